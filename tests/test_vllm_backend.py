"""The ``vllm`` backend's pure parts without vllm: request building and output parsing.

Stand-in objects have the attribute shapes of vLLM's ``RequestOutput`` /
``CompletionOutput`` / ``Logprob``; a stand-in ``vllm`` module drives the backend itself.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from common.schemas import Item
from common.settings import ModelSpec
from common.tasks import BUILTIN_TASKS
from consumers.backends import BackendError, check_options, load_backend
from consumers.backends.answers import AnswerParser
from consumers.backends.vllm_engine import (
    VLLMEngine,
    VLLMOptions,
    completion_tokens,
    parse_output,
    sampling_kwargs,
)

SENTIMENT = AnswerParser(BUILTIN_TASKS["sentiment"])
SIMILAR = AnswerParser(BUILTIN_TASKS["similar_ticket"])


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    index: int = 0
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]
    request_id: str = "0"


@dataclass
class Params:  # stands in for StructuredOutputsParams and GuidedDecodingParams
    choice: list[str] | None = None


VOCAB = {1: "positive", 2: "negative", 3: "neutral", 4: "not", 5: "_similar", 6: "similar"}


def output(ids: list[int], probs: dict[int, float] | None, text: str | None = None) -> Any:
    """A RequestOutput for generated ``ids``; ``probs`` is the top-k at the first token."""
    positions = []
    for i, tid in enumerate(ids):
        dist = probs if i == 0 and probs else {tid: 0.999}
        ranked = sorted(dist, key=lambda t: -dist[t])
        positions.append(
            {t: Logprob(math.log(dist[t]), ranked.index(t) + 1, VOCAB[t]) for t in ranked}
        )
    return RequestOutput([CompletionOutput(text or "".join(VOCAB[t] for t in ids), ids, positions)])


def test_sampling_kwargs_prefer_structured_outputs() -> None:
    opts = VLLMOptions(model="m", max_tokens=8, logprobs=5)
    kwargs = sampling_kwargs(["a", "b"], opts, structured=Params, guided=Params)
    assert set(kwargs) == {"temperature", "max_tokens", "logprobs", "structured_outputs"}
    assert kwargs["temperature"] == 0.0 and kwargs["max_tokens"] == 8 and kwargs["logprobs"] == 5
    assert kwargs["structured_outputs"] == Params(choice=["a", "b"])


def test_sampling_kwargs_fall_back_to_guided_decoding_then_to_none() -> None:
    opts = VLLMOptions(model="m")
    assert sampling_kwargs(["a", "b"], opts, None, Params)["guided_decoding"] == Params(["a", "b"])
    bare = sampling_kwargs(["a", "b"], opts, None, None)
    assert "guided_decoding" not in bare and "structured_outputs" not in bare
    unconstrained = sampling_kwargs(["a"], VLLMOptions(model="m", constrain=False), Params, Params)
    assert "structured_outputs" not in unconstrained


def test_options_give_the_engine_arguments_and_reject_typos(tmp_path: Any) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages }}")
    opts = VLLMOptions(
        model="Qwen/Qwen2.5-3B-Instruct",
        gpu_memory_utilization=0.12,
        max_model_len=2048,
        dtype="bfloat16",
        chat_template=str(template),
        engine_args={"enforce_eager": True},
    )
    assert opts.llm_kwargs() == {
        "model": "Qwen/Qwen2.5-3B-Instruct",
        "gpu_memory_utilization": 0.12,
        "max_model_len": 2048,
        "dtype": "bfloat16",
        "tensor_parallel_size": 1,
        "enforce_eager": True,
    }
    assert opts.template() == "{{ messages }}"
    assert VLLMOptions(model="m", chat_template="{{ inline }}").template() == "{{ inline }}"
    with pytest.raises(ValueError, match="gpu_mem_util"):
        VLLMOptions.model_validate({"model": "m", "gpu_mem_util": 0.5})


def test_a_fleet_with_bad_vllm_options_is_refused_before_vllm_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing it would fail
    spec = ModelSpec(backend="vllm", options={"model": "m", "max_model_len": "long"})
    with pytest.raises(BackendError, match=r"^judge: backend vllm: invalid options: max_model_len"):
        check_options(spec, "judge")
    with pytest.raises(BackendError, match=r"^backend vllm: invalid options: model: Field"):
        load_backend("vllm", {}, BUILTIN_TASKS)
    check_options(ModelSpec(backend="vllm", options={"model": "m"}), "judge")


def test_output_parsing_gives_label_and_renormalised_confidence() -> None:
    out = output([2], {2: 0.6, 1: 0.2, 3: 0.1})
    p = parse_output(out, SENTIMENT)
    assert p.label == "negative" and p.confidence == pytest.approx(0.6 / 0.9, abs=1e-4)


def test_output_parsing_of_a_multi_token_label() -> None:
    p = parse_output(output([4, 5], {4: 0.7, 6: 0.3}), SIMILAR)
    assert p.label == "not_similar" and p.confidence == pytest.approx(0.7)


def test_the_sampled_token_is_found_by_id_even_when_not_the_most_likely() -> None:
    """With a constraint, vLLM may sample a token that raw logprobs rank second."""
    p = parse_output(output([1], {3: 0.5, 1: 0.4, 2: 0.1}), SENTIMENT)
    assert p.label == "positive" and p.confidence == pytest.approx(0.4)


def test_raw_vocabulary_markers_in_decoded_tokens() -> None:
    out = output([1], {1: 0.8, 2: 0.2}, text=" positive")
    for position in out.outputs[0].logprobs:
        for lp in position.values():
            lp.decoded_token = "\u0120" + (lp.decoded_token or "")
    tokens = completion_tokens(out.outputs[0])
    assert tokens is not None and tokens[0].token == "\u0120positive"
    assert parse_output(out, SENTIMENT).confidence == pytest.approx(0.8)


def test_outputs_without_logprobs_or_text() -> None:
    plain = RequestOutput([CompletionOutput("Neutral.")])
    assert parse_output(plain, SENTIMENT).label == "neutral"
    assert parse_output(plain, SENTIMENT).confidence is None
    garbage = parse_output(RequestOutput([CompletionOutput("I refuse")]), SENTIMENT)
    assert garbage.label is None and garbage.raw == "I refuse"
    assert parse_output(RequestOutput([]), SENTIMENT).error == "the engine returned no completion"


def test_missing_vllm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'tribunal\[vllm\]'"):
        load_backend("vllm", {"model": "m"}, BUILTIN_TASKS)


class FakeLLM:
    """Answers each conversation from the marker after "reply~" in its last message (a
    marker that reads as no injection: the detector removes "say=positive" from a ticket)."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[int] = []
        FakeLLM.instances.append(self)

    def chat(self, conversations: list[Any], params: list[Any], **kwargs: Any) -> list[Any]:
        self.calls.append(len(conversations))
        assert kwargs["use_tqdm"] is False and len(params) == len(conversations)
        outs = []
        for conversation in conversations:
            said = conversation[-1]["content"].split("reply~")[1].split()[0]
            if said == "TOO_LONG":
                raise ValueError("prompt is longer than max_model_len")
            ids = [k for k, v in VOCAB.items() if v == said]
            outs.append(output(ids, {ids[0]: 0.9, 3 if ids[0] != 3 else 1: 0.1}))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    vllm = types.ModuleType("vllm")
    params = types.ModuleType("vllm.sampling_params")
    vllm.LLM = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = lambda **kw: kw  # type: ignore[attr-defined]
    params.StructuredOutputsParams = Params  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params)
    FakeLLM.instances.clear()


