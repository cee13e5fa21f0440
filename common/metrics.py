"""Fleet counters and histograms kept in Redis, so they add up across processes and restarts.

Each partition has one hash, ``tribunal:{p}:stats``. A field is a metric name with
its labels, ``votes_total|label=positive|worker=vader``, holding a count; histogram
fields add ``le=<bucket>`` (not cumulative: the exporter sums them up), plus
``…|sum`` and ``…|count``. Counters of things that must not be double counted
(votes, settled items) are incremented inside the Lua scripts, only when the
step really happened; the rest are summed per batch (``consumers.engine.writes``) and
incremented in the batch's pipeline.
Queue depths are never counted here: they are read from the streams themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Counters
VOTES = "votes_total"  # worker, label ("abstain" for abstentions)
DECISIONS = "decisions_total"  # source: workers | judge
ESCALATIONS = "escalations_total"
REJECTS = "rejects_total"
DEAD_LETTERS = "dead_letters_total"  # group
RETRIES = "retries_total"  # group: entries left pending after a failure
RECLAIMED = "reclaimed_total"  # group: entries taken over from an idle consumer
SKIPPED = "skipped_total"  # worker: items already settled when the worker got to them
TIEBREAKS = "tiebreaks_total"  # items sent on to a later tier of workers (staged, tiers)
PROMPT_TOKENS = "prompt_tokens_total"  # worker: prompt tokens of its model calls
CACHED_TOKENS = "prompt_tokens_cached_total"  # worker: of those, taken from the prompt cache
FLAGGED = "flagged_total"  # task: final labels of items the injection detector flagged
REVIEWS = "reviews_total"  # task: of those, sent to a person (injection = "review")
AUDITS = "audits_total"  # task, outcome: agree | disagree | failed (the judge gave no label)
SERVE_REQUESTS = "serve_requests_total"  # route, code: HTTP answers of `tribunal serve`
SERVE_RECORDS = "serve_records_total"  # outcome: stored | known | invalid, of `tribunal serve`
# Histograms
MODEL_CALL = "model_call_seconds"  # worker (the judge is worker="judge"), backend
BATCH_SIZE = "batch_size"  # role
ITEM_LATENCY = "item_latency_seconds"  # source: produce to final label


def field(name: str, labels: Mapping[str, str] | None = None) -> str:
    """``name|k=v|…`` with labels sorted, the one spelling of a metric field."""
    if not labels:
        return name
    return "|".join([name, *(f"{k}={v}" for k, v in sorted(labels.items()))])


def parse_field(raw: str) -> tuple[str, dict[str, str]]:
    name, *pairs = raw.split("|")
    labels = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return name, labels
