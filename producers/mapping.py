"""How a record's fields become an item's: which field (JSONL, a webhook's JSON) or column
(CSV) holds the text, the second text, the id, the task and the gold label (``CsvColumns``,
a dotted path for nested JSON), and what becomes of the others (``metadata``, or refused
with ``strict``). One ``Reading`` serves ``produce``, ``evaluate``, ``teach`` and ``serve``,
so a record one command takes the others take too. A record naming no task takes
``Reading.task``, resolved by ``default_task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from common.errors import InputError
from common.schemas import RawRecord
from common.settings import Settings
from common.validation import InvalidItem

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

    def unnested(self, row: RawRecord) -> RawRecord:
        """``row`` with each mapped field named by a dotted path (``ticket.description``: a
        help desk's nested JSON) taken out of its object to the top level, under the path's
        name, so it is not kept in metadata twice. A top-level field of that very name wins."""
        for path in self.columns.mapping():
            if "." in path and path not in row:
                found, value = value_at(row, path)
                if found:
                    row = {**without_path(row, path), path: value}
        return row

    def record(self, row: RawRecord) -> RawRecord:
        """The item fields of a row; the others go into metadata (refused when ``strict``).
        Mapped fields that are empty or null count as absent, except the text, whose
        absence the validation explains. A mapped name may be a dotted path (``unnested``)."""
        row = self.unnested(row)
        mapping = self.columns.mapping()
        record: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in row.items():
            target = mapping.get(name)
            if target is None and name in PASSED_AS_IS:
                if value is not None:
                    record[name] = value
            elif target is None and self.strict:
                raise InvalidItem(f"unknown field '{name}'")
            elif target is None:
                extra[name] = value
            elif target == "id" and isinstance(value, int) and not isinstance(value, bool):
                record[target] = str(value)  # a desk's ticket number
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


def value_at(data: Any, path: str) -> tuple[bool, Any]:
    """(found, value) at ``path``: the field of that name, else the dotted path's."""
    if isinstance(data, dict) and path in data:
        return True, data[path]
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def without_path(row: RawRecord, path: str) -> RawRecord:
    """``row`` without the value at the dotted ``path`` (copied along the path, never
    changed in place); an object left empty goes too."""
    head, _, rest = path.partition(".")
    inner = row.get(head)
    if head not in row or (rest and not isinstance(inner, dict)):
        return row
    smaller = without_path(inner, rest) if rest and isinstance(inner, dict) else None
    if smaller:
        return {**row, head: smaller}
    return {k: v for k, v in row.items() if k != head}


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
