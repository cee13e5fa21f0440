"""Offline similar_ticket backends: accuracy on the bundled gold pairs, and their contract."""

from __future__ import annotations

from importlib import resources

import orjson
import pytest

from common.schemas import Item
from common.settings import ModelSpec, load_settings
from common.tasks import BUILTIN_TASKS, TaskSpec
from consumers.backends import BackendError, check_options, load_backend
from consumers.backends.similarity import SimilarityJudge

WORKERS = ("jaccard", "tfidf", "char-ngrams")
JUDGE = "similarity-judge"


def gold_pairs() -> list[Item]:
    path = resources.files("producers") / "samples" / "ticket_pairs.jsonl"
    return [Item(**orjson.loads(line)) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def accuracy() -> dict[str, float]:
    pairs = gold_pairs()
    assert len(pairs) == 120
    scores = {}
    for name in (*WORKERS, JUDGE):
        predictions = load_backend(name, {}, BUILTIN_TASKS).classify(pairs)
        scores[name] = sum(p.label == i.gold for p, i in zip(predictions, pairs, strict=True)) / 120
    print("accuracy on the 120 gold pairs:", scores)
    return scores


def test_workers_beat_chance_and_the_judge_beats_every_worker(accuracy: dict[str, float]) -> None:
    # Measured: jaccard 0.58, tfidf 0.55, char-ngrams 0.62, similarity-judge 0.77.
    for name in WORKERS:
        assert accuracy[name] >= 0.54, name
        assert accuracy[JUDGE] > accuracy[name] + 0.1, name
    assert accuracy[JUDGE] >= 0.75


@pytest.mark.parametrize("name", [*WORKERS, JUDGE])
def test_labels_and_confidences_are_well_formed(name: str) -> None:
    backend = load_backend(name, {}, BUILTIN_TASKS)
    same = "The Android app crashes on launch since the 5.2 update."
    out = backend.classify(
        [
            Item(id="a", task="similar_ticket", text=same, text_b=same),
            Item(id="b", task="similar_ticket", text=same, text_b="How do I add a teammate?"),
        ]
    )
    assert [p.label for p in out] == ["similar", "not_similar"]
    assert all(p.confidence is not None and 0.5 <= p.confidence <= 1 for p in out)


@pytest.mark.parametrize("name", [*WORKERS, JUDGE])
def test_other_tasks_are_not_handled(name: str) -> None:
    tasks = {
        **BUILTIN_TASKS,
        "dupe": TaskSpec(labels=["dupe", "distinct"], pair=True, instructions="?"),
    }
    backend = load_backend(name, {}, tasks)
    out = backend.classify(
        [
            Item(id="a", task="sentiment", text="great"),
            Item(id="b", task="dupe", text="x", text_b="y"),
        ]
    )
    assert all(p.label is None and "does not handle task" in (p.error or "") for p in out)


def test_threshold_option_moves_the_decision() -> None:
    pair = Item(id="a", task="similar_ticket", text="refund not received", text_b="refund late")
    strict = load_backend("jaccard", {"threshold": 0.9}, BUILTIN_TASKS).classify([pair])
    loose = load_backend("jaccard", {"threshold": 0.01}, BUILTIN_TASKS).classify([pair])
    assert (strict[0].label, loose[0].label) == ("not_similar", "similar")


def test_the_offline_similar_fleet_file_loads_its_backends() -> None:
    fleet = resources.files("tribunal") / "fleets" / "similar_offline.toml"
    with resources.as_file(fleet) as path:
        settings = load_settings(path)
    assert sorted(settings.workers) == sorted(WORKERS)
    assert settings.judge.backend == JUDGE
    for spec in (*settings.workers.values(), settings.judge):
        load_backend(spec.backend, spec.options, settings.all_tasks)


def test_options_are_declared_and_a_typo_or_a_wrong_type_is_one_line() -> None:
    with pytest.raises(BackendError, match=r"^backend jaccard: invalid options: treshold: Extra"):
        load_backend("jaccard", {"treshold": 0.2}, BUILTIN_TASKS)
    with pytest.raises(BackendError, match="backend char-ngrams: invalid options: n: Input should"):
        load_backend("char-ngrams", {"n": "three"}, BUILTIN_TASKS)
    with pytest.raises(BackendError, match="scale: Input should be greater than 0"):
        load_backend("tfidf", {"scale": 0}, BUILTIN_TASKS)
    with pytest.raises(BackendError, match=r"^w: backend jaccard: invalid options: n: Extra"):
        check_options(ModelSpec(backend="jaccard", options={"n": 4}), "w")
    with pytest.raises(BackendError, match=r"^judge: unknown backend 'jacard' \(known: "):
        check_options(ModelSpec(backend="jacard"), "judge")
    check_options(ModelSpec(backend="char-ngrams", options={"threshold": 0.1, "n": 4}), "w")


def test_the_judge_keeps_its_own_threshold_and_gives_n_to_its_char_ngrams() -> None:
    judge = load_backend(JUDGE, {"n": 4}, BUILTIN_TASKS)
    assert isinstance(judge, SimilarityJudge)
    assert (judge.threshold, judge.scale) == (0.0, 1.0)
    jaccard, tfidf, char_ngrams = judge.parts
    assert (jaccard.threshold, tfidf.threshold, char_ngrams.threshold) == (0.10, 0.15, 0.15)
    assert getattr(char_ngrams, "n", None) == 4
