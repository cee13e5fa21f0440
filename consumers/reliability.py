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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.schemas import Vote
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
    1 / audit_fraction)."""

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

    def learn(self, lessons: Iterable[Lesson]) -> None:
        """Count each lesson's votes against its label, oldest first; lessons of other
        tasks, or with a label outside the task's set, are not counted."""
        for lesson in lessons:
            if lesson.label not in self.labels.get(lesson.task, ()):
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

    def refit(self, target: float, audit_fraction: float) -> None:
        """Choose each task's threshold again from the lessons counted now."""
        self.thresholds = {
            task: fit_threshold(self, task, target, audit_fraction) for task in self._recent
        }

    def counted(self, task: str) -> list[tuple[list[Key], Lesson]]:
        """The lessons of ``task`` counted now, oldest first, each with what it counted."""
        return list(self._recent.get(task, ()))

    def uncount(self, keys: Sequence[Key]) -> None:
        """Take one lesson's answers out of the counts (``recount`` puts them back)."""
        self._add(keys, -1)

    def recount(self, keys: Sequence[Key]) -> None:
        self._add(keys, 1)


def fit_threshold(table: Reliability, task: str, target: float, audit_fraction: float) -> Threshold:
    """The lowest posterior threshold whose accepted labels agree with the judge at least
    ``target`` with 95% confidence, by fixed-sequence testing (Trust or Escalate, Jung et al.
    2024, arXiv 2407.18370): thresholds are tested strictest first (``THRESHOLDS``) and the
    search stops at the first that fails, so the chosen one keeps the bound without paying
    for the many tries. A threshold with fewer than ``MIN_EVIDENCE`` labeled items above it
    is passed over untested.

    The evidence is the lessons in the window, each item's top posterior (from the counts
    of every other lesson: leave-one-out) against the judge's label. The
    judge labels every escalated item but only ``audit_fraction`` of the accepted ones, so an
    audit weighs ``1 / audit_fraction`` (inverse-propensity weighting): the estimate is then
    one of all items, not of the hard ones. The bound is Wilson's on the weighted rate with
    the effective sample size. No audits: the accepted items are unseen, and only the
    escalated ones count."""
    rows: list[tuple[float, float, bool]] = []  # (top posterior, weight, agrees)
    for keys, lesson in table.counted(task):
        if lesson.source == "gold" or not lesson.votes:
            continue
        # Leave one out: the item's own answers must not vouch for it (with few lessons,
        # counting them made every band look right, and the rule accepted too soon).
        table.uncount(keys)
        try:
            posterior = table.posterior(task, lesson.votes)
        finally:
            table.recount(keys)
        voted = {v.label for v in lesson.votes if v.label is not None}
        options = [(p, label) for label, p in posterior.items() if label in voted]
        if not options:
            continue
        top, label = max(options)
        weight = 1 / audit_fraction if lesson.source == "audit" and audit_fraction > 0 else 1.0
        rows.append((top, weight, label == lesson.label))
    chosen = Threshold(None, None, 0.0)
    for threshold in THRESHOLDS:
        above = [(w, ok) for p, w, ok in rows if p >= threshold]
        weight = sum(w for w, _ in above)
        items = weight * weight / sum(w * w for w, _ in above) if above else 0.0
        if items < MIN_EVIDENCE:
            continue
        rate = sum(w for w, ok in above if ok) / weight
        bound = wilson_lower(rate, items)
        if bound < target:
            break
        chosen = Threshold(threshold, round(bound, 4), round(items, 1))
    return chosen


def wilson_lower(rate: float, n: float, z: float = 1.645) -> float:
    """The lower end of the Wilson score interval for a rate observed on ``n`` items
    (Wilson 1927): with z = 1.645, a one-sided 95% lower bound — the true rate is at least
    this with 95% confidence."""
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)
