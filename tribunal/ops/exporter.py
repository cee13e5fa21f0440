"""``tribunal exporter``: Prometheus ``/metrics`` for the fleet, read from Redis at scrape time.

Why one exporter reading Redis, rather than a ``/metrics`` endpoint in every consumer:
the fleet's counters already live in Redis (``common.metrics``: one hash per partition,
incremented in the same pipeline or Lua script as the work they count). So they survive
a consumer's restart (a per-process counter would fall back to 0 and lose whatever had
not been scraped), add up across replicas and hosts without Prometheus having to discover
each short-lived process (workers are restarted, scaled and SIGKILLed by design), and a
vote counted inside ``cast_vote`` is counted exactly when the vote was stored — never
twice for a re-delivery. Queue depth, lag, pending and consumers are not counted at all:
each scrape reads them from the streams (XLEN, XINFO), as ``tribunal status`` does, and
liveness from the heartbeat set. If Redis cannot be read the scrape still answers 200
with ``tribunal_up 0``, so an outage is a metric to alert on, not a failed scrape.

Stats fields become metric families: ``votes_total|label=x|worker=y`` is the counter
``tribunal_votes_total{label="x",worker="y"}``; histogram buckets are stored one
increment per observation in the one bucket it falls in (cheap to write), so here they
are summed up into Prometheus's cumulative ``le`` buckets, over the union of the known
and seen bounds, with ``+Inf`` and ``_count`` both the sum of the buckets (consistent
even if a scrape lands between a writer's bucket and count increments).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis import Redis
from redis.exceptions import RedisError

from common import metrics
from common.keys import Keys
from common.lifecycle import StopFlag
from common.settings import Settings
from tribunal.ops.learning import cost_of, read_learning
from tribunal.ops.queues import (
    StatSample,
    expected_roles,
    live_by_role,
    quick_client,
    read_fleet_streams,
    read_heartbeats,
    read_stats,
)

log = logging.getLogger(__name__)
PREFIX = "tribunal_"

# Families always served (empty until something is counted), so dashboards and alerts
# can name them before the first retry or dead letter ever happens.
KNOWN: dict[str, tuple[str, str]] = {
    metrics.VOTES: ("counter", "Votes stored, by worker and label (abstain: no usable label)."),
    metrics.DECISIONS: ("counter", "Items settled with a final label, by source (workers, judge)."),
    metrics.ESCALATIONS: ("counter", "Items the workers could not settle, sent to the judge."),
    metrics.REJECTS: ("counter", "Items refused for bad input."),
    metrics.AUDITS: (
        "counter",
        "Worker-accepted items the judge also answered (audit_fraction), by task and outcome: "
        "agree, disagree, failed.",
    ),
    metrics.FLAGGED: (
        "counter",
        "Final labels of items the prompt-injection detector flagged, by task "
        "(the passages are in each outcome's flagged field).",
    ),
    metrics.REVIEWS: (
        "counter",
        "Flagged items whose flagged passages would have changed the judge's label, handed "
        'to a person on the review stream (injection = "review"), by task.',
    ),
    metrics.DEAD_LETTERS: ("counter", "Entries given up on after max_deliveries, by group."),
    metrics.RETRIES: ("counter", "Entries left pending after a failure (retried), by group."),
    metrics.RECLAIMED: ("counter", "Entries taken over from an idle consumer, by group."),
    metrics.MODEL_CALL: ("histogram", "One batched model call, by worker and backend."),
    metrics.PROMPT_TOKENS: (
        "counter",
        "Prompt tokens of the model calls, by worker (the judge: worker=judge), where the "
        "server reports them (llama-server's timings, OpenAI's usage).",
    ),
    metrics.CACHED_TOKENS: (
        "counter",
        "Of those, tokens the server took from its prompt cache: the cache hit rate is "
        "rate(this) / rate(prompt_tokens).",
    ),
    metrics.BATCH_SIZE: ("histogram", "Entries per batch handed to a handler, by group."),
    metrics.ITEM_LATENCY: ("histogram", "From produce to final label, by source."),
    metrics.SERVE_REQUESTS: ("counter", "HTTP answers of tribunal serve, by route and code."),
    metrics.SERVE_RECORDS: (
        "counter",
        "Records pushed to tribunal serve, by outcome: stored, known (not added again), invalid.",
    ),
}
KNOWN_BUCKETS: dict[str, tuple[float, ...]] = {
    metrics.MODEL_CALL: metrics.SECONDS_BUCKETS,
    metrics.ITEM_LATENCY: metrics.SECONDS_BUCKETS,
    metrics.BATCH_SIZE: metrics.SIZE_BUCKETS,
}


def _name(raw: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", raw)


def _labels(raw: dict[str, str]) -> dict[str, str]:
    return {_name(k): v for k, v in raw.items()}


def stats_families(samples: Iterable[StatSample]) -> Iterator[Metric]:
    """Counters, histograms (cumulated) and anything else as gauges, from the stats hash."""
    kinds = {name: kind for name, (kind, _) in KNOWN.items()}
    by_name: dict[str, list[StatSample]] = defaultdict(list)
    for s in samples:
        by_name[s.name].append(s)
        if s.suffix or "le" in s.labels:
            kinds[s.name] = "histogram"
        else:
            kinds.setdefault(s.name, "counter" if s.name.endswith("_total") else "gauge")
    for name, kind in sorted(kinds.items()):
        doc = KNOWN.get(name, ("", f"Fleet statistic {name} (stats hash)."))[1]
        base = PREFIX + _name(name.removesuffix("_total") if kind == "counter" else name)
        family = Metric(base, doc, kind)
        if kind == "histogram":
            _add_histogram(family, by_name[name], KNOWN_BUCKETS.get(name, ()))
        else:
            sample_name = base + "_total" if kind == "counter" else base
            for s in by_name[name]:
                family.add_sample(sample_name, _labels(s.labels), s.value)
            if (
                kind == "counter"
                and not by_name[name]
                and name
                in (
                    metrics.ESCALATIONS,
                    metrics.REJECTS,
                )
            ):
                family.add_sample(sample_name, {}, 0.0)  # unlabeled: nothing counted is 0
        yield family


@dataclass
class _Series:
    """One labelled series of a histogram: observations per bucket bound, and their sum."""

    buckets: defaultdict[float, float] = field(default_factory=lambda: defaultdict(float))
    sum: float = 0.0


def _add_histogram(family: Metric, samples: list[StatSample], known: tuple[float, ...]) -> None:
    series: defaultdict[tuple[tuple[str, str], ...], _Series] = defaultdict(_Series)
    bounds = {float(b) for b in known}
    for s in samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        entry = series[tuple(sorted(_labels(labels).items()))]
        if s.suffix == "sum":
            entry.sum = s.value
        elif not s.suffix and "le" in s.labels:
            bound = float(s.labels["le"])
            entry.buckets[bound] += s.value
            bounds.add(bound)
    ordered = [*sorted(bounds - {math.inf}), math.inf]
    for key, entry in sorted(series.items()):
        labels, running = dict(key), 0.0
        for bound in ordered:
            running += entry.buckets.get(bound, 0.0)
            le = "+Inf" if math.isinf(bound) else repr(bound)
            family.add_sample(family.name + "_bucket", {**labels, "le": le}, running)
        family.add_sample(family.name + "_count", labels, running)
        family.add_sample(family.name + "_sum", labels, entry.sum)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels)


def queue_families(redis: Redis, settings: Settings) -> Iterator[Metric]:
    """Streams, groups and live consumers, read now."""
    ttl = settings.heartbeat_ttl_s
    beats = read_heartbeats(redis, Keys(settings.namespace))
    streams, _ = read_fleet_streams(redis, settings, beats, ttl)
    length = _gauge("stream_length", "Entries in the stream now (XLEN): queue depth.", ["stream"])
    added = Metric(
        PREFIX + "stream_entries_added",
        "Entries ever added to the stream (XINFO STREAM entries-added): items produced, "
        "notifications, escalations, outputs, rejects, dead letters.",
        "counter",
    )
    group_labels = ["stream", "group"]
    lag = _gauge(
        "group_lag", "Entries not yet delivered to the group (XINFO GROUPS lag).", group_labels
    )
    pending = _gauge(
        "group_pending", "Entries delivered to the group, not yet acked.", group_labels
    )
    consumers = _gauge("group_consumers", "Consumers the group knows, live or dead.", group_labels)
    live = _gauge("group_live_consumers", "Group consumers with a live heartbeat.", group_labels)
    idle = _gauge("group_idle_seconds", "Least idle time of the group's consumers.", group_labels)
    stalled = _gauge("group_stalled", "1: work waits and no consumer takes it.", group_labels)
    read = Metric(PREFIX + "group_entries_read", "Entries delivered to the group.", "counter")
    for s in streams:
        length.add_metric([s.stream], s.length)
        added.add_sample(added.name + "_total", {"stream": s.stream}, s.entries_added)
        for g in s.groups:
            values = [s.stream, g.group]
            if g.lag is not None:
                lag.add_metric(values, g.lag)
            pending.add_metric(values, g.pending)
            consumers.add_metric(values, len(g.consumers))
            live.add_metric(values, g.live_consumers)
            stalled.add_metric(values, 1.0 if g.stalled else 0.0)
            if g.consumers:
                idle.add_metric(values, min(c.idle_s for c in g.consumers))
            if g.entries_read is not None:
                read.add_sample(
                    read.name + "_total",
                    dict(zip(group_labels, values, strict=True)),
                    g.entries_read,
                )
    roles = _gauge(
        "live_consumers", "Consumers per role with a heartbeat within heartbeat_ttl_s.", ["role"]
    )
    by_role = live_by_role(beats, ttl)
    for role in dict.fromkeys([*expected_roles(settings), *by_role]):
        roles.add_metric([role], len(by_role.get(role, [])))
    yield from (length, added, lag, pending, consumers, live, idle, stalled, read, roles)


def learning_families(
    redis: Redis, settings: Settings, stats: list[StatSample]
) -> Iterator[Metric]:
    """What the fleet learned from its judge and what a label costs (tribunal.ops.learning)."""
    agreement = _gauge(
        "voter_agreement",
        "Share of a voter's answers that agreed with the judge's label, on the items the "
        "judge labeled (its decisions and audits).",
        ["task", "voter"],
    )
    judged = _gauge(
        "voter_judged_items", "Items the judge labeled that the voter answered.", ["task", "voter"]
    )
    threshold = _gauge(
        "posterior_threshold",
        "The posterior rule's threshold on the task now (absent: it accepts nothing yet).",
        ["task"],
    )
    bound = _gauge(
        "posterior_agreement_bound",
        "The 95% lower bound on the accepted labels' agreement with the judge at that threshold.",
        ["task"],
    )
    voters, thresholds = read_learning(redis, settings)
    for row in voters:
        judged.add_metric([row.task, row.voter], row.labels)
        if row.agreement is not None:
            agreement.add_metric([row.task, row.voter], row.agreement)
    for t in thresholds:
        if t.threshold is not None and t.bound is not None:
            threshold.add_metric([t.task], t.threshold)
            bound.add_metric([t.task], t.bound)
    yield from (agreement, judged, threshold, bound)
    cost = cost_of(stats, settings.worker_tiers)
    for name, value, doc in (
        ("model_seconds_per_label", cost.per_label_s, "Model seconds spent per final label."),
        (
            "judge_seconds_per_item",
            cost.judge_per_item_s,
            "The judge's model seconds per item it answered: a label's cost if it labeled all.",
        ),
        ("cost_ratio", cost.ratio, "Model seconds per label over the judge's per item."),
    ):
        if value is not None:
            yield GaugeMetricFamily(PREFIX + name, doc, value)
    by_tier = _gauge(
        "tier_model_seconds_per_label",
        "Model seconds per final label spent by a tier's workers (named by them, joined with "
        "+), or by the judge.",
        ["tier"],
    )
    for spent in cost.by_tier:
        by_tier.add_metric([spent.tier], spent.per_label_s)
    yield by_tier


class FleetCollector(Collector):
    """Reads Redis on every ``collect`` (each scrape): nothing is cached between scrapes."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            stats = read_stats(self.redis, self.settings)
            families = [
                *queue_families(self.redis, self.settings),
                *stats_families(stats),
                *learning_families(self.redis, self.settings, stats),
            ]
            up = 1.0
        except RedisError as exc:
            log.warning("scrape: cannot read Redis: %s", exc)
            families, up = [], 0.0
        yield from families
        yield GaugeMetricFamily(PREFIX + "up", "1 when Redis answered this scrape, else 0.", up)
        yield GaugeMetricFamily(
            PREFIX + "scrape_duration_seconds",
            "Time this scrape spent reading Redis.",
            time.perf_counter() - started,
        )


def registry_for(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(quick_client(settings), settings))
    return registry


def serve(settings: Settings, port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` until SIGTERM/SIGINT."""
    stop = StopFlag().install()
    server, thread = start_http_server(port, host, registry_for(settings))
    log.info("serving fleet metrics on http://%s:%d/metrics", host, port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        thread.join(5)
