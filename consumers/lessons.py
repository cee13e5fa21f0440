"""Lessons: the labels the fleet trusts, kept for its students to learn from.

Every label the judge hands out — an escalated item's decision, or its answer on an audited
item — costs a judge call; a lesson keeps it (the item's text with that label, and the votes
the item had) so that a student (``consumers.backends.student``) can learn the task from the
judge, and the posterior rule (``consumers.reliability``) can learn how far each voter
agrees with it, instead of the fleet paying for the same answer again. Users may add gold
labels (``tribunal teach``).

Lessons go to a stream per partition. A decision's lesson is written by the settle script
that publishes the decision, only when that call settles the item: exactly one lesson per
decision, however often a crashed judge's batch is retried; an audit's goes with the audit
record. A ``LessonFeed`` reads every partition's stream in order from saved offsets and
keeps a learner's snapshot beside those offsets, so a learner that restarts (or a new
replica) loads the snapshot and reads only what came after it, never from zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import orjson
import pydantic
from pydantic import Field
from redis import Redis

from common.keys import ITEM_ID_FIELD, RECORD_FIELD, Keys, all_partitions, partition_of
from common.schemas import Item, Record, Vote

log = logging.getLogger(__name__)

# Bumped when a snapshot's shape changes: an older one is ignored (the learner replays the
# lessons the stream still holds) rather than misread.
SNAPSHOT_VERSION = 1

Source = Literal["judge", "audit", "gold"]


class Lesson(Record):
    """One trusted label: the item's text (and second text, for pairs) with its label, and
    the votes the workers had cast on it (none for a gold label). ``source``: the judge
    deciding an escalated item, the judge's audit of an accepted one, or a gold label a user
    taught. ``sampling_rate``: its escalation's (``common.schemas.Escalation``): an audit stands
    for 1 / rate accepted items, an explored item's later tiers for 1 / rate items."""

    id: str
    task: str
    text: str
    text_b: str | None = None
    label: str
    source: Source
    votes: list[Vote] = Field(default_factory=list)
    sampling_rate: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)

    ADDED_LATER = frozenset({"sampling_rate"})

    @classmethod
    def of(
        cls,
        item: Item,
        label: str,
        source: Source,
        votes: list[Vote] | None = None,
        sampling_rate: float | None = None,
    ) -> Lesson:
        return cls(
            id=item.id, task=item.task, text=item.text, text_b=item.text_b, label=label,
            source=source, votes=[v.model_copy(update={"raw": None}) for v in votes or []],
            sampling_rate=sampling_rate,
        )  # fmt: skip


def teach(redis: Redis, namespace: str, partitions: int, lessons: Iterable[Lesson]) -> int:
    """Add gold lessons, each to the partition its item id hashes to, a thousand per round
    trip. Returns how many."""
    pipe = redis.pipeline(transaction=False)
    n = 0
    for lesson in lessons:
        keys = Keys(namespace, partition_of(lesson.id, partitions))
        pipe.xadd(keys.lessons, {ITEM_ID_FIELD: lesson.id.encode(), RECORD_FIELD: lesson.dump()})
        n += 1
        if n % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return n


class LessonFeed:
    """Every partition's lessons, read in order from where a learner stopped, and the
    learner's snapshot kept with those offsets.

    ``offsets`` maps a partition to the id of the last lesson read there ("0-0": none).
    A snapshot is ``{"version", "offsets", "state"}`` as orjson at ``Keys.student(name)``;
    ``state`` is whatever the learner saves (JSON-able). Replicas of one student write the
    same key: each snapshot is whole and consistent with its own offsets, so whichever was
    written last is as good a start as any.
    """

    def __init__(self, redis: Redis, namespace: str, partitions: int, name: str) -> None:
        self.redis = redis
        self.partitions = all_partitions(namespace, partitions)
        self.key = Keys(namespace).student(name)
        self.offsets: dict[int, str] = {}
        self.reset()

    def reset(self) -> None:
        """Read from the start of every partition's stream."""
        self.offsets = {k.partition: "0-0" for k in self.partitions}

    def read(self, count: int = 500) -> list[Lesson]:
        """Up to ``count`` lessons per partition after the offsets, which advance only once
        every partition was read (a Redis error part-way loses nothing: the next call reads
        the same lessons again). A lesson that cannot be read is skipped with a warning: it
        must not stop the learning."""
        lessons: list[Lesson | None] = []
        offsets = dict(self.offsets)
        for keys in self.partitions:
            start = "(" + offsets[keys.partition]
            entries: Any = self.redis.xrange(keys.lessons, min=start, count=count)
            for entry_id, fields in entries:
                offsets[keys.partition] = entry_id.decode()
                lessons.append(_lesson(entry_id, fields))
        self.offsets = offsets
        return [lesson for lesson in lessons if lesson is not None]

    def latest(self, count: int) -> list[Lesson]:
        """The newest ``count`` lessons of each partition, oldest first (offsets untouched):
        what ``status`` folds into the voters' agreement."""
        lessons: list[Lesson | None] = []
        for keys in self.partitions:
            entries: Any = self.redis.xrevrange(keys.lessons, count=count)
            lessons += [_lesson(entry_id, fields) for entry_id, fields in reversed(entries)]
        return [lesson for lesson in lessons if lesson is not None]

    def save(self, state: object) -> int:
        """Write the snapshot: ``state`` with the current offsets. Returns its size (bytes)."""
        blob = orjson.dumps(
            {"version": SNAPSHOT_VERSION, "offsets": self.offsets, "state": state},
            option=orjson.OPT_NON_STR_KEYS,
        )
        self.redis.set(self.key, blob)
        return len(blob)

    def load(self) -> object:
        """The saved state, with the offsets set to where it stopped; None (offsets from the
        start) when there is none, or it is unreadable or of another version."""
        raw: Any = self.redis.get(self.key)
        if raw is None:
            return None
        try:
            snapshot = orjson.loads(raw)
            if snapshot.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"version {snapshot.get('version')!r}")
            offsets = {int(p): str(o) for p, o in snapshot["offsets"].items()}
        except (orjson.JSONDecodeError, ValueError, KeyError, AttributeError, TypeError) as exc:
            log.warning("ignoring the snapshot at %s (%s): learning from the start", self.key, exc)
            return None
        self.offsets.update({p: o for p, o in offsets.items() if p in self.offsets})
        return snapshot["state"]


def _lesson(entry_id: bytes, fields: dict[bytes, bytes]) -> Lesson | None:
    try:
        return Lesson.model_validate_json(fields[RECORD_FIELD])
    except (KeyError, pydantic.ValidationError) as exc:
        log.warning("skipping unreadable lesson %s: %s", entry_id.decode(), exc)
        return None
