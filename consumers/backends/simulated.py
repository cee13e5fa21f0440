"""A stand-in model for load tests and benchmarks: set latency and accuracy, get votes.

Latency is ``latency_ms_per_call + latency_ms_per_item * len(batch)``, the shape
of a batched GPU call. Answers are right (equal to the item's gold label) with
probability ``accuracy``, otherwise another label; the draw is seeded by the
item id, so reruns give the same votes. Items without gold get a random label.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends import unsupported


class Simulated:
    def __init__(self, options: Mapping[str, Any], tasks: Mapping[str, TaskSpec]) -> None:
        self.tasks = tasks
        self.per_call_s = float(options.get("latency_ms_per_call", 0.0)) / 1000
        self.per_item_s = float(options.get("latency_ms_per_item", 0.0)) / 1000
        self.accuracy = float(options.get("accuracy", 0.9))
        self.seed = str(options.get("seed", "simulated"))
        self.confidence = float(options.get("confidence", 0.8))

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        delay = self.per_call_s + self.per_item_s * len(items)
        if delay > 0:
            time.sleep(delay)
        return [self.predict(item) for item in items]

    def predict(self, item: Item) -> Prediction:
        task = self.tasks.get(item.task)
        if task is None:
            return unsupported("simulated", item)
        digest = hashlib.blake2b(f"{self.seed}:{item.id}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "big"))
        if item.gold in task.labels and rng.random() < self.accuracy:
            label = item.gold
        else:
            label = rng.choice([lb for lb in task.labels if lb != item.gold] or task.labels)
        spread = min(self.confidence, 1 - self.confidence)
        confidence = self.confidence + rng.uniform(-spread, spread)
        return Prediction(label=label, confidence=round(confidence, 4))
