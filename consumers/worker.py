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

from common import metrics
from common.keys import RECORD_FIELD, worker_group
from common.schemas import Item, Vote, now
from common.validation import InvalidItem, item_from_entry
from consumers import outcomes
from consumers.backends import Backend, BackendError, ask, backend_for
from consumers.engine.consumer import ensure_group
from consumers.engine.handler import Entry, Handler
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes

log = logging.getLogger(__name__)


class WorkerHandler(Handler):
    def __init__(self, rt: Runtime, worker: str, backend: Backend) -> None:
        self.rt = rt
        self.worker = worker
        self.backend = backend
        self.tasks = rt.settings.all_tasks
        self.rules = rt.settings.input_rules
        # The aggregator is woken once a decision may be possible, not on every vote.
        self.notify_at = rt.settings.effective_quorum
        self.stream = rt.keys.source_of(worker, rt.settings.backup_workers)
        self._groups_ready = False
        self.call_labels = {"worker": worker, "backend": rt.settings.workers[worker].backend}

    def tick(self) -> None:
        """Once connected: make sure every model's group exists, so the janitor never trims
        entries a model that has not started yet would still need."""
        if not self._groups_ready:
            backups = self.rt.settings.backup_workers
            for name in self.rt.settings.workers:
                stream = self.rt.keys.source_of(name, backups)
                ensure_group(self.rt.redis, stream, worker_group(name))
            self._groups_ready = True

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
        deadline = self.deadline()
        for (entry, item), vote in zip(valid, call.votes, strict=True):
            writes.cast_vote(item.id, vote, entry.fields[RECORD_FIELD], self.notify_at, deadline)
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

    def deadline(self) -> float:
        """When the vote timeout of an item voted on now ends (epoch seconds)."""
        return now() + self.rt.settings.vote_timeout_s

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
        writes.cast_vote(item.id, abstain, payload, self.notify_at, self.deadline())
        return True


def run_worker(rt: Runtime, worker: str) -> None:
    spec = rt.settings.workers.get(worker)
    if spec is None:
        known = ", ".join(sorted(rt.settings.workers))
        raise BackendError(f"no worker named {worker!r} in the fleet (known: {known})")
    backend = backend_for(spec, rt.settings)
    backups = rt.settings.backup_workers
    consume(
        rt,
        lambda keys: keys.source_of(worker, backups),
        worker_group(worker),
        lambda prt: WorkerHandler(prt, worker, backend),
        role=f"worker:{worker}",
    )
