"""Lines of a file or a pipe as they become readable, like ``tail -F``, with a checkpoint.

    lines = Lines("tickets.jsonl", follow=True, stop=stopped)
    for line in lines:            # bytes, or a marker:
        ...                       # IDLE: nothing more to read for now (send what you hold)
                                  # Restart: the file was rotated; lines number from .after + 1

A producer that holds records until it has a chunk's worth must know when no more are
coming soon, or a trickle waits for 500 records (Kafka's producers flush on ``linger.ms``
for the same reason). ``Lines`` says so with ``IDLE`` the moment its input has nothing
ready: at the end of a file, or when a pipe has no bytes waiting. Reading is ``os.read``
on the descriptor behind ``select``, because a buffered ``readline`` on a pipe blocks
without saying it waits.

Following survives log rotation as GNU ``tail -F`` does: a file renamed away (logrotate's
``create``) is read to its end for ``RENAMED_GRACE_S`` more (its writer reopens the path
only when told), then the new file at the path is followed from its start;
a file truncated in place (``copytruncate``), or rewritten in place (its first bytes are not
the ones read), is read again from its start. Lines written
between logrotate's copy and its truncation are lost to every reader: that is
copytruncate's own gap (logrotate(8)). ``position`` is where the lines given so far end,
which a ``Checkpoint`` saves, so a producer restarted on the same file resumes there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import orjson

log = logging.getLogger(__name__)
READ_BYTES = 1 << 16
RENAMED_GRACE_S = 2.0  # a file renamed away is still read this long: its writer reopens late
HEAD_BYTES = 1024  # the bytes a Position's fingerprint covers (Filebeat's default length)


class Idle:
    """The input has nothing more ready now: what was read is all there is for the moment."""

    def __repr__(self) -> str:
        return "IDLE"


IDLE = Idle()


@dataclass(frozen=True)
class Restart:
    """The followed file was rotated, or reading resumed from a checkpoint: the next line is
    line ``after + 1`` (a header line met again after a rotation is the file's new header)."""

    after: int


@dataclass(frozen=True)
class Ended:
    """The input ended. ``final``: at the end of a file not followed, all there will be (a
    record left open there is an error); else reading stopped on request, or stops short of
    a line no newline ended (``complete_only``): what is left open is unfinished, not wrong,
    and must not be handed on (a checkpoint would then point past it)."""

    final: bool


Marker = Idle | Restart | Ended


@dataclass(frozen=True)
class Position:
    """How far a file has been read: the end of the last complete line given, in bytes from
    the start of the file ``(device, inode)``, and that line's number. ``generation`` counts
    the rotations seen, so two readings of the same bytes after a truncation differ.
    ``head`` fingerprints the file's first bytes, as Filebeat does, because a file deleted
    and made again often gets the same inode back."""

    path: str
    device: int
    inode: int
    offset: int = 0
    line: int = 0
    generation: int = 0
    head: str = ""


class Checkpoint:
    """A ``Position`` kept in a small JSON file, replaced atomically on each ``save`` (a crash
    leaves the old one or the new one, never half of one)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._saved: Position | None = None

    def load(self) -> Position | None:
        """The position saved, or None when there is none yet. Raises ``ValueError`` for a
        file that is not a checkpoint."""
        try:
            data = orjson.loads(self.path.read_bytes())
            self._saved = Position(**data)
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{self.path} is not a tribunal checkpoint: {exc}") from None
        return self._saved

    def save(self, position: Position) -> None:
        if position == self._saved:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(orjson.dumps(position.__dict__))
        os.replace(temporary, self.path)
        self._saved = position


def fingerprint(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Lines:
    """The lines of ``path`` (``-``: stdin), each ending in a newline but the last one of a
    file not followed, with ``IDLE`` whenever nothing more is ready and, when a followed file
    rotates, a ``Restart``. While following, a half-written last line is never given. With
    ``resume`` (a saved ``Position`` of this path), reading starts where it ended when that
    is still the same file, no shorter; else from the start, said in a warning. ``header``:
    line 1 is given first even when resuming later in the file (a CSV's column names).
    ``stream``: read this open stream, named ``path`` (``-``: a pipe, not followed).
    ``complete_only``: a last line no newline ended is never given, following or not (a
    file read with a checkpoint may still be being written). The last item is ``Ended``.

    Raises ``OSError`` when the file cannot be opened."""

    def __init__(
        self,
        path: str,
        follow: bool = False,
        stop: Callable[[], bool] = lambda: False,
        poll_s: float = 0.2,
        resume: Position | None = None,
        header: bool = False,
        stream: BinaryIO | None = None,
        complete_only: bool = False,
    ) -> None:
        self.path = path
        self.follow = follow and path != "-"  # a pipe ends when its writer closes it
        self.complete_only = complete_only
        self.stop = stop
        self.poll_s = poll_s
        self.header = header
        if stream is None:
            stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
        self.stream = stream
        self.position = self._position_of(self.stream)
        self._first = b""  # the file's first HEAD_BYTES bytes, as far as they were given
        self._finish_old = False  # reading a checkpointed file renamed while stopped
        self._resume = self._resumable(resume)
        self._pending: list[bytes] = []  # the bytes read after the last newline, in chunks

    def _position_of(self, stream: BinaryIO) -> Position:
        info = os.fstat(stream.fileno())
        return Position(self.path, info.st_dev, info.st_ino)

    def _resumable(self, saved: Position | None) -> Position | None:
        """``saved`` where reading can go on from it: this file, no shorter, with the same
        first bytes; or the checkpointed file itself, renamed beside the path while the
        producer was stopped (its rest is read first, then this one: ``_read``)."""
        if saved is None or self.path == "-":
            return None
        if (saved.device, saved.inode) != (self.position.device, self.position.inode):
            old = self._rotated_away(saved)
            if old is None:
                log.warning(
                    "%s is not the file of the checkpoint (rotated or replaced while stopped, "
                    "the old one not beside it): reading it from the start",
                    self.path,
                )
                return None
            log.warning(
                "%s was rotated while stopped: reading the rest of %s first", self.path, old
            )
            self.stream.close()
            self.stream, self._finish_old = open(old, "rb"), True  # noqa: SIM115
        why = self._changed(saved)
        if why is not None:
            log.warning("%s %s: reading it from the start", self.path, why)
            if self._finish_old:  # the checkpointed file is not what it was: the path's
                self.stream.close()
                self.stream, self._finish_old = open(self.path, "rb"), False  # noqa: SIM115
            self._first = b""
            return None
        return saved

    def _changed(self, saved: Position) -> str | None:
        """Why the open file cannot be resumed at ``saved`` (None: it can)."""
        fd = self.stream.fileno()
        if os.fstat(fd).st_size < saved.offset:
            return "is shorter than at the checkpoint"
        self._first = os.pread(fd, min(saved.offset, HEAD_BYTES), 0)
        if fingerprint(self._first) != saved.head:
            return "does not start as it did at the checkpoint"
        return None

    def _rotated_away(self, saved: Position) -> Path | None:
        """The checkpointed file, if it is beside the path under another name (``desk.jsonl.1``,
        logrotate's ``create``; a compressed copy is another file)."""
        here = Path(self.path)
        with contextlib.suppress(OSError):
            for entry in os.scandir(here.parent):
                if not entry.name.startswith(here.name) or entry.name == here.name:
                    continue
                info = entry.stat()
                if (info.st_dev, info.st_ino) == (saved.device, saved.inode):
                    return Path(entry.path)
        return None

    @property
    def unfinished(self) -> int:
        """Bytes read after the last newline and not given (a line still being written)."""
        return sum(map(len, self._pending))

    def checkpoint(self) -> Position:
        """The position read up to, fingerprinted, for a ``Checkpoint``."""
        head = self._first[: min(self.position.offset, HEAD_BYTES)]
        return replace(self.position, head=fingerprint(head))

    def _advance(self, line: bytes) -> None:
        """``line`` was given: the position moves past it."""
        if len(self._first) < HEAD_BYTES:
            self._first += line[: HEAD_BYTES - len(self._first)]
        at = self.position
        self.position = replace(at, offset=at.offset + len(line), line=at.line + 1)

    def __iter__(self) -> Iterator[bytes | Marker]:
        try:
            yield from self._read()
        finally:
            if self.stream is not sys.stdin.buffer:
                self.stream.close()

    def _read(self) -> Iterator[bytes | Marker]:
        if self._resume is not None:
            yield from self._skip_to(self._resume)
        # when the file was seen renamed away (0: it was not); a checkpointed file found
        # renamed at the start is read to its end, then the path's
        renamed_at = time.monotonic() - RENAMED_GRACE_S if self._finish_old else 0.0
        while not self.stop():
            if not self._ready(0.0):
                yield IDLE
                while not self._ready(self.poll_s):
                    if self.stop():
                        yield Ended(final=False)
                        return
                    yield IDLE  # each wait of a pipe: lets the reader give up on a stop
            data = os.read(self.stream.fileno(), READ_BYTES)
            if data:
                yield from self._split(data)
                continue
            if not self.follow and not self._finish_old:
                break
            if self.follow:
                yield IDLE
            if renamed_at and time.monotonic() - renamed_at > RENAMED_GRACE_S:
                yield from self._reopen()  # the renamed file was read to its end: the new one
                renamed_at, self._finish_old = 0.0, False
                continue
            if not renamed_at and self._renamed():
                renamed_at = time.monotonic()
            time.sleep(self.poll_s)
            # Looked at before reading on: a file rewritten meanwhile would be read from the
            # middle of a line otherwise.
            if not renamed_at and self._truncated():
                yield from self._restart(self.stream, "was truncated or rewritten in place")
        final = not self.follow and not self.complete_only and not self.stop()
        if final:  # the file's last line, without its newline
            yield from self._unended()
        yield Ended(final=final)

    def _unended(self) -> Iterator[bytes]:
        """What was read after the last newline, given as a line of its own."""
        if self._pending:
            last, self._pending = b"".join(self._pending), []
            self._advance(last)
            yield last

    def _ready(self, timeout: float) -> bool:
        """Bytes (or the end of the input) can be read without waiting; always, for a file."""
        readable, _, _ = select.select([self.stream.fileno()], [], [], timeout)
        return bool(readable)

    def _split(self, data: bytes) -> Iterator[bytes]:
        """The lines ``data`` completes. Only the new bytes are searched, and the bytes held
        are joined once per line: a long line costs its length, not its length squared."""
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line = b"".join([*self._pending, data[start : end + 1]])
            self._pending, start = [], end + 1
            self._advance(line)
            yield line
        if start < len(data):
            self._pending.append(data[start:])

    def _skip_to(self, saved: Position) -> Iterator[bytes | Marker]:
        if self.header and saved.line > 0:
            first = self.stream.readline()  # read before any os.read: nothing else buffered
            self.position = replace(self.position, offset=len(first), line=1)
            yield first
        os.lseek(self.stream.fileno(), saved.offset, os.SEEK_SET)
        self.position = replace(saved, path=self.path)
        log.info("%s: resuming after line %d (byte %d)", self.path, saved.line, saved.offset)
        yield Restart(saved.line)

    def _renamed(self) -> bool:
        """The path names another file now: renamed away and created again (``create``)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:  # renamed, the new one not there yet: keep the old one
            return False
        return not same_file(now, os.fstat(self.stream.fileno()))

    def _truncated(self) -> bool:
        """The file is shorter than what was read of it, or its first bytes are not the ones
        read (rewritten in place, ``>`` by an exporter, to a size past the old one)."""
        fd = self.stream.fileno()
        if os.fstat(fd).st_size < self.position.offset + self.unfinished:
            return True
        return os.pread(fd, len(self._first), 0) != self._first

    def _reopen(self) -> Iterator[bytes | Marker]:
        try:
            stream = open(self.path, "rb")  # noqa: SIM115 - kept open while followed
        except FileNotFoundError:
            return  # gone again: the next end of file looks once more
        yield from self._unended()  # the old file's last line, never finished: as it is
        self.stream.close()
        yield from self._restart(stream, "was rotated (renamed): following the new file")

    def _restart(self, stream: BinaryIO, what: str) -> Iterator[bytes | Marker]:
        log.warning("%s %s: reading it from its start", self.path, what)
        with contextlib.suppress(OSError):
            os.lseek(stream.fileno(), 0, os.SEEK_SET)
        generation = self.position.generation + 1
        self.stream, self._pending, self._first = stream, [], b""
        self.position = replace(self._position_of(stream), generation=generation)
        yield Restart(0)
