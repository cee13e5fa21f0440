"""A stand-in model for load tests and benchmarks: set latency and accuracy, get votes.

Latency is ``latency_ms_per_call + latency_ms_per_item * len(batch)``, the shape
of a batched GPU call. Answers are right (equal to the item's gold label) with
probability ``accuracy``, otherwise another label; the draw is seeded by the
item id, so reruns give the same votes. Items without gold get a random label.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Mapping, Sequence

from pydantic import Field

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends.base import BackendOptions, RawOptions, parse_options, unsupported


class SimulatedOptions(BackendOptions):
    latency_ms_per_call: float = Field(
        default=0.0, ge=0, description="milliseconds each call sleeps, whatever its size"
    )
    latency_ms_per_item: float = Field(
        default=0.0, ge=0, description="milliseconds each call sleeps per item in it"
    )
    accuracy: float = Field(
        default=0.9, ge=0, le=1, description="probability of the gold label, when there is one"
    )
    seed: str = Field(
        default="simulated",
        coerce_numbers_to_str=True,
        description="seeds every item's draw with the item id: models with one seed agree",
    )
    confidence: float = Field(
        default=0.8, ge=0, le=1, description="mean confidence of a vote (drawn around it)"
    )
    crash_on: str | None = Field(
        default=None,
        description="an item whose text holds this kills the process asking (SIGKILL): a "
        "poison item, as a model server or tokenizer that dies on one input makes it",
    )


class Simulated:
    Options = SimulatedOptions

    def __init__(
        self, options: SimulatedOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        opts = parse_options(SimulatedOptions, options)
        self.tasks = tasks
        self.per_call_s = opts.latency_ms_per_call / 1000
        self.per_item_s = opts.latency_ms_per_item / 1000
        self.accuracy = opts.accuracy
        self.seed = opts.seed
        self.confidence = opts.confidence
        self.crash_on = opts.crash_on

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        delay = self.per_call_s + self.per_item_s * len(items)
        if delay > 0:
            time.sleep(delay)
        if self.crash_on and any(self.crash_on in item.text for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return [self.predict(item) for item in items]

    def predict(self, item: Item) -> Prediction:
        task = self.tasks.get(item.task)
        if task is None:
            return unsupported("simulated", item)
        # Three uniform draws from one hash of seed and id: the same votes on every run and
        # replica, at a fraction of what seeding a random.Random per item costs.
        digest = hashlib.blake2b(f"{self.seed}:{item.id}".encode(), digest_size=12).digest()
        right, pick, jitter = (int.from_bytes(digest[i : i + 4]) / 2**32 for i in (0, 4, 8))
        if item.gold in task.labels and right < self.accuracy:
            label = item.gold
        else:
            others = [lb for lb in task.labels if lb != item.gold] or task.labels
            label = others[int(pick * len(others))]
        spread = min(self.confidence, 1 - self.confidence)
        confidence = self.confidence + (2 * jitter - 1) * spread
        return Prediction(label=label, confidence=round(confidence, 4))
