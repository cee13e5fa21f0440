"""`tribunal serve` as a help desk meets it: a real server process on a free port, a real HTTP
client (httpx), the test's real Redis; the offline fleet (`tribunal run`) labels what it
took in. Refusals are asserted by status and message, and by what did (not) reach the
items stream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis
from test_cli import cli, items_on_stream  # noqa: F401  (cli: the fixture)
from test_run_command import Procs, free_port, wait_for

from common.keys import Keys
from common.settings import Settings, load_settings
from tribunal.processes.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

TOKEN = "s3cret-token"
SECRET = "whsec-shared"
JSON = {"Content-Type": "application/json"}
JSONL = {"Content-Type": "application/x-ndjson"}
# A Zendesk ticket's text, nested in its webhook's JSON, labeled for sentiment.
ZENDESK_TEXT = ("--task", "sentiment", "--text-col", "ticket.description")


class Endpoint:
    """One `tribunal serve` process (started by ``Procs``, in a session of its own) and a
    client that sends the bearer token unless told otherwise."""

    def __init__(self, procs: Procs, url: str, *args: str, env: dict[str, str]) -> None:
        self.port, self.procs = free_port(), procs
        self.log = f"serve-{self.port}.log"
        procs.env.update(env)
        self.process = procs.start("serve", "--port", str(self.port), *args, log=self.log, url=url)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base, timeout=30)
        wait_for("the health route", self.healthy, 60, self.process)

    def healthy(self) -> bool:
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def post(
        self, body: Any, headers: dict[str, str] | None = None, token: str | None = TOKEN
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        sent = {**JSON, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.client.post("/items", content=content, headers=sent)

    def item(self, item_id: str) -> httpx.Response:
        return self.client.get(f"/items/{item_id}", headers={"Authorization": f"Bearer {TOKEN}"})

    def output(self) -> str:
        return self.procs.output(self.log).decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(30)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    (tmp_path / "procs").mkdir()  # its own cwd/, beside the cli fixture's
    procs = Procs(tmp_path / "procs")
    yield procs
    procs.kill_all()


@pytest.fixture
def start(procs: Procs, settings: Settings) -> Iterator[Any]:
    """Start an endpoint on the test's Redis and namespace: ``start(*args, url=, **env)``."""
    started: list[Endpoint] = []

    def run(*args: str, url: str | None = None, **env: str) -> Endpoint:
        environ = {"TRIBUNAL_NAMESPACE": settings.namespace, "TRIBUNAL_SERVE_TOKEN": TOKEN}
        endpoint = Endpoint(procs, url or str(settings.redis_url), *args, env=environ | env)
        started.append(endpoint)
        return endpoint

    yield run
    for endpoint in started:
        code = endpoint.stop()
        assert code == 0, endpoint.output()[-3000:]
        assert "Traceback" not in endpoint.output(), endpoint.output()[-3000:]


@pytest.fixture
def endpoint(start: Any) -> Endpoint:
    return start("--task", "sentiment")  # type: ignore[no-any-return]


