"""Policies that save worker model time: staged voting and early exit."""

from __future__ import annotations

from typing import Any

from test_consumers import WORKERS, Fleet, agree, produce

from common.settings import ModelSpec
from consumers.engine.writes import Writes

SPECS = {name: ModelSpec(backend="simulated") for name in WORKERS}


def test_staged_asks_the_third_worker_only_when_the_first_two_split(make_settings: Any) -> None:
    fleet = Fleet(make_settings(workers=SPECS, policy="staged", block_ms=20))
    assert fleet.rt.settings.worker_tiers == [["alpha", "beta"], ["gamma"]]
    produce(
        fleet.rt.settings,
        agree("positive"),  # settled by alpha and beta
        {"alpha": "positive", "beta": "negative", "gamma": "negative"},  # gamma breaks the tie
        {"alpha": "positive", "beta": "negative", "gamma": "neutral", "judge": "neutral"},
    )
    fleet.step("alpha", "beta")
    fleet.step("gamma")
    decided = {d["id"]: d for d in fleet.outputs()}
    assert (decided["i0"]["label"], decided["i0"]["source"]) == ("positive", "workers")
    assert {v["worker"] for v in decided["i0"]["votes"]} == {"alpha", "beta"}
    assert (decided["i1"]["label"], decided["i1"]["source"]) == ("negative", "workers")
    assert {v["worker"] for v in decided["i1"]["votes"]} == {"alpha", "beta", "gamma"}
    assert (decided["i2"]["label"], decided["i2"]["source"]) == ("neutral", "judge")
    # gamma saw only the two items its colleagues split on.
    assert fleet.rt.redis.xlen(fleet.rt.keys.tier(1)) == 2
    assert fleet.stats()["tiebreaks_total"] == 2
    assert fleet.stats()["votes_total|label=negative|worker=gamma"] == 1


def test_staged_with_a_threshold_asks_the_third_when_a_vote_is_unsure(make_settings: Any) -> None:
    settings = make_settings(workers=SPECS, policy="staged", confidence_threshold=0.8, block_ms=20)
    fleet = Fleet(settings)
    produce(
        settings,
        {"alpha": "neutral", "beta": "neutral@0.5", "gamma": "neutral"},  # gamma confirms
        {"alpha": "neutral@0.3", "beta": "neutral@0.5", "judge": "positive"},  # hopeless: judge
    )
    fleet.step("alpha", "beta")
    assert fleet.rt.redis.xlen(fleet.rt.keys.tier(1)) == 1
    fleet.step("gamma")
    decided = {d["id"]: (d["label"], d["source"]) for d in fleet.outputs()}
    assert decided == {"i0": ("neutral", "workers"), "i1": ("positive", "judge")}


def test_early_exit_skips_items_settled_before_a_lagging_worker_reads_them(
    make_settings: Any,
) -> None:
    fleet = Fleet(make_settings(workers=SPECS, block_ms=20))
    produce(fleet.rt.settings, *[agree("negative") for _ in range(5)])
    fleet.step("alpha", "beta")
    assert len(fleet.outputs()) == 5
    fleet.step("gamma")
    assert fleet.backends["gamma"].calls == 0
    assert fleet.stats()["skipped_total|worker=gamma"] == 5
    assert len(fleet.outputs()) == 5


def test_without_early_exit_the_lagging_worker_still_runs(make_settings: Any) -> None:
    fleet = Fleet(make_settings(workers=SPECS, block_ms=20, early_exit=False))
    produce(fleet.rt.settings, agree("negative"))
    fleet.step("alpha", "beta")
    fleet.step("gamma")
    assert fleet.backends["gamma"].calls == 1
    assert len(fleet.outputs()) == 1


def test_three_tiers_ask_each_only_what_the_cheaper_ones_left_open(make_settings: Any) -> None:
    tiers = [["alpha"], ["beta"], ["gamma"]]
    settings = make_settings(workers=SPECS, tiers=tiers, quorum=2, block_ms=20)
    fleet = Fleet(settings)
    assert settings.worker_tiers == tiers
    produce(
        settings,
        {"alpha": "positive", "beta": "positive", "gamma": "negative"},  # two tiers settle it
        {"alpha": "positive", "beta": "negative", "gamma": "negative"},  # the third breaks it
        {"alpha": "positive", "beta": "negative", "gamma": "neutral", "judge": "neutral"},
    )
    fleet.step("alpha")
    assert fleet.outputs() == []  # one vote of a quorum of two: beta's tier is asked
    assert fleet.rt.redis.xlen(fleet.rt.keys.tier(1)) == 3
    fleet.step("beta")
    assert [d["id"] for d in fleet.outputs()] == ["i0"]
    assert fleet.rt.redis.xlen(fleet.rt.keys.tier(2)) == 2
    fleet.step("gamma")
    decided = {d["id"]: (d["label"], d["source"], len(d["votes"])) for d in fleet.outputs()}
    assert decided == {
        "i0": ("positive", "workers", 2),
        "i1": ("negative", "workers", 3),
        "i2": ("neutral", "judge", 3),
    }
    assert fleet.backends["gamma"].calls == 1  # one batch: the two items left open
    assert fleet.stats()["votes_total|label=negative|worker=gamma"] == 1


def test_tiers_must_name_every_worker_once(make_settings: Any) -> None:
    import pytest
    from pydantic import ValidationError

    cases = {
        "; gamma: in no tier)": [["alpha"], ["beta"]],
        "; alpha: named twice)": [["alpha", "beta"], ["gamma", "alpha"]],
        "; delta: no such worker; gamma: in no tier)": [["alpha", "beta"], ["delta"]],
        "; a tier is empty)": [[], WORKERS],
        "; gamma: in no tier; a tier is empty)": [[], ["alpha", "beta"]],
    }
    for named, tiers in cases.items():
        with pytest.raises(ValidationError, match="must name every worker once") as refused:
            make_settings(workers=SPECS, tiers=tiers)
        assert named in str(refused.value), (tiers, str(refused.value))
    # a votes hash keeps its own fields beside the votes under names that start with _
    for name in ("_item", "-x"):
        with pytest.raises(ValidationError, match=f"worker name '{name}'"):
            make_settings(workers={name: SPECS["alpha"]})


def test_an_item_is_sent_to_a_tier_once_however_often_the_aggregator_is_told(
    make_settings: Any,
) -> None:
    tiers = [["alpha", "beta"], ["gamma"]]
    settings = make_settings(workers=SPECS, tiers=tiers, quorum=1, block_ms=20)
    fleet = Fleet(settings)
    produce(settings, {"alpha": "positive", "beta": "negative", "gamma": "negative"})
    fleet.step("alpha", "beta")  # two notices (quorum 1), read after both votes are in
    for _ in range(2):  # and more: a replica, a re-delivery deciding the same votes again
        writes = Writes.transaction(fleet.rt.redis, fleet.rt.scripts)
        fleet.aggregator_handler.settle(["i0"], writes, timed_out=False)
        writes.flush().execute()
    assert fleet.rt.redis.xlen(fleet.rt.keys.tier(1)) == 1  # sent once, not once per notice
    assert fleet.stats()["tiebreaks_total"] == 1
    fleet.step("gamma")
    [decision] = fleet.outputs()
    assert (decision["label"], decision["source"]) == ("negative", "workers")
    assert fleet.backends["gamma"].calls == 1
