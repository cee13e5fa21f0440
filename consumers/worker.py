"""Worker-model consumer: every item gets one vote from each worker model.

Each worker model has its own consumer group on the items stream, so every
model sees every item while replicas of one model share its load. A batch goes
to the backend in one call; each vote is cast by a script that stores it in the
item's vote hash and notifies the aggregator once enough votes are in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from common import metrics
from common.keys import RECORD_FIELD, worker_group
from common.schemas import Item, Vote
from common.validation import InvalidItem, item_from_entry
from consumers import outcomes
from consumers.backends import Backend, BackendError, ask, backend_for
from consumers.backends.base import Learner
from consumers.engine.consumer import ensure_group
from consumers.engine.handler import Entry, Handler
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes
from consumers.lessons import LessonFeed

log = logging.getLogger(__name__)


class WorkerHandler(Handler):
    def __init__(
        self, rt: Runtime, worker: str, backend: Backend, feed: LessonFeed | None = None
    ) -> None:
        self.rt = rt
        self.feed = feed
        self.worker = worker
        self.backend = backend
        self.tasks = rt.settings.all_tasks
        self.rules = rt.settings.input_rules
        # The aggregator is woken once a decision may be possible, not on every vote: in
        # the first tier once a quorum of it has voted; in a later one (asked only about the
        # few items left open) on each vote.
        settings = rt.settings
        tiers, k = settings.worker_tiers, settings.tier_of(worker)
        before = sum(len(tier) for tier in tiers[:k])
        self.notify_at = before + 1 if k else min(settings.effective_quorum, len(tiers[0]))
        self.stream = rt.keys.tier(k)
        self._groups_ready = False
        self.call_labels = {"worker": worker, "backend": rt.settings.workers[worker].backend}

    def tick(self) -> None:
        """Once connected: make sure every model's group exists, so the janitor never trims
        entries a model that has not started yet would still need."""
        if not self._groups_ready:
            for k, tier in enumerate(self.rt.settings.worker_tiers):
                for name in tier:
                    ensure_group(self.rt.redis, self.rt.keys.tier(k), worker_group(name))
            self._groups_ready = True
        if self.feed is not None and isinstance(self.backend, Learner):
            self.backend.learn(self.feed)

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        valid: list[tuple[Entry, Item]] = []
        for entry in entries:
            try:
                valid.append((entry, item_from_entry(entry.fields, self.rules)))
            except InvalidItem as exc:
                outcomes.reject(writes, self.stream, entry, exc)
        if self.rt.settings.early_exit:
            valid = self.unsettled(valid, writes)
        if not valid:
            return {}
        call = ask(self.backend, self.worker, [item for _, item in valid], self.tasks)
        outcomes.model_call(
            writes, self.call_labels, call.seconds, call.prompt_tokens, call.cached_tokens
        )
        timeout_s = self.rt.settings.vote_timeout_s
        for (entry, item), vote in zip(valid, call.votes, strict=True):
            writes.cast_vote(item.id, vote, entry.fields[RECORD_FIELD], self.notify_at, timeout_s)
        return {}

    def unsettled(
        self, valid: list[tuple[Entry, Item]], writes: Writes
    ) -> list[tuple[Entry, Item]]:
        """Early exit: drop items another path settled already (the others agreed, the judge
        decided, a duplicate id), so a lagging model spends nothing on them."""
        states: Any = self.rt.redis.mget([self.rt.keys.state(item.id) for _, item in valid])
        kept = [pair for pair, state in zip(valid, states, strict=True) if state is None]
        writes.incr(metrics.SKIPPED, {"worker": self.worker}, len(valid) - len(kept))
        return kept

    def give_up(self, entry: Entry, error: str, writes: Writes) -> bool:
        """This model keeps failing on the item: abstain with the error, so the other
        workers and the judge can still settle it."""
        try:
            item = item_from_entry(entry.fields, self.rules)
        except InvalidItem as exc:
            outcomes.reject(writes, self.stream, entry, exc)
            return True
        abstain = Vote(
            worker=self.worker,
            label=None,
            error=f"gave up after {entry.deliveries} deliveries: {error}",
        )
        payload = entry.fields[RECORD_FIELD]
        writes.cast_vote(item.id, abstain, payload, self.notify_at, self.rt.settings.vote_timeout_s)
        return True


def run_worker(rt: Runtime, worker: str) -> None:
    spec = rt.settings.workers.get(worker)
    if spec is None:
        known = ", ".join(sorted(rt.settings.workers))
        raise BackendError(f"no worker named {worker!r} in the fleet (known: {known})")
    backend = backend_for(spec, rt.settings)
    tier = rt.settings.tier_of(worker)
    # One feed for the process: each partition's handler asks the backend to learn from
    # it, and the first call that finds something new does.
    feed = None
    if isinstance(backend, Learner):
        feed = LessonFeed(rt.redis, rt.settings.namespace, rt.settings.partitions, worker)
    consume(
        rt,
        lambda keys: keys.tier(tier),
        worker_group(worker),
        lambda prt: WorkerHandler(prt, worker, backend, feed),
        role=f"worker:{worker}",
    )
    if isinstance(backend, Learner):
        try:
            backend.save()  # what was learned since the last snapshot, on a graceful stop
        except redis.RedisError as exc:
            log.warning("worker %s: could not save what it learned (%s)", worker, exc)
