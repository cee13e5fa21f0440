"""Model backends behind one small protocol: a batch of items in, one prediction per item out.

A backend gets the whole batch in one call so it can batch on the device or send
requests concurrently. Backends are imported only when a fleet selects them, so
heavy engines (vLLM) are optional. Each backend class declares its options as a
pydantic model, its ``Options``; a fleet file's ``options`` are checked against it here,
once, and the backend gets the validated model.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import pydantic

from common.errors import ConfigurationError
from common.schemas import Item, Prediction, Vote
from common.settings import LOCAL_BACKEND, STUDENT_BACKEND, ModelSpec, Settings
from common.tasks import TaskSpec
from common.validation import problems
from consumers.backends.base import Backend, RawOptions

__all__ = [
    "REGISTRY",
    "Backend",
    "BackendError",
    "ModelCall",
    "ask",
    "backend_for",
    "check_options",
    "handles",
    "load_backend",
    "unhandled_tasks",
]


class BackendClass(Protocol):
    """A backend class: its options model, and a constructor taking a validated one."""

    Options: type[pydantic.BaseModel]

    def __call__(self, options: pydantic.BaseModel, tasks: Mapping[str, TaskSpec]) -> Backend: ...


# backend name -> "module:Class"; the class has ``Options`` and takes (options, tasks).
REGISTRY: dict[str, str] = {
    "vader": "consumers.backends.lexicon:Vader",
    "textblob": "consumers.backends.lexicon:TextBlobPolarity",
    "afinn": "consumers.backends.lexicon:Afinn",
    "lexicon-judge": "consumers.backends.lexicon:LexiconJudge",
    "simulated": "consumers.backends.simulated:Simulated",
    "openai": "consumers.backends.openai_compat:OpenAICompatible",
    LOCAL_BACKEND: "consumers.backends.openai_compat:OpenAICompatible",
    "vllm": "consumers.backends.vllm_engine:VLLMEngine",
    "jaccard": "consumers.backends.similarity:Jaccard",
    "tfidf": "consumers.backends.similarity:TfIdf",
    "char-ngrams": "consumers.backends.similarity:CharNgrams",
    "similarity-judge": "consumers.backends.similarity:SimilarityJudge",
    STUDENT_BACKEND: "consumers.backends.student:Student",
}


class BackendError(ConfigurationError, ValueError):
    """A backend cannot be built: unknown name, invalid options, no server for its model."""


def _backend_class(name: str) -> BackendClass:
    """The class of backend ``name``: a name in ``REGISTRY``, or ``"package.module:Class"``
    for a backend of the user's own (as rq and taskiq load plug-ins), its module imported
    now from the process's path. Raises BackendError."""
    target = REGISTRY.get(name) or (name if ":" in name else None)
    if target is None:
        raise BackendError(
            f"unknown backend {name!r} (known: {', '.join(sorted(REGISTRY))}; or give "
            '"package.module:Class" for one of your own)'
        )
    module, _, class_name = target.partition(":")
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # a user's module may fail any way it likes
        why = f"{type(exc).__name__}: {exc}"
        raise BackendError(f"backend {name!r}: cannot import {module!r}: {why}") from None
    cls: BackendClass | None = getattr(imported, class_name, None)
    if cls is None:
        raise BackendError(f"backend {name!r}: module {module!r} has no {class_name!r}")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, pydantic.BaseModel)):
        raise BackendError(
            f"backend {name!r}: {class_name} is not a backend class (it needs an Options "
            "model and a constructor taking (options, tasks): consumers/backends/base.py)"
        )
    return cls


def _validate_options(cls: BackendClass, options: RawOptions, where: str) -> pydantic.BaseModel:
    """``options`` checked against the backend's model. Raises BackendError
    ``{where}: invalid options: field: message; …``."""
    try:
        return cls.Options.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        raise BackendError(f"{where}: invalid options: {problems(exc, 'options')}") from None


def load_backend(name: str, options: RawOptions, tasks: Mapping[str, TaskSpec]) -> Backend:
    """Build backend ``name``. Raises BackendError with a readable reason."""
    cls = _backend_class(name)
    return cls(_validate_options(cls, options, f"backend {name}"), tasks)


def check_options(spec: ModelSpec, role: str) -> None:
    """Raise BackendError when a spec names no backend or its options do not parse, so a
    fleet refuses a typo at start instead of a worker failing in a restart loop."""
    try:
        cls = _backend_class(spec.backend)
    except BackendError as exc:
        raise BackendError(f"{role}: {exc}") from None
    options: dict[str, object] = dict(spec.options)
    if spec.backend in ("openai", LOCAL_BACKEND):
        # llama-cpp's base_url is the server tribunal starts later (backend_for); an
        # openai spec's base_url and model are not required here either
        options = {"base_url": "http://127.0.0.1/v1", **options}
        options.setdefault("model", "-")
    _validate_options(cls, options, f"{role}: backend {spec.backend}")


