"""`tribunal evaluate` and `tribunal calibrate` as a user runs them, on the bundled samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import cli  # noqa: F401  (the fixture)

from common.settings import load_settings
from consumers.decision import Rule

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "producers" / "samples"


def test_evaluate_offline_writes_summary_json_and_html(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "eval"
    result = cli("evaluate", str(SAMPLES / "tickets.jsonl"), "--offline", "--out", str(out))
    text = result.stdout.decode()
    assert result.returncode == 0, text + result.stderr.decode()
    for heading in ("models", "worker pairs", "agreement schemes side by side", "confusion"):
        assert heading in text
    assert "sentiment: 220 items, 220 gold" in text
    report = orjson.loads((out / "evaluation.json").read_bytes())
    section = report["tasks"]["sentiment"]
    assert report["mode"] == "offline" and len(report["observations"]) == 220
    assert {m for m in section["models"]} == {"vader", "textblob", "afinn", "judge"}
    assert [s["rule"] for s in section["schemes"]][:3] == [
        "majority 2/3",
        "weighted >= 1.5",
        "unanimous 3/3",
    ]
    assert all(o["judge"]["label"] for o in report["observations"])  # the judge saw every item
    html = (out / "evaluation.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "sentiment" in html


def test_pairs_get_the_similarity_fleet_and_calibrate_prints_lines_to_paste(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "eval"
    result = cli("evaluate", str(SAMPLES / "ticket_pairs.jsonl"), "--offline", "--out", str(out))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert "similar_offline.toml" in result.stderr.decode()
    report = orjson.loads((out / "evaluation.json").read_bytes())
    assert set(report["fleet"]["workers"]) == {"jaccard", "tfidf", "char-ngrams"}
    calibrated = cli("calibrate", str(out / "evaluation.json"), "--target", "0.65")
    text = calibrated.stdout.decode()
    assert calibrated.returncode == 0, text + calibrated.stderr.decode()
    assert "recommended:" in text and "trade-off" in text
    lines = text.split("before the first [table]):")[1].strip()
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(lines + '\n[judge]\nbackend = "similarity-judge"\n')
    assert load_settings(fleet).agreement in ("majority", "weighted", "unanimous")
    assert Rule.of(load_settings(fleet)).describe() in text


def test_calibrate_says_so_when_no_rule_meets_the_target(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "eval"
    assert (
        cli("evaluate", str(SAMPLES / "tickets.jsonl"), "--offline", "--out", str(out)).returncode
        == 0
    )
    result = cli("calibrate", str(out / "evaluation.json"), "--target", "0.99")
    assert result.returncode == 1
    assert "no rule meets the goal" in result.stdout.decode()


def test_evaluate_through_the_fleet_audits_every_settled_item(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    sample = tmp_path / "t30.jsonl"
    sample.write_bytes(b"".join((SAMPLES / "tickets.jsonl").read_bytes().splitlines(True)[:30]))
    out = tmp_path / "eval"
    result = cli("evaluate", str(sample), "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]
    report = orjson.loads((out / "evaluation.json").read_bytes())
    assert report["mode"] == "fleet"
    assert sorted(o["id"] for o in report["observations"]) == sorted(
        orjson.loads(line)["id"] for line in sample.read_bytes().splitlines()
    )
    assert all(o["judge"]["label"] for o in report["observations"])


def test_evaluate_reports_a_file_it_cannot_read(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    result = cli("evaluate", str(tmp_path / "missing.jsonl"), "--offline")
    assert result.returncode == 2
    assert "cannot read" in result.stdout.decode()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "sentiment", "text": ""}\nnot json\n')
    result = cli("evaluate", str(bad), "--offline")
    assert result.returncode == 2
    assert (
        "no usable record" in result.stdout.decode() and "text is empty" in result.stdout.decode()
    )


def test_evaluate_scores_injected_twins_in_the_terminal_json_and_html(
    cli: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The offline lexicon fleet on the dev set (bench/adversarial): the flip table, and a
    twin whose target is no label listed, not counted."""
    data = tmp_path / "twins.jsonl"
    lines = (ROOT / "bench/adversarial/dev.jsonl").read_text().splitlines()[:40]
    bad = {
        "id": "bad-x",
        "task": "sentiment",
        "text": "Late again.",
        "gold": "negative",
        "metadata": {"twin_of": "adv-001", "target": "angry"},
    }
    data.write_text("\n".join([*lines, orjson.dumps(bad).decode()]) + "\n")
    out = tmp_path / "eval"
    result = cli("evaluate", str(data), "--offline", "--out", str(out))
    text = result.stdout.decode()
    assert result.returncode == 0, text + result.stderr.decode()
    assert "prompt injection: 20 pairs" in text and "twin bad-x not scored" in text
    section = orjson.loads((out / "evaluation.json").read_bytes())["injection"]["sentiment"]
    assert section["pairs"] == 20 and section["flagged_injected"] == 1.0
    assert section["ignored"] == {
        "bad-x": "target 'angry' is not one of ['positive', 'negative', 'neutral']"
    }
    assert set(section["models"]) == {"vader", "textblob", "afinn", "judge", "fleet"}
    html = (out / "evaluation.html").read_text()
    assert "Prompt injection: sentiment, 20 pairs" in html
