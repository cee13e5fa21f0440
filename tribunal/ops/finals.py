"""Reading what ended: the final streams (output, rejects, dead letters) and the audits,
parsed into their records, from where the last read stopped (plain XRANGE, no group)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import Redis

from common.keys import RECORD_FIELD, Keys, all_partitions
from common.schemas import Audit, DeadLetter, Decision, Reject
from common.settings import Settings

Kind = Literal["output", "rejects", "dead", "audits"]


@dataclass
class FinalRecords:
    """The final-stream records ``collect`` has read, parsed, in stream order (partition by
    partition). Audits are not an end: the label stands."""

    decisions: list[Decision] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    audits: list[Audit] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return len(self.decisions) + len(self.rejects) + len(self.dead)


@dataclass
class Cursors:
    """Where ``collect`` is in each stream it reads: (stream key, what it holds) → the id of
    the last entry read ("0-0": none yet)."""

    positions: dict[tuple[str, Kind], str]

    @classmethod
    def of(cls, partitions: Sequence[Keys], final: bool = True, audits: bool = False) -> Cursors:
        """At the start of the partitions' final streams and/or their audits streams."""
        wanted: list[tuple[str, Kind]] = []
        for keys in partitions:
            if final:
                wanted += [(keys.output, "output"), (keys.rejects, "rejects"), (keys.dead, "dead")]
            if audits:
                wanted.append((keys.audits, "audits"))
        return cls(dict.fromkeys(wanted, "0-0"))


def final_cursors(settings: Settings, audits: bool = False) -> Cursors:
    """``Cursors`` at the start of every partition's final streams (and audits)."""
    return Cursors.of(all_partitions(settings.namespace, settings.partitions), audits=audits)


def collect(redis: Redis, cursors: Cursors, outcome: FinalRecords) -> None:
    """Read up to 1,000 new entries of each stream into ``outcome``, each record parsed into
    its model (a record that is not one raises pydantic's ``ValidationError``: only the
    fleet writes these streams)."""
    for (stream, kind), last in cursors.positions.items():
        entries: Any = redis.xrange(stream, min=f"({last}", count=1000)
        for entry_id, fields in entries:
            record = fields[RECORD_FIELD]
            if kind == "output":
                outcome.decisions.append(Decision.model_validate_json(record))
            elif kind == "rejects":
                outcome.rejects.append(Reject.model_validate_json(record))
            elif kind == "audits":
                outcome.audits.append(Audit.model_validate_json(record))
            else:
                outcome.dead.append(DeadLetter.model_validate_json(record))
            cursors.positions[stream, kind] = entry_id.decode()
