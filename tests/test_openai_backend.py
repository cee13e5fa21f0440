"""The ``openai`` backend against a real HTTP server speaking vLLM's API (tests/llm_server.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from llm_server import JUNK_P, MODEL, LLMServer, Reply, llm_server
from pydantic import ValidationError

from common.schemas import Item
from common.settings import LocalModel, ModelSpec, load_settings
from common.tasks import BUILTIN_TASKS
from consumers.backends import backend_for, load_backend
from consumers.backends.openai_compat import OpenAICompatible, retry_after_s

LABELS = BUILTIN_TASKS["sentiment"].labels


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with llm_server() as srv:
        yield srv


@pytest.fixture
def make_backend(server: LLMServer) -> Iterator[Any]:
    made: list[OpenAICompatible] = []

    def build(**options: Any) -> OpenAICompatible:
        defaults = {"base_url": server.url, "model": MODEL, "backoff_s": 0.01, "timeout_s": 2}
        backend = OpenAICompatible({**defaults, **options}, BUILTIN_TASKS)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def items(*texts: str, task: str = "sentiment") -> list[Item]:
    return [
        Item(id=f"i{n}", task=task, text=t, text_b="other ticket" if task != "sentiment" else None)
        for n, t in enumerate(texts)
    ]


def test_labels_and_confidences_from_logprobs(make_backend: Any) -> None:
    backend = make_backend()
    out = backend.classify(
        items("expect=positive p=0.8", "expect=negative p=0.6", "expect=neutral p=0.95")
    )
    assert [p.label for p in out] == ["positive", "negative", "neutral"]
    # the label's token mass over the labels' mass: p / (1 - junk)
    for p, want in zip(out, (0.8, 0.6, 0.95), strict=True):
        assert p.confidence == pytest.approx(want / (1 - JUNK_P), abs=1e-3)


def test_pair_task_and_multi_token_label(make_backend: Any) -> None:
    out = make_backend().classify(
        items("expect=not_similar p=0.7", "expect=similar p=0.9", task="similar_ticket")
    )
    assert [p.label for p in out] == ["not_similar", "similar"]
    assert out[0].confidence == pytest.approx(0.7 / 0.99, abs=1e-3)


def test_the_request_is_a_deterministic_constrained_chat_completion(
    make_backend: Any, server: LLMServer
) -> None:
    make_backend(top_logprobs=7).classify(items("expect=positive"))
    [body] = server.requests
    assert body["model"] == MODEL
    assert body["temperature"] == 0 and body["max_tokens"] == 16
    assert body["logprobs"] is True and body["top_logprobs"] == 7
    assert body["structured_outputs"] == {"choice": LABELS}
    assert body["messages"][0]["role"] == "system"
    assert "expect=positive" in body["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("style", "present", "absent"),
    [
        ("structured_outputs", "structured_outputs", ("guided_choice", "response_format")),
        ("guided_choice", "guided_choice", ("structured_outputs", "response_format")),
        ("response_format", "response_format", ("structured_outputs", "guided_choice")),
        ("none", None, ("structured_outputs", "guided_choice", "response_format")),
    ],
)
def test_constraint_styles_send_their_own_fields(
    make_backend: Any, server: LLMServer, style: str, present: str | None, absent: tuple[str, ...]
) -> None:
    flag = "json" if style == "response_format" else "sentence" if style == "none" else ""
    [p] = make_backend(constraint=style).classify(items(f"expect=negative p=0.8 {flag}"))
    assert p.label == "negative" and p.confidence == pytest.approx(0.8 / 0.99, abs=1e-3)
    [body] = server.requests
    assert not set(absent) & set(body)
    if style == "guided_choice":
        assert body["guided_choice"] == LABELS
    if style == "response_format":
        schema = body["response_format"]["json_schema"]["schema"]
        assert body["response_format"]["type"] == "json_schema"
        assert schema["properties"]["label"]["enum"] == LABELS
        assert '{"label": "<label>"}' in body["messages"][-1]["content"]
    if present is None:
        assert body["max_tokens"] == 48


def test_the_constraint_is_never_trusted(make_backend: Any, server: LLMServer) -> None:
    """A server that ignores the constraint (guided_choice on vLLM >= 0.12) answers freely."""
    out = make_backend(constraint="guided_choice").classify(
        items("expect=Positive sentence", "expect=ecstatic", "expect=urgent json")
    )
    assert out[0].label == "positive"
    assert [p.label for p in out[1:]] == [None, None]
    assert out[1].raw == "ecstatic" and "no label" in (out[1].error or "")
    assert "not one of" in (out[2].error or "")


def test_missing_logprobs_give_a_label_without_confidence(make_backend: Any) -> None:
    [p] = make_backend().classify(items("expect=neutral nologprobs"))
    assert (p.label, p.confidence) == ("neutral", None)
    [q] = make_backend(logprobs=False).classify(items("expect=neutral"))
    assert (q.label, q.confidence) == ("neutral", None)


def test_server_errors_are_retried_and_counted(make_backend: Any, server: LLMServer) -> None:
    backend = make_backend(max_retries=3)
    out = backend.classify(items("expect=negative fail=500x2", "expect=positive fail=503x1"))
    assert [p.label for p in out] == ["negative", "positive"]
    assert backend.stats["retries"] == 3 and backend.stats["requests"] == 5
    assert len(server.requests) == 5


def test_exhausted_retries_abstain_for_that_item_only(make_backend: Any) -> None:
    backend = make_backend(max_retries=2)
    out = backend.classify(items("expect=negative fail=500x9", "expect=positive"))
    assert out[0].label is None
    assert "HTTP 500" in (out[0].error or "") and "gave up after 3 attempts" in (out[0].error or "")
    assert out[1].label == "positive"
    assert backend.stats["failures"] == 1


def test_429_honours_retry_after(make_backend: Any, server: LLMServer) -> None:
    server.retry_after = "0.3"
    backend = make_backend(max_retries=1)
    started = time.perf_counter()
    [p] = backend.classify(items("expect=neutral fail=429x1"))
    assert p.label == "neutral"
    assert time.perf_counter() - started >= 0.3
    assert backend.stats["retries"] == 1


def test_client_errors_are_not_retried(make_backend: Any, server: LLMServer) -> None:
    server.respond = lambda body, attempt: Reply(status=400)
    backend = make_backend(max_retries=3)
    [p] = backend.classify(items("expect=neutral"))
    assert p.label is None and "HTTP 400" in (p.error or "")
    assert len(server.requests) == 1


def test_slow_answers_time_out_and_are_retried(make_backend: Any) -> None:
    backend = make_backend(timeout_s=0.2, max_retries=1)
    out = backend.classify(items("expect=positive slow=1x1", "expect=negative slow=1x5"))
    assert out[0].label == "positive"
    assert out[1].label is None and "timed out after 0.2s" in (out[1].error or "")
    assert backend.stats["retries"] == 2


def test_malformed_json_abstains_without_retrying(make_backend: Any, server: LLMServer) -> None:
    [p] = make_backend().classify(items("malformed"))
    assert p.label is None and "malformed JSON" in (p.error or "")
    assert len(server.requests) == 1


def test_unexpected_response_shape_abstains(make_backend: Any, server: LLMServer) -> None:
    server.respond = lambda body, attempt: Reply(raw_body=b'{"choices": []}')
    [p] = make_backend().classify(items("x"))
    assert p.label is None and "unexpected response shape" in (p.error or "")


def test_connection_refused_is_retried_then_abstains(make_backend: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = make_backend(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2)
    [p] = backend.classify(items("x"))
    assert p.label is None and "connection error" in (p.error or "")
    assert backend.stats["retries"] == 2


def test_concurrency_limit_is_respected(make_backend: Any, server: LLMServer) -> None:
    backend = make_backend(max_concurrency=3)
    out = backend.classify(items(*(f"n{n} expect=positive slow=0.1x1" for n in range(12))))
    assert all(p.label == "positive" for p in out)
    assert server.max_in_flight == 3


def test_batches_asked_from_two_threads_overlap_and_share_the_limit(
    make_backend: Any, server: LLMServer
) -> None:
    """What an engine needs to send the next batch while the last one's tail runs (issue 18):
    classify may be called from several threads at once, and their requests share one
    max_concurrency."""
    first = items(*(f"a{n} expect=positive slow=0.3x1" for n in range(3)))
    second = items(*(f"b{n} expect=negative slow=0.3x1" for n in range(3)))
    backend = make_backend(max_concurrency=6)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(backend.classify, [first, second])
    assert [p.label for p in a + b] == ["positive"] * 3 + ["negative"] * 3
    assert server.max_in_flight == 6  # 3 per batch: only both at once reach 6
    server.max_in_flight = 0
    limited = make_backend(max_concurrency=4)
    third, fourth = (items(*(f"{k}{n} slow=0.3x1" for n in range(3))) for k in "cd")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(limited.classify, [third, fourth]))
    assert server.max_in_flight == 4


def test_a_local_model_gets_twice_its_slots_in_flight(server: LLMServer) -> None:
    """More requests in flight than the server has slots, so a freed slot never waits for
    a round trip to the worker; at least the openai default of 16."""
    for slots, want in ((2, 16), (12, 24)):
        spec = ModelSpec(backend="llama-cpp", options={"model": "m"})
        settings = load_settings(
            models={"m": LocalModel(path=Path("/nonexistent.gguf"), slots=slots)},
            workers={"w": spec},
            model_urls={"m": server.url},
        )
        backend = backend_for(spec, settings)
        assert isinstance(backend, OpenAICompatible)
        backend.close()
        assert backend.opts.max_concurrency == want
    spec = ModelSpec(backend="llama-cpp", options={"model": "m", "max_concurrency": 3})
    settings = settings.model_copy(update={"workers": {"w": spec}})
    backend = backend_for(spec, settings)
    assert isinstance(backend, OpenAICompatible)
    backend.close()
    assert backend.opts.max_concurrency == 3


def test_api_key_is_sent_and_never_shown(
    make_backend: Any, server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(api_key="sk-secret-1")
    backend.classify(items("x"))
    assert server.headers[-1]["authorization"] == "Bearer sk-secret-1"
    assert "sk-secret-1" not in repr(backend.opts) and "sk-secret-1" not in str(backend.opts)
    monkeypatch.setenv("TEST_LLM_KEY", "sk-from-env")
    make_backend(api_key_env="TEST_LLM_KEY").classify(items("x"))
    assert server.headers[-1]["authorization"] == "Bearer sk-from-env"
    make_backend().classify(items("x"))
    assert "authorization" not in server.headers[-1]


def test_bad_options_fail_at_start_with_a_reason(server: LLMServer) -> None:
    with pytest.raises(ValidationError, match="constraint"):
        OpenAICompatible({"base_url": server.url, "model": "m", "constraint": "magic"}, {})
    with pytest.raises(ValidationError, match="temprature"):
        OpenAICompatible({"base_url": server.url, "model": "m", "temprature": 0}, {})
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        OpenAICompatible(
            {"base_url": server.url, "model": "m", "api_key_env": "NOT_SET_ANYWHERE"}, {}
        )


def test_unknown_task_abstains_and_registry_loads_the_backend(server: LLMServer) -> None:
    backend = load_backend("openai", {"base_url": server.url, "model": MODEL}, BUILTIN_TASKS)
    assert isinstance(backend, OpenAICompatible)
    try:
        [p] = backend.classify([Item(id="x", task="astrology", text="hi")])
        assert p.label is None and "does not handle task" in (p.error or "")
        assert server.requests == []
    finally:
        backend.close()


def test_retry_after_parsing() -> None:
    assert retry_after_s("2") == 2.0
    assert retry_after_s("0.5") == 0.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    later = retry_after_s(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 < later <= 31
