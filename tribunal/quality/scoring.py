"""Scores of a labeled run: how good each model is, and what each agreement rule trades.

Pure functions over ``Observation``s (every model's answer on one item), so the
same numbers come out whether the answers were collected offline, from a fleet
run, or from live audits. The rule applied is ``consumers.decision`` itself.

The evaluation report is typed too: ``EvaluationReport`` (what ``tribunal evaluate``
writes as JSON, ``model_dump(mode="json")``) holds a ``TaskReport`` per task, made of
``RuleScore``s, ``ModelRow``s and a ``Confusion``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, SerializationInfo, field_serializer

from common.schemas import Vote
from consumers.decision import SCHEMES, Majority, Rule, candidate_rules, decide


class Observation(BaseModel):
    """One labeled item and every answer collected for it."""

    id: str
    task: str
    gold: str | None = None
    votes: list[Vote]
    judge: Vote | None = None  # the judge's answer, asked for every item under evaluation
    # An injected twin names its clean item and the label it pushes (tribunal.quality.injection)
    twin_of: str | None = None
    target: str | None = None
    flagged: list[str] = []  # the cues the injection detector found (common.injection)
    escalate: bool = False  # flagged under injection = "review": the judge decides it


@dataclass(frozen=True)
class RuleScore:
    """What one agreement rule does on the observations."""

    rule: str
    scheme: str
    quorum: int
    threshold: float | None
    accepted: int
    acceptance: float  # share settled by the workers
    judge_calls: float  # share sent to the judge
    judge_agreement: float | None  # accepted labels equal to the judge's answer
    judge_agreement_low: float | None  # 95% Wilson lower bound of it
    accuracy: float | None  # final labels vs gold
    accepted_accuracy: float | None
    judged_accuracy: float | None
    speedup: float | None  # judge-only model-seconds / cascade model-seconds


class ModelRow(BaseModel):
    """One model on one task: answers given, abstentions among them, accuracy vs gold and
    agreement with the judge (shares; None without gold, and for the judge itself), and
    seconds per item."""

    items: int
    abstained: int
    accuracy: float | None
    judge_agreement: float | None
    seconds_per_item: float | None


Reference = Literal["gold", "judge"]


class Confusion(BaseModel):
    """Counts of items: ``matrix[i][j]`` items with reference label ``labels[i]`` (gold, or
    the judge's answer where no item has gold) got the final label ``labels[j]``; the last
    label is ``none`` (no label) unless that row and column are empty."""

    reference: Reference
    labels: list[str]
    matrix: list[list[int]]


class TaskReport(BaseModel):
    """Every number of the report for one task: items (and with gold), its labels, the
    configured rule and its score, a ``ModelRow`` per model (``judge`` last), pairwise
    agreement (``"a / b"`` -> share, None when they never both labeled), the schemes side by
    side (the configured rule first), every candidate rule of the sweep, the confusion."""

    items: int
    with_gold: int
    labels: list[str]
    rule: str
    configured: RuleScore
    models: dict[str, ModelRow]
    pairwise: dict[str, float | None]
    schemes: list[RuleScore]
    sweep: list[RuleScore]
    confusion: Confusion


class FleetReport(BaseModel):
    """The evaluated fleet: worker name -> backend, the judge's backend, the rule (described,
    and its parameters) and the policy."""

    workers: dict[str, str]
    judge: str
    rule: str
    rule_params: Rule
    policy: str


class Skipped(BaseModel):
    """A record that could not be scored: where it was (file:line, or an item id) and why."""

    where: str
    reason: str


class FlipRow(BaseModel):
    """One model (or the fleet) on the pairs: accuracy on the clean items and on their twins
    (shares of ``pairs``), and ``flipped`` of the ``right_on_clean`` pairs given the
    attacker's label (``flip_rate``, None when it was right on none)."""

    pairs: int
    clean_accuracy: float | None
    injected_accuracy: float | None
    right_on_clean: int
    flipped: int
    flip_rate: float | None