def stream(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    return items_on_stream(redis, Keys(settings.namespace))


def test_one_ticket_a_json_array_and_jsonl_are_stored_with_a_result_each(
    endpoint: Endpoint, redis: Redis, settings: Settings
) -> None:
    one = endpoint.post({"id": "t-1", "text": "The parcel never came", "channel": "mail"})
    assert one.status_code == 200, one.text
    assert one.json() == {
        "stored": 1,
        "known": 0,
        "invalid": 0,
        "unreplicated": 0,
        "records": [
            {"index": 0, "id": "t-1", "status": "stored", "reason": None, "replicated": True}
        ],
    }
    batch = endpoint.post([{"id": "t-2", "text": "Thanks, fixed!"}, {"text": "no id given"}])
    assert batch.status_code == 200, batch.text
    assert [r["status"] for r in batch.json()["records"]] == ["stored", "stored"]
    given_id = batch.json()["records"][1]["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", given_id)  # the producer's id, told to the sender
    lines = (
        b'{"id": "t-3", "text": "Where is my refund?"}\n{not json\n\n{"id": "t-4", "text": "ok"}\n'
    )
    jsonl = endpoint.post(lines, JSONL)
    assert jsonl.status_code == 200, jsonl.text
    reply = jsonl.json()
    assert (reply["stored"], reply["invalid"]) == (2, 1)
    assert [(r["index"], r["status"]) for r in reply["records"]] == [
        (0, "stored"),
        (1, "invalid"),
        (2, "stored"),
    ]
    assert reply["records"][1]["reason"].startswith("invalid JSON: ")
    items = stream(redis, settings)
    assert [i["id"] for i in items] == ["t-1", "t-2", given_id, "t-3", "t-4"]
    assert items[0]["task"] == "sentiment" and items[0]["metadata"] == {"channel": "mail"}
    assert items[0]["text"] == "The parcel never came"


def test_a_retried_webhook_adds_nothing(
    endpoint: Endpoint, redis: Redis, settings: Settings
) -> None:
    webhook = {"id": "zd-77", "text": "Charged twice for one order"}
    first, again = endpoint.post(webhook), endpoint.post(webhook)
    assert first.json()["records"][0]["status"] == "stored"
    assert again.status_code == 200
    assert again.json()["records"][0] == {
        "index": 0,
        "id": "zd-77",
        "status": "known",
        "reason": None,
        "replicated": True,
    }
    # the same id twice in one batch: once
    twice = endpoint.post([{"id": "zd-78", "text": "a"}, {"id": "zd-78", "text": "a"}])
    assert [r["status"] for r in twice.json()["records"]] == ["stored", "known"]
    # a batch of a new id and a known one: the counts say which is which, not each record
    mixed = endpoint.post([{"id": "zd-77", "text": "a"}, {"id": "zd-79", "text": "b"}]).json()
    assert (mixed["stored"], mixed["known"]) == (1, 1)
    assert [r["status"] for r in mixed["records"]] == ["accepted", "accepted"]
    assert [i["id"] for i in stream(redis, settings)] == ["zd-77", "zd-78", "zd-79"]
    metrics = endpoint.client.get("/metrics").text
    assert 'tribunal_serve_records_total{outcome="stored"} 3.0' in metrics
    assert 'tribunal_serve_records_total{outcome="known"} 3.0' in metrics
    assert 'tribunal_serve_requests_total{code="200",route="/items"} 4.0' in metrics


def test_a_record_is_refused_with_the_message_produce_gives(
    endpoint: Endpoint,
    redis: Redis,
    settings: Settings,
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    bad = [
        {"id": "b-1", "text": "x" * 9000},
        {"id": "b-2", "text": "hi", "task": "nosuchtask"},
        {"id": "has space", "text": "hi"},
    ]
    reply = endpoint.post(bad)
    assert reply.status_code == 422, reply.text  # every record refused
    reasons = [r["reason"] for r in reply.json()["records"]]
    assert [r["status"] for r in reply.json()["records"]] == ["invalid"] * 3
    assert reasons[0] == "text has 9000 characters, over the limit of 8000"
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in bad))
    produced = cli("produce", str(source), "--task", "sentiment")
    said = produced.stderr.decode()
    for n, reason in enumerate(reasons, 1):
        assert f"{source}:{n}: {reason}" in " ".join(said.split()), (reason, said)
    assert stream(redis, settings) == []


def test_bad_requests_are_refused_whole_and_store_nothing(
    start: Any, redis: Redis, settings: Settings
) -> None:
    endpoint = start("--task", "sentiment", TRIBUNAL_SERVE_MAX_BODY_BYTES="2048")
    ticket = {"text": "hello"}
    cases = [
        (endpoint.post(ticket, token=None), 401, "missing bearer token"),
        (endpoint.post(ticket, token="guess"), 401, "wrong bearer token"),
        (endpoint.post(b'{"text": "unclosed', JSON), 400, "invalid JSON: "),
        (endpoint.post(b"[]"), 400, "the body holds no records"),
        (endpoint.post(b'"just a string"'), 400, "expected a JSON object or an array"),
        (endpoint.post(b"text=hello", {"Content-Type": "text/plain"}), 415, "Content-Type"),
        (endpoint.post({"text": "x" * 3000}), 413, "serve_max_body_bytes (2048 bytes)"),
    ]
    for response, code, message in cases:
        assert response.status_code == code, (code, response.text)
        assert message in response.json()["error"], (message, response.text)
    assert cases[0][0].headers["WWW-Authenticate"] == "Bearer"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    chunked = endpoint.client.post(
        "/items", content=chunks(), headers={**JSON, "Authorization": f"Bearer {TOKEN}"}
    )
    assert chunked.status_code == 413, chunked.text
    assert stream(redis, settings) == []
    assert endpoint.post(ticket).status_code == 200  # and the server carries on


