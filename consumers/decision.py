"""The decision rule: when do the workers' votes settle an item, and when must the judge decide.

This is the only place the rule lives; the aggregator, the evaluation and the
calibration all call it, so what is measured offline is what runs live.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from common.schemas import Vote
from common.settings import Scheme, Settings


@dataclass(frozen=True)
class Rule:
    """How votes agree.

    - ``majority``: a label needs ``quorum`` counted votes and more than any other label.
    - ``weighted``: each counted vote weighs its confidence (1 when the backend gives none);
      a label needs a summed weight of ``min_weight`` (default: half the fleet) and more
      than any other label, so two unsure votes no longer outvote the judge.
    - ``unanimous``: every worker must cast a counted vote for the same label.

    With a ``threshold``, votes less confident than it do not count at all (the paper's
    confidence-threshold majority); abstentions never count.
    """

    n_workers: int
    quorum: int
    threshold: float | None = None
    scheme: Scheme = "majority"
    min_weight: float | None = None

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(
            n_workers=len(settings.workers),
            quorum=settings.effective_quorum,
            threshold=settings.confidence_threshold,
            scheme=settings.agreement,
            min_weight=settings.min_weight,
        )

    def counts(self, vote: Vote) -> bool:
        if vote.label is None:
            return False
        if self.threshold is None:
            return True
        return vote.confidence is not None and vote.confidence >= self.threshold

    def weight(self, vote: Vote) -> float:
        if self.scheme != "weighted" or vote.confidence is None:
            return 1.0
        return vote.confidence

    @property
    def needed(self) -> float:
        """The score the winning label must reach."""
        if self.scheme == "unanimous":
            return self.n_workers
        if self.scheme == "weighted":
            return self.min_weight if self.min_weight is not None else self.n_workers / 2
        return self.quorum

    def describe(self) -> str:
        """``majority 2/3``, ``weighted >= 1.5``, ``unanimous 3/3``, plus the threshold."""
        if self.scheme == "weighted":
            text = f"weighted >= {self.needed:g}"
        else:
            text = f"{self.scheme} {self.needed:g}/{self.n_workers}"
        return text if self.threshold is None else f"{text}, conf >= {self.threshold:g}"


@dataclass(frozen=True)
class Outcome:
    kind: Literal["accept", "escalate", "wait"]
    label: str | None = None
    reason: str = ""


def decide(votes: Sequence[Vote], rule: Rule, *, final: bool = False) -> Outcome:
    """Accept a label, escalate to the judge, or wait for more votes.

    ``final`` means no more votes will come (all are in, or the vote timeout hit).
    The rule escalates early when the votes still missing could not make any label
    reach the needed score, so the judge is not kept waiting on a lost cause.
    """
    scores: dict[str, float] = defaultdict(float)
    for vote in votes:
        if vote.label is not None and rule.counts(vote):
            scores[vote.label] += rule.weight(vote)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    top_label, top = ranked[0] if ranked else (None, 0.0)
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    if top_label is not None and top >= rule.needed - 1e-9 and top > runner_up:
        return Outcome("accept", top_label, f"{_spread(scores)} of {len(votes)} votes")
    missing = 0 if final else max(rule.n_workers - len(votes), 0)
    if missing and top + missing >= rule.needed - 1e-9:
        return Outcome("wait", reason=f"{len(votes)}/{rule.n_workers} votes in")
    return Outcome(
        "escalate",
        reason=f"no agreement ({rule.describe()}): {len(votes)}/{rule.n_workers} votes, "
        f"counted {_spread(scores) or 'none'}",
    )


def _spread(scores: dict[str, float]) -> str:
    return ", ".join(f"{label}={n:g}" for label, n in sorted(scores.items(), key=lambda kv: -kv[1]))
