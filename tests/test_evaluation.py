"""Evaluation numbers against a case computed by hand, and calibration on a constructed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.schemas import Vote
from common.settings import load_settings
from consumers.decision import Majority, Rule, Weighted, candidate_rules
from tribunal.demo import load_sample
from tribunal.quality.calibrate import (
    Candidate,
    Goal,
    recommend,
    score_candidates,
    stricter_rules,
)
from tribunal.quality.scoring import (
    Observation,
    confusion,
    evaluate_task,
    pairwise,
    score_rule,
)

MAJORITY = Majority(n_workers=3, quorum=2)


def obs(
    item_id: str, votes: list[tuple[str | None, float]], judge: str, gold: str | None
) -> Observation:
    return Observation(
        id=item_id,
        task="t",
        gold=gold,
        votes=[
            Vote(worker=f"w{n}", label=label, confidence=conf, latency_ms=10)
            for n, (label, conf) in enumerate(votes)
        ],
        judge=Vote(worker="judge", label=judge, confidence=0.9, latency_ms=100),
    )


# Worked out on paper:
# i1: a a b  -> majority a (judge a, gold a)   conf 0.8: a a counted -> a
# i2: a b b  -> majority b (judge a, gold a)   conf 0.8: only b counted -> judge a
# i3: a b -  -> split, judge b (gold b)        conf 0.8: split -> judge b
# i4: b b b  -> majority b (judge b, gold a)   conf 0.8: nothing counted -> judge b
HAND = [
    obs("i1", [("a", 0.9), ("a", 0.9), ("b", 0.6)], judge="a", gold="a"),
    obs("i2", [("a", 0.6), ("b", 0.9), ("b", 0.55)], judge="a", gold="a"),
    obs("i3", [("a", 0.9), ("b", 0.9), (None, 0.0)], judge="b", gold="b"),
    obs("i4", [("b", 0.7), ("b", 0.7), ("b", 0.7)], judge="b", gold="a"),
]


def test_majority_numbers_match_the_hand_computed_case() -> None:
    s = score_rule(HAND, MAJORITY)
    assert (s.accepted, s.acceptance, s.judge_calls) == (3, 0.75, 0.25)
    assert s.judge_agreement == pytest.approx(2 / 3)  # i1 and i4 agree, i2 does not
    assert s.accuracy == 0.5  # i1 and i3 right
    assert s.accepted_accuracy == pytest.approx(1 / 3)
    assert s.judged_accuracy == 1.0
    # judge alone: 4 x 100 ms; cascade: 3 workers x 4 x 10 ms + 1 judge call x 100 ms
    assert s.speedup == pytest.approx(0.4 / 0.22)


def test_threshold_rule_numbers_match_the_hand_computed_case() -> None:
    s = score_rule(HAND, Majority(n_workers=3, quorum=2, threshold=0.8))
    assert (s.accepted, s.judge_agreement, s.accuracy) == (1, 1.0, 0.75)
    assert s.judge_calls == 0.75


def test_models_pairs_and_confusion_match_the_hand_computed_case() -> None:
    section = evaluate_task(HAND, MAJORITY, ["a", "b"])
    models = section.models
    assert [models[w].accuracy for w in ("w0", "w1", "w2", "judge")] == [0.5, 0.5, 0.0, 0.75]
    assert models["w2"].abstained == 1
    assert models["w0"].judge_agreement == 0.75  # a a a b vs judge a a b b
    assert models["judge"].seconds_per_item == pytest.approx(0.1)
    pairs = pairwise(HAND)
    assert pairs["w0 / w1"] == 0.5
    assert pairs["w0 / w2"] == pytest.approx(1 / 3)  # i3: w2 abstained, not counted
    assert confusion(HAND, MAJORITY, ["a", "b"]).model_dump() == {
        "reference": "gold",
        "labels": ["a", "b"],
        "matrix": [[1, 2], [0, 1]],  # gold a: i1 -> a, i2 and i4 -> b; gold b: i3 -> b
    }
    assert [s.rule for s in section.schemes][:4] == [
        "majority 2/3",
        "weighted >= 1.5",
        "unanimous 3/3",
        "majority 2/3, conf >= 0.8",
    ]


def test_without_gold_the_confusion_matrix_is_against_the_judge() -> None:
    no_gold = [o.model_copy(update={"gold": None}) for o in HAND]
    section = evaluate_task(no_gold, MAJORITY, ["a", "b"])
    assert section.configured.accuracy is None
    assert section.confusion.reference == "judge"
    assert section.confusion.matrix == [[1, 1], [0, 2]]  # judge a: i1 a, i2 b


def constructed() -> list[Observation]:
    """60 items whose sure votes agree with the judge, 40 whose unsure votes do not."""
    sure = [
        obs(f"s{n}", [("a", 0.9), ("a", 0.9), ("b", 0.9)], judge="a", gold="a") for n in range(60)
    ]
    unsure = [
        obs(f"u{n}", [("a", 0.6), ("a", 0.6), ("b", 0.6)], judge="b", gold="b") for n in range(40)
    ]
    return sure + unsure


def candidates() -> list[Candidate]:
    return score_candidates(constructed(), candidate_rules(3))


def test_calibration_picks_the_lowest_threshold_that_filters_the_unsure_votes() -> None:
    best = recommend(candidates(), Goal(target_agreement=0.9))
    assert best is not None
    assert best.rule == Majority(n_workers=3, quorum=2, threshold=0.65)
    assert (best.score.acceptance, best.score.judge_agreement) == (0.6, 1.0)


def test_plain_majority_is_kept_when_the_target_allows_it() -> None:
    best = recommend(candidates(), Goal(target_agreement=0.55))
    assert best is not None and best.rule == Majority(n_workers=3, quorum=2)


def test_calibration_within_a_judge_budget() -> None:
    best = recommend(candidates(), Goal(target_agreement=None, judge_budget=0.5))
    assert best is not None and best.score.judge_calls <= 0.5
    assert best.score.judge_agreement == 1.0
    assert recommend(candidates(), Goal(target_agreement=0.9, judge_budget=0.3)) is None


def test_the_printed_fleet_lines_load_and_give_the_recommended_rule(tmp_path: Path) -> None:
    best = recommend(candidates(), Goal(target_agreement=0.9))
    assert best is not None
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(best.rule.fleet_lines() + '\n\n[judge]\nbackend = "lexicon-judge"\n')
    assert Rule.of(load_settings(fleet)) == best.rule


def test_a_judge_abstention_is_not_a_disagreement() -> None:
    silent = HAND[0].model_copy(update={"judge": Vote(worker="judge", label=None)})
    s = score_rule([silent, HAND[3]], MAJORITY)
    assert s.accepted == 2 and s.judge_agreement == 1.0  # only i4's judge answered


def test_audits_judge_only_rules_at_least_as_strict_as_the_live_one() -> None:
    weighted = Weighted(n_workers=3, quorum=2, threshold=0.6, min_weight=2.5)
    rules = stricter_rules(weighted)
    assert rules and all(r.scheme == "weighted" and r.min_weight == 2.5 for r in rules)
    assert all((r.threshold or 0) >= 0.6 for r in rules)
    majority = stricter_rules(Majority(n_workers=3, quorum=2))
    assert {r.scheme for r in majority} == {"majority", "unanimous"}
    assert "min_weight = 2.5" in weighted.fleet_lines()


def test_the_textblob_worker_starts_without_numpy_scipy_sklearn_and_scores_as_textblob() -> None:
    """TextBlob's nltk would import NumPy, SciPy and scikit-learn (1 CPU-s per process) for
    parts its sentiment never uses: they stay out of the worker, its scores are those of
    TextBlob imported as usual (in a process of its own) on every bundled ticket, and the
    worker's process can still import all three after (a student beside it in `evaluate`)."""
    import subprocess
    import sys

    texts = ["Not good, awful day!", "I love the new dashboard.", "The invoice is attached."]
    texts += [str(r["text"]) for r in load_sample("sentiment")]
    ours = f"""
import sys
from common.tasks import BUILTIN_TASKS
from consumers.backends.lexicon import PolarityOptions, TextBlobPolarity
worker = TextBlobPolarity(PolarityOptions(), BUILTIN_TASKS)
print([worker.score(t) for t in {texts!r}])
print(*(name in sys.modules for name in ("numpy", "scipy", "sklearn")))
import numpy, scipy.stats, sklearn.naive_bayes
print("sklearn" in sys.modules and "scipy.stats" in sys.modules and "numpy" in sys.modules)
"""
    usual = f"""
import sys
from textblob import TextBlob
print([TextBlob(t).sentiment.polarity for t in {texts!r}])
print(*(name in sys.modules for name in ("numpy", "scipy", "sklearn")))
"""
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        for code in (ours, usual)
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    (scores, hidden, later), (usual_scores, present) = (r.stdout.splitlines() for r in runs)
    assert scores == usual_scores and scores.startswith("[-0.675, 0."), (scores, usual_scores)
    assert len(scores.split(",")) > 200
    assert (hidden, later, present) == ("False False False", "True", "True True True")
