"""Worker, aggregator and judge handlers on a real Redis, driven one batch at a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, worker_group
from common.schemas import Item, Prediction, Vote
from common.settings import ModelSpec, Settings
from consumers.aggregator import AggregatorHandler
from consumers.engine.consumer import StreamConsumer
from consumers.engine.runtime import Runtime
from consumers.engine.writes import Writes
from consumers.judge import JudgeHandler
from consumers.worker import WorkerHandler
from producers.api import Producer

WORKERS = ("alpha", "beta", "gamma")


class Scripted:
    """A backend whose answer for each item is written in the item's metadata under its name,
    as ``label`` (confidence 0.9) or ``label@confidence``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        self.calls += 1
        out = []
        for item in items:
            answer = item.metadata.get(self.name)
            if answer == "!raise":
                raise RuntimeError(f"{self.name} crashed")
            label, _, confidence = (answer or "").partition("@")  # "label@confidence"
            out.append(
                Prediction(
                    label=label or None,
                    confidence=float(confidence or 0.9),
                    raw=None if label else "???",
                )
            )
        return out


class Fleet:
    """The three workers, the aggregator and the judge as in-process consumers."""

    def __init__(self, settings: Settings) -> None:
        self.rt = Runtime.create(settings)
        rt, keys = self.rt, self.rt.keys
        self.backends = {name: Scripted(name) for name in WORKERS}
        handlers = {name: WorkerHandler(rt, name, self.backends[name]) for name in WORKERS}
        self.workers = {
            name: self._consumer(handler.stream, worker_group(name), handler)
            for name, handler in handlers.items()
        }
        self.aggregator_handler = AggregatorHandler(rt)
        self.aggregator_handler._next_trim = float("inf")  # the janitor has its own tests
        self.aggregator = self._consumer(keys.ready, AGGREGATOR_GROUP, self.aggregator_handler)
        self.judge_backend = Scripted("judge")
        self.judge = self._consumer(keys.judge, JUDGE_GROUP, JudgeHandler(rt, self.judge_backend))

    def _consumer(self, stream: str, group: str, handler: Any, name: str = "c1") -> StreamConsumer:
        rt = self.rt
        consumer = StreamConsumer(rt, stream, group, handler, name)
        consumer.ensure_group()
        return consumer

    def step(self, *workers: str) -> None:
        for name in workers or WORKERS:
            drain(self.workers[name])
        drain(self.aggregator)
        drain(self.judge)

    def final(self, stream: str) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"d"]) for _, f in self.rt.redis.xrange(stream)]

    def outputs(self) -> list[dict[str, Any]]:
        return self.final(self.rt.keys.output)

    def stats(self) -> dict[str, float]:
        raw = self.rt.redis.hgetall(self.rt.keys.stats)
        return {k.decode(): float(v) for k, v in raw.items()}


def drain(consumer: StreamConsumer) -> None:
    while consumer.read_new():
        pass


@pytest.fixture
def fleet(make_settings: Any) -> Fleet:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    return Fleet(make_settings(workers=workers, block_ms=20, vote_timeout_s=60))


def produce(settings: Settings, *answers: dict[str, str], task: str = "sentiment") -> list[str]:
    records = [
        {"id": f"i{n}", "task": task, "text": "ticket text", "metadata": a}
        for n, a in enumerate(answers)
    ]
    report = Producer(Runtime.create(settings).redis, settings).send(records)
    assert report.produced == len(records), report.invalid
    return [r["id"] for r in records]


def agree(label: str) -> dict[str, str]:
    return dict.fromkeys(WORKERS, label)


def test_majority_is_labeled_by_the_workers_and_leaves_no_vote_keys(fleet: Fleet) -> None:
    produce(
        fleet.rt.settings,
        agree("positive"),
        {"alpha": "negative", "beta": "negative", "gamma": "positive"},
    )
    fleet.step()
    out = {d["id"]: d for d in fleet.outputs()}
    assert {k: (v["label"], v["source"]) for k, v in out.items()} == {
        "i0": ("positive", "workers"),
        "i1": ("negative", "workers"),
    }
    assert fleet.rt.redis.keys(fleet.rt.keys.votes("*")) == []
    assert fleet.rt.redis.zcard(fleet.rt.keys.deadlines) == 0
    assert fleet.judge_backend.calls == 0


def test_split_goes_to_the_judge_with_the_votes_kept(fleet: Fleet) -> None:
    produce(
        fleet.rt.settings,
        {"alpha": "positive", "beta": "negative", "gamma": "neutral", "judge": "negative"},
    )
    fleet.step()
    [decision] = fleet.outputs()
    assert (decision["label"], decision["source"]) == ("negative", "judge")
    assert {v["worker"]: v["label"] for v in decision["votes"]} == {
        "alpha": "positive",
        "beta": "negative",
        "gamma": "neutral",
    }
    assert decision["judge"]["label"] == "negative"


