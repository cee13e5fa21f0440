"""Aggregator: applies the decision rule to an item's votes and settles or escalates it.

Workers notify it (on the ready stream) once an item has enough votes that a
decision may be possible. Items whose remaining votes never arrive (a worker is
down) are swept from the deadlines set after ``vote_timeout_s`` and decided with
the votes present. Settling goes through a script that acts once per item, so
replicas, re-deliveries and the sweep can race safely.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import pydantic

from common.connection import server_time
from common.keys import AGGREGATOR_GROUP, ITEM_IN_VOTES, READY_IDS_FIELD, SAMPLING_RATE_IN_VOTES
from common.schemas import Decision, Escalation, Item, Vote, now
from consumers import outcomes
from consumers.decision import Posterior, Rule, Ruling, decide, fit_policy
from consumers.engine.handler import Entry, Handler
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes
from consumers.lessons import LessonFeed
from consumers.reliability import Reliability
from consumers.retention import trim_all

log = logging.getLogger(__name__)


class Learning:
    """The posterior rule's counts, folded from the lessons as they arrive: one per process,
    shared by its partitions' handlers (each would otherwise read every partition again)."""

    def __init__(self, rt: Runtime) -> None:
        settings = rt.settings
        self.reliability = Reliability.of(settings)
        self.feed = LessonFeed(rt.redis, settings.namespace, settings.partitions, "aggregator")
        self.every_s = settings.reliability_every_s
        self.policy = fit_policy(settings)
        self.next_at = 0.0

    def refresh(self) -> None:
        """Count the lessons that arrived, at most every ``reliability_every_s``."""
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        learned = 0
        while lessons := self.feed.read():
            self.reliability.learn(lessons)
            learned += len(lessons)
        if learned:
            self.reliability.refit(self.policy)


