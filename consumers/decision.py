"""The decision rule: when do the workers' votes settle an item, and when must the judge decide.

This is the only place a rule lives. Each agreement scheme is one class here — how a vote
weighs, the score a label needs, how the rule reads, the fleet-file lines that select it,
the variants calibration tries and which of them audits can judge — registered in
``SCHEMES``; the aggregator, ``evaluate`` and ``calibrate`` all go through it, so what is
measured offline is what runs live, and a new scheme is one more class in this module.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common.errors import ConfigurationError
from common.schemas import Vote
from common.settings import Settings
from consumers.reliability import FitPolicy, Reliability, tier_prefixes

# Confidence thresholds calibration tries for every scheme (None: every vote counts).
THRESHOLDS: tuple[float | None, ...] = (None, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


class UnknownScheme(ConfigurationError, ValueError):
    """A fleet file's ``agreement`` names no scheme of ``SCHEMES``."""


@dataclass(frozen=True)
class Rule:
    """How votes agree: the parameters every scheme shares. Votes less confident than
    ``threshold`` do not count at all (the paper's confidence-threshold majority);
    abstentions never count. A subclass per scheme says how a counted vote weighs and what a
    label needs; the label must also score more than any other."""

    n_workers: int
    quorum: int
    threshold: float | None = None
    min_weight: float | None = None
    # The scheme's name, set by each subclass: a field, so a report's copy of the rule
    # (``dataclasses.asdict``) names it and ``make(**that)`` builds the rule again.
    scheme: str = field(default="", init=False)
    # Whether the scheme can be scored offline from recorded votes alone (evaluate and
    # calibrate compare such schemes); a learned one needs the live fleet's counts.
    offline: ClassVar[bool] = True

    @classmethod
    def of(cls, settings: Settings, reliability: Reliability | None = None) -> Rule:
        """The fleet's rule (``agreement``, ``quorum``, ``confidence_threshold``,
        ``min_weight``; ``target_agreement`` for the posterior rule, which reads
        ``reliability``: an empty table when None). Raises UnknownScheme."""
        params: dict[str, int | float | None] = {
            "n_workers": len(settings.workers),
            "quorum": settings.effective_quorum,
            "threshold": settings.confidence_threshold,
            "min_weight": settings.min_weight,
        }
        if settings.agreement == Posterior.scheme:
            table = reliability if reliability is not None else Reliability.of(settings)
            tiers = tuple(tuple(tier) for tier in settings.worker_tiers)
            return Posterior(
                **params,  # type: ignore[arg-type]
                target=settings.target_agreement,
                table=table,
                tiers=tiers,
            )
        return make(settings.agreement, **params)

    def tally(self, votes: Sequence[Vote], task: str) -> dict[str, float]:
        """Each label's score from the votes that count."""
        scores: dict[str, float] = defaultdict(float)
        for vote in votes:
            if vote.label is not None and self.counts(vote):
                scores[vote.label] += self.weight(vote)
        return scores

    def reachable(self, top: float, missing: int) -> bool:
        """Whether ``missing`` more votes could still lift the leading score to ``needed``."""
        return top + missing >= self.needed - 1e-9

    def needed_for(self, task: str) -> float:
        """The score the winning label must reach on an item of ``task``."""
        return self.needed

    def counts(self, vote: Vote) -> bool:
        if vote.label is None:
            return False
        if self.threshold is None:
            return True
        return vote.confidence is not None and vote.confidence >= self.threshold

    def weight(self, vote: Vote) -> float:
        return 1.0

    @property
    def needed(self) -> float:
        """The score the winning label must reach."""
        raise NotImplementedError

    def describe(self) -> str:
        """``majority 2/3``, ``weighted >= 1.5``, ``unanimous 3/3``, plus the threshold."""
        text = self.headline()
        return text if self.threshold is None else f"{text}, conf >= {self.threshold:g}"

    def headline(self) -> str:
        """What a label needs, in a few words (``describe`` adds the threshold)."""
        return f"{self.scheme} {self.needed:g}/{self.n_workers}"

    def fleet_lines(self) -> str:
        """What to put at the top of a fleet file (before the first [table]) to run this."""
        lines = [f'agreement = "{self.scheme}"', *self._own_lines()]
        if self.threshold is None:
            lines.append("# confidence_threshold: leave unset (every vote counts)")
        else:
            lines.append(f"confidence_threshold = {self.threshold:g}")
        return "\n".join(lines)

    def _own_lines(self) -> list[str]:
        return []

    @classmethod
    def sweep(cls, n_workers: int, min_weight: float | None) -> list[Rule]:
        """The variants of this scheme calibration tries: every threshold of ``THRESHOLDS``."""
        majority = n_workers // 2 + 1
        return [cls(n_workers, majority, t, min_weight) for t in THRESHOLDS]

    def within(self, live: Rule) -> bool:
        """Accepts only items ``live`` accepts too, so audits of ``live``'s accepted items can
        judge it: the same scheme with at least its threshold."""
        return type(self) is type(live) and (self.threshold or 0.0) >= (live.threshold or 0.0)


