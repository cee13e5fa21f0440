"""Field faults, round 2 (issue 28): what users of queue systems, Redis clients and model
servers reported, tried against the fleet as they hit it. Real valkey, real processes and
signals, real pipes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from llm_server import MODEL, llm_server
from redis import Redis
from test_cli import cli, flat  # noqa: F401  (cli: the fixture)

from common.keys import Keys
from common.schemas import Item
from common.settings import Settings
from common.tasks import BUILTIN_TASKS
from consumers.backends.openai_compat import OpenAICompatible

pytestmark = pytest.mark.slow  # real processes

LABELS = 3_000  # ~600 KB of JSON lines: far more than a pipe's 64 KB buffer


def fill_output(redis: Redis, keys: Keys) -> None:
    pipe = redis.pipeline(transaction=False)
    for n in range(LABELS):
        line = orjson.dumps({"id": f"t{n}", "label": "positive", "note": "x" * 160})
        pipe.xadd(keys.output, {"id": f"t{n}", "d": line})
    pipe.execute()


def acked(redis: Redis, keys: Keys, group: str) -> int:
    (info,) = [g for g in redis.xinfo_groups(keys.output) if g["name"] == group.encode()]
    return int(info["entries-read"]) - int(info["pending"])


@pytest.mark.parametrize("follow", [False, True])
def test_labels_into_a_pipe_closed_early_ends_quietly_and_acks_only_what_it_wrote(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys, follow: bool
) -> None:
    """Was: `labels | head -n 1` printed tracebacks ("failed on a batch"), said "wrote 64
    labels", acked them, and with --follow never exited. Now it exits 141 (SIGPIPE's code,
    as `seq 9 | head -1`) without a word, the batch it was writing stays pending for the
    group, and the group's next reader gets every label but those the pipe had taken."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {
        "TRIBUNAL_REDIS_URL": str(settings.redis_url),
        "TRIBUNAL_NAMESPACE": settings.namespace,
        "TRIBUNAL_BLOCK_MS": "200",
        "TRIBUNAL_RECLAIM_IDLE_S": "1",  # the next reader takes the pending batch at once
    }
    fill_output(redis, keys)
    args = [sys.executable, "-m", "tribunal", "labels", *(["--follow"] if follow else [])]
    reader = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert reader.stdout is not None and reader.stderr is not None
    first = reader.stdout.readline()  # head -n 1
    reader.stdout.close()
    code = reader.wait(30)
    said = reader.stderr.read().decode()
    assert code == 128 + signal.SIGPIPE, said
    said = reader.stderr.read().decode()
    assert "Traceback" not in said and "failed on a batch" not in said, said
    assert "wrote" not in said  # no claim to have written what the pipe dropped
    assert orjson.loads(first)["id"] == "t0"

    taken = acked(redis, keys, "labels")
    assert 0 < taken < LABELS  # acked: what went into the pipe, not the batch it failed on
    time.sleep(1.5)  # the pending batch idle past reclaim_idle_s: the next reader claims it
    again = subprocess.run(
        [sys.executable, "-m", "tribunal", "labels"], capture_output=True, env=env, timeout=60
    )
    assert again.returncode == 0, again.stderr
    rest = [orjson.loads(line)["id"] for line in again.stdout.splitlines()]
    assert len(rest) == len(set(rest)) == LABELS - taken
    assert acked(redis, keys, "labels") == LABELS


def test_labels_to_a_file_still_says_what_it_wrote(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    redis: Redis,
    keys: Keys,
) -> None:
    fill_output(redis, keys)
    done = cli("labels", "-o", str(tmp_path / "out.jsonl"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"wrote {LABELS} labels to" in flat(done.stderr)
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == LABELS


# --- a proxy in the environment ---------------------------------------------------------

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: a proxy that swallows every call


def backend(base_url: str) -> OpenAICompatible:
    options = {"base_url": base_url, "model": MODEL, "backoff_s": 0.01, "timeout_s": 5}
    return OpenAICompatible({**options, "max_retries": 0}, BUILTIN_TASKS)


def sentiment(*texts: str) -> list[Item]:
    return [Item(id=f"i{n}", task="sentiment", text=t) for n, t in enumerate(texts)]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_proxy_in_the_environment_is_not_used_for_this_machines_model_servers(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """Was: with http_proxy/HTTPS_PROXY set and no no_proxy, every loopback model call went
    to the proxy: every item dead-lettered with "All connection attempts failed"."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with llm_server() as server:
        model = backend(server.url.replace("127.0.0.1", host))
        try:
            out = model.classify(sentiment("expect=negative", "expect=positive"))
        finally:
            model.close()
        assert [p.label for p in out] == ["negative", "positive"], [p.error for p in out]
        assert len(server.requests) == 2 and server.proxied == []


def test_a_remote_model_server_goes_through_the_proxy_and_an_error_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user's proxy is honoured where it is meant for: a remote endpoint. The test
    server plays the proxy (it answers requests sent to it in absolute form)."""
    for name in ("no_proxy", "NO_PROXY", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    remote = "http://models.example.invalid:8000/v1"
    with llm_server() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.root)
        model = backend(remote)
        try:
            [p] = model.classify(sentiment("expect=neutral"))
        finally:
            model.close()
        assert p.label == "neutral", p.error
        assert proxy.proxied == [f"{remote}/chat/completions"]

    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    model = backend(remote)
    try:
        [p] = model.classify(sentiment("expect=neutral"))
    finally:
        model.close()
    assert p.label is None
    assert f"(through the proxy {DEAD_PROXY} set in the environment)" in (p.error or "")
