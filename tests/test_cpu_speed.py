"""Local models at the CPU's speed, with real llama-servers (issue 26): the flags and
environment a server gets (thread budget, passive OpenMP wait, ``--swa-full`` for a
sliding-window model), prompt caches that are hit from the second request on, warm slots
at start, and slow weights converted once on fetch into a copy that answers as the
original does. Speed itself is measured in bench/models.py, never asserted here.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from gguf import GGUFWriter

from common.schemas import Item
from common.settings import LocalModel, ModelSpec, load_settings
from common.tasks import BUILTIN_TASKS
from consumers.backends import ask, backend_for
from consumers.backends.openai_compat import OpenAICompatible
from tribunal.demo import load_sample
from tribunal.serving.gguf_info import gguf_info
from tribunal.serving.llama import ModelServer, ModelServers
from tribunal.serving.models import (
    fast_copy,
    fetch,
    is_converted,
    model_file,
    needs_speed_up,
    packaged,
    speed_up,
)
from tribunal.serving.warm import warm_prompt_caches

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"  # Gemma-3: sliding-window attention
TICKETS = [
    Item(id=r["id"], task="sentiment", text=r["text"], gold=r["gold"])
    for r in load_sample("sentiment", 10)
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    directory = load_settings().model_dir
    for name in (SMOL, GEMMA):
        fetch(packaged(name), directory)  # once; pip's cache keeps the wheels
    return directory


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServers]:
    """SmolLM2 with two slots and Gemma, threads from the budget of 2 cores."""
    models = {"smol": LocalModel(package=SMOL, slots=2), "gemma": LocalModel(package=GEMMA)}
    running = ModelServers(models, model_dir, tmp_path_factory.mktemp("llama"), cores=2)
    running.start()
    yield running
    running.stop()


def server(servers: ModelServers, name: str) -> ModelServer:
    return next(s for s in servers.servers if s.name == name)


def backend(servers: ModelServers, name: str, endpoint: str = "chat") -> OpenAICompatible:
    spec = ModelSpec(backend="llama-cpp", options={"model": name, "endpoint": endpoint})
    settings = load_settings(
        models={"smol": LocalModel(package=SMOL, slots=2), "gemma": LocalModel(package=GEMMA)},
        workers={name: spec},
        model_urls=servers.urls(),
    )
    made = backend_for(spec, settings)
    assert isinstance(made, OpenAICompatible)
    return made


def test_each_server_runs_with_its_budgeted_threads_and_a_passive_openmp_wait(
    servers: ModelServers,
) -> None:
    assert servers.budget.threads == {"smol": 2, "gemma": 2} and servers.budget.cores == 2
    for s in servers.servers:
        assert s.process is not None
        argv = Path(f"/proc/{s.process.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--threads") + 1] == b"2"
        env = Path(f"/proc/{s.process.pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_WAIT_POLICY=passive" in env and b"GOMP_SPINCOUNT=0" in env
    gemma = Path(f"/proc/{server(servers, 'gemma').process.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    smol = Path(f"/proc/{server(servers, 'smol').process.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    assert b"--swa-full" in gemma.split(b"\0"), "a sliding-window model must keep its cache"
    assert b"--swa-full" not in smol.split(b"\0")


@pytest.mark.parametrize(("name", "endpoint"), [("gemma", "completion"), ("smol", "chat")])
def test_the_second_request_takes_the_prefix_from_the_prompt_cache(
    servers: ModelServers, name: str, endpoint: str
) -> None:
    """Gemma-3 (sliding window) evaluated its whole prompt on every request before
    --swa-full; each model now evaluates only the item's tokens once the prefix is in."""
    client = backend(servers, name, endpoint)
    try:
        first = ask(client, name, TICKETS[:1], load_settings().all_tasks)
        second = ask(client, name, TICKETS[1:2], load_settings().all_tasks)
    finally:
        client.close()
    assert first.prompt_tokens > 150, first
    assert second.cached_tokens > 0.7 * second.prompt_tokens, second  # the few-shot prefix


def test_warming_leaves_every_slot_holding_the_prefix(servers: ModelServers) -> None:
    """Two requests at once go to the two slots: both find the prefix after warming, where
    a slot that never served a request computes it again."""
    spec = ModelSpec(backend="llama-cpp", options={"model": "smol"})
    settings = load_settings(
        models={"smol": LocalModel(package=SMOL, slots=2)}, workers={"smol": spec}
    )
    took = warm_prompt_caches(settings, {"smol": servers.urls()["smol"]}, ["similar_ticket"])
    assert set(took) == {"smol"} and took["smol"] > 0
    client = backend(servers, "smol")
    try:
        pairs = [
            Item(id=f"p{n}", task="similar_ticket", text=f"Login fails {n}", text_b="Cannot log in")
            for n in range(2)
        ]
        answers = client.classify(pairs)  # concurrently: one per slot
    finally:
        client.close()
    for answer in answers:
        assert answer.prompt_tokens and answer.cached_tokens, answer
        assert answer.cached_tokens > 0.7 * answer.prompt_tokens, answer


