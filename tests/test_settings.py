"""Settings from the fleet file, the environment and defaults, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.settings import ModelSpec, load_settings
from consumers.backends import BackendError, check_options, load_backend, unhandled_tasks
from consumers.backends.simulated import Simulated
from consumers.decision import Rule, UnknownScheme

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TRIBUNAL_FLEET_FILE", "TRIBUNAL_QUORUM", "TRIBUNAL_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_offline_fleet_with_a_majority_quorum() -> None:
    s = load_settings()
    assert sorted(s.workers) == ["afinn", "textblob", "vader"]
    assert s.judge.backend == "lexicon-judge"
    assert s.effective_quorum == 2
    assert {"sentiment", "similar_ticket"} <= set(s.all_tasks)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_fleet_file_loads(example: str) -> None:
    s = load_settings(EXAMPLES / example)
    assert s.workers and s.judge.backend
    for role, spec in [*s.workers.items(), ("judge", s.judge)]:
        check_options(spec, role)  # the options its backend declares, of the right types


def test_backend_options_are_declared_typed_and_refused_in_one_line() -> None:
    bad = {
        "simulated": ({"accuracy": 1.5}, "accuracy: Input should be less than or equal to 1"),
        "afinn": ({"bnd": 0.3}, "bnd: Extra inputs are not permitted"),
        "lexicon-judge": ({"band": "wide"}, "band: Input should be a valid number"),
    }
    for backend, (options, problem) in bad.items():
        message = f"backend {backend}: invalid options: {problem}"
        with pytest.raises(BackendError, match=f"^w: {message}"):
            check_options(ModelSpec(backend=backend, options=options), "w")
        with pytest.raises(BackendError, match=f"^{message}"):
            load_backend(backend, options, {})
    simulated = load_backend("simulated", {"seed": 7, "latency_ms_per_call": "40"}, {})
    assert isinstance(simulated, Simulated)
    assert (simulated.seed, simulated.per_call_s, simulated.accuracy) == ("7", 0.04, 0.9)


def test_fleet_file_defines_tasks_and_workers_and_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        'quorum = 1\nbatch_size = 7\n[workers.one]\nbackend = "simulated"\n'
        '[workers.two]\nbackend = "simulated"\nreplicas = 3\n'
        '[tasks.topic]\nlabels = ["billing", "bug"]\ninstructions = "Topic?"\n'
    )
    monkeypatch.setenv("TRIBUNAL_QUORUM", "2")
    monkeypatch.setenv("TRIBUNAL_FLEET_FILE", str(fleet))
    s = load_settings()
    assert s.quorum == 2 and s.batch_size == 7
    assert s.workers["two"].replicas == 3
    assert s.all_tasks["topic"].labels == ["billing", "bug"]


def test_missing_fleet_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fleet file not found"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("quorum = 5\n", "quorum 5 exceeds the 3 workers"),
        ('[tasks.x]\nlabels = ["a"]\ninstructions = "?"\n', "at least 2"),
        ('[tasks.x]\nlabels = ["a", "a"]\ninstructions = "?"\n', "duplicate labels"),
        (
            '[tasks.x]\nlabels = ["a", "b"]\ninstructions = "?"\nsynonyms = {c = ["d"]}\n',
            "not in the label set",
        ),
        ('[workers."bad name"]\nbackend = "vader"\n', "worker name"),
        ("bogus_setting = 1\n", "bogus_setting"),
    ],
)
def test_invalid_fleet_files_say_what_is_wrong(tmp_path: Path, toml: str, message: str) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(toml)
    with pytest.raises(ValidationError, match=message):
        load_settings(fleet)


def test_partitions_and_their_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().my_partitions == [0]
    assert load_settings(partitions=4).my_partitions == [0, 1, 2, 3]
    monkeypatch.setenv("TRIBUNAL_ASSIGNED_PARTITIONS", "[3, 1, 3]")
    assert load_settings(partitions=4).my_partitions == [1, 3]
    with pytest.raises(ValidationError, match=r"assigned partition 3 is not in 0\.\.1"):
        load_settings(partitions=2)


def test_agreement_schemes_and_their_limits() -> None:
    assert load_settings(agreement="weighted", min_weight=2.5).min_weight == 2.5
    with pytest.raises(ValidationError, match=r"min_weight 4\.0 exceeds the 3 workers"):
        load_settings(agreement="weighted", min_weight=4)
    with pytest.raises(ValidationError, match="agreement"):
        load_settings(agreement="not a scheme name!")
    # The names are consumers.decision.SCHEMES': an unknown one is refused where a rule is
    # made (fleet start, evaluate, calibrate: exit 2, tests/test_decision.py).
    with pytest.raises(UnknownScheme, match="unknown agreement 'plurality'"):
        Rule.of(load_settings(agreement="plurality"))
    with pytest.raises(ValidationError, match="audit_fraction"):
        load_settings(audit_fraction=1.5)


def test_tasks_no_model_of_the_fleet_handles_are_named(tmp_path: Path) -> None:
    """The lexicons know sentiment, the pair scorers similar/not_similar pairs; a prompted
    language model (no ``handles``) any task."""
    fleets = Path(__file__).resolve().parent.parent / "tribunal" / "fleets"
    assert unhandled_tasks(load_settings()) == ["similar_ticket"]  # the offline default
    assert unhandled_tasks(load_settings(fleets / "similar_offline.toml")) == ["sentiment"]
    assert unhandled_tasks(load_settings(fleets / "local.toml")) == []
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        '[workers.v]\nbackend = "vader"\n[workers.j]\nbackend = "jaccard"\n'
        '[judge]\nbackend = "lexicon-judge"\n'
        '[tasks.topic]\nlabels = ["billing", "bug"]\ninstructions = "Pick the topic."\n'
    )
    assert unhandled_tasks(load_settings(mixed)) == ["topic"]
    mixed.write_text(mixed.read_text().replace("lexicon-judge", "simulated"))
    assert unhandled_tasks(load_settings(mixed)) == []
