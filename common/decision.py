"""The decision rule: when do the workers' votes settle an item, and when must the judge decide.

This is the only place the rule lives; the aggregator and any evaluation call it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from common.schemas import Vote


@dataclass(frozen=True)
class Rule:
    n_workers: int
    quorum: int
    threshold: float | None = None

    def counts(self, vote: Vote) -> bool:
        """Abstentions never count; with a threshold, neither do unsure votes."""
        if vote.label is None:
            return False
        if self.threshold is None:
            return True
        return vote.confidence is not None and vote.confidence >= self.threshold


@dataclass(frozen=True)
class Outcome:
    kind: Literal["accept", "escalate", "wait"]
    label: str | None = None
    reason: str = ""


def decide(votes: Sequence[Vote], rule: Rule, *, final: bool = False) -> Outcome:
    """Accept a label, escalate to the judge, or wait for more votes.

    ``final`` means no more votes will come (all are in, or the vote timeout hit).
    A label is accepted when at least ``quorum`` counted votes name it and no other
    label has as many. The rule escalates early when the votes still missing could
    not reach a quorum, so the judge is not kept waiting on a lost cause.
    """
    tally = Counter(v.label for v in votes if rule.counts(v))
    ranked = tally.most_common(2)
    top_label, top = ranked[0] if ranked else (None, 0)
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    if top_label is not None and top >= rule.quorum and top > runner_up:
        return Outcome("accept", top_label, f"{top}/{len(votes)} votes for {top_label}")
    missing = 0 if final else max(rule.n_workers - len(votes), 0)
    if missing and top + missing >= rule.quorum:
        return Outcome("wait", reason=f"{len(votes)}/{rule.n_workers} votes in")
    return Outcome("escalate", reason=_why_no_quorum(votes, tally, rule))


def _why_no_quorum(votes: Sequence[Vote], tally: Counter[str | None], rule: Rule) -> str:
    counted = sum(tally.values())
    spread = ", ".join(f"{label}={n}" for label, n in tally.most_common()) or "none"
    return (
        f"no quorum of {rule.quorum}: {len(votes)}/{rule.n_workers} votes, "
        f"{counted} counted ({spread})"
    )
