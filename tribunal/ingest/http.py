"""``tribunal serve``: the HTTP endpoint help desks push tickets to (FastAPI on uvicorn).

- ``POST /items``: one record (a JSON object), a batch (a JSON array) or JSONL
  (``application/x-ndjson``), mapped to item fields (``webhooks.WebhookMapping``) and stored
  by ``producers.api.Producer``: its validation, ids, dedupe and XADD, so a record is
  refused with ``produce``'s message and an id the fleet knows is not added twice (a
  retried webhook adds nothing). Answered once stored (and WAITed for with
  ``wait_replicas``), with a result per record (``replies.IngestReply``).
- ``GET /items/{id}``: where the item stands, its label once labeled (404: unknown).
- ``GET /health`` (200, or 503 while Redis is away), ``GET /metrics`` (Prometheus),
  ``GET /docs`` and ``/openapi.json``. Its heartbeat and counters also go to Redis
  (``liveness``): ``tribunal health --role serve`` and ``tribunal exporter`` see it.

A POST is checked in this order, each refusal one line of JSON (``{"error": ...}``): the
bearer token (401), the Content-Type (415), the size (413, before and while reading), the
signature (401 missing, 403 wrong), the JSON (400), the backlog (429 with Retry-After,
never a request held waiting for the workers), Redis (503 with Retry-After while it is
unreachable; one log line when an outage starts and one when it ends).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import Redis
from redis.exceptions import RedisClusterException, RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.connection import is_transient
from common.errors import TribunalError
from common.schemas import Item, is_item_id
from common.settings import Settings
from common.validation import InvalidItem
from producers.api import Producer
from tribunal.ingest.liveness import OUTCOMES, Heartbeat, Metrics
from tribunal.ingest.replies import (
    Health,
    IngestReply,
    LabelReply,
    Outcome,
    Problem,
    RecordResult,
)
from tribunal.ingest.webhooks import (
    JSON,
    JSONL,
    IndexedRecord,
    Signature,
    UnreadableBody,
    UnsupportedType,
    WebhookMapping,
    body_kind,
    records_of_body,
)
from tribunal.ops.lookup import item_status

log = logging.getLogger(__name__)
REDIS_ERRORS = (RedisError, RedisClusterException)
FRESH_S = 0.25  # how long a backlog read stands (Depth)


class NoWaitProducer(Producer):
    """The producer without its wait for room: the endpoint reads the backlog itself before
    sending and answers 429, so a request is never held while the workers catch up."""

    def wait_for_room(self) -> float:
        return 0.0


@dataclass
class Episode:
    """A condition that lasts (Redis away, the backlog over ``max_backlog``): logged once
    when it starts and once when it ends, with the requests it turned away, instead of a
    line per request."""

    what: str
    since: float | None = None
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, detail: str, retry_after_s: int) -> None:
        with self.lock:
            self.refused += 1
            if self.since is None:
                self.since = time.monotonic()
                log.warning(
                    "%s (%s): answering with Retry-After %d s", self.what, detail, retry_after_s
                )

    def end(self) -> None:
        if self.since is None:  # the common case, without the lock
            return
        with self.lock:
            if self.since is not None:
                lasted = time.monotonic() - self.since
                log.info(
                    "%s: over after %.1f s, %d requests turned away",
                    self.what,
                    lasted,
                    self.refused,
                )
                self.since, self.refused = None, 0


@dataclass
class Depth:
    """The backlog as a request needs it, read from Redis (``read``) at most every
    ``FRESH_S`` while it stays under ``limit`` counting what this process added since:
    a single-ticket webhook then costs one round trip, not four. What other producers add
    is seen within ``FRESH_S``; a backlog that may be over the limit is always read."""

    read: Callable[[], int]
    limit: int
    value: int = 0
    at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> int:
        with self.lock:
            fresh = time.monotonic() - self.at < FRESH_S
            if fresh and self.value <= self.limit:
                return self.value
        value = self.read()
        with self.lock:
            self.value, self.at = value, time.monotonic()
        return value

    def added(self, count: int) -> None:
        with self.lock:
            self.value += count


def problem(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Problem(error=message).model_dump(), code, headers=headers)


class Ingest:
    """What the routes do, on one Redis client and one producer shared by every request
    (redis-py's client is thread-safe; the routes run the blocking calls in threads)."""

    def __init__(self, settings: Settings, mapping: WebhookMapping, redis: Redis) -> None:
        self.settings, self.mapping, self.redis = settings, mapping, redis
        # A request is one chunk, however long: one round trip, and one count of known ids.
        self.producer = NoWaitProducer(redis, settings, chunk_size=10**9)
        self.depth = Depth(self.producer.backlog, settings.max_backlog)
        token = settings.serve_token
        self.token = token.get_secret_value().encode() if token else None
        self.signature = Signature.of(settings)
        self.retry = {"Retry-After": str(settings.serve_retry_after_s)}
        self.outage = Episode("Redis unreachable")
        self.backlog = Episode(f"backlog over max_backlog {settings.max_backlog}")
        self.metrics = Metrics()

    def authorized(self, credentials: HTTPAuthorizationCredentials | None) -> JSONResponse | None:
        """None when no token is asked or the right one is given, else the 401."""
        if self.token is None:
            return None
        given = credentials.credentials.encode() if credentials else b""
        if given and hmac.compare_digest(given, self.token):
            return None
        why = "wrong bearer token" if given else "missing bearer token (Authorization: Bearer …)"
        return problem(401, why, {"WWW-Authenticate": "Bearer"})

    def may_read(self, credentials: HTTPAuthorizationCredentials | None) -> JSONResponse | None:
        """``authorized``, and where webhooks are signed but no token is set, a 403: a GET
        cannot be signed, and an item's record (its text, its metadata) is not for anyone
        who can guess its id."""
        if self.token is None and self.signature is not None:
            return problem(403, "reading items needs serve_token: only webhooks are signed")
        return self.authorized(credentials)

    async def post(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None
    ) -> Response:
        if (refused := self.authorized(credentials)) is not None:
            return refused
        try:
            kind = body_kind(request.headers.get("content-type"))
        except UnsupportedType as exc:
            return problem(415, str(exc))
        limit = self.settings.serve_max_body_bytes
        too_big = problem(
            413, f"body over serve_max_body_bytes ({limit} bytes): send smaller batches"
        )
        if int(request.headers.get("content-length") or 0) > limit:
            return too_big
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no length: counted as read
            body += chunk
            if len(body) > limit:
                return too_big
        if self.signature and (wrong := self.signature.problem(request.headers, bytes(body))):
            return problem(*wrong)
        try:
            records = records_of_body(bytes(body), kind)
        except UnreadableBody as exc:
            return problem(400, str(exc))
        return await run_in_threadpool(self.store, records)

    def store(self, records: list[IndexedRecord]) -> Response:
        """Check the backlog, then send the valid records; every Redis failure is a 503."""
        try:
            backlog = self.depth.now()
            if backlog > self.settings.max_backlog:
                self.backlog.begin(f"{backlog} entries", self.settings.serve_retry_after_s)
                return problem(
                    429,
                    f"backlog {backlog} > max_backlog {self.settings.max_backlog}: the workers "
                    f"are behind, retry after {self.settings.serve_retry_after_s} s",
                    self.retry,
                )
            self.backlog.end()
            reply = self.send(records)
            if reply.invalid < len(reply.records):  # Redis answered the send
                self.outage.end()
        except REDIS_ERRORS as exc:
            return self.redis_failed(exc)
        except TribunalError as exc:  # a partition count other than the namespace's
            log.error("cannot store: %s", exc)
            return problem(500, str(exc))
        for outcome in OUTCOMES:
            self.metrics.received(outcome, getattr(reply, outcome))
        code = 422 if reply.invalid == len(reply.records) else 200
        return JSONResponse(reply.model_dump(), code)

    def send(self, records: list[IndexedRecord]) -> IngestReply:
        """Validate every record, then send the valid ones as one chunk (one round trip per
        server). The producer counts how many ids were known: all or none, each record's
        status follows (a repeat of an id within the body is known); a batch that mixes
        new and known ids gets "accepted" (the counts stay exact)."""
        results: dict[int, RecordResult] = {}
        valid: list[tuple[int, Item]] = []
        for index, record in records:
            try:
                if isinstance(record, InvalidItem):
                    raise record
                valid.append((index, self.producer.prepare(self.mapping.record(record))))
            except InvalidItem as exc:
                name = None if isinstance(record, InvalidItem) else self.mapping.id_of(record)
                results[index] = RecordResult(
                    index=index, id=name, status="invalid", reason=str(exc)
                )
        report = self.producer.send((str(index), item.model_dump()) for index, item in valid)
        self.depth.added(report.new)
        firsts = {item.id: index for index, item in reversed(valid)}  # an id's first record
        known = report.known - (len(valid) - len(firsts))  # the producer counts repeats known
        first: Outcome = "stored" if not known else "known"
        if 0 < known < len(firsts):
            first = "accepted"
        for index, item in valid:
            results[index] = RecordResult(
                index=index,
                id=item.id,
                status=first if firsts[item.id] == index else "known",
                replicated=not report.unreplicated,
            )
        ordered = [results[index] for index in sorted(results)]
        return IngestReply(
            stored=report.new,
            known=report.known,
            invalid=len(ordered) - len(valid),
            unreplicated=report.unreplicated,
            records=ordered,
        )

    def redis_failed(self, exc: RedisError | RedisClusterException) -> Response:
        if not is_transient(exc, self.redis):  # refused for good (ACL, a script error): said
            log.error("Redis refused: %s", exc)
            return problem(500, f"Redis refused: {exc}")
        self.outage.begin(str(exc), self.settings.serve_retry_after_s)
        return problem(503, "Redis is unreachable: nothing was stored, retry later", self.retry)

    def label(self, item_id: str) -> Response:
        if not is_item_id(item_id):
            return problem(404, f"{item_id!r} is not an item id (1-128 of letters, digits, ._:@/-)")
        try:
            status = item_status(self.redis, self.settings, item_id)
            self.outage.end()
        except REDIS_ERRORS as exc:
            return self.redis_failed(exc)
        if not status.known:
            return problem(
                404, f"no item {item_id!r}: never produced, or ended over decided_ttl_s ago"
            )
        return JSONResponse(LabelReply.of(status).model_dump(mode="json"))

    def health(self) -> Response:
        try:
            self.redis.ping()
        except REDIS_ERRORS:
            return JSONResponse(
                Health(status="redis unreachable").model_dump(), 503, headers=self.retry
            )
        return JSONResponse(Health(status="ok").model_dump())


# The POST body as the docs show it: the route reads the raw bytes itself (size, signature).
BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}]
                }
            },
            JSONL: {"schema": {"type": "string", "description": "one JSON object per line"}},
        },
    }
}
REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": why}
    for code, why in [
        (400, "The body is not JSON, or holds no records."),
        (401, "Missing or wrong bearer token; missing signature header."),
        (403, "The signature does not match the body."),
        (413, "The body is over serve_max_body_bytes."),
        (415, "The Content-Type is neither JSON nor JSONL."),
        (429, "The backlog is over max_backlog: retry after Retry-After seconds."),
        (503, "Redis is unreachable: retry after Retry-After seconds."),
    ]
}


