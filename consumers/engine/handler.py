"""The extension point: what a consumer does with a batch of stream entries.

Every stage (worker, aggregator, judge, labels) is a ``Handler``; the engine reads the
entries, keeps them claimed while the handler runs, and sends what it queued on ``Writes``
with the batch's XACK in one MULTI/EXEC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import TribunalError
from consumers.engine.writes import Writes


@dataclass
class Entry:
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1


class StopConsuming(TribunalError):
    """Raised by a handler whose output is gone for good (the labels reader's pipe closed):
    the consumer stops at once, acking of the batch only the entries in ``done``; the rest
    stay pending for the group's next reader. Not an error to retry, so not caught as one."""

    def __init__(self, done: Sequence[str] = ()) -> None:
        super().__init__("the handler's output is gone")
        self.done = list(done)


class Handler:
    """What a consumer does with a batch. Subclasses implement ``handle``."""

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        """Queue the batch's results on ``writes``; return ``{entry_id: error}`` for entries
        to leave pending (they are retried after ``reclaim_idle_s``). Raises
        ``StopConsuming`` to end the consumer instead."""
        raise NotImplementedError

    def give_up(self, entry: Entry, error: str, writes: Writes) -> bool:
        """Settle an entry that failed too often; return False to keep it pending."""
        return False

    def tick(self) -> None:
        """Called once per loop iteration, for periodic work (cheap when there is none)."""
