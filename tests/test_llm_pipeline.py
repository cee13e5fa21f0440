"""End to end through the ``openai`` backend: the paper fleet file pointed at test servers.

One OpenAI-compatible test server per model, as in production (one ``vllm serve`` per
model); the worker, aggregator and judge handlers run on the real Redis (the in-process
``Fleet`` of test_consumers.py). Each server's "model" answers from a marker in the
ticket naming it (``w1=negative``), so the workers can be made to agree or split.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from llm_server import JUNK_P, MODEL, LLMServer, Reply, llm_server
from test_consumers import WORKERS, Fleet, drain

from common.settings import ModelSpec, load_settings
from common.tasks import BUILTIN_TASKS
from consumers.backends import load_backend
from consumers.backends.openai_compat import OpenAICompatible
from producers.api import Producer

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper-3b.toml"
TAGS = ("w1", "w2", "w3", "judge")


def tagged(server: LLMServer, tag: str) -> Any:
    """This server's model answers what the ticket's ``TAG=LABEL`` marker says."""

    def respond(body: dict[str, Any], attempt: int) -> Reply:
        last = body["messages"][-1]
        text = last["content"].replace(f"{tag}=", "expect=")
        return server.default_reply({**body, "messages": [{**last, "content": text}]}, attempt)

    return respond


@pytest.fixture
def servers() -> Iterator[dict[str, LLMServer]]:
    with ExitStack() as stack:
        found = {tag: stack.enter_context(llm_server()) for tag in TAGS}
        for tag, server in found.items():
            server.respond = tagged(server, tag)
        yield found


@pytest.fixture
def fleet(make_settings: Any, servers: dict[str, LLMServer]) -> Iterator[Fleet]:
    paper = load_settings(PAPER)
    specs = [*paper.workers.values(), paper.judge]
    backends: list[OpenAICompatible] = []
    for spec, tag in zip(specs, TAGS, strict=True):
        options = {**spec.options, "base_url": servers[tag].url, "backoff_s": 0.01}
        backend = load_backend(spec.backend, options, paper.all_tasks)
        assert isinstance(backend, OpenAICompatible)
        backends.append(backend)
    workers = {name: ModelSpec(backend="openai") for name in WORKERS}
    # The items tell the fake servers what to answer ("... judge=negative"): the learned half
    # of the injection detector rightly reads that as a label assignment beside a ticket's
    # sentence, so these fleets read with the cues only.
    cues_only = BUILTIN_TASKS["sentiment"].model_copy(update={"injection_model": False})
    settings = make_settings(
        workers=workers, block_ms=20, vote_timeout_s=60, tasks={"sentiment": cues_only}
    )
    fleet = Fleet(settings)
    for name, backend in zip(WORKERS, backends, strict=False):
        fleet.workers[name].handler.backend = backend  # type: ignore[attr-defined]
    fleet.judge.handler.backend = backends[-1]  # type: ignore[attr-defined]
    yield fleet
    for backend in backends:
        backend.close()


def test_items_are_labeled_with_confidences_through_llm_servers(
    fleet: Fleet, servers: dict[str, LLMServer]
) -> None:
    records = [
        {"id": "agree", "task": "sentiment", "text": "w1=negative w2=negative w3=negative p=0.8"},
        {
            "id": "split",
            "task": "sentiment",
            "text": "w1=positive w2=negative w3=neutral judge=negative p=0.7",
        },
        {
            "id": "pair",
            "task": "similar_ticket",
            "text": "w1=not_similar w2=not_similar w3=similar fail=500x1",
            "text_b": "Export times out",
        },
        {
            "id": "odd",
            "task": "sentiment",
            "text": "w1=ecstatic w2=positive w3=positive sentence",
        },
    ]
    report = Producer(fleet.rt.redis, fleet.rt.settings).send(records)
    assert report.produced == len(records), report.invalid
    fleet.step()
    out = {d["id"]: d for d in fleet.outputs()}
    assert {k: (d["label"], d["source"]) for k, d in out.items()} == {
        "agree": ("negative", "workers"),
        "split": ("negative", "judge"),
        "pair": ("not_similar", "workers"),
        "odd": ("positive", "workers"),
    }
    agree = out["agree"]["votes"]
    assert len(agree) == 3
    assert all(v["confidence"] == pytest.approx(0.8 / (1 - JUNK_P), abs=1e-3) for v in agree)
    assert out["split"]["judge"]["confidence"] == pytest.approx(0.7 / (1 - JUNK_P), abs=1e-3)
    odd = {v["worker"]: v for v in out["odd"]["votes"]}
    assert odd["alpha"]["label"] is None and odd["alpha"]["raw"] == "The answer is ecstatic."
    # every model got the structured-output constraint from the example fleet file
    sent = [body for server in servers.values() for body in server.requests]
    assert sent and all("structured_outputs" in body for body in sent)
    # the pair's first request to each worker failed with a 500 and was retried
    for tag in ("w1", "w2", "w3"):
        pair = [b for b in servers[tag].requests if "Export times out" in str(b["messages"])]
        assert len(pair) == 2, tag


def test_a_dead_model_server_abstains_and_the_others_still_decide(
    fleet: Fleet, servers: dict[str, LLMServer]
) -> None:
    servers["w3"].respond = lambda body, attempt: Reply(status=503)
    report = Producer(fleet.rt.redis, fleet.rt.settings).send(
        [{"id": "x", "task": "sentiment", "text": "w1=positive w2=positive"}]
    )
    assert report.produced == 1
    fleet.step()
    drain(fleet.aggregator)
    [decision] = fleet.outputs()
    assert (decision["label"], decision["source"]) == ("positive", "workers")


def run_smoke(fleet_file: Path) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_smoke.py"
    return subprocess.run(
        [sys.executable, str(script), str(fleet_file), "--items", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gpu_smoke_script_passes_against_healthy_servers_and_fails_clearly(
    servers: dict[str, LLMServer], tmp_path: Path
) -> None:
    fleet = PAPER.read_text()
    for port, tag in zip((8001, 8002, 8003, 8010), TAGS, strict=True):
        fleet = fleet.replace(f"http://127.0.0.1:{port}/v1", servers[tag].url)
    # the test servers serve one model name, and a dead one should fail fast
    fleet = re.sub(r'model = "[^"]+"', f'model = "{MODEL}"', fleet)
    good = tmp_path / "fleet.toml"
    good.write_text(fleet.replace("max_retries = 2", "max_retries = 0"))
    result = run_smoke(good)
    assert result.returncode == 0, result.stderr
    assert "OK: all 4 models answered" in result.stdout
    assert "conf=0.9" in result.stdout

    servers["w2"].stop()
    result = run_smoke(good)
    assert result.returncode == 1
    assert "FAIL llama32-3b: cannot reach" in result.stderr
    assert "1 of 4 models failed" in result.stderr
