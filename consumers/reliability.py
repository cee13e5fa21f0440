"""How far each voter can be trusted, learned from the labels the fleet trusts.

Dawid and Skene (1979, "Maximum likelihood estimation of observer error-rates using the EM
algorithm") describe each annotator by a confusion matrix: how often it answers each label
when the truth is each label. Here the truth is the judge's label (the fleet's aim is to
agree with its judge, cheaply), so no EM is needed: every judge decision and every audit
counts, per task and voter, its answer against the judge's. An answer is a label with its
confidence band (``BANDS``): a voter that says 0.99 is trusted as far as its 0.99s have
agreed with the judge, whatever the number claims — the counts calibrate it.

Audits of accepted items (``audit_fraction``) keep the estimate honest: the judge's
decisions alone are the hard items. ``Reliability.posterior`` combines votes as naive Bayes
(answers independent given the truth) with Laplace smoothing, so a voter nobody has checked
yet counts for nothing, and one whose band has agreed 200 times out of 200 counts for a lot.

Counts live in a hash per partition (``Keys.reliability``), written in the judge's
transaction; the aggregator reads them all every few seconds.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from redis import Redis

from common.keys import Keys
from common.schemas import Vote
from consumers.engine.writes import Writes

# Confidence bands (lower edges): an answer is "label@k" with k the band's index. A vote
# without a confidence is band "n". The top bands are narrow because naive Bayes (the
# student) crowds its probabilities there: its 0.9999s are right more often than its 0.99s.
BANDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)
_SEP = "\t"  # between the parts of a hash field: task, voter, answer, truth
_PRIOR_VOTER = ""  # the field of the trusted labels' own counts (the prior)


def answer(vote: Vote) -> str | None:
    """A vote as the table counts it: ``label@band``; None for an abstention."""
    if vote.label is None:
        return None
    if vote.confidence is None:
        return f"{vote.label}@n"
    return f"{vote.label}@{bisect.bisect_right(BANDS, vote.confidence) - 1}"


def record(writes: Writes, task: str, votes: Sequence[Vote], truth: str) -> None:
    """Count each vote's answer against ``truth`` (the judge's label), in the batch's writes."""
    key = writes.keys.reliability
    writes.hincr(key, _SEP.join((task, _PRIOR_VOTER, "", truth)))
    for vote in votes:
        given = answer(vote)
        if given is not None:
            writes.hincr(key, _SEP.join((task, vote.worker, given, truth)))


class Reliability:
    """The counts of every partition, and the posterior they give.

    ``labels`` maps each task to its label set. Not thread-safe; one per aggregator.
    """

    def __init__(
        self,
        labels: Mapping[str, Sequence[str]],
        pseudo_count: float = 1.0,
    ) -> None:
        self.labels = {task: list(names) for task, names in labels.items()}
        self.pseudo_count = pseudo_count
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        self.per_truth: Counter[tuple[str, str, str]] = Counter()  # (task, voter, truth)

    def refresh(self, redis: Redis, partitions: Sequence[Keys]) -> None:
        """Read every partition's counts again (one HGETALL each)."""
        counts: Counter[tuple[str, str, str, str]] = Counter()
        for keys in partitions:
            raw: Any = redis.hgetall(keys.reliability)
            for field, n in raw.items():
                parts = field.decode().split(_SEP)
                if len(parts) == 4:
                    counts[(parts[0], parts[1], parts[2], parts[3])] += int(n)
        self.load(counts)

    def load(self, counts: Mapping[tuple[str, str, str, str], int]) -> None:
        """Replace the counts: (task, voter, answer, truth) -> items."""
        self.counts = Counter(counts)
        self.per_truth = Counter()
        for (task, voter, _, truth), n in self.counts.items():
            self.per_truth[(task, voter, truth)] += n

    def trusted(self, task: str) -> int:
        """How many trusted labels the task has."""
        return sum(self.per_truth[(task, _PRIOR_VOTER, t)] for t in self.labels.get(task, []))

    def likelihood(self, task: str, voter: str, given: str, truth: str) -> float:
        """P(voter answers ``given`` | truth), Laplace-smoothed: ``pseudo_count`` added to
        every possible answer (each label in each band, and "n"), so an answer never seen
        under some truth is rare there, not impossible — twenty agreements in a band and no
        disagreement weigh about 20:1, not infinitely."""
        answers = len(self.labels[task]) * (len(BANDS) + 1)
        seen = self.counts[(task, voter, given, truth)]
        total = self.per_truth[(task, voter, truth)]
        return (seen + self.pseudo_count) / (total + self.pseudo_count * answers)

    def posterior(self, task: str, votes: Sequence[Vote]) -> dict[str, float]:
        """P(the judge would say each label | these votes): label -> probability, summing to
        1 over the task's labels. Abstentions carry no evidence. An unknown task: {}."""
        labels = self.labels.get(task)
        if not labels:
            return {}
        base = sum(self.per_truth[(task, _PRIOR_VOTER, t)] for t in labels)
        logs: dict[str, float] = {}
        for truth in labels:
            # The judge's own label frequencies, with one pseudo-count each (Laplace).
            prior = (self.per_truth[(task, _PRIOR_VOTER, truth)] + 1) / (base + len(labels))
            total = math.log(prior)
            for vote in votes:
                given = answer(vote)
                if given is not None:
                    total += math.log(self.likelihood(task, vote.worker, given, truth))
            logs[truth] = total
        top = max(logs.values())
        weights = {label: math.exp(v - top) for label, v in logs.items()}
        norm = sum(weights.values())
        return {label: w / norm for label, w in weights.items()}
