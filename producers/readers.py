"""Reading records from JSONL or CSV files, stdin, or a file that keeps growing.

One reader serves ``produce`` and ``evaluate``, with one set of options (``Reading``), so a
file that one command takes the other takes too. Files come as a ticket system or a public
data set exports them: which field (JSONL) or column (CSV) holds the text, the second text,
the id, the task and the gold label is mapped (``CsvColumns``); every other one is kept in
``metadata`` (``strict`` refuses them instead). A record naming no task takes
``Reading.task``, resolved by ``default_task``.

Each reader yields ``(where, record)`` where ``where`` names the line, so a bad
line is reported precisely while the rest still go. A line that cannot even be
parsed is yielded as an ``InvalidItem`` in place of the record. What makes a whole
file unusable (a CSV without its text column) raises ``UnusableSource`` before any
record, so it is said once instead of once per line.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import IO, Any

from common.errors import InputError
from common.schemas import RawRecord
from common.settings import Settings
from common.validation import InvalidItem, parse_payload
from producers.api import SourceRecord

PASSED_AS_IS = ("metadata", "produced_at")  # item fields no option maps
# Each mapped item field: what it holds, as the command-line help and the errors say it.
HOLDS = {"text": "the text", "text_b": "the second text", "id": "the item id"}
HOLDS |= {"task": "the task", "gold": "a known label"}


def flag_of(item_field: str) -> str:
    """The command-line option naming the column or field of ``item_field``: --text-b-col."""
    return "--" + item_field.replace("_", "-") + "-col"


class UnusableSource(InputError, ValueError):
    """No record of this file can become an item, whatever its lines hold; says why."""


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV column, or JSONL field, holds which item field."""

    text: str = "text"
    text_b: str = "text_b"
    id: str = "id"
    task: str = "task"
    gold: str = "gold"

    def mapping(self) -> dict[str, str]:
        """Column or field name -> item field."""
        return {getattr(self, f.name): f.name for f in fields(self)}


@dataclass(frozen=True)
class Reading:
    """How to read a file of records: its format, which column or field holds what, the task
    of records naming none, and whether unmapped fields are refused. ``needs_task`` is set
    by ``for_fleet`` when no task is left to default to: such a record is then refused
    with what to do, and a CSV without a task column at once."""

    fmt: str | None = None
    columns: CsvColumns = field(default_factory=CsvColumns)
    task: str | None = None
    strict: bool = False
    needs_task: bool = False

    def for_fleet(self, settings: Settings) -> Reading:
        """This reading with the task of records naming none resolved (``default_task``) and
        checked against the fleet's tasks; raises ``UnusableSource`` for an unknown task."""
        task = default_task(settings, self.task)
        known = settings.all_tasks
        if task is not None and task not in known:
            raise UnusableSource(f"unknown task {task!r} (known: {', '.join(sorted(known))})")
        return replace(self, task=task, needs_task=task is None)

    def record(self, row: RawRecord) -> RawRecord:
        """The item fields of a row; the others go into metadata (refused when ``strict``).
        Mapped fields that are empty or null count as absent, except the text, whose
        absence the validation explains."""
        mapping = self.columns.mapping()
        record: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in row.items():
            if name is None:  # a CSV row with more cells than the header
                raise InvalidItem(f"row has {len(value)} more cells than the header")
            target = mapping.get(name)
            if target is None and name in PASSED_AS_IS:
                if value is not None:
                    record[name] = value
            elif target is None and self.strict:
                raise InvalidItem(f"unknown field '{name}'")
            elif target is None:
                extra[name] = value
            elif value not in (None, "") or target == "text":
                record[target] = value
        if extra:
            record["metadata"] = with_extra(record.get("metadata"), extra)
        if "text" not in record and extra:  # a data set that calls it "sentence" or "body"
            has = ", ".join(sorted(extra))
            raise InvalidItem(
                f"missing field '{self.columns.text}' (this record has {has}: "
                "name the text's with --text-col)"
            )
        if "task" not in record and self.task is not None:
            record["task"] = self.task
        elif "task" not in record and self.needs_task:
            raise InvalidItem("missing field 'task' (give --task, or set default_task)")
        return record


def with_extra(metadata: Any, extra: RawRecord) -> Any:
    """A record's metadata with its other fields added; a clash is an error, not a pick."""
    if metadata is None:
        return extra
    if not isinstance(metadata, dict):
        return metadata  # the validation says it must be an object
    clash = sorted(set(metadata) & set(extra))
    if clash:
        raise InvalidItem(f"field '{clash[0]}' is both a top-level field and in metadata")
    return {**metadata, **extra}


