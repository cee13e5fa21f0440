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
from common.schemas import Audit, Decision, Escalation, Item, Review, Vote, now
from consumers import outcomes
from consumers.backends import Backend, ask, backend_for, handles
from consumers.engine.handler import Entry, Handler
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes
from consumers.lessons import Lesson, Source

log = logging.getLogger(__name__)

JUDGE_NAME = "judge"


class JudgeHandler(Handler):
    def __init__(self, rt: Runtime, backend: Backend) -> None:
        self.rt = rt
        self.backend = backend
        self.tasks = rt.settings.all_tasks
        # The tasks as the judge reads an item whole (injection = "review": its second answer).
        self.whole = {
            name: task.model_copy(update={"injection": "flag"}) for name, task in self.tasks.items()
        }
        self.call_labels = {"worker": JUDGE_NAME, "backend": rt.settings.judge.backend}
        judge = rt.settings.judge
        self.unhandled = {
            name for name, task in self.tasks.items() if not handles(judge, name, task)
        }
        # Lessons only where a student or the posterior rule learns from them: otherwise
        # they are memory for nobody.
        self.teaches = rt.settings.learns

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
        # What the detector flags in each item to decide, found once for the decision and the
        # second answer of injection = "review".
        found = {
            c.item.id: self.tasks[c.item.task].findings(c.item)
            for _, c in cases
            if c.accepted is None
        }
        whole = self.read_whole([c for _, c in cases if found.get(c.item.id)], writes)
        for (entry, case), verdict in zip(cases, call.votes, strict=True):
            if verdict.label is None and verdict.refused:  # asking again gets the same
                error = f"the judge's model refused it: {verdict.error}"
                log.warning("%s: %s; giving up on it now", case.item.id, error)
                self._abandon(entry, case, error, writes)
            elif verdict.label is None:
                labels = self.tasks[case.item.task].labels
                failures[entry.id] = (
                    f"judge gave no label in {labels}: {verdict.error or verdict.raw!r}"
                )
            elif case.accepted is not None:
                self.record_audit(writes, case, case.accepted, verdict)
            else:
                decision = Decision.of(
                    case.item,
                    verdict.label,
                    "judge",
                    case.reason,
                    case.votes,
                    verdict,
                    found[case.item.id],
                )
                obeyed = whole.get(case.item.id)
                if obeyed is not None and obeyed != verdict.label:
                    self.record_review(writes, decision, case.item, obeyed)
                lesson = self.lesson(case, verdict.label, "judge")
                outcomes.publish(writes, decision, escalated=True, lesson=lesson)
        return failures

    def read_whole(self, flagged: Sequence[Escalation], writes: Writes) -> dict[str, str | None]:
        """Item id -> the judge's label reading it whole, for the ``flagged`` items (to decide,
        with findings) of tasks with ``injection = "review"`` (its decision reads them without
        the flagged passages)."""
        items = [c.item for c in flagged if self.tasks[c.item.task].injection == "review"]
        if not items:
            return {}
        call = ask(self.backend, JUDGE_NAME, items, self.whole)
        outcomes.model_call(
            writes, self.call_labels, call.seconds, call.prompt_tokens, call.cached_tokens
        )
        return {item.id: vote.label for item, vote in zip(items, call.votes, strict=True)}

    def record_review(self, writes: Writes, decision: Decision, item: Item, obeyed: str) -> None:
        """Hand a person the item whose flagged passages would have made its label ``obeyed``;
        like an audit, recorded once per answer of the judge."""
        review = Review(
            id=item.id,
            task=item.task,
            label=decision.label,
            with_passages=obeyed,
            flagged=decision.flagged,
            item=item,
            reviewed_at=now(),
        )
        writes.add(
            self.rt.keys.review, {ITEM_ID_FIELD: item.id.encode(), RECORD_FIELD: review.dump()}
        )
        writes.incr(metrics.REVIEWS, {"task": item.task})

    def lesson(self, case: Escalation, label: str, source: Source) -> bytes | None:
        """The judge's label as a lesson (the item as the models read it, its votes), where the
        fleet learns: a student learns from the text it will be asked about."""
        if not self.teaches:
            return None
        item = self.tasks[case.item.task].view(case.item)
        return Lesson.of(item, label, source, case.votes, case.sampling_rate).dump()

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
        lesson = self.lesson(case, verdict.label, "audit") if verdict.label else None
        if lesson:  # an audit is recorded once per answer, like the audit itself
            writes.add(
                self.rt.keys.lessons, {ITEM_ID_FIELD: item.id.encode(), RECORD_FIELD: lesson}
            )

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
