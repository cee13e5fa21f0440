"""What the fleet has learned from its judge, and what a label costs against the judge alone:
the readings ``status`` and the exporter show beside the queues.

- Reliability: per task and voter, how often its answers agreed with the judge's label on
  the items the fleet trusts (the judge's decisions and audits: the lessons, as
  ``consumers.reliability`` counts them); a student's row is its accuracy on those labels.
- Cost: model seconds (the ``model_call_seconds`` sums: each batch's wall time, workers,
  judge and audits) per final label, against the judge's seconds per item it answered —
  what a label would cost if the judge labeled everything.
- The audits' agreement as a Wilson score interval's lower bound (95%): the rate the
  accepted labels agree with the judge at least, given how many were audited; and, for the
  posterior rule, each task's threshold with the bound it keeps (``fit_threshold``).
"""

from __future__ import annotations

from collections import defaultdict

from redis import Redis

from common import metrics
from common.settings import Settings
from consumers.decision import fit_policy
from consumers.lessons import LessonFeed
from consumers.reliability import Reliability
from tribunal.ops.queues import StatSample
from tribunal.ops.readmodels import Cost, TaskThreshold, TierCost, VoterReliability


def read_learning(
    redis: Redis, settings: Settings
) -> tuple[tuple[VoterReliability, ...], tuple[TaskThreshold, ...]]:
    """Every voter's agreement with the judge, by task, over the newest lessons (the
    posterior rule's window: ``reliability_window`` per partition), and, for the posterior
    rule, each task's threshold as the aggregator chooses it from the same lessons."""
    table = Reliability.of(settings)
    feed = LessonFeed(redis, settings.namespace, settings.partitions, "status")
    table.learn(feed.latest(settings.reliability_window))
    voters = tuple(
        VoterReliability(task, voter, n, round(agree / n, 4))
        for task, voter, agree, n in table.agreement()
    )
    if settings.agreement != "posterior":
        return voters, ()
    table.refit(fit_policy(settings))
    # what consumers.aggregator sends past the first tier while a task accepts nothing
    explored = settings.explore_fraction if len(settings.worker_tiers) > 1 else None
    thresholds = tuple(
        TaskThreshold(task, t.value, t.bound, t.items, explored if t.value is None else None)
        for task, t in sorted(table.thresholds.items())
    )
    return voters, thresholds


def cost_of(stats: list[StatSample], tiers: list[list[str]]) -> Cost:
    """The cost readings from the fleet counters: model seconds over the final labels, and
    the judge's over the items it answered (escalations, and audits it gave a label); and
    per label, what each of ``tiers`` (worker names, cheapest first) and the judge spent."""
    labels = int(sum(s.value for s in stats if s.name == metrics.DECISIONS))
    judge_items = int(
        sum(s.value for s in stats if s.name == metrics.ESCALATIONS)
        + sum(
            s.value
            for s in stats
            if s.name == metrics.AUDITS and s.labels.get("outcome") in ("agree", "disagree")
        )
    )
    spent_by: defaultdict[str, float] = defaultdict(float)  # by worker, "judge" among them
    for s in stats:
        if s.name == metrics.MODEL_CALL and s.suffix == "sum":
            spent_by[s.labels.get("worker", "")] += s.value
    spent, judge = sum(spent_by.values()), spent_by.get("judge", 0.0)
    per_label = spent / labels if labels else None
    per_judged = judge / judge_items if judge_items else None
    ratio = per_label / per_judged if per_label is not None and per_judged else None
    groups = [*(("+".join(t), t) for t in tiers), ("judge", ["judge"])]
    by_tier = tuple(
        TierCost(name, round(sum(spent_by.get(w, 0.0) for w in workers) / labels, 4))
        for name, workers in (groups if labels else [])
    )
    return Cost(
        model_seconds=round(spent, 3),
        labels=labels,
        per_label_s=_round(per_label),
        judge_seconds=round(judge, 3),
        judge_items=judge_items,
        judge_per_item_s=_round(per_judged),
        ratio=_round(ratio),
        by_tier=by_tier,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