def default_task(settings: Settings, given: str | None = None) -> str | None:
    """The task of a record that names none: ``given`` (``--task``), else the ``default_task``
    setting, else the one task of the fleet file's ``[tasks]`` when it defines exactly one,
    else none, and such a record is refused. Never guessed from the record's shape."""
    if given is not None:
        return given
    if settings.default_task is not None:
        return settings.default_task
    return next(iter(settings.tasks)) if len(settings.tasks) == 1 else None


def jsonl_records(
    lines: Iterator[bytes], name: str, reading: Reading | None = None
) -> Iterator[SourceRecord]:
    how = reading or Reading()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            yield where, how.record(parse_payload(line))
        except InvalidItem as exc:
            yield where, exc


def csv_records(
    lines: Iterator[bytes], name: str, reading: Reading | CsvColumns | None = None
) -> Iterator[SourceRecord]:
    """Records of CSV rows. Reads the header at once: raises ``UnusableSource`` when it lacks
    the text column, a column named by a flag, or the task column with no task to default
    to, or (``strict``) has columns no item field takes."""
    how = Reading(columns=reading) if isinstance(reading, CsvColumns) else reading or Reading()
    # utf-8-sig: spreadsheets often start a CSV with a byte order mark.
    # strict: bad quoting (an unterminated quote, text after a closing one) is an error naming
    # the lines it spans, where it would be glued silently into one ticket's text.
    rows = (line.decode("utf-8-sig", errors="replace") for line in lines)
    reader = csv.DictReader(rows, strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise UnusableSource(f"{name}: malformed CSV header: {exc}") from None
    if header:
        check_header(list(header), name, how)
    return csv_rows(reader, name, how)


def csv_rows(reader: csv.DictReader[str], name: str, how: Reading) -> Iterator[SourceRecord]:
    while True:
        first = reader.reader.line_num + 1  # the row's first line (a quoted field may span more)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader goes on after the lines it has read
            last = reader.reader.line_num
            lines = f"{first}-{last}" if last > first else str(first)
            skipped = f" (lines {lines} skipped)" if last > first else ""
            yield f"{name}:{lines}", InvalidItem(f"malformed CSV row: {exc}{skipped}")
            continue
        where = f"{name}:{reader.line_num}"
        try:
            yield where, how.record(row)
        except InvalidItem as exc:
            yield where, exc


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


def lines_of(
    stream: IO[bytes], follow: bool, stop: Callable[[], bool], poll_s: float = 0.5
) -> Iterator[bytes]:
    """Lines of a text stream; with ``follow``, keep waiting for more at EOF (like ``tail -f``)
    and never yield a half-written last line."""
    pending = b""
    while not stop():
        chunk = stream.readline()
        if chunk:
            pending += chunk
            if pending.endswith(b"\n"):
                yield pending
                pending = b""
            continue
        if not follow:
            break
        time.sleep(poll_s)
    if pending and not follow:
        yield pending


# The input formats: name -> reader of a file's lines (its name, how to read it). The one
# place a format is added: ``--format`` offers these names and a file whose extension is one
# of them is read with it (else as JSONL).
Reader = Callable[[Iterator[bytes], str, Reading], Iterator[SourceRecord]]
FORMATS: dict[str, Reader] = {"jsonl": jsonl_records, "csv": csv_records}


def detect_format(path: str, explicit: str | None) -> str:
    """``explicit`` if given, else the file's extension where it names a format, else jsonl.
    Raises UnusableSource for an unknown ``explicit``."""
    if explicit:
        if explicit not in FORMATS:
            raise UnusableSource(f"--format {explicit}: one of {', '.join(FORMATS)}")
        return explicit
    extension = path.lower().rsplit(".", 1)[-1] if "." in path else ""
    return extension if extension in FORMATS else "jsonl"


def open_binary(path: str) -> IO[bytes]:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def records_of(
    source: str,
    reading: Reading | None = None,
    follow: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[SourceRecord]:
    """The records of a JSONL or CSV file (``-``: stdin), each with where it came from. Raises
    ``OSError`` when the file cannot be opened, ``UnusableSource`` when no line of it can
    be used (a CSV header is read at once for that)."""
    how = reading or Reading()
    reader = FORMATS[detect_format(source, how.fmt)]  # before opening: a bad --format
    stream = open_binary(source)
    name = "stdin" if source == "-" else source
    return reader(lines_of(stream, follow, stop), name, how)