@dataclass(frozen=True)
class Majority(Rule):
    """A label needs ``quorum`` counted votes."""

    scheme: str = field(default="majority", init=False)

    @property
    def needed(self) -> float:
        return self.quorum

    def _own_lines(self) -> list[str]:
        return [f"quorum = {self.quorum}"]

    @classmethod
    def sweep(cls, n_workers: int, min_weight: float | None) -> list[Rule]:
        """Every quorum from a majority up to one short of every worker (that is unanimity)."""
        majority = n_workers // 2 + 1
        return [
            cls(n_workers, quorum, t, min_weight)
            for quorum in range(majority, max(n_workers, majority + 1))
            for t in THRESHOLDS
        ]

    def within(self, live: Rule) -> bool:
        return super().within(live) and self.quorum >= live.quorum


@dataclass(frozen=True)
class Weighted(Rule):
    """Each counted vote weighs its confidence (1 when the backend gives none); a label
    needs a summed weight of ``min_weight`` (default: half the fleet), so two unsure votes no
    longer outvote the judge."""

    scheme: str = field(default="weighted", init=False)

    def weight(self, vote: Vote) -> float:
        return 1.0 if vote.confidence is None else vote.confidence

    @property
    def needed(self) -> float:
        return self.min_weight if self.min_weight is not None else self.n_workers / 2

    def headline(self) -> str:
        return f"weighted >= {self.needed:g}"

    def _own_lines(self) -> list[str]:
        return [f"min_weight = {self.needed:g}"]


@dataclass(frozen=True)
class Unanimous(Rule):
    """Every worker must cast a counted vote for the same label."""

    scheme: str = field(default="unanimous", init=False)

    @property
    def needed(self) -> float:
        return self.n_workers

    def within(self, live: Rule) -> bool:
        """Also within a live majority (every worker is at least its quorum); a weighted
        rule's sum is not bounded by unanimity."""
        floor = (self.threshold or 0.0) >= (live.threshold or 0.0)
        return super().within(live) or (isinstance(live, Majority) and floor)


@dataclass(frozen=True)
class Posterior(Rule):
    """The learned rule: the labels it accepts agree with the judge at least ``target``, with
    95% confidence. A label's score is the probability that the judge would give it, given
    the votes (``consumers.reliability``: each voter's answers per confidence band counted
    against the judge's labels); it is accepted when that reaches the task's threshold,
    which ``fit_threshold`` chooses from the judge's labels so that the bound holds, and
    chooses again as labels arrive. Until the labels support one, it accepts nothing: the
    judge decides. Votes below ``threshold`` still do not count; a label no counted vote
    named is never accepted.

    Offline (``evaluate``, ``calibrate``) the table is empty: there is nothing to sweep."""

    target: float = 0.95
    table: Reliability = field(default_factory=lambda: Reliability({}), compare=False, repr=False)
    # The tiers the votes come in (Settings.worker_tiers): the rule decides only once a
    # tier's votes are all in, as fit_threshold scores the items it chose the threshold on.
    tiers: tuple[tuple[str, ...], ...] = ()
    scheme: str = field(default="posterior", init=False)
    offline: ClassVar[bool] = False

    @property
    def needed(self) -> float:
        return self.target

    def needed_for(self, task: str) -> float:
        chosen = self.table.thresholds.get(task)
        return chosen.value if chosen and chosen.value is not None else math.inf

    def tally(self, votes: Sequence[Vote], task: str) -> dict[str, float]:
        """The posterior of each label some counted vote named: a label nobody voted for
        is never accepted, however likely the others make it."""
        prefixes = tier_prefixes(votes, self.tiers)
        counted = [v for v in prefixes[-1] if self.counts(v)] if prefixes else []
        voted = {v.label for v in counted}
        posterior = self.table.posterior(task, counted) if counted else {}
        return {label: p for label, p in posterior.items() if label in voted}

    def reachable(self, top: float, missing: int) -> bool:
        return missing > 0  # any vote still to come may raise the posterior

    def headline(self) -> str:
        return f"agreement with the judge >= {self.target:g}"

    def _own_lines(self) -> list[str]:
        return [f"target_agreement = {self.target:g}"]

    @classmethod
    def sweep(cls, n_workers: int, min_weight: float | None) -> list[Rule]:
        return []

    def within(self, live: Rule) -> bool:
        return False


