"""What the endpoint tells the rest of the fleet: that it is alive, and what it has done.

- Its counters go to this process's ``/metrics`` (``prometheus_client``) and, every
  ``heartbeat_every_s``, into the fleet's stats hash (``common.metrics``), so
  ``tribunal exporter`` serves them beside the fleet's: they add up across endpoint
  replicas and survive their restarts, as the consumers' do.
- It stamps the heartbeat set as ``serve@host:pid`` on the same schedule (Redis's clock,
  ``Scripts.heartbeat``), so ``tribunal health --role serve`` and compose's healthchecks
  see it like any consumer; a clean stop removes it at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter

from fastapi import Response
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from redis import Redis
from redis.exceptions import RedisClusterException, RedisError

from common import metrics
from common.keys import SERVE_ROLE, Keys
from common.scripts import Scripts
from common.settings import Settings
from consumers.engine.consumer import consumer_name

log = logging.getLogger(__name__)
OUTCOMES = ("stored", "known", "invalid")


class Metrics:
    """The endpoint's counters (module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "tribunal_serve_requests",
            "HTTP requests answered, by route and status code (429: backlog, 503: Redis away).",
            ["route", "code"],
            registry=self.registry,
        )
        self.records = PromCounter(
            "tribunal_serve_records",
            "Records received, by outcome: stored (added), known (the fleet had the id: not "
            "added again), invalid (refused).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # served before the first one
            self.records.labels(outcome)
        self.unsent: Counter[str] = Counter()  # stats fields not yet added to Redis
        self.lock = threading.Lock()  # requests run in a thread pool

    def answered(self, route: str, response: Response) -> Response:
        code = str(response.status_code)
        self.requests.labels(route, code).inc()
        self._count(metrics.field(metrics.SERVE_REQUESTS, {"route": route, "code": code}), 1)
        return response

    def received(self, outcome: str, count: int) -> None:
        self.records.labels(outcome).inc(count)
        self._count(metrics.field(metrics.SERVE_RECORDS, {"outcome": outcome}), count)

    def _count(self, name: str, count: int) -> None:
        with self.lock:
            self.unsent[name] += count

    def take(self) -> Counter[str]:
        with self.lock:
            unsent, self.unsent = self.unsent, Counter()
        return unsent

    def put_back(self, unsent: Counter[str]) -> None:
        with self.lock:
            self.unsent.update(unsent)


class Heartbeat:
    """A daemon thread that stamps the heartbeat and adds the counters to the stats hash
    every ``heartbeat_every_s``; ``stop`` adds the last ones and removes the heartbeat."""

    def __init__(self, redis: Redis, settings: Settings, counters: Metrics) -> None:
        self.redis, self.counters = redis, counters
        self.keys = Keys(settings.namespace)
        self.scripts = Scripts(self.keys, settings.decided_ttl_s)
        self.every_s = settings.heartbeat_every_s
        self.name = consumer_name(SERVE_ROLE)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(RedisError, RedisClusterException):
            self.beat(alive=False)

    def _run(self) -> None:
        while True:
            try:
                self.beat(alive=True)
            except (RedisError, RedisClusterException) as exc:  # the requests say so, once
                log.debug("heartbeat failed: %s", exc)
            if self.stopping.wait(self.every_s):
                return

    def beat(self, alive: bool) -> None:
        """Counters into the stats hash; the heartbeat stamped (or, not ``alive``, removed).
        Counters a failed write did not add are kept for the next beat."""
        unsent = self.counters.take()
        try:
            if unsent:
                pipe = self.redis.pipeline(transaction=False)
                for name, count in unsent.items():
                    pipe.hincrby(self.keys.stats, name, count)
                pipe.execute()
        except (RedisError, RedisClusterException):
            self.counters.put_back(unsent)
            raise
        if alive:
            self.scripts.heartbeat(self.redis, self.name, forget_after_s=3600)
        else:
            self.redis.zrem(self.keys.heartbeats, self.name)