class InjectionReport(BaseModel):
    """Every injection number of one task: pairs, shares of clean and of injected items the
    detector flagged, a ``FlipRow`` per worker, ``judge`` and ``fleet`` (in that order)."""

    pairs: int
    flagged_clean: float | None
    flagged_injected: float | None
    models: dict[str, FlipRow]
    ignored: dict[str, str] = {}  # twin id -> why it was not scored


class EvaluationReport(BaseModel):
    """The JSON report of ``tribunal evaluate``: where the items came from, how the answers
    were collected (``offline`` or ``fleet``, seconds), the fleet, what was skipped, a
    ``TaskReport`` per task (sorted by name), every ``Observation`` (written without its
    empty fields) and, for tasks with injected twins, their ``InjectionReport``."""

    source: str
    mode: str
    seconds: float
    fleet: FleetReport
    skipped: list[Skipped]
    tasks: dict[str, TaskReport]
    observations: list[Observation]
    injection: dict[str, InjectionReport] = {}  # by task, where the file pairs injected twins

    @field_serializer("observations")
    def _observations(
        self, observations: list[Observation], info: SerializationInfo
    ) -> list[dict[str, Any]]:
        return [o.model_dump(mode=info.mode, exclude_none=True) for o in observations]


def fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def wilson_low(hits: int, total: int, z: float = 1.96) -> float | None:
    """Lower end of the 95% interval of a proportion: honest about small samples."""
    if not total:
        return None
    p = hits / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (centre - margin) / (1 + z * z / total)


def seconds_per_item(votes: Iterable[Vote | None]) -> float | None:
    latencies = [v.latency_ms / 1000 for v in votes if v is not None]
    return statistics.fmean(latencies) if latencies else None


def worker_names(observations: Sequence[Observation]) -> list[str]:
    return sorted({v.worker for o in observations for v in o.votes})


def score_rule(
    observations: Sequence[Observation],
    rule: Rule,
    model_time: tuple[float | None, float] | None = None,
) -> RuleScore:
    """Apply ``rule`` to every item as if all its votes were in; the judge decides the rest.
    ``model_time`` (see ``model_seconds``) saves recomputing it when scoring many rules."""
    accepted = audited = agree = right = accepted_right = judged = judged_right = 0
    with_gold = accepted_gold = judged_gold = 0
    for o in observations:
        settled, label = final_label(o, rule)
        if settled:
            accepted += 1
            if o.judge is not None and o.judge.label is not None:  # a judge abstention: no say
                audited += 1
                agree += o.judge.label == label
        else:
            judged += 1
        if o.gold is not None:
            with_gold += 1
            right += label == o.gold
            if settled:
                accepted_gold += 1
                accepted_right += label == o.gold
            else:
                judged_gold += 1
                judged_right += label == o.gold
    n = len(observations)
    return RuleScore(
        rule=rule.describe(),
        scheme=rule.scheme,
        quorum=rule.quorum,
        threshold=rule.threshold,
        accepted=accepted,
        acceptance=accepted / n if n else 0.0,
        judge_calls=judged / n if n else 0.0,
        judge_agreement=fraction(agree, audited),
        judge_agreement_low=wilson_low(agree, audited),
        accuracy=fraction(right, with_gold),
        accepted_accuracy=fraction(accepted_right, accepted_gold),
        judged_accuracy=fraction(judged_right, judged_gold),
        speedup=_speedup(len(observations), judged, model_time or model_seconds(observations)),
    )


def final_label(o: Observation, rule: Rule) -> tuple[bool, str | None]:
    """(settled by the workers?, the item's final label) under ``rule``, all votes in."""
    outcome = decide(o.votes, rule, final=True)
    if outcome.kind == "accept" and not o.escalate:
        return True, outcome.label
    return False, o.judge.label if o.judge else None


def model_seconds(observations: Sequence[Observation]) -> tuple[float | None, float]:
    """(the judge's seconds per item, all workers' seconds per item together): the same
    for every rule."""
    workers_s = sum(
        seconds_per_item(v for o in observations for v in o.votes if v.worker == w) or 0.0
        for w in worker_names(observations)
    )
    return seconds_per_item(o.judge for o in observations), workers_s


