"""Audit sampling: a share of worker-accepted items also goes to the judge; the label stands."""

from __future__ import annotations

import time
from typing import Any

import orjson
from test_consumers import WORKERS, Fleet, agree, drain, produce

from common.keys import JUDGE_GROUP
from common.settings import ModelSpec
from consumers.aggregator import sampled
from consumers.engine.writes import Writes
from tribunal.ops.readmodels import AuditCounts
from tribunal.ops.status import snapshot


def audit_fleet(make_settings: Any, fraction: float) -> Fleet:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    return Fleet(make_settings(workers=workers, block_ms=20, audit_fraction=fraction))


def test_every_accepted_item_is_audited_at_fraction_one(make_settings: Any) -> None:
    fleet = audit_fleet(make_settings, 1.0)
    settings = fleet.rt.settings
    judge_says = [{"judge": "positive"}, {"judge": "negative"}, {"judge": "positive"}]
    produce(settings, *({**agree("positive"), **j} for j in judge_says))
    fleet.step()
    outputs = fleet.outputs()
    assert [(o["label"], o["source"]) for o in outputs] == [("positive", "workers")] * 3
    audits = [orjson.loads(f[b"d"]) for _, f in fleet.rt.redis.xrange(fleet.rt.keys.audits)]
    assert sorted((a["id"], a["accepted"], a["judge"]["label"], a["agree"]) for a in audits) == [
        ("i0", "positive", "positive", True),
        ("i1", "positive", "negative", False),
        ("i2", "positive", "positive", True),
    ]
    assert len(audits[0]["votes"]) >= 2  # the votes behind the accepted label travel along
    snap = snapshot(fleet.rt.redis, settings)
    assert snap.audits == AuditCounts(agree=2, disagree=1, failed=0)
    assert snap.audit_disagreement == round(1 / 3, 4)


def test_no_audits_by_default(make_settings: Any) -> None:
    fleet = audit_fleet(make_settings, 0.0)
    produce(fleet.rt.settings, agree("positive"))
    fleet.step()
    assert fleet.rt.redis.xlen(fleet.rt.keys.audits) == 0
    assert fleet.judge_backend.calls == 0


def test_a_judge_that_cannot_answer_an_audit_drops_it_without_a_dead_letter(
    make_settings: Any,
) -> None:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    settings = make_settings(
        workers=workers, block_ms=20, audit_fraction=1.0, reclaim_idle_s=0.01, max_deliveries=2
    )
    fleet = Fleet(settings)
    produce(settings, agree("neutral"))  # no answer scripted for the judge: it gives no label
    fleet.step()
    for _ in range(3):  # re-deliveries 2 and 3; the third exceeds max_deliveries
        time.sleep(0.05)
        fleet.judge.reclaim()
    assert [o["label"] for o in fleet.outputs()] == ["neutral"]
    assert fleet.rt.redis.xlen(fleet.rt.keys.dead) == 0
    assert fleet.rt.redis.xpending(fleet.rt.keys.judge, JUDGE_GROUP)["pending"] == 0
    assert snapshot(fleet.rt.redis, settings).audits.failed == 1


def test_audit_sample_is_stable_and_close_to_the_fraction() -> None:
    ids = [f"ticket-{n}" for n in range(20_000)]
    picked = [i for i in ids if sampled(i, 0.1)]
    assert 0.09 < len(picked) / len(ids) < 0.11
    assert picked == [i for i in ids if sampled(i, 0.1)]
    assert not any(sampled(i, 0.0) for i in ids)
    assert all(sampled(i, 1.0) for i in ids)
    # exploration's sample (its own salt) is unrelated to the audits': about 10% of theirs
    explored = {i for i in ids if sampled(i, 0.1, salt=b"explore")}
    assert 0.09 < len(explored) / len(ids) < 0.11
    assert 0.05 < len(explored & set(picked)) / len(picked) < 0.15


def test_two_aggregators_settling_one_item_at_once_send_one_audit(make_settings: Any) -> None:
    fleet = audit_fleet(make_settings, 1.0)
    rt = fleet.rt
    produce(rt.settings, agree("positive"))
    for name in WORKERS:
        drain(fleet.workers[name])
    racing = [Writes(rt.redis.pipeline(transaction=True), rt.scripts) for _ in range(2)]
    for writes in racing:  # both gathered the votes before either settled
        fleet.aggregator_handler.settle(["i0"], writes, timed_out=False)
    for writes in racing:
        writes.flush().execute()
    assert rt.redis.xlen(rt.keys.output) == 1
    assert rt.redis.xlen(rt.keys.judge) == 1  # the audit went with the settlement that won


def test_calibrate_from_live_audits(make_settings: Any) -> None:
    from rich.console import Console

    from consumers.decision import Rule
    from tribunal.quality.calibrate import Goal, live_acceptance, read_audits, run_calibrate

    fleet = audit_fleet(make_settings, 1.0)
    rt = fleet.rt
    sure = {name: "positive@0.95" for name in WORKERS}
    unsure = {name: "positive@0.6" for name in WORKERS}
    produce(
        rt.settings,
        *([{**sure, "judge": "positive"}] * 30 + [{**unsure, "judge": "negative"}] * 20),
    )
    fleet.step()
    observations = read_audits(rt.redis, [rt.keys], None)
    assert len(observations) == 50 and live_acceptance(rt.redis, rt.settings) == 1.0
    console = Console(width=160, record=True)
    code = run_calibrate(console, observations, Rule.of(rt.settings), Goal(0.9), 1.0)
    text = console.export_text()
    assert code == 0, text
    assert "recommended: majority 2/3, conf >= 0.65" in text  # the unsure votes filtered out
