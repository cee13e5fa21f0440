"""``tribunal serve``: the HTTP endpoint help desks push tickets to (``tribunal.ingest``)."""

from __future__ import annotations

import functools
import logging
import signal
from typing import Annotated, Any

import typer

from common.keys import claim_partitions
from producers.mapping import HOLDS, Reading
from tribunal.cli.base import clear_errors, needs_redis, say, settings
from tribunal.cli.quality import READ_OPTIONS, column_option, reads_records

log = logging.getLogger("tribunal.serve")

# produce's mapping options, said of a webhook's fields; no --format (the Content-Type says).
WEBHOOK_FIELDS = "Webhook field with {what}; a dotted path reaches into nested JSON."
MAPPING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "task": READ_OPTIONS["task"],
    "strict": READ_OPTIONS["strict"],
    **{f"{f}_col": column_option(f, what, WEBHOOK_FIELDS) for f, what in HOLDS.items()},
}


@functools.partial(reads_records, options=MAPPING_OPTIONS)
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind (default: serve_host, 127.0.0.1; 0.0.0.0: all)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default: serve_port, 8080).")
    ] = None,
    metadata_col: Annotated[
        list[str] | None,
        typer.Option(
            "--metadata-col",
            help="Webhook field (dotted path) kept as metadata (repeatable; default: every "
            "field not mapped, as produce keeps them).",
        ),
    ] = None,
    *,
    reading: Reading,
) -> None:
    """Serve an HTTP endpoint that help desks push tickets to, as webhooks.

    POST /items takes one record (a JSON object), a batch (a JSON array) or JSONL
    (application/x-ndjson), validated as produce validates a file, and answers once
    they are stored, with a result per record: stored, known (an id the fleet has: a
    retried webhook adds nothing) or invalid with the reason. GET /items/ID says where
    an item stands and gives its label; GET /health, GET /metrics (Prometheus) and
    GET /docs (OpenAPI). A backlog over max_backlog answers 429 and Redis away 503,
    both with Retry-After. Nested webhook JSON is mapped with dotted paths, e.g.
    --text-col ticket.description --id-col ticket.id. Requests must carry the bearer
    token TRIBUNAL_SERVE_TOKEN and, with TRIBUNAL_SERVE_SIGNATURE_SECRET, an HMAC
    signature (Zendesk, GitHub and Jira schemes; see docs/running.md). Ctrl-C or
    SIGTERM stops it gracefully: requests in flight are answered first.
    """
    import uvicorn

    from tribunal.ingest.http import create_app
    from tribunal.ingest.webhooks import WebhookMapping
    from tribunal.ops.queues import quick_client

    given = {"serve_host": host, "serve_port": port}
    s = needs_redis(settings(ctx, **{k: v for k, v in given.items() if v is not None}))
    with clear_errors(s):  # an unknown --task, a partition count other than the fleet's
        reading = reading.for_fleet(s)
        # fails in seconds, not the consumers' long timeout; room for a WAIT
        redis = quick_client(s, timeout_s=5.0 + s.wait_timeout_ms / 1000)
        claim_partitions(redis, s.namespace, s.partitions)
    mapping = WebhookMapping(reading, tuple(metadata_col or ()))
    app = create_app(s, mapping, redis)
    announce(s, reading)
    config = uvicorn.Config(
        app,
        host=s.serve_host,
        port=s.serve_port,
        log_config=None,  # tribunal's logging: one format for every line
        access_log=False,  # a line per request would bury the rest; /metrics counts them
        timeout_graceful_shutdown=int(s.shutdown_grace_s),
    )
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handler it found: this one notes it, so a requested stop exits 0.
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run()
    if not server.started:  # uvicorn logged why (a port in use) and exited 1 already
        raise typer.Exit(1)
    why = signal.Signals(stopped[0]).name if stopped else "shutdown"
    say("", f"endpoint stopped ({why})")


def announce(s: Any, reading: Reading) -> None:
    """What the endpoint takes and whom it lets in, logged once at start."""
    columns = reading.columns
    log.info(
        "POST /items on http://%s:%d (docs: /docs): text from %r, id from %r, task %s",
        s.serve_host,
        s.serve_port,
        columns.text,
        columns.id,
        repr(reading.task) if reading.task else f"from {columns.task!r}",
    )
    asked = []
    if s.serve_token is not None:
        asked.append("a bearer token")
    if s.serve_signature_secret is not None:
        asked.append(f"an HMAC-SHA256 signature in {s.serve_signature_header}")
    if asked:
        log.info("requests must carry %s", " and ".join(asked))
    else:
        log.warning(
            "no serve_token and no serve_signature_secret: anyone who can reach %s:%d can "
            "add items (set TRIBUNAL_SERVE_TOKEN)",
            s.serve_host,
            s.serve_port,
        )
