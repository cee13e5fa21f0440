"""The decision rule: majority, ties, threshold, abstentions, missing votes."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from common.schemas import Vote
from common.settings import load_settings
from consumers.decision import (
    SCHEMES,
    THRESHOLDS,
    Majority,
    Rule,
    Unanimous,
    UnknownScheme,
    Weighted,
    candidate_rules,
    decide,
    make,
)


def votes(*specs: tuple[str | None, float | None]) -> list[Vote]:
    return [Vote(worker=f"w{i}", label=lb, confidence=c) for i, (lb, c) in enumerate(specs)]


MAJORITY = Majority(n_workers=3, quorum=2)


def test_two_of_three_agree_is_accepted_without_waiting_for_the_third() -> None:
    outcome = decide(votes(("positive", 0.9), ("positive", 0.6)), MAJORITY)
    assert (outcome.kind, outcome.label) == ("accept", "positive")


def test_unanimous_vote_is_accepted() -> None:
    outcome = decide(votes(("neutral", 0.9), ("neutral", 0.9), ("neutral", 0.9)), MAJORITY)
    assert (outcome.kind, outcome.label) == ("accept", "neutral")


def test_three_way_split_escalates() -> None:
    outcome = decide(votes(("positive", 1), ("negative", 1), ("neutral", 1)), MAJORITY)
    assert outcome.kind == "escalate"
    assert "no agreement (majority 2/3)" in outcome.reason


def test_split_with_a_vote_missing_waits_for_it() -> None:
    assert decide(votes(("positive", 1), ("negative", 1)), MAJORITY).kind == "wait"


def test_split_is_escalated_when_no_more_votes_will_come() -> None:
    assert decide(votes(("positive", 1), ("negative", 1)), MAJORITY, final=True).kind == "escalate"


def test_single_vote_after_timeout_is_not_a_quorum() -> None:
    assert decide(votes(("positive", 1)), MAJORITY, final=True).kind == "escalate"


def test_no_votes_at_all_escalate_when_final() -> None:
    assert decide([], MAJORITY, final=True).kind == "escalate"


def test_abstentions_never_count() -> None:
    outcome = decide(votes((None, None), (None, None), ("positive", 0.99)), MAJORITY)
    assert outcome.kind == "escalate"


def test_abstentions_escalate_early_when_quorum_is_out_of_reach() -> None:
    # Two abstentions of three: the last vote alone cannot make a quorum of 2.
    assert decide(votes((None, None), (None, None)), MAJORITY).kind == "escalate"


def test_tie_between_two_labels_is_never_accepted() -> None:
    rule = Majority(n_workers=4, quorum=2)
    tie = votes(("positive", 1), ("positive", 1), ("negative", 1), ("negative", 1))
    assert decide(tie, rule).kind == "escalate"


@pytest.mark.parametrize(
    ("confidences", "expected"),
    [
        ((0.9, 0.8), "accept"),  # both at or above the threshold
        ((0.9, 0.8 - 1e-9), "wait"),  # one vote too unsure to count; the third may settle it
        ((0.5, 0.5), "escalate"),  # neither counts: one more vote cannot make a quorum
    ],
)
def test_threshold_counts_only_confident_votes(
    confidences: tuple[float, float], expected: str
) -> None:
    rule = Majority(n_workers=3, quorum=2, threshold=0.8)
    specs = [("negative", c) for c in confidences]
    assert decide(votes(*specs), rule).kind == expected


def test_threshold_escalates_when_confident_votes_cannot_reach_quorum() -> None:
    rule = Majority(n_workers=3, quorum=2, threshold=0.8)
    three = votes(("negative", 0.9), ("negative", 0.3), ("negative", 0.2))
    assert decide(three, rule).kind == "escalate"


def test_vote_without_confidence_does_not_count_under_a_threshold() -> None:
    rule = Majority(n_workers=3, quorum=2, threshold=0.5)
    assert decide(votes(("positive", None), ("positive", None)), rule, final=True).kind == (
        "escalate"
    )


def test_quorum_of_one_accepts_the_first_vote() -> None:
    outcome = decide(votes(("positive", 0.7)), Majority(n_workers=3, quorum=1))
    assert (outcome.kind, outcome.label) == ("accept", "positive")


def test_unanimity_rule_needs_every_vote() -> None:
    rule = Majority(n_workers=3, quorum=3)
    assert decide(votes(("positive", 1), ("positive", 1)), rule).kind == "wait"
    three = votes(("positive", 1), ("positive", 1), ("negative", 1))
    assert decide(three, rule).kind == "escalate"


WEIGHTED = Weighted(n_workers=3, quorum=2)


def test_weighted_two_sure_votes_are_accepted() -> None:
    outcome = decide(votes(("positive", 0.9), ("positive", 0.8)), WEIGHTED)
    assert (outcome.kind, outcome.label) == ("accept", "positive")


def test_weighted_two_unsure_votes_are_not_enough_once_all_are_in() -> None:
    two_unsure = votes(("positive", 0.6), ("positive", 0.6), ("negative", 0.9))
    assert decide(two_unsure, WEIGHTED).kind == "escalate"  # 1.2 < 1.5 needed


def test_weighted_waits_while_the_missing_vote_could_still_carry_it() -> None:
    assert decide(votes(("positive", 0.6), ("positive", 0.6)), WEIGHTED).kind == "wait"


def test_weighted_three_lukewarm_votes_add_up() -> None:
    outcome = decide(votes(("neutral", 0.55), ("neutral", 0.5), ("neutral", 0.5)), WEIGHTED)
    assert (outcome.kind, outcome.label) == ("accept", "neutral")


def test_weighted_min_weight_is_configurable() -> None:
    rule = Weighted(n_workers=3, quorum=2, min_weight=2.5)
    assert decide(votes(("a", 0.9), ("a", 0.9), ("a", 0.6)), rule).kind == "escalate"
    assert decide(votes(("a", 0.9), ("a", 0.9), ("a", 0.8)), rule).label == "a"


def test_unanimous_needs_every_worker() -> None:
    rule = Unanimous(n_workers=3, quorum=2)
    assert decide(votes(("a", 1), ("a", 1)), rule).kind == "wait"
    assert decide(votes(("a", 1), ("a", 1), ("b", 1)), rule).kind == "escalate"
    assert decide(votes(("a", 1), ("a", 1), (None, None)), rule).kind == "escalate"
    assert decide(votes(("a", 1), ("a", 1), ("a", 1)), rule).label == "a"


def test_rule_describes_itself() -> None:
    assert MAJORITY.describe() == "majority 2/3"
    assert Majority(3, 2, 0.8).describe() == "majority 2/3, conf >= 0.8"
    assert WEIGHTED.describe() == "weighted >= 1.5"


def test_a_new_scheme_is_one_class_in_one_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A throwaway scheme, registered in consumers.decision.SCHEMES and nowhere else: the
    fleet file selects it, the aggregator's decide applies it, calibration sweeps it and
    prints the lines that select it again."""

    @dataclass(frozen=True)
    class Plurality(Rule):
        """The label with the most counted votes, however few."""

        scheme: str = field(default="plurality", init=False)

        @property
        def needed(self) -> float:
            return 1

    monkeypatch.setitem(SCHEMES, "plurality", Plurality)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('agreement = "plurality"\n')
    rule = Rule.of(load_settings(fleet))
    assert rule == Plurality(n_workers=3, quorum=2)
    split = votes(("a", 1), ("b", 1), ("a", 0.4))
    assert decide(split, rule, final=True).label == "a"
    assert decide(split, Majority(3, 2), final=True).label == "a"  # 2 of 3 there too
    assert decide(votes(("a", 1), ("b", 1), (None, None)), rule, final=True).kind == "escalate"
    swept = [r for r in candidate_rules(3) if isinstance(r, Plurality)]
    assert len(swept) == len(THRESHOLDS)
    fleet.write_text(swept[3].fleet_lines() + "\n")
    assert Rule.of(load_settings(fleet)) == swept[3]
    assert make(**asdict(swept[3])) == swept[3]  # as a report stores and reads it


def test_an_unknown_scheme_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('agreement = "majorty"\n')
    with pytest.raises(
        UnknownScheme, match=r"'majorty' \(known: majority, weighted, unanimous, posterior\)"
    ):
        Rule.of(load_settings(fleet))
    result = subprocess.run(
        [sys.executable, "-m", "tribunal", "--fleet", str(fleet), "demo", "--offline"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown agreement 'majorty'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "starting" not in result.stdout + result.stderr  # refused before anything starts
