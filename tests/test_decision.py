"""The decision rule: majority, ties, threshold, abstentions, missing votes."""

from __future__ import annotations

import pytest

from common.schemas import Vote
from consumers.decision import Rule, decide


def votes(*specs: tuple[str | None, float | None]) -> list[Vote]:
    return [Vote(worker=f"w{i}", label=lb, confidence=c) for i, (lb, c) in enumerate(specs)]


MAJORITY = Rule(n_workers=3, quorum=2)


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
    rule = Rule(n_workers=4, quorum=2)
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
    rule = Rule(n_workers=3, quorum=2, threshold=0.8)
    specs = [("negative", c) for c in confidences]
    assert decide(votes(*specs), rule).kind == expected


def test_threshold_escalates_when_confident_votes_cannot_reach_quorum() -> None:
    rule = Rule(n_workers=3, quorum=2, threshold=0.8)
    three = votes(("negative", 0.9), ("negative", 0.3), ("negative", 0.2))
    assert decide(three, rule).kind == "escalate"


def test_vote_without_confidence_does_not_count_under_a_threshold() -> None:
    rule = Rule(n_workers=3, quorum=2, threshold=0.5)
    assert decide(votes(("positive", None), ("positive", None)), rule, final=True).kind == (
        "escalate"
    )


def test_quorum_of_one_accepts_the_first_vote() -> None:
    outcome = decide(votes(("positive", 0.7)), Rule(n_workers=3, quorum=1))
    assert (outcome.kind, outcome.label) == ("accept", "positive")


def test_unanimity_rule_needs_every_vote() -> None:
    rule = Rule(n_workers=3, quorum=3)
    assert decide(votes(("positive", 1), ("positive", 1)), rule).kind == "wait"
    three = votes(("positive", 1), ("positive", 1), ("negative", 1))
    assert decide(three, rule).kind == "escalate"


WEIGHTED = Rule(n_workers=3, quorum=2, scheme="weighted")


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
    rule = Rule(n_workers=3, quorum=2, scheme="weighted", min_weight=2.5)
    assert decide(votes(("a", 0.9), ("a", 0.9), ("a", 0.6)), rule).kind == "escalate"
    assert decide(votes(("a", 0.9), ("a", 0.9), ("a", 0.8)), rule).label == "a"


def test_unanimous_needs_every_worker() -> None:
    rule = Rule(n_workers=3, quorum=2, scheme="unanimous")
    assert decide(votes(("a", 1), ("a", 1)), rule).kind == "wait"
    assert decide(votes(("a", 1), ("a", 1), ("b", 1)), rule).kind == "escalate"
    assert decide(votes(("a", 1), ("a", 1), (None, None)), rule).kind == "escalate"
    assert decide(votes(("a", 1), ("a", 1), ("a", 1)), rule).label == "a"


def test_rule_describes_itself() -> None:
    assert MAJORITY.describe() == "majority 2/3"
    assert Rule(3, 2, 0.8).describe() == "majority 2/3, conf >= 0.8"
    assert WEIGHTED.describe() == "weighted >= 1.5"
