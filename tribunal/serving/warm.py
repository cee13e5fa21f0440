"""Warm the model servers' prompt caches at start, so the first items do not pay for the
few-shot prefix.

A task's prompt is its instructions and examples first and the item last (``TaskSpec``),
so llama-server evaluates the ~250-300-token prefix once per slot and then only the
item's tokens (~30-90). Cold, the first item of each task pays the whole prefix in every
slot that takes one: on 2 cores ~1 s per task for SmolLM2, several for the 1.5B judge.
Here each llama-cpp worker and the judge asks its model, per task it handles, as many
placeholder items at once as the server has slots, before the fleet reads its first item:
each slot computes the prefix once, at start.

A slot that moves to another task keeps the prefix it leaves in llama-server's
host-memory prompt cache (``--cache-ram``, 8 GiB by default: llama.cpp PR 16391) and
restores it when that task comes back: measured with one slot, sentiment and
similar_ticket alternating, every request after the first of each task took 281 of its
~310 prompt tokens from the cache. A slot that has never served a request did not
restore from that cache (cache_n 0), which is why every slot is warmed here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor

from common.schemas import Item
from common.settings import LOCAL_BACKEND, ModelSpec, Settings
from common.tasks import TaskSpec
from consumers.backends import BackendError, backend_for, handles

log = logging.getLogger(__name__)

PLACEHOLDER = "warm-up"  # any short text: only the prefix before it is worth keeping


def placeholder(name: str, task: TaskSpec) -> Item:
    """An item of task ``name`` whose prompt is the task's prefix and a few tokens."""
    text_b = PLACEHOLDER if task.pair else None
    return Item(id=f"warm-{name}", task=name, text=PLACEHOLDER, text_b=text_b)


def warm_prompt_caches(
    settings: Settings, urls: Mapping[str, str], tasks: Collection[str] | None = None
) -> dict[str, float]:
    """Ask every llama-cpp worker's and the judge's model, per task it handles (of ``tasks``
    where given: the ones the caller will send), one placeholder per slot at once (the
    first task last, so that is the prefix the slots hold when several tasks share them).
    The servers are warmed side by side, each from a thread of its own. Returns the seconds
    each took, by role. A failure is logged, never raised: the fleet then starts cold, as
    it would without this."""
    live = settings.model_copy(update={"model_urls": dict(urls)})
    roles = [
        (role, spec)
        for role, spec in [*settings.workers.items(), ("judge", settings.judge)]
        if spec.backend == LOCAL_BACKEND
    ]
    with ThreadPoolExecutor(max_workers=max(len(roles), 1)) as pool:
        took = pool.map(lambda pair: _warm(live, pair[0], pair[1], tasks), roles)
        return {role: seconds for (role, _), seconds in zip(roles, took, strict=True)}


def _warm(settings: Settings, role: str, spec: ModelSpec, only: Collection[str] | None) -> float:
    started = time.perf_counter()
    items = [
        placeholder(name, task)
        for name, task in settings.all_tasks.items()
        if (only is None or name in only) and handles(spec, name, task)
    ]
    model = settings.models.get(str(spec.options.get("model")))
    slots = model.slots if model else 1
    # No retries: a server that fails now is the fleet's to handle, not a reason to wait.
    once = spec.model_copy(update={"options": {**spec.options, "max_retries": 0}})
    try:
        backend = backend_for(once, settings)
    except BackendError as exc:
        log.warning("not warming %s's prompt cache: %s", role, exc)
        return 0.0
    try:
        for item in reversed(items):
            copies = [item.model_copy(update={"id": f"{item.id}-{n}"}) for n in range(slots)]
            for answer in backend.classify(copies):  # concurrently: one per slot
                if answer.error:
                    log.warning("warming %s for %s: %s", role, item.task, answer.error)
    except Exception as exc:  # a warm-up must never stop the fleet's start
        log.warning("warming %s's prompt cache failed: %s: %s", role, type(exc).__name__, exc)
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    took = time.perf_counter() - started
    log.info("warmed %s's prompt cache for %d task(s) in %.1fs", role, len(items), took)
    return took
