"""Dead letters can be listed and replayed, and a replayed item still ends exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import orjson
from test_consumers import WORKERS, Fleet, Scripted, drain, produce

from common.connection import connect
from common.keys import Keys
from common.settings import ModelSpec
from producers.api import Producer
from tribunal.ops.dlq import dead_letters, replay


def test_a_dead_lettered_item_is_replayed_and_labeled_once(make_settings: Any) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(workers=workers, block_ms=20, reclaim_idle_s=0.01, max_deliveries=1)
    fleet = Fleet(settings)
    produce(settings, {"alpha": "positive", "beta": "negative", "gamma": "neutral"})
    fleet.step()
    for _ in range(2):  # the judge has no answer: given up on after one more delivery
        time.sleep(0.05)
        fleet.judge.reclaim()
    [(_, _, letter)] = dead_letters(fleet.rt.redis, [fleet.rt.keys])
    assert letter.id == "i0" and letter.item is not None

    report = replay(fleet.rt.redis, [fleet.rt.keys], {"i0", "nope"})
    assert report.replayed == ["i0"]
    assert report.skipped == [("nope", "no dead letter with this id")]
    assert dead_letters(fleet.rt.redis, [fleet.rt.keys]) == []

    fleet.judge.handler.backend = _AlwaysPositive()  # type: ignore[attr-defined]
    fleet.step()
    [decision] = fleet.outputs()
    assert (decision["id"], decision["source"], decision["label"]) == ("i0", "judge", "positive")
    drain(fleet.aggregator)
    assert len(fleet.outputs()) == 1


class _AlwaysPositive(Scripted):
    def __init__(self) -> None:
        super().__init__("judge")

    def classify(self, items: Any) -> Any:
        from common.schemas import Prediction

        return [Prediction(label="positive", confidence=1.0) for _ in items]


def test_dlq_cli_lists_and_refuses_a_replay_without_ids(make_settings: Any) -> None:
    settings = make_settings()
    fleet_keys = Keys(settings.namespace)
    letter = {
        "id": "x1",
        "error": "boom",
        "stream": "s",
        "group": "judge",
        "entry_id": "1-0",
        "deliveries": 6,
        "fields": {},
        "item": None,
        "dead_at": 1.0,
    }
    connect(settings).xadd(fleet_keys.dead, {"id": "x1", "d": orjson.dumps(letter)})
    env = {
        **os.environ,
        "TRIBUNAL_REDIS_URL": settings.redis_url,
        "TRIBUNAL_NAMESPACE": settings.namespace,
    }
    listed = subprocess.run(
        [sys.executable, "-m", "tribunal", "dlq", "list", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert orjson.loads(listed.stdout)["error"] == "boom"
    refused = subprocess.run(
        [sys.executable, "-m", "tribunal", "dlq", "replay"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--all" in refused.stderr
    skipped = subprocess.run(
        [sys.executable, "-m", "tribunal", "dlq", "replay", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert skipped.returncode == 1 and "does not carry its item" in skipped.stderr


def test_a_task_the_judges_backend_does_not_handle_is_dead_lettered_at_once(
    make_settings: Any,
) -> None:
    """The default judge (lexicon-judge) knows sentiment only: a pair escalated to it is
    dead-lettered on its first delivery with the reason, not asked max_deliveries times."""
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(workers=workers, block_ms=20)
    assert settings.judge.backend == "lexicon-judge"
    fleet = Fleet(settings)
    pair = {"id": "i0", "task": "similar_ticket", "text": "Refund late", "text_b": "No refund"}
    assert Producer(fleet.rt.redis, settings).send([pair]).produced == 1
    fleet.step()
    [(_, _, letter)] = dead_letters(fleet.rt.redis, [fleet.rt.keys])
    assert letter.id == "i0" and letter.deliveries == 1
    assert letter.error == (
        "the judge's backend lexicon-judge does not handle task 'similar_ticket'"
    )
    assert fleet.judge_backend.calls == 0  # never asked
    assert fleet.outputs() == []