def handles(spec: ModelSpec, name: str, task: TaskSpec) -> bool:
    """Whether the backend of ``spec`` handles task ``name``. A backend class may say so with
    ``handles(name, task) -> bool`` (the lexicons: sentiment; the pair scorers:
    similar/not_similar pairs); one that does not, a prompted language model, handles every
    task; so does an unknown name here (``check_options`` refuses it, naming the role)."""
    try:
        check = getattr(_backend_class(spec.backend), "handles", None)
    except BackendError:
        return True
    return check is None or bool(check(name, task))


def unhandled_tasks(settings: Settings) -> list[str]:
    """The fleet's tasks that none of its models handles, workers or judge: every vote on
    such an item abstains, and the judge dead-letters it."""
    specs = [*settings.workers.values(), settings.judge]
    return [
        name
        for name, task in settings.all_tasks.items()
        if not any(handles(spec, name, task) for spec in specs)
    ]


def backend_for(spec: ModelSpec, settings: Settings) -> Backend:
    """The backend of a worker's or the judge's spec. A ``llama-cpp`` spec is pointed at
    the server of its local model (``settings.model_urls``, which ``tribunal run`` sets
    for its children), with llama-server's constraint style and retries that outlast a
    server restart (11-22 s)."""
    options: dict[str, object] = dict(spec.options)
    if spec.backend == LOCAL_BACKEND:
        model = str(options.get("model"))
        url = settings.model_urls.get(model)
        if url is None:
            raise BackendError(
                f"local model {model!r} has no server: run the fleet with `tribunal run` "
                "(which starts one per model), or set TRIBUNAL_MODEL_URLS to a JSON map "
                f'like {{"{model}": "http://127.0.0.1:PORT/v1"}}'
            )
        # 4 retries, backoff 2 s doubling to 8 s with equal jitter: 11-22 s in all, more
        # than a crashed llama-server needs to be restarted (1-2 s) and load its model.
        # Twice as many requests in flight as the server has slots: one waits in its queue
        # for every slot that frees, so no slot idles for a round trip while a batch runs
        # (bench/models.py --feeding).
        local = settings.models.get(model)
        defaults = {
            "constraint": "grammar",
            "max_retries": 4,
            "backoff_s": 2.0,
            "max_concurrency": max(16, 2 * local.slots) if local else 16,
        }
        options = {**defaults, **options, "base_url": url}
    return load_backend(spec.backend, options, settings.all_tasks)


class ModelCall(NamedTuple):
    """One batch asked of a model: a vote per item, the call's wall time (seconds), and
    the prompt tokens the server reported for the batch with how many it took from its
    prompt cache (0 and 0 where it reports none)."""

    votes: list[Vote]
    seconds: float
    prompt_tokens: int
    cached_tokens: int


def ask(
    backend: Backend, name: str, items: Sequence[Item], tasks: Mapping[str, TaskSpec]
) -> ModelCall:
    """One batch call, timed; each prediction becomes a vote signed ``name``. A label outside
    the task's set is an abstention with the reason, never a label. The backend gets each
    item as its task lets models read it (``TaskSpec.view``: without the blocks where the
    prompt-injection detector flags a passage), whatever kind of model it is."""
    started = time.perf_counter()
    predictions = backend.classify(
        [tasks[item.task].view(item) if item.task in tasks else item for item in items]
    )
    elapsed = time.perf_counter() - started
    if len(predictions) != len(items):
        raise RuntimeError(
            f"backend returned {len(predictions)} predictions for {len(items)} items"
        )
    latency_ms = round(elapsed * 1000 / max(len(items), 1), 3)
    votes = [
        _vote(name, item, p, latency_ms, tasks) for item, p in zip(items, predictions, strict=True)
    ]
    prompt = sum(p.prompt_tokens or 0 for p in predictions)
    cached = sum(p.cached_tokens or 0 for p in predictions)
    return ModelCall(votes, elapsed, prompt, cached)


def _vote(
    name: str, item: Item, p: Prediction, latency_ms: float, tasks: Mapping[str, TaskSpec]
) -> Vote:
    label, error = p.label, p.error
    labels = tasks[item.task].labels
    if label is not None and label not in labels:
        label, error = None, f"label {p.label!r} is not one of {labels}"
    return Vote(
        worker=name,
        label=label,
        confidence=p.confidence if label is not None else None,
        latency_ms=latency_ms,
        error=error,
        raw=p.raw if label is None else None,
        refused=p.refused,
        truncated_chars=p.truncated_chars,
    )