def test_a_label_outside_the_set_is_an_abstention(fleet: Fleet) -> None:
    produce(
        fleet.rt.settings,
        {"alpha": "ecstatic", "beta": "positive", "gamma": "negative", "judge": "positive"},
    )
    fleet.step()
    [decision] = fleet.outputs()
    alpha = next(v for v in decision["votes"] if v["worker"] == "alpha")
    assert alpha["label"] is None
    assert "'ecstatic' is not one of" in alpha["error"]
    assert decision["source"] == "judge"


def test_missing_worker_times_out_and_split_votes_go_to_the_judge(make_settings: Any) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    fleet = Fleet(make_settings(workers=workers, block_ms=20, vote_timeout_s=0.2))
    produce(
        fleet.rt.settings,
        {"alpha": "positive", "beta": "negative", "judge": "neutral"},
        {"alpha": "neutral", "beta": "neutral"},
    )
    fleet.step("alpha", "beta")  # gamma is down
    # The agreeing pair is settled at once; the split pair waits for gamma.
    assert [(d["id"], d["label"]) for d in fleet.outputs()] == [("i1", "neutral")]
    import time

    time.sleep(0.3)
    fleet.aggregator_handler._next_sweep = 0.0
    fleet.aggregator_handler.tick()
    drain(fleet.judge)
    decided = {d["id"]: d for d in fleet.outputs()}
    assert decided["i0"]["source"] == "judge"
    assert decided["i0"]["reason"].startswith("vote timeout")
    # gamma comes back late: its votes are dropped and no per-item key is re-created.
    drain(fleet.workers["gamma"])
    drain(fleet.aggregator)
    assert len(fleet.outputs()) == 2
    assert fleet.rt.redis.keys(fleet.rt.keys.votes("*")) == []


def test_redelivered_votes_and_racing_aggregators_give_one_label(fleet: Fleet) -> None:
    [item_id] = produce(fleet.rt.settings, agree("neutral"))
    for name in WORKERS:
        drain(fleet.workers[name])
    # Every worker casts its vote a second time (a re-delivery after a crash before XACK).
    item = fleet.rt.redis.xrange(fleet.rt.keys.items)[0][1][b"d"]
    pipe = fleet.rt.redis.pipeline(transaction=False)
    recast = Writes(pipe, fleet.rt.scripts)
    for name in WORKERS:
        recast.cast_vote(item_id, Vote(worker=name, label="neutral"), item, 2, 1e12)
    recast.flush()
    # Two aggregator replicas decide the same item at once.
    for aggregator in (AggregatorHandler(fleet.rt), fleet.aggregator_handler):
        writes = Writes(pipe, fleet.rt.scripts)
        aggregator.settle([item_id], writes, timed_out=False)
        writes.flush()
    pipe.execute()
    drain(fleet.aggregator)
    assert [d["id"] for d in fleet.outputs()] == [item_id]
    # The counters count what happened, not what was attempted.
    stats = fleet.stats()
    assert sum(v for k, v in stats.items() if k.startswith("votes_total|")) == 3
    assert stats["votes_total|label=neutral|worker=alpha"] == 1
    assert stats["decisions_total|source=workers"] == 1


BAD_ENTRIES = {
    "invalid JSON": {b"d": b'{"id": "x1", "text": '},
    "not an object": {b"d": b"[1, 2, 3]"},
    "not UTF-8": {b"d": b'{"id": "x2", "text": "\xff\xfe"}'},
    "missing text": {b"d": b'{"id": "x3", "task": "sentiment"}'},
    "empty text": {b"d": b'{"id": "x4", "task": "sentiment", "text": "  \\n "}'},
    "text is a number": {b"d": b'{"id": "x5", "task": "sentiment", "text": 7}'},
    "unknown task": {b"d": b'{"id": "x6", "task": "astrology", "text": "hi"}'},
    "pair without text_b": {b"d": b'{"id": "x7", "task": "similar_ticket", "text": "hi"}'},
    "no d field": {b"body": b"hello"},
    "oversized text": {b"d": orjson.dumps({"id": "x8", "task": "sentiment", "text": "a" * 9000})},
}


def test_bad_entries_are_rejected_once_with_a_reason_and_workers_keep_going(fleet: Fleet) -> None:
    for fields in BAD_ENTRIES.values():
        fleet.rt.redis.xadd(fleet.rt.keys.items, fields)  # type: ignore[arg-type]
    produce(fleet.rt.settings, agree("positive"))
    fleet.step()
    rejects = fleet.final(fleet.rt.keys.rejects)
    assert len(rejects) == len(BAD_ENTRIES)  # three workers saw each: still one reject each
    assert len({r["id"] for r in rejects}) == len(BAD_ENTRIES)
    reasons = " | ".join(r["reason"] for r in rejects)
    for expected in (
        "invalid JSON",
        "expected a JSON object",
        "not valid UTF-8",
        "missing field 'text'",
        "text is empty",
        "valid string",
        "unknown task",
        "needs text_b",
        "no 'd' field",
        "over the limit",
    ):
        assert expected in reasons
    assert [d["id"] for d in fleet.outputs()] == ["i0"]
    assert fleet.stats()["rejects_total"] == len(BAD_ENTRIES)


