"""Labels reader: streams final decisions to JSONL through its own consumer group.

Its own group means several readers (an exporter, an archiver) each get every
label, and a restarted reader continues where it stopped: a line is written and
flushed before its entry is acked.

Into a pipe, "written" is not "read": ``head`` reads a whole buffer and keeps a line of it.
So into a pipe a line is written alone and counts once the pipe is empty again (its reader
took it: ``FIONREAD`` 0); when the reader is gone (``POLLERR``, or ``EPIPE`` on the next
write), the reader ends (``OutputClosed``), acking the lines taken and no other. ``labels |
head -n 2`` acks two labels; the rest stay for the group's next reader.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import stat
import termios
from collections.abc import Sequence
from typing import IO, Any

from common.connection import text
from common.errors import Busy
from common.keys import LABELS_ROLE, RECORD_FIELD, all_partitions, claim_partitions
from consumers.engine.handler import Entry, Handler, StopConsuming
from consumers.engine.loop import consume
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes

WAIT_S = 0.001  # between two looks at a pipe being read


class OutputClosed(StopConsuming):
    """The labels' reader closed its end (``tribunal labels | head``)."""


class LabelsHandler(Handler):
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.written = 0
        self.pipe = self._fifo()

    def _fifo(self) -> int | None:
        """The descriptor of ``out`` when it is a pipe, else None (a file, a test's sink)."""
        try:
            fd = self.out.fileno()
            return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
        except (AttributeError, OSError, ValueError):
            return None

    def handle(self, entries: Sequence[Entry], writes: Writes) -> dict[str, str]:
        if self.pipe is not None:
            self._to_pipe(entries, self.pipe)
            return {}
        lines = [e.fields[RECORD_FIELD] + b"\n" for e in entries if RECORD_FIELD in e.fields]
        self.out.write(b"".join(lines))
        self.out.flush()
        self.written += len(lines)
        return {}

    def _to_pipe(self, entries: Sequence[Entry], fd: int) -> None:
        taken: list[str] = []
        for entry in entries:
            line = entry.fields.get(RECORD_FIELD)
            try:
                if line is not None:
                    self.out.write(line + b"\n")
                    self.out.flush()
                    if not self._taken(fd):
                        raise BrokenPipeError
                    self.written += 1
            except BrokenPipeError:  # what the reader took is acked, nothing else
                raise OutputClosed(done=taken) from None
            taken.append(entry.id)

    def _taken(self, fd: int) -> bool:
        """Wait until the pipe's reader took all that was written (True) or left (False)."""
        unread = array.array("i", [0])
        while True:
            fcntl.ioctl(fd, termios.FIONREAD, unread)
            if unread[0] == 0:
                return True
            if reader_gone(fd):
                return False
            select.select([], [], [], WAIT_S)

    def tick(self) -> None:
        """Between reads: a pipe whose reader left (``labels --follow | head -1``) ends the
        reader now, not at the next label, which may be hours away."""
        if self.pipe is not None and reader_gone(self.pipe):
            raise OutputClosed


def reader_gone(fd: int) -> bool:
    """The read end of the pipe ``fd`` writes to is closed (poll reports POLLERR)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


def read_labels(rt: Runtime, out: IO[bytes], group: str, follow: bool) -> int:
    """Write decisions as JSONL until the stream is drained (or until stopped, with
    ``follow``); returns how many were written and acked. Raises ``OutputClosed`` when
    ``out`` is a pipe its reader closed (what it took is acked, nothing else)."""
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