class AggregatorHandler(Handler):
    def __init__(self, rt: Runtime, learning: Learning | None = None) -> None:
        self.rt = rt
        self.learning = learning or Learning(rt)
        self.rule = Rule.of(rt.settings, self.learning.reliability)
        self.learns = isinstance(self.rule, Posterior)
        self._next_sweep = 0.0
        self._next_trim = 0.0

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        ids = list(dict.fromkeys(item_id for e in entries for item_id in _ids(e)))
        self.settle(ids, writes, timed_out=False)
        return {}

    def give_up(self, entry: Entry, error: str, writes: Writes) -> bool:
        """Dead-letter every item the notification names, each with its item when known."""
        keys = self.rt.keys
        for item_id in _ids(entry) or [f"entry-{entry.id}"]:
            raw: Any = self.rt.redis.hget(keys.votes(item_id), ITEM_IN_VOTES)
            try:
                item = Item.model_validate_json(raw) if raw else None
            except pydantic.ValidationError:
                item = None
            outcomes.dead_letter(writes, keys.ready, AGGREGATOR_GROUP, entry, item_id, error, item)
        return True

    def tick(self) -> None:
        if self.learns:
            self.learning.refresh()
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.rt.settings.trim_every_s
            trim_all(self.rt.redis, self.rt.keys, self.rt.settings)
        self.sweep()

    def sweep(self) -> None:
        """Decide items whose vote timeout passed, with the votes they have."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + min(1.0, self.rt.settings.vote_timeout_s / 4)
        now = server_time(self.rt.redis, self.rt.keys.deadlines)  # its clock stamped them
        due: Any = self.rt.redis.zrangebyscore(
            self.rt.keys.deadlines,
            "-inf",
            now,
            start=0,
            num=self.rt.settings.batch_size,
        )
        if due:
            log.info("vote timeout: deciding %d items with the votes present", len(due))
            writes = Writes.transaction(self.rt.redis, self.rt.scripts)
            self.settle([d.decode() for d in due], writes, timed_out=True)
            writes.flush().execute()

    def settle(self, ids: list[str], writes: Writes, timed_out: bool) -> None:
        for item_id, fields in zip(
            ids, self.rt.scripts.gather_votes(self.rt.redis, ids), strict=True
        ):
            raw_item = fields.pop(ITEM_IN_VOTES, None)
            raw_rate = fields.pop(SAMPLING_RATE_IN_VOTES, None)
            if raw_item is None:
                if timed_out:  # settled meanwhile; only its deadline entry was left
                    writes.forget_deadline(item_id)
                continue
            sampling_rate = float(raw_rate) if raw_rate else None
            item = Item.model_validate_json(raw_item)
            votes = [_read_vote(worker, raw) for worker, raw in sorted(fields.items())]
            final = timed_out or len(votes) >= self.rule.n_workers
            outcome = decide(votes, self.rule, final=final, task=item.task)
            spec = self.rt.settings.all_tasks.get(item.task)
            flagged = spec.findings(item) if spec and outcome.kind == "accept" else []
            if flagged and spec is not None and spec.injection == "review":
                # The judge answers it twice (without and with the passages): a person gets it
                # if the passages would have changed its label.
                outcome = Ruling(
                    "escalate", reason="flagged: the judge decides (injection = review)"
                )
            if outcome.kind == "accept" and outcome.label is not None:
                decision = Decision.of(
                    item, outcome.label, "workers", outcome.reason, votes, flagged=flagged
                )
                audit = None
                if sampled(item.id, fraction := self.rt.settings.audit_fraction):
                    # An item explored past the first tier was seen with both samples' chance.
                    audit = Escalation(
                        item=item,
                        votes=votes,
                        reason="audit",
                        escalated_at=now(),
                        accepted=outcome.label,
                        sampling_rate=fraction * (sampling_rate or 1.0),
                    ).dump()
                outcomes.publish(writes, decision, escalated=False, audit=audit)
            elif outcome.kind == "escalate":
                reason = ("vote timeout: " if timed_out else "") + outcome.reason
                self.escalate(item, votes, reason, writes, sampling_rate)
            elif (tier := self.next_tier(votes)) is not None:
                # The vote timeout starts again for the votes the next tier owes. Only the
                # step out of the first tier is sampled (the fit weighs acceptances past it);
                # an item past it goes on to the later tiers, with the rate it went at.
                timeout_s = self.rt.settings.vote_timeout_s
                if tier > 1 or not self.untrusted(item.task):
                    writes.advance(item.id, tier, raw_item, timeout_s, None)
                elif self.explored(item.id):
                    rate = self.rt.settings.explore_fraction
                    writes.advance(item.id, tier, raw_item, timeout_s, rate)
                else:
                    reason = f"{item.task} accepts nothing yet: tier {tier} skipped, judge asked"
                    self.escalate(item, votes, reason, writes, None)

    def escalate(
        self,
        item: Item,
        votes: list[Vote],
        reason: str,
        writes: Writes,
        sampling_rate: float | None,
    ) -> None:
        """Send the item to the judge. ``sampling_rate``: the rate of the sample that sent it
        past its first tier while its task accepted nothing (kept in its votes hash when it was
        sent, whatever the rule says now), so the fit weighs its later tiers' votes as the
        items they were sampled from."""
        escalation = Escalation(
            item=item, votes=votes, reason=reason, escalated_at=now(), sampling_rate=sampling_rate
        )
        writes.escalate(item.id, escalation.dump())

    def untrusted(self, task: str) -> bool:
        """Whether the learned rule accepts nothing of ``task`` now (no threshold has kept its
        bound yet): a later tier's votes could not settle an item, only teach the fit."""
        return self.learns and math.isinf(self.rule.needed_for(task))

    def explored(self, item_id: str) -> bool:
        """Whether an untrusted task's item is one of the ``explore_fraction`` sent on anyway."""
        return sampled(item_id, self.rt.settings.explore_fraction, salt=b"explore")

    def next_tier(self, votes: list[Vote]) -> int | None:
        """The tier to ask next, when every worker of the tiers asked so far has voted (an
        abstention counts as voted) and the item is still open; else None."""
        tiers = self.rt.settings.worker_tiers
        voters = {v.worker for v in votes}
        asked = max((k for k, tier in enumerate(tiers) if voters & set(tier)), default=0)
        if asked + 1 >= len(tiers):
            return None
        everyone = all(name in voters for tier in tiers[: asked + 1] for name in tier)
        return asked + 1 if everyone else None


def sampled(item_id: str, fraction: float, salt: bytes = b"") -> bool:
    """Whether an item is in a ``fraction`` sample (audits; exploration, with its own
    ``salt`` so the two samples are unrelated): a stable hash of its id, so a re-delivery or
    another replica picks the same items, unrelated to their content."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(item_id.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _ids(entry: Entry) -> list[str]:
    """The item ids a notification names (one entry per batch of votes)."""
    return entry.fields.get(READY_IDS_FIELD, b"").decode().split()


def _read_vote(worker: bytes, raw: bytes) -> Vote:
    """A vote that cannot be read counts as an abstention, never as a crash."""
    try:
        return Vote.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        name = worker.decode(errors="replace")
        return Vote(
            worker=name,
            label=None,
            error=f"unreadable vote: {exc.error_count()} errors",
            raw=raw[:200].decode(errors="replace"),
        )


def run_aggregator(rt: Runtime) -> None:
    learning = Learning(rt)
    consume(
        rt,
        lambda keys: keys.ready,
        AGGREGATOR_GROUP,
        lambda prt: AggregatorHandler(prt, learning),
        role="aggregator",
    )
