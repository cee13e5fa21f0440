"""How far each voter can be trusted, learned from the labels the fleet trusts.

Dawid and Skene (1979, "Maximum likelihood estimation of observer error-rates using the EM
algorithm") describe each annotator by a confusion matrix: how often it answers each label
when the truth is each label. Here the truth is the judge's label (the fleet's aim is to
agree with its judge, cheaply), so no EM is needed: every lesson (``consumers.lessons``: a
judge decision or audit, with the votes the item had) counts, per task and voter, its answer
against the judge's. An answer is a label with its confidence band (``BANDS``): a voter that
says 0.99 is trusted as far as its 0.99s have agreed with the judge, whatever the number
claims — the counts calibrate it.

The counts are a fold over the lessons stream, so they are exactly as many as the lessons
(a decision's lesson is written once, with the decision), and they cover the last ``window``
lessons of each task: a student that got better is judged on what it does now. Audits of
accepted items (``audit_fraction``) keep them honest: the judge's decisions alone are the
hard items. ``Reliability.posterior`` combines votes as naive Bayes (answers independent
given the judge's label) with Laplace smoothing and a uniform prior over the labels: only the
votes are evidence, so a voter nobody has checked yet counts for nothing.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.schemas import Vote
from common.settings import Settings
from consumers.lessons import Lesson

# Confidence bands (lower edges): an answer is "label@k" with k the band's index. A vote
# without a confidence is band "n". The top bands are narrow because naive Bayes (the
# student) crowds its probabilities there: its 0.9999s are right more often than its 0.99s.
BANDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)

Key = tuple[str, str, str, str]  # task, voter, answer, judge's label

# The acceptance thresholds on the posterior that ``fit_threshold`` tests, strictest first.
THRESHOLDS = (0.9999, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
MIN_EVIDENCE = 20  # labeled items (effective) a threshold needs before it is tested


@dataclass(frozen=True)
class Threshold:
    """The posterior a label needs on a task (``value``; None: accept nothing yet), the
    95% lower bound on the agreement with the judge of the labels it accepts (``bound``),
    and how many labeled items that bound rests on (``items``, effective: audits weigh
    1 / sampling rate)."""

    value: float | None
    bound: float | None
    items: float


def answer(vote: Vote) -> str | None:
    """A vote as the table counts it: ``label@band``; None for an abstention."""
    if vote.label is None:
        return None
    if vote.confidence is None:
        return f"{vote.label}@n"
    return f"{vote.label}@{bisect.bisect_right(BANDS, vote.confidence) - 1}"


class Reliability:
    """Each voter's answers against the judge's labels over the last ``window`` lessons of
    each task, and the posterior they give. ``labels`` maps each task to its label set.
    Not thread-safe."""

    def __init__(
        self, labels: Mapping[str, Sequence[str]], window: int = 2000, pseudo_count: float = 1.0
    ) -> None:
        self.labels = {task: list(names) for task, names in labels.items()}
        self.window = window
        self.pseudo_count = pseudo_count
        self.counts: Counter[Key] = Counter()
        self.per_truth: Counter[tuple[str, str, str]] = Counter()  # (task, voter, truth)
        self.lessons: Counter[str] = Counter()  # task -> lessons counted
        self._recent: dict[str, deque[tuple[list[Key], Lesson]]] = {}
        self.thresholds: dict[str, Threshold] = {}  # task -> the posterior it needs now

    @classmethod
    def of(cls, settings: Settings) -> Reliability:
        """An empty table for the fleet's tasks and its ``reliability_window``."""
        labels = {name: task.labels for name, task in settings.all_tasks.items()}
        return cls(labels, window=settings.reliability_window)

    def learn(self, lessons: Iterable[Lesson]) -> None:
        """Count each lesson's votes against its label, oldest first; lessons of other
        tasks, or with a label outside the task's set, are not counted."""
        for lesson in lessons:
            # A gold lesson has no votes: it says nothing of the voters, and in the window it
            # would only push out lessons that do.
            if lesson.label not in self.labels.get(lesson.task, ()) or not lesson.votes:
                continue
            keys = [
                (lesson.task, vote.worker, given, lesson.label)
                for vote in lesson.votes
                if (given := answer(vote)) is not None
            ]
            recent = self._recent.setdefault(lesson.task, deque())
            recent.append((keys, lesson))
            self._add(keys, 1)
            self.lessons[lesson.task] += 1
            if len(recent) > self.window:
                self._add(recent.popleft()[0], -1)
                self.lessons[lesson.task] -= 1

    def load(self, counts: Mapping[Key, int]) -> None:
        """Replace the counts with ``counts``: (task, voter, answer, judge's label) -> items."""
        self.counts, self.per_truth, self._recent = Counter(), Counter(), {}
        for key, n in counts.items():
            self._add([key], n)

    def _add(self, keys: Sequence[Key], n: int) -> None:
        for key in keys:
            task, voter, _, truth = key
            self.counts[key] += n
            self.per_truth[(task, voter, truth)] += n

    def likelihood(self, task: str, voter: str, given: str, truth: str) -> float:
        """P(voter answers ``given`` | the judge's label is ``truth``), Laplace-smoothed:
        ``pseudo_count`` added to every possible answer (each label in each band, and "n"),
        so an answer never seen under some truth is rare there, not impossible — twenty
        agreements in a band and no disagreement weigh about 20:1, not infinitely."""
        answers = len(self.labels[task]) * (len(BANDS) + 1)
        seen = self.counts[(task, voter, given, truth)]
        total = self.per_truth[(task, voter, truth)]
        return (seen + self.pseudo_count) / (total + self.pseudo_count * answers)

    def posterior(self, task: str, votes: Sequence[Vote]) -> dict[str, float]:
        """P(the judge would say each label | these votes): label -> probability, summing to
        1 over the task's labels, from a uniform prior. Abstentions, and labels outside the
        task's set, carry no evidence. An unknown task: {}."""
        labels = self.labels.get(task)
        if not labels:
            return {}
        logs: dict[str, float] = {}
        for truth in labels:
            total = 0.0
            for vote in votes:
                given = answer(vote)
                if given is not None and vote.label in labels:
                    total += math.log(self.likelihood(task, vote.worker, given, truth))
            logs[truth] = total
        top = max(logs.values())
        weights = {label: math.exp(v - top) for label, v in logs.items()}
        norm = sum(weights.values())
        return {label: w / norm for label, w in weights.items()}

    def agreement(self) -> list[tuple[str, str, int, int]]:
        """(task, voter, answers that agreed with the judge, answers counted), sorted."""
        agree: Counter[tuple[str, str]] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        for (task, voter, given, truth), n in self.counts.items():
            total[(task, voter)] += n
            agree[(task, voter)] += n if given.partition("@")[0] == truth else 0
        return [(t, v, agree[(t, v)], n) for (t, v), n in sorted(total.items()) if n]

    def refit(self, policy: FitPolicy) -> None:
        """Choose each task's threshold again from the lessons counted now."""
        self.thresholds = {task: fit_threshold(self, task, policy) for task in self._recent}

    def counted(self, task: str) -> list[tuple[list[Key], Lesson]]:
        """The lessons of ``task`` counted now, oldest first, each with what it counted."""
        return list(self._recent.get(task, ()))

    def uncount(self, keys: Sequence[Key]) -> None:
        """Take one lesson's answers out of the counts (``recount`` puts them back)."""
        self._add(keys, -1)

    def recount(self, keys: Sequence[Key]) -> None:
        self._add(keys, 1)