@pytest.mark.parametrize(
    "scheme",
    [
        # Zendesk: base64(HMACSHA256(TIMESTAMP + BODY)), developer.zendesk.com/documentation/
        # webhooks/verifying/; its ticket JSON nested under "ticket", a numeric id.
        {
            "TRIBUNAL_SERVE_SIGNATURE_HEADER": "X-Zendesk-Webhook-Signature",
            "TRIBUNAL_SERVE_SIGNATURE_ENCODING": "base64",
            "TRIBUNAL_SERVE_SIGNATURE_TIMESTAMP_HEADER": "X-Zendesk-Webhook-Signature-Timestamp",
        },
        # GitHub / Jira: X-Hub-Signature-256: sha256=<hex of HMAC-SHA256(BODY)>
        {"TRIBUNAL_SERVE_SIGNATURE_HEADER": "X-Hub-Signature-256"},
    ],
    ids=["zendesk", "github"],
)
def test_a_signed_nested_webhook_is_checked_and_mapped(
    start: Any, redis: Redis, settings: Settings, scheme: dict[str, str]
) -> None:
    endpoint = start(
        *ZENDESK_TEXT,
        "--id-col",
        "ticket.id",
        TRIBUNAL_SERVE_SIGNATURE_SECRET=SECRET,
        **scheme,
    )
    header = scheme["TRIBUNAL_SERVE_SIGNATURE_HEADER"]
    stamp_header = scheme.get("TRIBUNAL_SERVE_SIGNATURE_TIMESTAMP_HEADER")
    body = orjson.dumps(
        {"ticket": {"id": 4711, "description": "App crashes on login", "priority": "high"}}
    )
    now = datetime.now(UTC).replace(microsecond=0)

    def signed_at(at: datetime) -> dict[str, str]:
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        digest = hmac.new(
            SECRET.encode(), (stamp.encode() if stamp_header else b"") + body, hashlib.sha256
        ).digest()
        signature = base64.b64encode(digest).decode() if stamp_header else "sha256=" + digest.hex()
        return {header: signature, **({stamp_header: stamp} if stamp_header else {})}

    signed = signed_at(now)

    missing = endpoint.post(body, {})
    assert missing.status_code == 401 and missing.json()["error"] == (
        f"missing signature header {header}"
    )
    forged = endpoint.post(body.replace(b"high", b"urgent"), signed)
    assert forged.status_code == 403, forged.text
    assert forged.json()["error"].startswith(f"signature in {header} does not match")
    if stamp_header:  # the timestamp is signed too
        later = (now + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        restamped = endpoint.post(body, {**signed, stamp_header: later})
        assert restamped.status_code == 403
        replayed = endpoint.post(body, signed_at(now - timedelta(days=2)))  # a replay
        assert replayed.status_code == 401, replayed.text
        assert "over 86400 s from now" in replayed.json()["error"]
    assert stream(redis, settings) == []

    right = endpoint.post(body, signed)
    assert right.status_code == 200, right.text
    assert right.json()["records"][0]["id"] == "4711"
    retried = endpoint.post(body, signed)
    assert retried.json()["records"][0]["status"] == "known"
    (item,) = stream(redis, settings)
    assert (item["id"], item["text"]) == ("4711", "App crashes on login")
    assert item["metadata"] == {"ticket": {"priority": "high"}}  # mapped fields not twice


def test_signed_webhooks_without_a_token_leave_items_unreadable(start: Any) -> None:
    """A GET cannot be signed: with a signature secret and no token, an item's record (its
    text, its metadata) is not served to anyone who can guess its id."""
    endpoint = start(
        "--task", "sentiment", TRIBUNAL_SERVE_TOKEN="", TRIBUNAL_SERVE_SIGNATURE_SECRET=SECRET
    )
    read = endpoint.client.get("/items/4711")
    assert read.status_code == 403
    assert read.json()["error"] == "reading items needs serve_token: only webhooks are signed"


def test_a_body_with_a_bom_is_read_and_every_refusal_has_one_shape(endpoint: Endpoint) -> None:
    stored = endpoint.post(b"\xef\xbb\xbf" + orjson.dumps({"text": "with a BOM"}))
    assert stored.status_code == 200, stored.text
    assert endpoint.client.get("/nothing/here").json() == {"error": "Not Found"}
    wrong_method = endpoint.client.put("/items")
    assert wrong_method.status_code == 405 and wrong_method.json() == {
        "error": "Method Not Allowed"
    }


def test_metadata_col_keeps_only_the_fields_named(
    start: Any, redis: Redis, settings: Settings
) -> None:
    endpoint = start(
        *ZENDESK_TEXT,
        "--metadata-col",
        "ticket.priority",
        "--metadata-col",
        "requester.email",
    )
    webhook = {
        "ticket": {"description": "Locked out", "priority": "urgent", "tags": ["x"] * 2000},
        "requester": {"email": "a@example.com", "name": "A"},
    }
    assert endpoint.post(webhook).status_code == 200
    (item,) = stream(redis, settings)
    assert item["text"] == "Locked out"
    assert item["metadata"] == {"ticket.priority": "urgent", "requester.email": "a@example.com"}


def test_a_backlog_over_max_backlog_is_a_429_with_retry_after(
    start: Any, redis: Redis, settings: Settings
) -> None:
    endpoint = start("--task", "sentiment", TRIBUNAL_MAX_BACKLOG="2")
    first = endpoint.post([{"text": f"ticket {n}"} for n in range(3)])
    assert first.json()["stored"] == 3  # the backlog was 0 when it came
    refused = endpoint.post({"text": "one more"})
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"].startswith("backlog 3 > max_backlog 2")
    assert len(stream(redis, settings)) == 3
    metrics = endpoint.client.get("/metrics").text
    assert 'tribunal_serve_requests_total{code="429",route="/items"} 1.0' in metrics
    assert endpoint.output().count("backlog over max_backlog 2 (3 entries)") == 1


def test_redis_away_is_a_503_with_retry_after_logged_once_then_back(
    start: Any, tmp_path: Path, settings: Settings
) -> None:
    server = EmbeddedRedis(tmp_path / "valkey").start()
    try:
        endpoint = start("--task", "sentiment", url=server.url, TRIBUNAL_SERVE_RETRY_AFTER_S="7")
        assert endpoint.post({"id": "before", "text": "stored"}).status_code == 200
        server.stop()
        for n in range(3):
            away = endpoint.post({"id": f"during-{n}", "text": "not stored"})
            assert away.status_code == 503, away.text
            assert away.headers["Retry-After"] == "7"
            assert "Redis is unreachable" in away.json()["error"]
        health = endpoint.client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "redis unreachable"}
        assert endpoint.item("before").status_code == 503
        server.restart()
        back = endpoint.post({"id": "after", "text": "stored again"})
        assert back.status_code == 200, back.text
        assert endpoint.client.get("/health").status_code == 200
        ids = [
            i["id"] for i in items_on_stream(Redis.from_url(server.url), Keys(settings.namespace))
        ]
        assert ids == ["before", "after"]
        log = endpoint.output()
        assert log.count("Redis unreachable (") == 1, log  # one line per outage
        assert re.search(r"Redis unreachable: over after [\d.]+ s, 4 requests turned away", log)
    finally:
        server.stop()