def test_q4_1_weights_are_converted_once_to_f16_that_answers_as_the_original(
    model_dir: Path, tmp_path: Path
) -> None:
    entry = packaged(SMOL)
    shutil.copy(model_dir / entry.filename, tmp_path / entry.filename)
    assert gguf_info(tmp_path / entry.filename).type_name == "Q4_1"
    assert needs_speed_up(entry, tmp_path)
    copy = speed_up(entry, tmp_path)
    assert copy == fast_copy(entry, tmp_path) and is_converted(copy, entry)
    assert gguf_info(copy).type_name == "F16"
    meta = orjson.loads(copy.with_name(copy.name + ".json").read_bytes())
    assert meta["size"] == copy.stat().st_size and meta["from"]["sha256"] == entry.sha256
    assert len(meta["sha256"]) == 64
    assert model_file(LocalModel(package=SMOL), tmp_path) == copy, "the server loads the copy"
    stamp = copy.stat().st_mtime_ns
    assert speed_up(entry, tmp_path) == copy and copy.stat().st_mtime_ns == stamp  # once
    assert not needs_speed_up(entry, tmp_path)

    # The copy is the same model: at each bundled ticket's few-shot prompt its most likely
    # next token is the original's, with nearly the same log-probability. (Labels are no
    # test of this: SmolLM2 is near chance, so a 0.05 change in a near-flat distribution
    # flips a chat answer. Measured 2026-12-06 on 40 tickets: 40 of 40 the same token,
    # mean |difference| 0.018 nats.)
    models = {"q4_1": LocalModel(path=tmp_path / entry.filename), "f16": LocalModel(path=copy)}
    both = ModelServers(models, tmp_path, tmp_path / "logs", cores=2).start()
    task = BUILTIN_TASKS["sentiment"]
    try:
        firsts = {
            name: [first_token(url, task.prompt(t)) for t in TICKETS]
            for name, url in both.urls().items()
        }
    finally:
        both.stop()
    pairs = list(zip(firsts["q4_1"], firsts["f16"], strict=True))
    same = [(a, b) for a, b in pairs if a[0] == b[0]]
    assert len(same) >= len(TICKETS) - 1, pairs
    assert sum(abs(a[1] - b[1]) for a, b in same) / len(same) < 0.1, pairs


def first_token(url: str, prompt: str) -> tuple[str, float]:
    """The most likely next token after ``prompt`` and its log-probability."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    answer = httpx.post(f"{url}/completions", json=body, timeout=120, trust_env=False).json()
    top = answer["choices"][0]["logprobs"]["content"][0]
    return str(top["token"]), float(top["logprob"])


def test_a_half_written_copy_is_never_served_and_the_start_says_what_to_run(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = packaged(SMOL)
    shutil.copy(model_dir / entry.filename, tmp_path / entry.filename)
    fast_copy(entry, tmp_path).write_bytes(b"GGUF, cut short")  # no sidecar: unfinished
    assert not is_converted(fast_copy(entry, tmp_path), entry)
    assert model_file(LocalModel(package=SMOL), tmp_path) == tmp_path / entry.filename
    # fetched before conversions existed: served as it is, and the start log says the fix
    servers = ModelServers({"smol": LocalModel(package=SMOL)}, tmp_path, tmp_path / "logs")
    with caplog.at_level(logging.WARNING, logger="tribunal.serving.llama"):
        servers.start().stop()
    assert f"run `tribunal models fetch {SMOL}` once" in caplog.text


def test_the_metadata_decides_swa_full_and_unreadable_files_are_one_error(tmp_path: Path) -> None:
    """GGUF files written by llama.cpp's own gguf package: a sliding window is found, a
    model without one gets no flag, and a file that is not GGUF is refused in one line."""
    for name, window in (("swa", 512), ("full", None)):
        writer = GGUFWriter(tmp_path / f"{name}.gguf", "gemma3")
        writer.add_file_type(15)  # Q4_K_M
        if window:
            writer.add_sliding_window(window)
        writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # skipped on the way
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    assert gguf_info(tmp_path / "swa.gguf").sliding_window == 512
    assert gguf_info(tmp_path / "swa.gguf").type_name == "Q4_K_M"
    assert gguf_info(tmp_path / "full.gguf").sliding_window is None
    swa = ModelServer("m", LocalModel(path=tmp_path / "swa.gguf"), tmp_path, tmp_path)
    full = ModelServer("m", LocalModel(path=tmp_path / "full.gguf"), tmp_path, tmp_path)
    assert "--swa-full" in swa.argv() and "--swa-full" not in full.argv()
    from tribunal.serving.gguf_info import UnreadableModel

    swa_bytes = (tmp_path / "swa.gguf").read_bytes()
    huge = swa_bytes.replace(b"gemma3", b"gemma3", 1)
    at = huge.index(b"general.architecture") - 8  # its key length: claim a 2^62-byte key
    corrupt = {
        "junk.gguf": b"not a model",
        "cut.gguf": swa_bytes[:60],  # cut inside the key-value section
        "huge.gguf": huge[:at] + (1 << 62).to_bytes(8, "little") + huge[at + 8 :],
    }
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableModel, match="not a readable GGUF file"):
            gguf_info(tmp_path / name)
