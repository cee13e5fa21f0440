"""The baseline one might write first, for bench/pipeline.py: rq, one job per item per worker
model plus an aggregation job once three votes are in (JSON serializer, default forking
workers), on the same server as the fleet."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any

import orjson
from redis import Redis


def rq_vote(url: str, worker: str, item: dict[str, Any]) -> None:
    """One worker model's job for one item: vote, and enqueue the aggregation on the third."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    client = Redis.from_url(url)
    key = f"rq:votes:{item['id']}"
    client.hset(key, worker, item["gold"])
    if client.hlen(key) == 3:
        Queue("agg", connection=client, serializer=JSONSerializer).enqueue(
            "rq_baseline.rq_aggregate", url, item["id"]
        )


def rq_aggregate(url: str, item_id: str) -> None:
    client = Redis.from_url(url)
    votes: Any = client.hgetall(f"rq:votes:{item_id}")
    if not votes:  # two vote jobs both saw the third vote: this naive design labels twice
        return
    label, count = statistics.mode(v.decode() for v in votes.values()), len(votes)
    client.rpush("rq:output", orjson.dumps({"id": item_id, "label": label, "votes": count}))
    client.delete(f"rq:votes:{item_id}")


def _rq_worker(url: str, queue: str) -> None:
    from rq import Queue, Worker
    from rq.serializers import JSONSerializer

    client = Redis.from_url(url)
    Worker(
        [Queue(queue, connection=client, serializer=JSONSerializer)],
        connection=client,
        serializer=JSONSerializer,
    ).work(logging_level="WARNING")


def rq_run(url: str, items: list[dict[str, Any]]) -> float:
    """Items/s of the rq design labeling ``items`` (records with a gold label)."""
    n = len(items)
    from rq import Queue
    from rq.serializers import JSONSerializer

    client = Redis.from_url(url)
    client.delete("rq:output")
    workers = [
        multiprocessing.Process(target=_rq_worker, args=(url, q), daemon=True)
        for q in ("w1", "w2", "w3", "agg")
    ]
    for w in workers:
        w.start()
    time.sleep(2.0)
    queues = [Queue(q, connection=client, serializer=JSONSerializer) for q in ("w1", "w2", "w3")]
    started = time.perf_counter()
    for item in items:
        for worker, queue in zip("abc", queues, strict=True):
            queue.enqueue("rq_baseline.rq_vote", url, worker, item)
    while client.llen("rq:output") < n and time.perf_counter() - started < 600:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    for w in workers:
        w.terminate()
    return int(client.llen("rq:output")) / elapsed
