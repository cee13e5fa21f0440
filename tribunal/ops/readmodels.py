"""Typed read models of the fleet as ``tribunal.ops.queues`` reads it from Redis.

Frozen dataclasses, one per thing read: a consumer, a consumer group, a stream (one
partition's, or all partitions merged), the throughput, the decision counts, and the whole
``tribunal status`` snapshot. ``Snapshot.to_json`` prints the JSON ``status --json`` has
always printed: every field under its own name, in the order declared here, except
``StreamReading.partitions`` (only on merged streams), ``Decisions`` (one flat object:
``total`` beside the count of each source) and ``AuditCounts`` (one flat object too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import orjson


@dataclass(frozen=True)
class ConsumerReading:
    """One consumer of a group (XINFO CONSUMERS).

    ``name`` is ``role@host:pid``; ``pending``: entries delivered to it, not yet acked;
    ``idle_s``: seconds since its last read attempt (XINFO's ``idle``, millisecond
    resolution); ``live``: it stamped a heartbeat within ``heartbeat_ttl_s`` (set by
    ``flag_stalls``, False until then).
    """

    name: str
    pending: int
    idle_s: float
    live: bool = False


@dataclass(frozen=True)
class GroupReading:
    """One consumer group of a stream (XINFO GROUPS), or one the fleet file implies that
    does not exist yet (``exists`` False: the whole stream is its lag).

    ``lag``: entries not yet delivered to it (None when Redis cannot tell, after a
    deletion); ``lag_unknown``: lag is None and the group is not at the stream's last id;
    ``pending``: delivered, not yet acked; ``entries_read``: entries delivered so far (None
    when unknown); ``last_delivered_id``: a stream id (None when merged or not created);
    ``consumers``: least idle first. ``live_consumers``, ``stalled`` and ``stall_reason``
    (a sentence, None when not stalled) are set by ``flag_stalls``.
    """

    group: str
    exists: bool
    lag: int | None
    lag_unknown: bool
    pending: int
    entries_read: int | None
    last_delivered_id: str | None
    consumers: tuple[ConsumerReading, ...]
    live_consumers: int = 0
    stalled: bool = False
    stall_reason: str | None = None


@dataclass(frozen=True)
class StreamReading:
    """One stream (XINFO STREAM) with its groups.

    ``stream``: its short name (``items``, ``ready``, …); ``key``: its Redis key (with
    ``{*}`` for the partition when merged); ``partitions``: how many partitions were summed,
    None for a single partition's reading (then absent from the JSON); ``exists``: the key
    exists (in any partition); ``length``: entries in it now (XLEN); ``entries_added``:
    entries ever added; ``last_id``: its last generated id (None when merged or empty).
    """

    stream: str
    key: str
    partitions: int | None
    exists: bool
    length: int
    entries_added: int
    last_id: str | None
    groups: tuple[GroupReading, ...]


@dataclass(frozen=True)
class Throughput:
    """Final labels over the last ``window_s`` seconds: ``outputs`` counted, at ``per_s``
    labels per second (3 decimals); ``capped``: the read cap was hit, so the rate is that
    of the newest ``outputs`` labels and the window held at least that many."""

    window_s: int
    outputs: int
    capped: bool
    per_s: float


@dataclass(frozen=True)
class Decisions:
    """Items settled with a final label: ``total``, and the count by source (``workers``,
    ``judge``; a source not seen yet is absent). JSON: ``{"total": n, "workers": a, …}``."""

    total: int
    by_source: dict[str, int]


@dataclass(frozen=True)
class AuditCounts:
    """Worker-accepted items the judge also answered, by outcome: it ``agree``d, it
    ``disagree``d, or it ``failed`` to give a label; ``other``: any other outcome label
    counted (none today). JSON: one flat object, ``{"agree": a, "disagree": d,
    "failed": f, …}``."""

    agree: int
    disagree: int
    failed: int
    other: dict[str, int] = field(default_factory=dict)

    @property
    def judged(self) -> int:
        """Audits the judge answered with a label: agree + disagree."""
        return self.agree + self.disagree


@dataclass(frozen=True)
class VoterReliability:
    """A voter's agreement with the judge on one task: ``agreement`` (4 decimals) of its
    ``labels`` answers (abstentions not counted) that the judge also labeled."""

    task: str
    voter: str
    labels: int
    agreement: float | None


@dataclass(frozen=True)
class Cost:
    """Model seconds per final label (``per_label_s``) and per item the judge answered
    (``judge_per_item_s``, decisions and audits), and their ratio: < 1 means the cascade
    costs less than asking the judge for every item. None where nothing was counted yet."""

    model_seconds: float
    labels: int
    per_label_s: float | None
    judge_seconds: float
    judge_items: int
    judge_per_item_s: float | None
    ratio: float | None
    # per_label_s split by who spent it: each tier's workers (``Settings.worker_tiers``, in
    # order, named by its workers), then the judge: model seconds per final label
    by_tier: tuple[TierCost, ...] = ()


@dataclass(frozen=True)
class TierCost:
    """One tier's (or the judge's) model seconds per final label; ``tier``: its workers'
    names joined with "+", or "judge"."""

    tier: str
    per_label_s: float


@dataclass(frozen=True)
class TaskThreshold:
    """The posterior rule on one task now: the posterior a label needs (``threshold``; None:
    nothing is accepted yet), the 95% lower bound on the accepted labels' agreement with the
    judge it keeps (``bound``), the labeled items that bound rests on (``items``), and while
    nothing is accepted, the share of items still sent past the first tier (``explored``;
    None: one tier, or trusted)."""

    task: str
    threshold: float | None
    bound: float | None
    items: float
    explored: float | None = None


@dataclass(frozen=True)
class PromptCache:
    """One model's prompt tokens (as its server reported them) and how many it took from
    its prompt cache; ``hit_rate``: their ratio (4 decimals), None before any token."""

    prompt_tokens: int
    cached_tokens: int
    hit_rate: float | None


@dataclass(frozen=True)
class Snapshot:
    """Everything ``tribunal status`` shows, read at ``time`` (Unix seconds, 3 decimals).

    ``streams``: every stream, partitions merged when there are several; ``stalled``:
    ``stream/group`` of the stalled groups; ``escalations``: items sent to the judge;
    ``judge_call_rate``, ``agreement_rate`` (decided by the workers) and
    ``audit_disagreement``: fractions (4 decimals) of the decisions, resp. of the judged
    audits, None when there is nothing to divide by; ``rejects``, ``dead_letters``:
    entries ever added to those streams; ``votes``: worker -> label -> votes;
    ``live_consumers``: role -> consumers with a heartbeat within ``heartbeat_ttl_s``
    (seconds), every role the fleet file runs included; ``prompt_cache``: worker (the
    judge as "judge") -> its prompt-cache reuse, for models whose server reports it;
    ``flagged``: task -> final labels of items the injection detector flagged; ``reviews``:
    of those, handed to a person (``injection = "review"``).
    """

    namespace: str
    partitions: int
    time: float
    streams: tuple[StreamReading, ...]
    stalled: tuple[str, ...]
    throughput: Throughput
    decisions: Decisions
    escalations: int
    judge_call_rate: float | None
    agreement_rate: float | None
    audits: AuditCounts
    audit_disagreement: float | None
    rejects: int
    dead_letters: int
    votes: dict[str, dict[str, int]]
    live_consumers: dict[str, int]
    heartbeat_ttl_s: float
    prompt_cache: dict[str, PromptCache] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    reviews: int = 0
    # What the fleet learned and what a label costs (tribunal.ops.learning): each voter's
    # agreement with the judge by task, model seconds per label against the judge alone,
    # and the audits' agreement at least (95% Wilson lower bound; None before any audit).
    reliability: tuple[VoterReliability, ...] = ()
    thresholds: tuple[TaskThreshold, ...] = ()
    cost: Cost | None = None
    audit_agreement_at_least: float | None = None

    def stream(self, name: str) -> StreamReading:
        """The reading of the stream ``name`` (``items``, ``ready``, …)."""
        return next(s for s in self.streams if s.stream == name)

    def to_json(self) -> bytes:
        """The snapshot as ``status --json`` prints it (indented, UTF-8, no final newline)."""
        return orjson.dumps(
            self,
            default=_jsonable,
            option=orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATACLASS,
        )


def _jsonable(obj: object) -> dict[str, object]:
    """orjson's hook for the read models (see the module docstring)."""
    if isinstance(obj, Decisions):
        return {"total": obj.total, **obj.by_source}
    if isinstance(obj, AuditCounts):
        return {"agree": obj.agree, "disagree": obj.disagree, "failed": obj.failed, **obj.other}
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"not JSON serializable: {type(obj).__name__}")
    out = {f.name: getattr(obj, f.name) for f in fields(obj)}
    if isinstance(obj, StreamReading) and obj.partitions is None:
        del out["partitions"]
    return out
