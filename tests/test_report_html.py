"""The HTML report: every section, the plots, hand-checked numbers, escaped user text.

Built from a handful of hand-made observations through ``evaluate_task``, so the page is
tested on the numbers the real report carries, without Redis or model backends.
"""

from __future__ import annotations

import base64
import re

from common.schemas import Vote
from consumers.decision import Majority
from tribunal.quality.report_html import render_html
from tribunal.quality.scoring import (
    EvaluationReport,
    FleetReport,
    Observation,
    Skipped,
    evaluate_task,
)

HOSTILE = "<script>alert('x')</script>"
# id, gold, the votes of a, b, c (label, confidence; None abstains), the judge's label
Votes = list[tuple[str | None, float | None]]
ITEMS: list[tuple[str, str, Votes, str]] = [
    ("i1", "positive", [("positive", 0.9), ("positive", 0.9), ("positive", 0.6)], "positive"),
    ("i2", "negative", [("positive", 0.6), ("negative", 0.9), ("negative", 0.7)], "negative"),
    ("i3", "negative", [("positive", 0.9), ("positive", 0.55), ("negative", 0.9)], "negative"),
    ("i4", "positive", [("positive", 0.8), ("negative", 0.8), (None, None)], "positive"),
    ("i5", "negative", [("negative", 0.9), ("negative", 0.9), ("negative", 0.9)], "negative"),
]


def build(gold: bool, judge_ms: float, skipped: int = 1) -> EvaluationReport:
    """A report as ``evaluate.report()`` builds it, from the items above."""
    observations = [
        Observation(
            id=item_id,
            task="sentiment",
            gold=label if gold else None,
            votes=[
                Vote(worker=w, label=lb, confidence=c, latency_ms=1.0)
                for w, (lb, c) in zip("abc", votes, strict=True)
            ],
            judge=Vote(worker="judge", label=judge, confidence=0.9, latency_ms=judge_ms),
        )
        for item_id, label, votes, judge in ITEMS
    ]
    rule = Majority(n_workers=3, quorum=2)
    task = evaluate_task(observations, rule, ["positive", "negative"])
    return EvaluationReport(
        source=f"tickets{HOSTILE}.jsonl",
        mode="offline",
        seconds=0.5,
        fleet=FleetReport(
            workers={"a": "vader", "b": "textblob", "c": "afinn"},
            judge="lexicon-judge",
            rule="majority 2/3",
            rule_params=rule,
            policy="parallel",
        ),
        skipped=[Skipped(where=f"line {n}", reason=f"bad {HOSTILE}") for n in range(skipped)],
        tasks={"sentiment": task},
        observations=observations,
    )


def test_page_has_every_section_plots_and_hand_checked_numbers() -> None:
    page = render_html(build(gold=True, judge_ms=10.0))
    for title in ["Evaluation report", "Run", "Skipped items", "Task: sentiment", "Models"]:
        assert f">{title}<" in page
    for title in ["Worker agreement", "Agreement schemes", "Plots", "All candidate rules"]:
        assert f">{title}<" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert 'alt="Accuracy vs judge calls"' in page
    assert 'alt="Confusion matrix (gold vs final label)"' in page
    assert "http" not in page and "<script" not in page  # self-contained, no scripts
    # 4 of 5 settled (i4 is a 1-1 tie with one abstention), i3 settled wrongly: 4/5 right;
    # the judge is right on all 5.
    assert "the workers settle 80.0% of 5 items, 20.0% go to the judge" in page
    assert "Accuracy <b>80.0%</b> vs <b>100.0%</b> judge-only" in page
    # worker a says positive throughout: 3 of 5 right; c abstained once
    assert "<tr><td>a</td><td>vader</td><td>5</td><td>60.0%</td>" in page
    assert "<tr><td>c</td><td>afinn</td><td>5</td><td>80.0%</td><td>80.0%</td><td>1</td>" in page
    # a and c both labeled i1, i2, i3, i5 and agree on i1 and i5
    assert "<td>a / c</td><td>50.0%</td>" in page
    # model-seconds: judge-only 5 x 10 ms; cascade 5 x 3 x 1 ms + 1 judge call x 10 ms
    assert "Speedup 2.00\u00d7" in page and 'class="warn"' not in page
    assert "<tr class=mark><td>majority 2/3</td>" in page  # the configured rule stands out
    assert "\u2013" in page  # None (the judge's agreement with itself) prints as a dash


def test_text_from_user_files_is_escaped() -> None:
    page = render_html(build(gold=True, judge_ms=10.0, skipped=12))
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<td>bad &lt;script&gt;") == 10  # the first ten, then a count
    assert "and 2 more" in page


def test_report_without_gold_plots_agreement_with_the_judge() -> None:
    page = render_html(build(gold=False, judge_ms=1.0, skipped=0))
    assert "No gold labels" in page and "Skipped items" not in page
    assert 'alt="Agreement with judge vs judge calls"' in page
    assert 'alt="Confusion matrix (judge vs final label)"' in page
    assert page.count("data:image/png;base64,") == 3
    # a judge as fast as one worker: the cascade costs more, and the page says so
    assert 'class="warn">Speedup 0.31\u00d7' in page


def test_dollar_signs_in_user_text_are_drawn_not_parsed_as_tex() -> None:
    report = build(gold=True, judge_ms=10.0)
    task = report.tasks["sentiment"]
    task.confusion.labels[0] = "$\\frac{$"  # broken TeX: would fail to draw
    task.rule = "majority $2/3$"
    assert "majority $2/3$" in render_html(report)