# The bearer token as the docs show it; None where no Authorization: Bearer header came.
BEARER = HTTPBearer(auto_error=False, description="serve_token (TRIBUNAL_SERVE_TOKEN)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


def create_app(settings: Settings, mapping: WebhookMapping, redis: Redis) -> FastAPI:
    """The endpoint's ASGI app; ``redis`` is used from the threads requests run in."""
    ingest = Ingest(settings, mapping, redis)
    heartbeat = Heartbeat(redis, settings, ingest.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        heartbeat.start()
        yield
        await run_in_threadpool(heartbeat.stop)

    app = FastAPI(
        title="tribunal",
        summary="Push tickets to label; read their labels.",
        description=__doc__,
        lifespan=lifespan,
    )

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own refusals (404 no such route, 405 wrong method) in the endpoint's
        one shape, ``{"error": ...}``, not FastAPI's ``{"detail": ...}``."""
        return problem(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.post("/items", response_model=IngestReply, openapi_extra=BODY_DOC, responses=REFUSALS)
    async def post_items(request: Request, credentials: Credentials) -> Response:
        """Store one record, a batch (JSON array) or JSONL; each record's result, in order
        (422: every record was invalid)."""
        return ingest.metrics.answered("/items", await ingest.post(request, credentials))

    @app.get(
        "/items/{item_id:path}", response_model=LabelReply, responses={404: {"model": Problem}}
    )
    async def get_item(item_id: str, credentials: Credentials) -> Response:
        """Where the item stands: queued, voting, judging, or ended with its final record."""
        if (refused := ingest.may_read(credentials)) is not None:
            return ingest.metrics.answered("/items/{id}", refused)
        return ingest.metrics.answered(
            "/items/{id}", await run_in_threadpool(ingest.label, item_id)
        )

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Response:
        """200 while Redis answers, else 503 (with Retry-After)."""
        return ingest.metrics.answered("/health", await run_in_threadpool(ingest.health))

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """This process's counters, in Prometheus's text format."""
        return Response(generate_latest(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