def test_a_label_is_read_by_id_once_the_fleet_labeled_it(
    endpoint: Endpoint, procs: Procs, settings: Settings
) -> None:
    endpoint.post({"id": "lbl-1", "text": "I love how fast you fixed this, thank you!"})
    waiting = endpoint.item("lbl-1")
    assert waiting.status_code == 200 and waiting.json()["stage"] == "queued"
    unknown = endpoint.item("never-sent")
    assert unknown.status_code == 404 and "no item 'never-sent'" in unknown.json()["error"]
    assert endpoint.client.get("/items/lbl-1").status_code == 401  # the token guards reads
    fleet = procs.start("run", log="run.log", url=str(settings.redis_url))
    try:
        labeled = wait_for(
            "the label",
            lambda: (r := endpoint.item("lbl-1").json()).get("stage") == "labeled" and r,
            120,
            fleet,
        )
    finally:
        fleet.send_signal(signal.SIGINT)
        fleet.wait(60)
    assert labeled["label"] == labeled["decision"]["label"] == "positive"
    assert labeled["decision"]["id"] == "lbl-1"
    assert labeled["decision"]["task"] == "sentiment"


def test_sigterm_stops_the_endpoint_cleanly(endpoint: Endpoint) -> None:
    assert endpoint.post({"text": "last one"}).status_code == 200
    assert endpoint.stop(signal.SIGTERM) == 0
    log = endpoint.output()
    assert "endpoint stopped (SIGTERM)" in log and "Traceback" not in log
    assert "Uvicorn running on http://127.0.0.1" in log