def _speedup(n: int, judge_calls: int, model_time: tuple[float | None, float]) -> float | None:
    """Model-seconds of judge-only over the cascade's: every worker on every item plus the
    judge on the items it had to decide (the parallel policy; staged spends less)."""
    judge_s, workers_s = model_time
    if not judge_s:
        return None
    cascade = workers_s * n + judge_s * judge_calls
    return judge_s * n / cascade if cascade else None


def model_table(observations: Sequence[Observation]) -> dict[str, ModelRow]:
    """Per model (each worker by name, then ``judge``): accuracy vs gold, agreement with the
    judge, abstentions, seconds per item."""
    table: dict[str, ModelRow] = {}
    for name in worker_names(observations):
        pairs = [(o, v) for o in observations for v in o.votes if v.worker == name]
        table[name] = _model_row(pairs, judge=True)
    table["judge"] = _model_row([(o, o.judge) for o in observations if o.judge], judge=False)
    return table


def _model_row(pairs: Sequence[tuple[Observation, Vote]], judge: bool) -> ModelRow:
    gold = [(o.gold, v.label) for o, v in pairs if o.gold is not None]
    both = [(o.judge.label, v.label) for o, v in pairs if judge and o.judge and o.judge.label]
    return ModelRow(
        items=len(pairs),
        abstained=sum(1 for _, v in pairs if v.label is None),
        accuracy=fraction(sum(g == lb for g, lb in gold), len(gold)),
        judge_agreement=fraction(sum(j == lb for j, lb in both), len(both)) if judge else None,
        seconds_per_item=seconds_per_item(v for _, v in pairs),
    )


def pairwise(observations: Sequence[Observation]) -> dict[str, float | None]:
    """How often two workers give the same label, over items both labeled."""
    out: dict[str, float | None] = {}
    for a, b in combinations(worker_names(observations), 2):
        same = total = 0
        for o in observations:
            labels = {v.worker: v.label for v in o.votes}
            if labels.get(a) is not None and labels.get(b) is not None:
                total += 1
                same += labels[a] == labels[b]
        out[f"{a} / {b}"] = fraction(same, total)
    return out


def confusion(observations: Sequence[Observation], rule: Rule, labels: Sequence[str]) -> Confusion:
    """Final label (rows: gold, or the judge where no gold) against the cascade's label."""
    axis = [*labels, "none"]
    matrix = [[0] * len(axis) for _ in axis]
    position = {label: i for i, label in enumerate(labels)}
    none = len(labels)
    reference: Reference = "gold" if any(o.gold is not None for o in observations) else "judge"
    for o in observations:
        truth = o.gold if reference == "gold" else (o.judge.label if o.judge else None)
        _, label = final_label(o, rule)
        matrix[position.get(truth or "", none)][position.get(label or "", none)] += 1
    if not any(matrix[none]) and not any(row[none] for row in matrix):
        axis, matrix = axis[:none], [row[:none] for row in matrix[:none]]
    return Confusion(reference=reference, labels=axis, matrix=matrix)


def evaluate_task(
    observations: Sequence[Observation], rule: Rule, labels: Sequence[str]
) -> TaskReport:
    """Every number of the report for one task."""
    n_workers = max(rule.n_workers, len(worker_names(observations)))
    rule = replace(rule, n_workers=n_workers)
    schemes = [
        rule,
        *(cls(n_workers, rule.quorum) for cls in SCHEMES.values() if cls.offline),
        Majority(n_workers, rule.quorum, 0.8),
    ]
    model_time = model_seconds(observations)
    compared = {r.describe(): score_rule(observations, r, model_time) for r in schemes}
    golds = Counter(o.gold for o in observations if o.gold is not None)
    return TaskReport(
        items=len(observations),
        with_gold=sum(golds.values()),
        labels=list(labels),
        rule=rule.describe(),
        configured=compared[rule.describe()],
        models=model_table(observations),
        pairwise=pairwise(observations),
        schemes=list(compared.values()),
        sweep=[score_rule(observations, r, model_time) for r in candidate_rules(n_workers)],
        confusion=confusion(observations, rule, labels),
    )
