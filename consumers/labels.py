"""Labels reader: streams final decisions to JSONL through its own consumer group.

Its own group means several readers (an exporter, an archiver) each get every
label, and a restarted reader continues where it stopped: a line is written and
flushed before its entry is acked. A pipe closed by its reader ends it (``OutputClosed``)
with the batch being written left unacked; lines a pipe had taken into its buffer before
its reader left are gone for that group, as with any pipe.
"""

from __future__ import annotations

import os
import select
import stat
from collections.abc import Sequence
from typing import IO, Any

from common.connection import text
from common.errors import Busy
from common.keys import LABELS_ROLE, RECORD_FIELD, all_partitions, claim_partitions
from consumers.engine.handler import Entry, Handler, StopConsuming
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes


class OutputClosed(StopConsuming):
    """The labels' reader closed its end (``tribunal labels | head``)."""


class LabelsHandler(Handler):
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.written = 0

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        lines = [e.fields[RECORD_FIELD] + b"\n" for e in entries if RECORD_FIELD in e.fields]
        try:
            self.out.write(b"".join(lines))
            self.out.flush()
        except BrokenPipeError:  # nothing of this batch is acked: its labels stay for the group
            raise OutputClosed from None
        self.written += len(lines)
        return {}

    def tick(self) -> None:
        """Between reads: a pipe whose reader left (``labels --follow | head -1``) ends the
        reader now, not at the next label, which may be hours away."""
        if self._pipe_closed():
            raise OutputClosed

    def _pipe_closed(self) -> bool:
        try:
            fd = self.out.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
        except (AttributeError, OSError, ValueError):  # not a file (a test's sink), or closed
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))


def read_labels(rt: Runtime, out: IO[bytes], group: str, follow: bool) -> int:
    """Write decisions as JSONL until the stream is drained (or until stopped, with
    ``follow``); returns how many were written and acked. Raises ``OutputClosed`` when
    ``out`` is a pipe its reader closed: the batch being written is not acked."""
    handler = LabelsHandler(out)
    consume(
        rt, lambda keys: keys.output, group, lambda _: handler, role=LABELS_ROLE, drain=not follow
    )
    return handler.written


class ReaderActive(Busy, RuntimeError):
    """The reader to forget is reading now: deleting its group would make it start over."""


def forget_reader(rt: Runtime, group: str) -> int:
    """Delete the reader's consumer group from the output stream of every partition, so
    retention stops keeping labels it has not read; its next read starts a new group at
    the oldest label still kept. Returns how many groups were deleted (0: no such reader).
    Raises PartitionMismatch when this process counts partitions differently from the
    namespace, ReaderActive when a consumer of the group was seen within the heartbeat ttl
    (a running ``labels --follow``: it would recreate the group and write every kept label
    again)."""
    settings = rt.settings
    claim_partitions(rt.redis, settings.namespace, settings.partitions)
    streams = [keys.output for keys in all_partitions(settings.namespace, settings.partitions)]
    streams = [s for s in streams if rt.redis.exists(s)]
    for stream in streams:
        groups: Any = rt.redis.xinfo_groups(stream)
        if group not in {text(g["name"]) for g in groups}:
            continue
        consumers: Any = rt.redis.xinfo_consumers(stream, group)
        for c in consumers:
            if c["idle"] < settings.heartbeat_ttl_s * 1000:
                raise ReaderActive(
                    f"label reader {group!r} is reading now (consumer {text(c['name'])}, "
                    f"idle {c['idle'] / 1000:.0f}s): stop it first"
                )
    return sum(int(rt.redis.xgroup_destroy(s, group)) for s in streams)