def test_docs_and_metrics_are_served(endpoint: Endpoint) -> None:
    spec = endpoint.client.get("/openapi.json").json()
    assert {"/items", "/items/{item_id}", "/health", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/items"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-ndjson"} <= set(body)
    assert endpoint.client.get("/docs").status_code == 200
    metrics = endpoint.client.get("/metrics").text
    assert 'tribunal_serve_records_total{outcome="invalid"} 0.0' in metrics


def test_health_and_the_exporter_see_the_endpoint_and_its_counts(
    endpoint: Endpoint,
    cli: Any,  # noqa: F811
    redis: Redis,
    settings: Settings,
) -> None:
    """The endpoint has a heartbeat (``serve@host:pid``) and adds its counters to the fleet's
    stats hash, so `tribunal health --role serve` and `tribunal exporter` see it; a clean
    stop removes the heartbeat at once."""
    assert endpoint.post([{"text": "one"}, {"text": "two"}, {"text": ""}]).status_code == 200
    stats = Keys(settings.namespace).stats
    field = "serve_records_total|outcome=stored"
    wait_for("the counters in Redis", lambda: redis.hget(stats, field) == b"2", 30)
    assert redis.hget(stats, "serve_records_total|outcome=invalid") == b"1"
    assert redis.hget(stats, "serve_requests_total|code=200|route=/items") == b"1"
    live = cli("health", "--role", "serve")
    assert live.returncode == 0, live.stderr

    from tribunal.ops.exporter import registry_for

    families = {m.name: m for m in registry_for(settings).collect()}
    stored = [
        s for s in families["tribunal_serve_records"].samples if s.labels == {"outcome": "stored"}
    ]
    assert stored[0].value == 2

    assert endpoint.stop() == 0
    gone = cli("health", "--role", "serve")
    assert gone.returncode == 1 and "serve: never seen" in gone.stderr.decode()


def test_an_unknown_task_or_no_redis_is_one_line_at_start(cli: Any) -> None:  # noqa: F811
    proc = cli("serve", "--task", "nosuch")
    assert proc.returncode == 2 and proc.stderr.count(b"\n") == 1, proc.stderr
    assert b"unknown task 'nosuch'" in proc.stderr
    proc = cli("serve", env={"TRIBUNAL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 3 and proc.stderr.count(b"\n") == 1, proc.stderr
    assert b"cannot reach Redis" in proc.stderr


def test_settings_read_the_serve_fields_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIBUNAL_SERVE_TOKEN", "")  # compose's ${SERVE_TOKEN:-}: none
    monkeypatch.setenv("TRIBUNAL_SERVE_PORT", "9999")
    loaded = load_settings()
    assert loaded.serve_token is None and loaded.serve_port == 9999
    assert "s3cret" not in repr(load_settings(serve_token="s3cret"))
