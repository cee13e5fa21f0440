"""The student: a cheap classifier per task that learns online from the labels the fleet
trusts (the judge's decisions and audits, gold labels taught), and votes like any worker.

Online Cascade Learning (Nie et al., ICML 2024, arXiv 2402.04513) puts such a model in
front of an LLM and lets it learn from the LLM's answers: here it is scikit-learn's
multinomial naive Bayes (``partial_fit``, one pass per lesson, so learning costs what the
lessons cost and never the whole history) on hashed features, which need no vocabulary and
so no refit: the word 1-2-grams of the text (a pair task: the words both tickets share, the
words only one has, and their overlap as a bucket).

It abstains on a task until it has learned ``min_per_class`` lessons of every label; after
that its vote's confidence is the model's probability of its label. That probability is
not calibrated (naive Bayes crowds its probabilities near 0 and 1): the ``posterior`` decision rule
(``consumers.decision``) counts how often each confidence band agreed with the judge and
trusts the band, not the number.

Its state lives in Redis (``consumers.lessons.LessonFeed``): the worker attaches the feed,
the student loads the last snapshot and reads only newer lessons, learns between batches
(``learn``), and saves a snapshot every ``snapshot_every_s``. Costs on a 2-core machine:
well under a millisecond of CPU per item to vote (bench/stream.py prints it).
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import ClassVar, TypedDict

import numpy as np
import scipy.sparse as sp
from pydantic import Field
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.naive_bayes import MultinomialNB

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends.base import BackendOptions, RawOptions, parse_options
from consumers.lessons import Lesson, LessonFeed

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9']+")


class StudentOptions(BackendOptions):
    min_per_class: int = Field(
        default=8, ge=1, description="lessons of every label before the student votes on a task"
    )
    features_log2: int = Field(
        default=17, ge=8, le=22, description="hashed feature space: 2**features_log2 columns"
    )
    smoothing: float = Field(default=1.0, gt=0, description="naive Bayes' additive smoothing")
    snapshot_every_s: float = Field(default=30.0, gt=0, description="how often state is saved")
    learn_every_s: float = Field(
        default=0.5,
        ge=0,
        description="how often new lessons are read (every partition's handler asks each "
        "round: without this, a process reading P partitions would read them P times)",
    )


class TaskState(TypedDict):
    """A task's model in a snapshot: lessons learned per label, and per label the hashed
    features seen (base64 of little-endian int32 column indices and float32 counts: only the
    columns seen, a few tens of thousands, not 2**features_log2)."""

    counts: dict[str, int]
    columns: list[str]
    values: list[str]


class TaskModel:
    """One task's classifier: a label set, what it has learned of each, the model.

    Multinomial naive Bayes on word 1-2-grams present in the text (binary features): its
    state is counts, so learning one lesson at a time gives exactly the model learning them
    all at once would (replicas that read the same lessons agree), and no learning rate
    needs tuning. Measured on Rotten Tomatoes snippets (bench/labeled.py), 1,000 lessons, 1,000
    held out: 0.69 right, where scikit-learn's ``SGDClassifier`` (log loss) learning the
    same lessons one by one was 0.53-0.62 and a logistic regression fitted on all of them
    at once 0.66-0.68; its most confident tenth was 0.88 right.
    """

    def __init__(self, labels: Sequence[str], pair: bool, options: StudentOptions) -> None:
        self.labels = list(labels)
        self.pair = pair
        self.min_per_class = options.min_per_class
        self.words = HashingVectorizer(
            n_features=2**options.features_log2,
            ngram_range=(1, 2),
            token_pattern=r"(?u)\b\w+\b",
            alternate_sign=False,
            binary=True,
            norm=None,
        )
        self.model = MultinomialNB(alpha=options.smoothing)
        self.counts: Counter[str] = Counter()

    @property
    def ready(self) -> bool:
        return all(self.counts[label] >= self.min_per_class for label in self.labels)

    def features(self, texts: Sequence[tuple[str, str | None]]) -> sp.csr_matrix:
        if self.pair:
            # A pair's features say what the two tickets share, not what either is about.
            return self.words.transform([_pair_words(a, b or "") for a, b in texts])
        return self.words.transform([a for a, _ in texts])

    def learn(self, lessons: Sequence[Lesson]) -> None:
        known = [x for x in lessons if x.label in self.labels]
        if not known:
            return
        x = self.features([(lesson.text, lesson.text_b) for lesson in known])
        self.model.partial_fit(x, [lesson.label for lesson in known], classes=self.labels)
        self.counts.update(lesson.label for lesson in known)

    def predict(self, items: Sequence[Item]) -> list[Prediction]:
        if not self.ready:
            short = ", ".join(f"{lb} {self.counts[lb]}/{self.min_per_class}" for lb in self.labels)
            return [Prediction(error=f"still learning ({short} lessons)") for _ in items]
        proba = self.model.predict_proba(self.features([(i.text, i.text_b) for i in items]))
        classes = [str(c) for c in self.model.classes_]
        best = np.argmax(proba, axis=1)
        return [
            Prediction(label=classes[b], confidence=round(float(p[b]), 6))
            for b, p in zip(best, proba, strict=True)
        ]

    def state(self) -> TaskState | None:
        if not hasattr(self.model, "feature_count_"):
            return None
        columns, values = [], []
        for row in np.asarray(self.model.feature_count_):
            seen = np.flatnonzero(row)
            columns.append(base64.b64encode(seen.astype("<i4").tobytes()).decode())
            values.append(base64.b64encode(row[seen].astype("<f4").tobytes()).decode())
        return TaskState(counts=dict(self.counts), columns=columns, values=values)

    def restore(self, state: TaskState) -> None:
        """Continue from a snapshot, through ``partial_fit`` itself: one row per label
        holding its mean feature counts, weighted by its number of lessons, adds exactly
        those counts (naive Bayes' state is its counts)."""
        n_features = int(self.words.n_features)
        classes = sorted(self.labels)
        if len(state["columns"]) != len(classes) or len(state["values"]) != len(classes):
            raise ValueError(f"{len(state['columns'])} rows, expected {len(classes)}")
        learned = Counter({str(k): int(v) for k, v in state["counts"].items()})
        rows, labels, weights = [], [], []
        for label, cols, vals in zip(classes, state["columns"], state["values"], strict=True):
            index = np.frombuffer(base64.b64decode(cols), dtype="<i4")
            if index.size and (index.min() < 0 or index.max() >= n_features):
                raise ValueError(f"a column outside the {n_features} features")
            if learned[label] > 0:
                row = np.zeros(n_features)
                row[index] = np.frombuffer(base64.b64decode(vals), dtype="<f4")
                rows.append(row / learned[label])
                labels.append(label)
                weights.append(learned[label])
        if rows:
            x = sp.csr_matrix(np.vstack(rows))
            self.model.partial_fit(x, labels, classes=self.labels, sample_weight=weights)
        self.counts = learned


def _pair_words(a: str, b: str) -> str:
    words_a, words_b = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    union = words_a | words_b
    overlap = len(words_a & words_b) / len(union) if union else 0.0
    shared = [f"both:{w}" for w in sorted(words_a & words_b)]
    alone = [f"one:{w}" for w in sorted(words_a ^ words_b)]
    return " ".join([*shared, *alone, f"overlap:{int(overlap * 10)}"])


class Student:
    """The ``student`` backend: one ``TaskModel`` per task of the fleet."""

    name = "student"
    Options: ClassVar[type[StudentOptions]] = StudentOptions

    def __init__(self, options: StudentOptions | RawOptions, tasks: Mapping[str, TaskSpec]) -> None:
        self.options = parse_options(self.Options, options)
        self.tasks = {
            name: TaskModel(spec.labels, spec.pair, self.options) for name, spec in tasks.items()
        }
        self.feed: LessonFeed | None = None
        self._saved_at = time.monotonic()
        self._next_learn = 0.0
        self._unsaved = 0

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        out: list[Prediction | None] = [None] * len(items)
        by_task: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_task.setdefault(item.task, []).append(i)
        for task, where in by_task.items():
            model = self.tasks.get(task)
            if model is None:
                for i in where:
                    out[i] = Prediction(error=f"backend student does not know task {task!r}")
                continue
            for i, prediction in zip(where, model.predict([items[i] for i in where]), strict=True):
                out[i] = prediction
        return [p if p is not None else Prediction(error="no prediction") for p in out]

    def learn(self, feed: LessonFeed) -> int:
        """Learn the lessons that arrived since the last call, starting from ``feed``'s
        snapshot the first time (a Redis error there leaves the feed unattached: the next
        call tries again, rather than learning from zero over a good snapshot); save a
        snapshot when due. Returns how many lessons were read."""
        if self.feed is not feed:
            if not self.restore(feed.load()):
                feed.reset()  # what the snapshot covered is learned again from the stream
            self.feed = feed
        elif time.monotonic() < self._next_learn:
            return 0
        self._next_learn = time.monotonic() + self.options.learn_every_s
        total = 0
        while lessons := feed.read():
            by_task: dict[str, list[Lesson]] = {}
            for lesson in lessons:
                by_task.setdefault(lesson.task, []).append(lesson)
            for task, batch in by_task.items():
                if task in self.tasks:
                    self.tasks[task].learn(batch)
            total += len(lessons)
        self._unsaved += total
        due = time.monotonic() - self._saved_at >= self.options.snapshot_every_s
        if self._unsaved and due:
            self.save()
        return total

    def fingerprint(self) -> dict[str, object]:
        """What a snapshot must have been made for: the tasks, their labels and pair shape,
        and the feature space. Another one is learned again from the lessons instead."""
        tasks = {name: {"labels": m.labels, "pair": m.pair} for name, m in self.tasks.items()}
        return {"features_log2": self.options.features_log2, "tasks": tasks}

    def restore(self, state: object) -> bool:
        """Continue from a snapshot's state; False when it cannot be used (another fleet's
        tasks or labels, another feature space, damaged), and then nothing is restored."""
        if state is None:
            return True
        fresh = {name: TaskModel(m.labels, m.pair, self.options) for name, m in self.tasks.items()}
        try:
            if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint():
                raise ValueError("it was made for other tasks, labels or features")
            for task, saved in state["tasks"].items():
                fresh[task].restore(saved)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("student: not using its snapshot (%s): learning every lesson again", exc)
            return False
        self.tasks = fresh
        log.info("student: resumed from its snapshot (%s)", self.describe())
        return True

    def save(self) -> None:
        if self.feed is None or not self._unsaved:
            return
        states = {name: s for name, model in self.tasks.items() if (s := model.state())}
        size = self.feed.save({"fingerprint": self.fingerprint(), "tasks": states})
        log.info("student: snapshot saved, %d bytes (%s)", size, self.describe())
        self._saved_at, self._unsaved = time.monotonic(), 0

    def describe(self) -> str:
        return "; ".join(
            f"{name}: {sum(m.counts.values())} lessons" for name, m in self.tasks.items()
        )
