"""Reading records from JSONL or CSV files, stdin, or a file that keeps growing.

Each reader yields ``(where, record)`` where ``where`` names the line, so a bad
line is reported precisely while the rest still go. A line that cannot even be
parsed is yielded as an ``InvalidItem`` in place of the record.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from common.validation import InvalidItem, parse_payload
from producers.api import Record


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV column holds which item field; every other column goes into metadata."""

    text: str = "text"
    text_b: str = "text_b"
    id: str = "id"
    task: str = "task"
    gold: str = "gold"

    def to_record(self, row: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        mapping = {
            self.text: "text",
            self.text_b: "text_b",
            self.id: "id",
            self.task: "task",
            self.gold: "gold",
        }
        for column, value in row.items():
            if column is None:  # more cells than headers
                raise InvalidItem(f"row has {len(value)} more cells than the header")
            target = mapping.get(column)
            if target is None:
                metadata[column] = value
            elif value not in (None, "") or target == "text":
                record[target] = value
        if metadata:
            record["metadata"] = metadata
        return record


def jsonl_records(lines: Iterator[bytes], name: str) -> Iterator[Record]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            yield where, parse_payload(line)
        except InvalidItem as exc:
            yield where, exc


def csv_records(lines: Iterator[bytes], name: str, columns: CsvColumns) -> Iterator[Record]:
    # utf-8-sig: spreadsheets often start a CSV with a byte order mark.
    reader = csv.DictReader(line.decode("utf-8-sig", errors="replace") for line in lines)
    for row in reader:
        where = f"{name}:{reader.line_num}"
        try:
            yield where, columns.to_record(row)
        except InvalidItem as exc:
            yield where, exc


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


def detect_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def open_binary(path: str) -> IO[bytes]:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def records_of(
    source: str,
    fmt: str | None = None,
    columns: CsvColumns | None = None,
    follow: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Record]:
    """The records of a JSONL or CSV file (``-``: stdin), each with where it came from.
    Raises ``OSError`` when the file cannot be opened."""
    stream = open_binary(source)
    name = "stdin" if source == "-" else source
    lines = lines_of(stream, follow, stop)
    if detect_format(source, fmt) == "csv":
        return csv_records(lines, name, columns or CsvColumns())
    return jsonl_records(lines, name)
