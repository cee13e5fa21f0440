"""``tribunal calibrate``: pick the agreement rule and confidence threshold from measured answers.

The answers come from an evaluation report (every model on every item) or from the
live fleet's audits (the judge's answer on a sample of accepted items). Every
candidate rule is scored with ``consumers.decision`` itself; the recommendation is
the rule that lets the workers settle the most items while the labels they settle
still agree with the judge at least ``target`` of the time, or, given a judge-call
budget, the most trustworthy rule that stays within it.

Audits only show items the live rule accepted, so from audits only rules at least
as strict as the live one can be judged (their acceptance is scaled by the live
acceptance rate); a looser rule needs an evaluation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
from redis import Redis
from rich.console import Console

from common import metrics
from common.keys import Keys
from common.settings import Settings
from consumers.decision import Rule, UnknownScheme, candidate_rules, make, simplicity
from tribunal.ops.finals import Cursors, FinalRecords, collect
from tribunal.ops.queues import read_stats
from tribunal.quality.report import RULE_COLUMNS, RULE_LEGEND, rule_table
from tribunal.quality.scoring import (
    Observation,
    RuleScore,
    model_seconds,
    score_rule,
    worker_names,
)

MIN_ACCEPTED = 20  # fewer accepted items say too little about their agreement


@dataclass(frozen=True)
class Candidate:
    rule: Rule
    score: RuleScore


@dataclass(frozen=True)
class Goal:
    target_agreement: float | None = 0.9
    judge_budget: float | None = None  # largest share of items the judge may get
    min_accepted: int = MIN_ACCEPTED

    def describe(self) -> str:
        parts = []
        if self.target_agreement is not None:
            parts.append(f"accepted labels agree with the judge >= {self.target_agreement:.0%}")
        if self.judge_budget is not None:
            parts.append(f"judge calls <= {self.judge_budget:.0%}")
        return " and ".join(parts) or "no constraint"


def score_candidates(
    observations: Sequence[Observation],
    rules: Sequence[Rule],
    live_acceptance: float | None = None,
) -> list[Candidate]:
    """Each rule's score; ``live_acceptance`` scales acceptance when the observations are
    audits (a sample of the items the live rule accepted)."""
    audits = live_acceptance is not None
    live_acceptance = live_acceptance or 0.0
    out = []
    model_time = model_seconds(observations)
    for rule in rules:
        s = score_rule(observations, rule, model_time)
        if audits:
            acceptance = s.acceptance * live_acceptance
            s = replace(s, acceptance=acceptance, judge_calls=1 - acceptance, speedup=None)
        out.append(Candidate(rule, s))
    return out


def recommend(candidates: Sequence[Candidate], goal: Goal) -> Candidate | None:
    """The rule settling most items within the goal, then the one agreeing most with the
    judge (with a budget and no target: the one agreeing most, then settling most). Ties
    go to the simpler rule: majority before weighted before unanimous, then the lower
    threshold, then the smaller quorum."""

    def fits(c: Candidate) -> bool:
        s = c.score
        if s.accepted < goal.min_accepted or s.judge_agreement is None:
            return False
        if goal.target_agreement is not None and s.judge_agreement < goal.target_agreement:
            return False
        return goal.judge_budget is None or s.judge_calls <= goal.judge_budget + 1e-9

    feasible = [c for c in candidates if fits(c)]
    if not feasible:
        return None
    if goal.target_agreement is None:
        return max(
            feasible,
            key=lambda c: (
                c.score.judge_agreement or 0.0,
                c.score.acceptance,
                *simplicity(c.rule),
            ),
        )
    return max(
        feasible,
        key=lambda c: (c.score.acceptance, c.score.judge_agreement, *simplicity(c.rule)),
    )


def rule_of_report(report: Any) -> Rule | None:
    """The rule the evaluated fleet ran, when the report says (older reports do not)."""
    params = report.get("fleet", {}).get("rule_params") if isinstance(report, dict) else None
    if not isinstance(params, dict):
        return None
    try:
        return make(**params)
    except (UnknownScheme, TypeError):  # a scheme this version lacks, or other fields
        return None


def observations_from_report(report: Any, task: str | None) -> list[Observation]:
    rows = report.get("observations") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise ValueError("not an evaluation report: no 'observations' list")
    observations = [Observation.model_validate(row) for row in rows]
    return [o for o in observations if task is None or o.task == task]


def read_audits(redis: Redis, partitions: Sequence[Keys], task: str | None) -> list[Observation]:
    """The audits streams as observations, one per item (a re-delivered audit counts once)."""
    outcome, cursors = FinalRecords(), Cursors.of(partitions, final=False, audits=True)
    while True:  # collect reads up to 1,000 entries per stream and call
        before = len(outcome.audits)
        collect(redis, cursors, outcome)
        if len(outcome.audits) == before:
            break
    seen: dict[str, Observation] = {}
    for a in outcome.audits:
        if (task is None or a.task == task) and a.id not in seen:
            seen[a.id] = Observation(
                id=a.id, task=a.task, gold=a.gold, votes=a.votes, judge=a.judge
            )
    return list(seen.values())


def live_acceptance(redis: Redis, settings: Settings) -> float | None:
    """Share of final labels the workers settled, from the fleet's counters."""
    by_source = {"workers": 0.0, "judge": 0.0}
    for stat in read_stats(redis, settings):
        if stat.name == metrics.DECISIONS and stat.labels.get("source") in by_source:
            by_source[stat.labels["source"]] += stat.value
    total = sum(by_source.values())
    return by_source["workers"] / total if total else None


