"""Reading records from JSONL or CSV files, stdin, or a file that keeps growing.

Files come as a ticket system or a public data set exports them; what each field or column
holds is the ``Reading``'s (``producers.mapping``), the same for every command.

Each reader yields ``(where, record)`` where ``where`` names the line, so a bad
line is reported precisely while the rest still go, and passes on ``IDLE`` when its input
has nothing more ready (``producers.follow``: a producer then sends what it holds). A line
that cannot even be parsed is yielded as an ``InvalidItem`` in place of the record. What
makes a whole file unusable (a CSV without its text column) raises ``UnusableSource``
before any record, so it is said once instead of once per line.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest

from common.validation import InvalidItem, parse_payload
from producers.api import SourceRecord
from producers.follow import Ended, Idle, Lines, Marker, Position, Restart
from producers.mapping import (
    HOLDS,
    PASSED_AS_IS,
    CsvColumns,
    Reading,
    UnusableSource,
    flag_of,
)

log = logging.getLogger(__name__)
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
MAX_ROW_CHARS = 16 << 20  # a CSV record longer than this is skipped, not held in memory


def jsonl_records(
    lines: Iterable[bytes | Marker], name: str, reading: Reading | None = None
) -> Iterator[SourceRecord | Idle]:
    """Records of JSON lines; markers of the input pass through (``IDLE``) or renumber the
    lines (``Restart``). A byte order mark before a file's first record is dropped (Notepad,
    Excel and PowerShell write one)."""
    how = reading or Reading()
    n = 0
    for line in lines:
        if isinstance(line, Restart):
            n = line.after
            continue
        if isinstance(line, Ended):
            continue
        if isinstance(line, Idle):
            yield line
            continue
        n += 1
        if n == 1:
            line = line.removeprefix(BOM)
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            yield where, how.record(parse_payload(line))
        except InvalidItem as exc:
            yield where, exc


def csv_records(
    lines: Iterable[bytes | Marker], name: str, reading: Reading | CsvColumns | None = None
) -> Iterator[SourceRecord | Idle]:
    """Records of CSV rows. Reads the header at once: raises ``UnusableSource`` when it lacks
    the text column, a column named by a flag, or the task column with no task to default
    to, or (``strict``) has columns no item field takes."""
    how = Reading(columns=reading) if isinstance(reading, CsvColumns) else reading or Reading()
    csv.field_size_limit(MAX_ROW_CHARS)  # Python's default, 131,072, is one pasted log
    rows = csv_framed(lines, name)
    first = next((row for row in rows if isinstance(row, Row)), None)
    if first is None:
        return iter(())
    try:
        header = parse_row(first)
    except InvalidItem as exc:
        raise UnusableSource(f"{name}: malformed CSV header: {exc}") from None
    if header:
        check_header(header, name, how)
    return csv_rows(rows, header, name, how)


@dataclass(frozen=True)
class Row:
    """The text of one CSV record and the lines it spans (a quoted field may hold newlines)."""

    first: int
    last: int
    text: str
    too_long: bool = False

    @property
    def lines(self) -> str:
        return f"{self.first}-{self.last}" if self.last > self.first else str(self.first)


def csv_framed(lines: Iterable[bytes | Marker], name: str = "") -> Iterator[Row | Idle | Restart]:
    """The lines of a CSV file grouped into records: a record ends at a newline outside
    quotes (RFC 4180, 2.6). Framing before parsing lets a bad or oversized row be skipped
    whole: the csv module, after an error, goes on from inside the field it gave up on.
    A record still open when reading stops short (``Ended(final=False)``) is not given at
    all: it is unfinished, not wrong."""
    held: list[str] = []
    quoted, n, first, size, warned = False, 0, 1, 0, 0
    for line in lines:
        if isinstance(line, Restart):
            if held:  # the file rotated under a record: what was read of it is all there is
                yield Row(first, n, "".join(held), size > MAX_ROW_CHARS)
                held, quoted, size = [], False, 0
            n = line.after
            yield line
            continue
        if isinstance(line, Ended):
            if held and line.final:
                yield Row(first, n, "".join(held), size > MAX_ROW_CHARS)
            return
        if isinstance(line, Idle):
            if len(held) > 1 and warned != first:  # the input waits inside a quoted field
                warned = first
                log.warning(
                    "%s:%d opens a quoted field still open %d lines on: the rows after it "
                    "wait for its closing quote",
                    name,
                    first,
                    len(held),
                )
            yield line
            continue
        n += 1
        text = line.decode("utf-8-sig", errors="replace")
        if not held:
            first = n
        quoted = still_quoted(text, quoted)
        size += len(text)
        if size <= MAX_ROW_CHARS:  # past it, only the framing goes on: nothing is kept
            held.append(text)
        if not quoted:
            yield Row(first, n, "".join(held), size > MAX_ROW_CHARS)
            held, size = [], 0
    if held:
        yield Row(first, n, "".join(held), size > MAX_ROW_CHARS)


def still_quoted(text: str, quoted: bool) -> bool:
    """Whether a record is inside a quoted field after the line ``text``, given whether it was
    before it. As the csv module's excel dialect reads: a quote opens a field only at its
    start (a line's start outside quotes, or after a comma); inside, a doubled quote is a
    quote and a single one closes the field (RFC 4180, 2.5-2.7). A closing quote followed by
    more than a comma or the line's end ends the record at this line: ``csv`` in strict mode
    refuses it there, and the next line starts a record of its own, as it does."""
    at = text.find('"')
    while at >= 0:
        if quoted and text.startswith('""', at):
            at = text.find('"', at + 2)
            continue
        if quoted:
            quoted = False
            if text[at + 1 : at + 2] not in ("", ",", "\r", "\n"):
                return False  # text after a closing quote: strict csv refuses this line
        elif at == 0 or text[at - 1] == ",":
            quoted = True
        at = text.find('"', at + 1)
    return quoted


def parse_row(row: Row) -> list[str]:
    """The cells of a framed record; raises ``InvalidItem`` for one that is not CSV."""
    if row.too_long:
        raise InvalidItem(f"CSV row of over {MAX_ROW_CHARS:,} characters")
    try:
        cells = list(csv.reader([row.text], strict=True))
    except csv.Error as exc:
        raise InvalidItem(f"malformed CSV row: {exc}") from None
    return cells[0] if cells else []


def csv_rows(
    rows: Iterator[Row | Idle | Restart], header: list[str], name: str, how: Reading
) -> Iterator[SourceRecord | Idle]:
    """The records of framed rows. After a rotation (``Restart(0)``) a first row naming the
    text column is the new file's header, in its own column order; one that does not is
    data (a logger rotated with copytruncate writes no header again)."""
    new_file = False
    for row in rows:
        if isinstance(row, Idle):
            yield row
            continue
        if isinstance(row, Restart):
            new_file = row.after == 0
            continue
        if new_file:
            new_file = False
            with contextlib.suppress(InvalidItem):
                if how.columns.text in (cells := parse_row(row)):
                    try:
                        check_header(cells, name, how)
                        header = cells
                    except UnusableSource as exc:  # the old header stays
                        yield f"{name}:{row.lines}", InvalidItem(str(exc))
                    continue
        try:
            cells = parse_row(row)
            if not cells:  # a blank line
                continue
            if len(cells) > len(header):
                raise InvalidItem(f"row has {len(cells) - len(header)} more cells than the header")
            # a row with fewer cells than the header: the missing ones are None (DictReader's)
            yield f"{name}:{row.lines}", how.record(dict(zip_longest(header, cells)))
        except InvalidItem as exc:
            skipped = f" (lines {row.lines} skipped)" if row.last > row.first else ""
            yield f"{name}:{row.lines}", InvalidItem(f"{exc}{skipped}")


def check_header(header: list[str], name: str, how: Reading) -> None:
    found = f"(columns: {', '.join(header)})"
    columns, defaults = how.columns, CsvColumns()
    for item_field, what in HOLDS.items():
        column = getattr(columns, item_field)
        named = column != getattr(defaults, item_field)  # asked for with a flag
        if column not in header and (named or item_field == "text"):
            raise UnusableSource(
                f"{name} has no column {column!r} with {what} {found}: "
                f"name it with {flag_of(item_field)} COLUMN"
            )
    if columns.task not in header and how.needs_task:
        raise UnusableSource(
            f"{name} has no column {columns.task!r} for the task {found} and there is no "
            "default task: give --task NAME (or --task-col COLUMN, or set default_task)"
        )
    unknown = [c for c in header if c not in columns.mapping() and c not in PASSED_AS_IS]
    if how.strict and unknown:
        raise UnusableSource(
            f"{name} has columns no item field takes: {', '.join(unknown)} (--strict refuses "
            "them; without it they go into metadata)"
        )


# The input formats: name -> reader of a file's lines (its name, how to read it). The one
# place a format is added: ``--format`` offers these names and a file whose extension is one
# of them is read with it (else as JSONL).
Reader = Callable[[Iterable[bytes | Marker], str, Reading], Iterator[SourceRecord | Idle]]
FORMATS: dict[str, Reader] = {"jsonl": jsonl_records, "csv": csv_records}
HEADED = {"csv"}  # formats whose line 1 names the columns: kept when resuming further on


def detect_format(path: str, explicit: str | None) -> str:
    """``explicit`` if given, else the file's extension where it names a format, else jsonl.
    Raises UnusableSource for an unknown ``explicit``."""
    if explicit:
        if explicit not in FORMATS:
            raise UnusableSource(f"--format {explicit}: one of {', '.join(FORMATS)}")
        return explicit
    extension = path.lower().rsplit(".", 1)[-1] if "." in path else ""
    return extension if extension in FORMATS else "jsonl"


def records_of(source: str, reading: Reading | None = None) -> Iterator[SourceRecord]:
    """The records of a JSONL or CSV file (``-``: stdin), each with where it came from. Raises
    ``OSError`` when the file cannot be opened, ``UnusableSource`` when no line of it can
    be used (a CSV header is read at once for that)."""
    records, _ = followed(source, reading)
    return (record for record in records if not isinstance(record, Idle))


def followed(
    source: str,
    reading: Reading | None = None,
    follow: bool = False,
    stop: Callable[[], bool] = lambda: False,
    resume: Position | None = None,
    complete_only: bool = False,
) -> tuple[Iterator[SourceRecord | Idle], Lines]:
    """``records_of`` for a producer: with ``IDLE`` whenever no more input is ready (send
    what is held), following the file as it grows and rotates until ``stop()``, from
    ``resume`` where that is still the file's; ``complete_only``: see ``Lines``. The
    ``Lines`` give the position read up to, the end of the last record handed on while
    the records are taken one at a time."""
    how = reading or Reading()
    fmt = detect_format(source, how.fmt)  # before opening: a bad --format
    header = fmt in HEADED
    lines = Lines(source, follow, stop, resume=resume, header=header, complete_only=complete_only)
    return FORMATS[fmt](lines, "stdin" if source == "-" else source, how), lines
