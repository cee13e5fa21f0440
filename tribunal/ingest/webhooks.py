"""What a webhook's request holds, before the producer sees it: its records, mapped to item
fields, and whether its signature is right. No web framework here: bytes and headers in,
records or a refusal out.

- ``records_of_body``: a JSON object (one record), a JSON array (a batch) or JSONL
  (``application/x-ndjson``), each record with its index in the body;
- ``WebhookMapping``: which field holds the text, the id, the task (``produce``'s
  ``Reading``, the same options ``--text-col`` ...), reached by dotted paths into nested
  JSON (Zendesk's ``ticket.description``), and which fields become metadata;
- ``Signature``: the HMAC-SHA256 check of signed webhooks (``common.serve_settings``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import orjson

from common.errors import InputError
from common.schemas import RawRecord
from common.settings import Settings
from common.validation import InvalidItem, parse_payload
from producers.mapping import Reading, value_at
from producers.readers import BOM

JSON = "application/json"
JSONL = "application/x-ndjson"
# Other names JSONL goes by: each is read as JSONL.
JSONL_ALIASES = (JSONL, "application/jsonl", "application/x-jsonlines", "application/jsonlines")

# (index of the record in the body, from 0; the record, or why it cannot be one)
IndexedRecord = tuple[int, "RawRecord | InvalidItem"]


class UnreadableBody(InputError, ValueError):
    """The body as a whole cannot be read as records (400); says why."""


class UnsupportedType(InputError, ValueError):
    """The body is neither JSON nor JSONL (415); says what is taken."""


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


BodyKind = Literal["json", "jsonl"]


def body_kind(content_type: str | None) -> BodyKind:
    """How a body of this Content-Type is read; raises ``UnsupportedType`` for one that is
    neither JSON (``application/json``, ``...+json``) nor JSONL."""
    kind = media_type(content_type)
    if kind == JSON or kind.endswith("+json"):
        return "json"
    if kind in JSONL_ALIASES:
        return "jsonl"
    raise UnsupportedType(
        f"Content-Type {kind or 'missing'}: send {JSON} (an object or an array of "
        f"objects) or {JSONL} (one object per line)"
    )


def records_of_body(body: bytes, kind: BodyKind) -> list[IndexedRecord]:
    """The records of a request body. JSON: an object is one record, an array a batch whose
    members must be objects (others are invalid records). JSONL: one record per non-empty
    line, each parsed on its own as ``produce`` parses a file's lines (a bad line is an
    invalid record, the rest still go). Raises ``UnreadableBody`` for JSON that does not
    parse, or a body with no records. A byte order mark before it is dropped, as
    ``produce`` drops one (PowerShell's Invoke-RestMethod can send one)."""
    body = body.removeprefix(BOM)
    if kind == "json":
        records = list(_json_records(body))
    else:
        lines = (line for line in body.split(b"\n") if line.strip())
        records = [(n, _parsed(line)) for n, line in enumerate(lines)]
    if not records:
        raise UnreadableBody("the body holds no records")
    return records


def _json_records(body: bytes) -> Iterator[IndexedRecord]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UnreadableBody(f"invalid JSON: {exc}") from None
    if isinstance(data, dict):
        yield 0, data
    elif isinstance(data, list):
        for n, member in enumerate(data):
            if isinstance(member, dict):
                yield n, member
            else:
                yield n, InvalidItem(f"expected a JSON object, got {type(member).__name__}")
    else:
        raise UnreadableBody(
            f"expected a JSON object or an array of objects, got {type(data).__name__}"
        )


def _parsed(line: bytes) -> RawRecord | InvalidItem:
    try:
        return parse_payload(line)
    except InvalidItem as exc:
        return exc


@dataclass(frozen=True)
class WebhookMapping:
    """How a webhook's JSON becomes an item's fields: ``reading`` names the field of each
    (``produce``'s options; a name with dots is a path into nested objects), ``metadata``
    the paths kept as metadata (empty: every field not mapped, as ``produce`` keeps them).
    A mapped value is taken out of its nested object, so it is not in the metadata twice;
    an integer id (a desk's ticket number) is taken as its decimal string."""

    reading: Reading
    metadata: tuple[str, ...] = ()

    def record(self, body: RawRecord) -> RawRecord:
        """The item fields of one webhook record; raises ``InvalidItem`` with ``produce``'s
        messages (``Reading.record``, then the producer's validation)."""
        row = self.reading.unnested(dict(body))
        if self.metadata:  # the mapped fields, and of the rest only the paths named
            mapped = self.reading.columns.mapping()
            row = {name: value for name, value in row.items() if name in mapped}
            for path in self.metadata:
                found, value = value_at(body, path)
                if found:
                    row[path] = value
        return self.reading.record(row)

    def id_of(self, body: RawRecord) -> str | None:
        """The id a record names, if any, as text: to say which one was refused."""
        found, value = value_at(body, self.reading.columns.id)
        return str(value) if found and value is not None else None


@dataclass(frozen=True)
class Signature:
    """The HMAC-SHA256 check of a signed webhook: ``header`` holds the digest of the body
    (after ``timestamp_header``'s value where set) under ``secret``, as ``encoding`` writes
    it, with or without a ``sha256=`` prefix. Schemes: common.serve_settings."""

    secret: bytes
    header: str
    encoding: Literal["hex", "base64"]
    timestamp_header: str | None = None
    max_age_s: int = 0  # a timestamp this far from now is refused (0: not checked)

    @classmethod
    def of(cls, settings: Settings) -> Signature | None:
        """The check ``settings`` ask for, None where no ``serve_signature_secret`` is set."""
        if settings.serve_signature_secret is None:
            return None
        return cls(
            settings.serve_signature_secret.get_secret_value().encode(),
            settings.serve_signature_header,
            settings.serve_signature_encoding,
            settings.serve_signature_timestamp_header,
            settings.serve_signature_max_age_s,
        )

    def sign(self, body: bytes, timestamp: str = "") -> str:
        """The header value a sender computes for ``body`` (and ``timestamp``)."""
        digest = hmac.new(self.secret, timestamp.encode() + body, hashlib.sha256).digest()
        return digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()

    def problem(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str] | None:
        """None when ``headers`` sign ``body``, else (HTTP status, why): 401 for a missing
        header, 403 for a signature that does not match."""
        given = headers.get(self.header)
        if not given:
            return 401, f"missing signature header {self.header}"
        timestamp = ""
        if self.timestamp_header is not None:
            timestamp = headers.get(self.timestamp_header, "")
            if not timestamp:
                return 401, f"missing signature timestamp header {self.timestamp_header}"
            if (stale := self.stale(timestamp)) is not None:
                return 401, stale
        expected = self.sign(body, timestamp)
        given = given.strip().removeprefix("sha256=")
        if self.encoding == "hex":
            given = given.lower()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            signed = f"{self.timestamp_header} + body" if self.timestamp_header else "the body"
            return 403, (
                f"signature in {self.header} does not match: expected the HMAC-SHA256 of "
                f"{signed} with the shared secret, {self.encoding}-encoded"
            )
        return None

    def stale(self, timestamp: str) -> str | None:
        """Why a signed timestamp (ISO 8601, as Zendesk sends it, or Unix seconds) is refused:
        unreadable, or more than ``max_age_s`` from now (a replay); None when it is fine."""
        if not self.max_age_s:
            return None
        try:
            if timestamp.strip().isdigit():
                at = float(timestamp)
            else:
                parsed = datetime.fromisoformat(timestamp.strip())
                at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            return f"unreadable timestamp in {self.timestamp_header}: {timestamp[:40]!r}"
        if abs(time.time() - at) > self.max_age_s:
            return (
                f"timestamp in {self.timestamp_header} is over {self.max_age_s} s from now: "
                "a webhook is refused after serve_signature_max_age_s (a replay)"
            )
        return None