def stricter_rules(live: Rule) -> list[Rule]:
    """Candidates that accept only items the live rule accepts too: the ones audits can
    judge (``Rule.within``)."""
    return [r for r in candidate_rules(live.n_workers, live.min_weight) if r.within(live)]


def as_json(candidates: Sequence[Candidate], best: Candidate | None, goal: Goal) -> bytes:
    return orjson.dumps(
        {
            "goal": asdict(goal),
            "recommended": asdict(best.score) if best else None,
            "fleet_lines": best.rule.fleet_lines() if best else None,
            "candidates": [asdict(c.score) for c in candidates],
        },
        option=orjson.OPT_INDENT_2,
    )


def frontier(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The rules no other beats on both acceptance and agreement: the trade-off curve."""
    out: list[Candidate] = []
    best = -1.0
    ranked = sorted(candidates, key=lambda c: (-c.score.acceptance, -_agreement(c)))
    for c in ranked:
        if c.score.judge_agreement is not None and _agreement(c) > best:
            out.append(c)
            best = _agreement(c)
    return out


def _agreement(c: Candidate) -> float:
    return c.score.judge_agreement or 0.0


def run_calibrate(
    console: Console,
    observations: Sequence[Observation],
    live: Rule,
    goal: Goal,
    from_audits: float | None = None,
    as_json_out: bool = False,
) -> int:
    """The command: score the candidates, print the trade-off and the lines to paste.
    ``from_audits`` is the live acceptance rate when the observations are audits."""
    if not observations:
        console.print("[red]error:[/] no answers to calibrate on")
        return 2
    if from_audits is None:
        live = replace(live, n_workers=len(worker_names(observations)) or live.n_workers)
        rules = candidate_rules(live.n_workers, live.min_weight)
        candidates = score_candidates(observations, [live, *rules])
    else:
        candidates = score_candidates(observations, [live, *stricter_rules(live)], from_audits)
    best = recommend(candidates, goal)
    if as_json_out:
        sys.stdout.buffer.write(as_json(candidates, best, goal) + b"\n")
        return 0 if best else 1
    source = "audits" if from_audits is not None else "evaluation"
    console.print(
        f"[bold]calibration[/] on {len(observations)} items ({source}); goal: {goal.describe()}"
    )
    shown = frontier(candidates)
    for extra in (candidates[0], best):
        if extra is not None and extra not in shown:
            shown.append(extra)
    shown.sort(key=lambda c: -c.score.acceptance)
    marked = best.score.rule if best else None
    scores = [c.score for c in shown]
    compact = [c for c in RULE_COLUMNS if c[1] not in ("accepted_accuracy", "judged_accuracy")]
    console.print(rule_table("trade-off (rules no other beats on both)", scores, marked, compact))
    console.print(f"[dim]{RULE_LEGEND}")
    console.print(f"now: {live.describe()}")
    if best is None:
        big = [c for c in candidates if c.score.accepted >= goal.min_accepted]
        top = max((_agreement(c) for c in big), default=0.0)
        console.print(
            f"[yellow]no rule meets the goal[/] (best agreement with the judge: {top:.1%}, "
            f"needing {goal.min_accepted}+ accepted items); lower --target, raise "
            "--judge-budget, or use better worker models"
        )
        return 1
    s = best.score
    console.print(
        f"[green]recommended:[/] {best.rule.describe()}: workers settle {s.acceptance:.1%}, "
        f"the judge gets {s.judge_calls:.1%}, accepted labels agree with it "
        f"{s.judge_agreement or 0:.1%} (95% low {s.judge_agreement_low or 0:.1%})"
    )
    console.print("put these at the top of the fleet file (before the first \\[table]):")
    console.print(best.rule.fleet_lines(), markup=False, highlight=False)
    return 0