def test_reclaim_takes_over_entries_a_dead_consumer_left_pending(make_settings: Any) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(workers=workers, block_ms=20, reclaim_idle_s=0.05)
    fleet = Fleet(settings)
    produce(settings, agree("negative"), agree("negative"))
    rt = fleet.rt
    # "dead" reads the batch and dies before acking it.
    rt.redis.xreadgroup(worker_group("alpha"), "dead", {rt.keys.items: ">"}, count=10)
    drain(fleet.workers["alpha"])
    assert rt.redis.xpending(rt.keys.items, worker_group("alpha"))["pending"] == 2
    import time

    time.sleep(0.1)
    fleet.workers["alpha"].reclaim()
    assert rt.redis.xpending(rt.keys.items, worker_group("alpha"))["pending"] == 0
    fleet.step("beta")
    assert sorted(d["id"] for d in fleet.outputs()) == ["i0", "i1"]


def test_a_judge_that_never_answers_ends_in_the_dead_letter_stream(make_settings: Any) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(workers=workers, block_ms=20, reclaim_idle_s=0.01, max_deliveries=2)
    fleet = Fleet(settings)
    produce(settings, {"alpha": "positive", "beta": "negative", "gamma": "neutral"})
    fleet.step()
    assert fleet.outputs() == []
    import time

    for _ in range(3):  # re-deliveries 2 and 3; the third exceeds max_deliveries
        time.sleep(0.05)
        fleet.judge.reclaim()
    [dead] = fleet.final(fleet.rt.keys.dead)
    assert dead["id"] == "i0"
    assert "judge gave no label" in dead["error"]
    assert dead["deliveries"] == 3
    assert fleet.rt.redis.xpending(fleet.rt.keys.judge, JUDGE_GROUP)["pending"] == 0
    assert fleet.outputs() == []
    assert fleet.stats()["dead_letters_total|group=judge"] == 1
    assert fleet.stats()["escalations_total"] == 1


def test_a_worker_that_keeps_crashing_on_an_item_abstains_after_max_deliveries(
    make_settings: Any,
) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(workers=workers, block_ms=20, reclaim_idle_s=0.01, max_deliveries=2)
    fleet = Fleet(settings)
    fleet.rt.stop.wait = lambda seconds: False  # type: ignore[method-assign]  # no backoff sleep
    produce(
        settings, {"alpha": "!raise", "beta": "positive", "gamma": "negative", "judge": "positive"}
    )
    fleet.step("beta", "gamma", "alpha")
    import time

    for _ in range(3):
        time.sleep(0.05)
        fleet.workers["alpha"].reclaim()
    drain(fleet.aggregator)
    drain(fleet.judge)
    [decision] = fleet.outputs()
    alpha = next(v for v in decision["votes"] if v["worker"] == "alpha")
    assert alpha["label"] is None
    assert "alpha crashed" in alpha["error"]
    assert decision["source"] == "judge"


PLUGIN = '''
from consumers.backends.base import BackendOptions
from common.schemas import Prediction


class Always:
    """Votes one label, sure of it."""

    class Options(BackendOptions):
        label: str = "positive"

    def __init__(self, options, tasks):
        self.label = options.label

    def classify(self, items):
        return [Prediction(label=self.label, confidence=1.0) for _ in items]
'''


def test_a_backend_of_your_own_by_dotted_path_runs_in_the_fleet(tmp_path: Path) -> None:
    """``backend = "module:Class"``: a user's backend without forking tribunal, imported by
    every fleet process from its path; a typo in it is one line before anything starts."""
    (tmp_path / "my_backends.py").write_text(PLUGIN)
    fleet = tmp_path / "fleet.toml"
    workers = "".join(
        f'[workers.w{n}]\nbackend = "my_backends:Always"\noptions = {{ label = "negative" }}\n'
        for n in range(3)
    )
    fleet.write_text(workers + '[judge]\nbackend = "lexicon-judge"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    demo = [sys.executable, "-m", "tribunal", "--fleet", str(fleet), "demo", "--offline"]
    result = subprocess.run(
        [*demo, "--limit", "4"], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"accepted by workers\W+4 \(100%\)", result.stdout), result.stdout
    assert re.search(r"sent to judge\W+0 \(0%\)", result.stdout), result.stdout

    fleet.write_text(fleet.read_text().replace("my_backends:Always", "my_backends:Alway"))
    result = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "module 'my_backends' has no 'Alway'" in result.stderr
    assert "Traceback" not in result.stderr
