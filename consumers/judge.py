"""Judge consumer: the large model settles the items the workers could not agree on.

It reads escalations in batches, asks the judge backend once per batch, and writes
the final decision with the workers' votes kept for audit. A judge that gives no
usable label leaves the entry pending; after ``max_deliveries`` it is dead-lettered. An
item of a task the judge's backend does not handle is dead-lettered at once: asking again
cannot help.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pydantic

from common import metrics
from common.keys import ITEM_ID_FIELD, JUDGE_GROUP, RECORD_FIELD
from common.schemas import Audit, Decision, Escalation, Item, Vote, now
from consumers import lessons, outcomes, reliability
from consumers.backends import Backend, ask, backend_for, handles
from consumers.engine.handler import Entry, Handler
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes

log = logging.getLogger(__name__)

JUDGE_NAME = "judge"


class JudgeHandler(Handler):
    def __init__(self, rt: Runtime, backend: Backend) -> None:
        self.rt = rt
        self.backend = backend
        self.tasks = rt.settings.all_tasks
        self.call_labels = {"worker": JUDGE_NAME, "backend": rt.settings.judge.backend}
        judge = rt.settings.judge
        self.unhandled = {
            name for name, task in self.tasks.items() if not handles(judge, name, task)
        }
        # Lessons only where a student learns from them: otherwise they are memory for
        # nobody. The reliability counts are small (voters x answers x labels): always kept.
        self.teaches = rt.settings.has_students

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        failures: dict[str, str] = {}
        cases: list[tuple[Entry, Escalation]] = []
        for entry in entries:
            try:
                case = Escalation.model_validate_json(entry.fields[RECORD_FIELD])
            except (KeyError, pydantic.ValidationError) as exc:
                failures[entry.id] = f"unreadable escalation: {exc}"
                continue
            task = case.item.task
            if task in self.unhandled or task not in self.tasks:  # asking again cannot help
                backend = self.rt.settings.judge.backend
                error = (
                    f"the judge's backend {backend} does not handle task {task!r}"
                    if task in self.tasks
                    else f"task {task!r} is not one of this fleet's"
                )
                log.warning("%s: %s; giving up on it now", case.item.id, error)
                self._abandon(entry, case, error, writes)
            else:
                cases.append((entry, case))
        if not cases:
            return failures
        call = ask(self.backend, JUDGE_NAME, [c.item for _, c in cases], self.tasks)
        outcomes.model_call(
            writes, self.call_labels, call.seconds, call.prompt_tokens, call.cached_tokens
        )
        for (entry, case), verdict in zip(cases, call.votes, strict=True):
            if verdict.label is None:
                labels = self.tasks[case.item.task].labels
                failures[entry.id] = (
                    f"judge gave no label in {labels}: {verdict.error or verdict.raw!r}"
                )
            elif case.accepted is not None:
                self.record_audit(writes, case, case.accepted, verdict)
                self.trust(writes, case, verdict.label, "audit")
            else:
                self.trust(writes, case, verdict.label, "judge")
                decision = Decision.of(
                    case.item, verdict.label, "judge", case.reason, case.votes, verdict
                )
                outcomes.publish(writes, decision, escalated=True)
        return failures

    def trust(self, writes: Writes, case: Escalation, label: str, source: lessons.Source) -> None:
        """The judge's label is one the fleet trusts: count how each vote compared with it
        (the posterior rule's evidence) and keep it as a lesson for the students."""
        reliability.record(writes, case.item.task, case.votes, label)
        if self.teaches:
            lessons.record(writes, case.item, label, source)

    def record_audit(self, writes: Writes, case: Escalation, accepted: str, verdict: Vote) -> None:
        """The accepted label stands; the judge's answer on it is kept and counted."""
        item = case.item
        agree = verdict.label == accepted
        audit = Audit(
            id=item.id,
            task=item.task,
            accepted=accepted,
            judge=verdict,
            agree=agree,
            votes=case.votes,
            gold=item.gold,
            audited_at=now(),
        )
        writes.add(
            self.rt.keys.audits, {ITEM_ID_FIELD: item.id.encode(), RECORD_FIELD: audit.dump()}
        )
        outcome = "agree" if agree else "disagree"
        writes.incr(metrics.AUDITS, {"task": item.task, "outcome": outcome})

    def give_up(self, entry: Entry, error: str, writes: Writes) -> bool:
        try:
            case = Escalation.model_validate_json(entry.fields[RECORD_FIELD])
        except (KeyError, pydantic.ValidationError):  # written by hand: not a real escalation
            case = None
        self._abandon(entry, case, error, writes)
        return True

    def _abandon(self, entry: Entry, case: Escalation | None, error: str, writes: Writes) -> None:
        """Drop an audit (the item keeps its label) or dead-letter the escalation."""
        item: Item | None = case.item if case else None
        item_id = item.id if item else f"entry-{entry.id}"
        if case is not None and case.accepted is not None:
            # An audit only: the item already has its final label, so nothing is dead.
            log.warning(
                "audit of %s dropped after %d deliver%s: %s",
                item_id,
                entry.deliveries,
                "y" if entry.deliveries == 1 else "ies",
                error,
            )
            writes.incr(metrics.AUDITS, {"task": case.item.task, "outcome": "failed"})
            return
        keys = self.rt.keys
        escalated = item is not None
        outcomes.dead_letter(
            writes, keys.judge, JUDGE_GROUP, entry, item_id, error, item, escalated
        )


def run_judge(rt: Runtime) -> None:
    spec = rt.settings.judge
    backend = backend_for(spec, rt.settings)
    consume(
        rt,
        lambda keys: keys.judge,
        JUDGE_GROUP,
        lambda prt: JudgeHandler(prt, backend),
        role="judge",
    )