# The schemes by name, simplest first (calibration prefers the simpler of equal rules).
SCHEMES: dict[str, type[Rule]] = {
    cls.scheme: cls for cls in (Majority, Weighted, Unanimous, Posterior)
}


def make(scheme: str, **params: int | float | None) -> Rule:
    """The rule of scheme ``scheme`` with ``params`` (``n_workers``, ``quorum``,
    ``threshold``, ``min_weight``): ``make(**dataclasses.asdict(rule))`` is ``rule``.
    Raises UnknownScheme."""
    cls = SCHEMES.get(scheme)
    if cls is None:
        raise UnknownScheme(f"unknown agreement {scheme!r} (known: {', '.join(SCHEMES)})")
    return cls(**params)  # type: ignore[arg-type]


def fit_policy(settings: Settings) -> FitPolicy:
    """How the posterior rule's thresholds are fitted for this fleet: its target, audit rate,
    tiers and which votes its rule counts."""
    rule = Rule.of(settings)
    tiers = settings.worker_tiers
    return FitPolicy(settings.target_agreement, settings.audit_fraction, tiers, rule.counts)


def candidate_rules(n_workers: int, min_weight: float | None = None) -> list[Rule]:
    """Every scheme's variants, simplest scheme first (what ``calibrate`` compares)."""
    return [rule for cls in SCHEMES.values() for rule in cls.sweep(n_workers, min_weight)]


def simplicity(rule: Rule) -> tuple[int, float, int]:
    """Larger is simpler: an earlier scheme, then a lower threshold, then a smaller quorum."""
    return (-list(SCHEMES).index(rule.scheme), -(rule.threshold or 0.0), -rule.quorum)


@dataclass(frozen=True)
class Ruling:
    """What ``decide`` rules for an item: accept ``label``, escalate to the judge, or wait for
    more votes; ``reason`` says why in a line (it goes into the final record)."""

    kind: Literal["accept", "escalate", "wait"]
    label: str | None = None
    reason: str = ""


def decide(votes: Sequence[Vote], rule: Rule, *, final: bool = False, task: str = "") -> Ruling:
    """Accept a label, escalate to the judge, or wait for more votes on an item of ``task``.

    ``final`` means no more votes will come (all are in, or the vote timeout hit).
    The rule escalates early when the votes still missing could not make any label
    reach the needed score, so the judge is not kept waiting on a lost cause.
    """
    scores = rule.tally(votes, task)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    top_label, top = ranked[0] if ranked else (None, 0.0)
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    if top_label is not None and top >= rule.needed_for(task) - 1e-9 and top > runner_up:
        return Ruling("accept", top_label, f"{_spread(scores)} of {len(votes)} votes")
    missing = 0 if final else max(rule.n_workers - len(votes), 0)
    if missing and rule.reachable(top, missing):
        return Ruling("wait", reason=f"{len(votes)}/{rule.n_workers} votes in")
    # A learned rule's bar is the task's: say it, else the scores read as if 0.5 were enough.
    needed = rule.needed_for(task)
    bar = f"; {task} needs {needed:g}" if isinstance(rule, Posterior) else ""
    bar = f"; {task} accepts nothing yet" if math.isinf(needed) else bar
    return Ruling(
        "escalate",
        reason=f"no agreement ({rule.describe()}{bar}): {len(votes)}/{rule.n_workers} votes, "
        f"counted {_spread(scores) or 'none'}",
    )


def _spread(scores: dict[str, float]) -> str:
    return ", ".join(
        f"{label}={n:.3g}" for label, n in sorted(scores.items(), key=lambda kv: -kv[1])
    )
