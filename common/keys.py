"""Every Redis key and stream name, in one place.

Each name carries its partition's hash tag (``tribunal:{0}:items``) so that all
keys one item touches hash to the same cluster slot: the multi-key scripts and
pipelines below stay valid when the fleet later runs on a Redis Cluster.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from common.errors import ConfigurationError


@dataclass(frozen=True)
class Keys:
    namespace: str = "tribunal"
    partition: int = 0

    @cached_property  # every per-item key starts with it: spelled once
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.partition}}}"

    # Streams, in the order an item travels through them.
    @property
    def items(self) -> str:
        """Producers XADD items here; every worker model reads it in its own group."""
        return f"{self.prefix}:items"

    def tier(self, k: int) -> str:
        """The stream the workers of tier ``k`` read (``Settings.worker_tiers``): tier 0
        reads the items; a later tier gets only the items the tiers before it left open."""
        return self.items if k == 0 else f"{self.prefix}:tier:{k}"

    def stream(self, name: str) -> str:
        """A stream by the name ``status`` shows: a property's name, or ``tier:K``."""
        tier, _, k = name.partition(":")
        return self.tier(int(k)) if tier == "tier" and k.isdigit() else str(getattr(self, name))

    @property
    def ready(self) -> str:
        """Workers notify the aggregator here once an item has enough votes to decide."""
        return f"{self.prefix}:ready"

    @property
    def judge(self) -> str:
        """Items the workers could not agree on, waiting for the judge."""
        return f"{self.prefix}:judge"

    @property
    def output(self) -> str:
        """Final decisions, one per item."""
        return f"{self.prefix}:output"

    @property
    def audits(self) -> str:
        """The judge's answers on a sample of worker-accepted items (``audit_fraction``)."""
        return f"{self.prefix}:audits"

    @property
    def review(self) -> str:
        """Flagged items whose label their flagged passages would have changed, for a person
        (``injection = "review"``: ``common.schemas.Review``)."""
        return f"{self.prefix}:review"

    @property
    def lessons(self) -> str:
        """Labels the fleet trusts, for its students to learn from: the judge's decisions and
        audits, and gold labels a user teaches (``consumers.lessons``)."""
        return f"{self.prefix}:lessons"

    @property
    def rejects(self) -> str:
        """Items refused for bad input, with the reason."""
        return f"{self.prefix}:rejects"

    @property
    def dead(self) -> str:
        """Entries given up on after ``max_deliveries`` failed deliveries."""
        return f"{self.prefix}:dead"

    # Per-item state.
    def votes(self, item_id: str) -> str:
        """Hash: worker name -> vote JSON, plus ``ITEM_IN_VOTES`` -> the item JSON and, for an
        item explored past the first tier, ``SAMPLING_RATE_IN_VOTES`` -> the sample's rate."""
        return f"{self.prefix}:votes:{item_id}"

    def state(self, item_id: str) -> str:
        """String: ``judge`` while escalated, ``done`` once final (expires after the dedupe TTL)."""
        return f"{self.prefix}:state:{item_id}"

    def queued(self, item_id: str) -> str:
        """String: set when a producer adds the item, deleted when it settles (or expiring
        after the dedupe TTL): while it waits in a stream its id counts as known."""
        return f"{self.prefix}:queued:{item_id}"

    def produced(self, chunk: str) -> str:
        """String: what one producer chunk did in this partition ("<new> <known>"), so the
        chunk sent again after a lost reply reports the same (expires after ten minutes)."""
        return f"{self.prefix}:produced:{chunk}"

    @property
    def deadlines(self) -> str:
        """Sorted set: item id -> time by which its missing votes are no longer awaited."""
        return f"{self.prefix}:deadlines"

    @property
    def stats(self) -> str:
        """Hash of fleet counters and histogram buckets (see ``common.metrics``)."""
        return f"{self.prefix}:stats"

    @property
    def heartbeats(self) -> str:
        """Sorted set: consumer name (``role@host:pid``) -> last time its loop came round.
        One per fleet, in partition 0, whatever partitions a consumer reads."""
        return f"{self.namespace}:{{0}}:heartbeats"

    def student(self, worker: str) -> str:
        """String: a student's snapshot (its models and the lessons they cover), one per
        student worker and fleet, in {0} like the heartbeats (``consumers.lessons``)."""
        return f"{self.namespace}:{{0}}:student:{worker}"

    @property
    def partitions(self) -> str:
        """String: how many partitions this namespace uses (one fleet-wide key, in {0})."""
        return f"{self.namespace}:{{0}}:partitions"

    @property
    def final_streams(self) -> tuple[str, str, str]:
        """Where an item can end: exactly one entry in exactly one of these."""
        return (self.output, self.rejects, self.dead)


def partition_of(item_id: str, partitions: int) -> int:
    """The partition of an item: a stable hash of its id (CRC-32, the same in every process
    and language), so every key of one item lands in one partition, one cluster slot."""
    return zlib.crc32(item_id.encode()) % partitions if partitions > 1 else 0


class PartitionMismatch(ConfigurationError, RuntimeError):
    """This process counts partitions differently from the fleet it joins."""


def claim_partitions(redis: Any, namespace: str, partitions: int) -> None:
    """Record the namespace's number of partitions on first use and refuse a process set up
    with another: items it routed would land in partitions nobody reads, and a resubmitted
    id would escape the dedupe of its old partition."""
    key = Keys(namespace).partitions
    redis.set(key, partitions, nx=True)
    stored = int(redis.get(key) or partitions)
    if stored != partitions:
        raise PartitionMismatch(
            f"namespace {namespace!r} uses {stored} partitions but this process is set up "
            f"with {partitions}: set TRIBUNAL_PARTITIONS={stored} (to change the number, drain "
            f"the fleet, stop it and delete the key {key})"
        )


def all_partitions(namespace: str, partitions: int) -> list[Keys]:
    return [Keys(namespace, p) for p in range(partitions)]


def worker_group(worker: str) -> str:
    """Consumer group of one worker model: replicas of that model share it."""
    return f"worker:{worker}"


AGGREGATOR_GROUP = "aggregator"
JUDGE_GROUP = "judge"
LABELS_ROLE = "labels"  # a label reader's heartbeat role, whatever its group's name
SERVE_ROLE = "serve"  # the HTTP endpoint's heartbeat role (``tribunal serve``)

# Fields on the wire, as Redis returns them (bytes). The Lua scripts (``common/lua/``) are
# filled in with the same names when loaded (``common.scripts``).
RECORD_FIELD = b"d"  # every stream entry: its record as JSON (item, escalation, decision ...)
ITEM_ID_FIELD = b"id"  # final streams: the item id beside the record, for XRANGE readers
ITEM_IN_VOTES = b"_item"  # an item's votes hash: the item's JSON beside the workers' votes
# an item's votes hash: the rate of the sample that sent it past the first tier (exploration)
SAMPLING_RATE_IN_VOTES = b"_sampling_rate"
READY_IDS_FIELD = b"ids"  # the ready stream: ids of items with enough votes, space-separated