@pytest.mark.usefixtures("fake_vllm")
def test_the_whole_batch_goes_to_the_engine_in_one_call() -> None:
    backend = load_backend("vllm", {"model": "m", "max_model_len": 1024}, BUILTIN_TASKS)
    assert isinstance(backend, VLLMEngine)
    batch = [
        Item(id="a", task="sentiment", text="reply~positive"),
        Item(id="b", task="similar_ticket", text="reply~similar", text_b="x"),
        Item(id="c", task="astrology", text="reply~neutral"),
    ]
    out = backend.classify(batch)
    [llm] = FakeLLM.instances
    assert llm.kwargs["model"] == "m" and llm.kwargs["max_model_len"] == 1024
    assert llm.calls == [2]
    assert [p.label for p in out] == ["positive", "similar", None]
    assert out[0].confidence == pytest.approx(0.9)
    assert backend._params["sentiment"]["structured_outputs"] == Params(
        ["positive", "negative", "neutral"]
    )


@pytest.mark.usefixtures("fake_vllm")
def test_one_failing_prompt_abstains_and_the_rest_of_the_batch_is_labeled() -> None:
    backend = load_backend("vllm", {"model": "m"}, BUILTIN_TASKS)
    out = backend.classify(
        [
            Item(id="a", task="sentiment", text="reply~negative"),
            Item(id="b", task="sentiment", text="reply~TOO_LONG"),
        ]
    )
    assert out[0].label == "negative"
    assert out[1].label is None and "max_model_len" in (out[1].error or "")
    assert FakeLLM.instances[0].calls == [2, 1, 1]


@pytest.mark.usefixtures("fake_vllm")
def test_an_engine_that_fails_every_prompt_raises_so_the_batch_stays_pending() -> None:
    backend = load_backend("vllm", {"model": "m"}, BUILTIN_TASKS)
    with pytest.raises(ValueError, match="max_model_len"):
        backend.classify([Item(id="a", task="sentiment", text="reply~TOO_LONG")])