@dataclass(frozen=True)
class FitPolicy:
    """What ``fit_threshold`` needs of the live rule, so it scores items as the rule decides
    them: the agreement to keep, the audit sampling rate, the tiers in the order they are
    asked, and which votes count (``Rule.counts``: a confidence threshold)."""

    target: float
    audit_fraction: float
    tiers: Sequence[Sequence[str]]
    counts: Callable[[Vote], bool]


def tier_prefixes(votes: Sequence[Vote], tiers: Sequence[Sequence[str]]) -> list[list[Vote]]:
    """The votes the rule decides on, tier by tier: those of tier 0, then of tiers 0-1, … as
    long as every worker of those tiers has voted (an abstention is a vote). No tiers: one
    prefix of every vote. The posterior rule decides only at these points."""
    if not tiers:
        return [list(votes)] if votes else []
    by_worker = {v.worker: v for v in votes}
    prefixes: list[list[Vote]] = []
    for k in range(len(tiers)):
        asked = [name for tier in tiers[: k + 1] for name in tier]
        if not all(name in by_worker for name in asked):
            break
        prefixes.append([by_worker[name] for name in asked])
    return prefixes


def fit_threshold(table: Reliability, task: str, policy: FitPolicy) -> Threshold:
    """The lowest posterior threshold whose accepted labels agree with the judge at least
    ``policy.target`` with 95% confidence, by fixed-sequence testing (Trust or Escalate, Jung
    et al. 2024, arXiv 2407.18370): thresholds are tested strictest first (``THRESHOLDS``,
    those above 1/labels: a posterior no vote has moved is never enough) and the search
    stops at the first that fails, so the chosen one keeps the bound without paying for the
    many tries. A threshold with fewer than ``MIN_EVIDENCE`` labeled items above it is
    passed over untested.

    The evidence is the lessons in the window, each scored as the live rule would have
    decided it: tier by tier (``tier_prefixes``), with only the votes that count, accepted at
    the first tier whose top posterior — from the counts of every other lesson
    (leave-one-out) — reaches the threshold. The judge labels every escalated item but only
    a sample of the accepted ones, so an audit weighs ``1 / sampling_rate`` (its lesson's
    ``audit_fraction``; inverse-propensity weighting): the estimate covers all items, not the
    hard ones only. Likewise, while a task accepts nothing, only ``explore_fraction`` of its
    items reach the later tiers: an acceptance past the first tier on such an explored
    lesson weighs ``1 / sampling_rate``, and the others have the first tier's votes only.
    The bound is Wilson's on the weighted rate, with the smaller of Kish's effective sample
    size and the one its linearised variance gives (errors concentrated in heavy audits
    then widen it)."""
    labels = table.labels.get(task, [])
    # (tops per tier, weight at the first tier, weight past it, the judge's label)
    scored: list[tuple[list[tuple[float, str]], float, float, str]] = []
    for keys, lesson in table.counted(task):
        if lesson.source == "gold":
            continue
        table.uncount(keys)  # leave one out: the item's own answers must not vouch for it
        try:
            counted = [
                [v for v in prefix if policy.counts(v)]
                for prefix in tier_prefixes(lesson.votes, policy.tiers)
            ]
            tops = [_top(table.posterior(task, votes), votes) for votes in counted]
        finally:
            table.recount(keys)
        rate = lesson.sampling_rate
        if lesson.source == "audit":  # before sampling_rate was recorded: today's fraction
            weight = 1 / (rate or policy.audit_fraction or 1.0)
            scored.append((tops, weight, weight, lesson.label))
        else:
            scored.append((tops, 1.0, 1 / (rate or 1.0), lesson.label))
    chosen = Threshold(None, None, 0.0)
    for threshold in (t for t in THRESHOLDS if labels and t > 1 / len(labels)):
        above: list[tuple[float, bool]] = []
        for tops, at_first, past_first, judge in scored:
            tier, label = next(
                ((k, label) for k, (p, label) in enumerate(tops) if p >= threshold and label),
                (0, None),
            )
            if label is not None:
                above.append((at_first if tier == 0 else past_first, label == judge))
        items = _effective_items(above)
        if items < MIN_EVIDENCE:
            continue
        rate = sum(w for w, ok in above if ok) / sum(w for w, _ in above)
        bound = wilson_lower(rate, items)
        if bound < policy.target:
            break
        chosen = Threshold(threshold, round(bound, 4), round(items, 1))
    return chosen


def _top(posterior: Mapping[str, float], votes: Sequence[Vote]) -> tuple[float, str]:
    """The best posterior among the labels some vote named (0, "" when none)."""
    voted = {v.label for v in votes if v.label is not None}
    return max(((p, label) for label, p in posterior.items() if label in voted), default=(0.0, ""))


def _effective_items(rows: Sequence[tuple[float, bool]]) -> float:
    """The effective sample size of weighted 0/1 outcomes: Kish's, or the smaller one the
    weighted rate's linearised variance implies."""
    if not rows:
        return 0.0
    total = sum(w for w, _ in rows)
    kish = total * total / sum(w * w for w, _ in rows)
    rate = sum(w for w, ok in rows if ok) / total
    variance = sum(w * w * ((1.0 if ok else 0.0) - rate) ** 2 for w, ok in rows) / total**2
    return min(kish, rate * (1 - rate) / variance) if variance > 0 else kish


def wilson_lower(rate: float, n: float, z: float = 1.645) -> float:
    """The lower end of the Wilson score interval for a rate observed on ``n`` items
    (Wilson 1927): with z = 1.645, a one-sided 95% lower bound — the true rate is at least
    this with 95% confidence."""
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)
