"""The answer reader on real model answers (issue 14): a regression corpus, read by hand.

``data/real_answers.jsonl`` holds 210 unconstrained answers (constraint "none", so the
models write freely, ``max_tokens`` 48, temperature 0) of the four packaged local models,
served by tribunal's own llama-server, to the first 25 bundled sentiment tickets and 10
ticket pairs (5 similar, 5 not_similar): the chat endpoint for every model, the few-shot
completion prompt for gemma-3-270m and SmolLM2 as well. Its ``read`` is the label a
careful person reads in each answer (null where the answer gives no single label), decided
by hand, never by the parser.

Goal: no wrong label ever, and at least 99% of the readable answers read. Every answer is
read today. The 35 gemma-3-270m chat answers were the hard ones: that base model has no
chat template, so llama-server falls back to ChatML, whose end-of-turn ``<|im_end|>`` is no
special token in Gemma's vocabulary; the model writes its label, then ``<|im_end|>`` as
plain text, then invents the next user turn (an echo of the prompt, label list included)
until the token limit: ``positive<|im_end|>\n<|im_start|>user\n…``, finish_reason
"length". The reader ends the answer at a leaked end-of-turn marker (answer_text.END_OF_TURN).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from common.tasks import BUILTIN_TASKS
from consumers.backends.answers import AnswerParser

CORPUS = Path(__file__).parent / "data" / "real_answers.jsonl"
FIELDS = {"model", "style", "task", "item_id", "text", "text_b", "answer", "finish_reason", "read"}
GOAL = 0.99  # issue 14: the share of readable answers the parser must read
FLOOR = GOAL

ROWS: list[dict[str, Any]] = [
    orjson.loads(line) for line in CORPUS.read_bytes().splitlines() if line.strip()
]
PARSERS = {name: AnswerParser(task) for name, task in BUILTIN_TASKS.items()}


def _parsed(row: dict[str, Any]) -> str | None:
    answer = PARSERS[row["task"]].parse(
        row["answer"], finish_reason=row["finish_reason"], inputs=(row["text"], row["text_b"])
    )
    return answer.label


def _show(row: dict[str, Any], label: str | None) -> str:
    return (
        f"{row['model']}/{row['style']} {row['item_id']}: read {row['read']!r}, "
        f"parsed {label!r}, finish {row['finish_reason']!r}, answer {row['answer'][:80]!r}"
    )


def test_corpus_is_well_formed() -> None:
    assert len(ROWS) == 210
    for row in ROWS:
        assert set(row) == FIELDS, row
        labels = BUILTIN_TASKS[row["task"]].labels
        assert row["read"] is None or row["read"] in labels, row
        assert (row["text_b"] is not None) == BUILTIN_TASKS[row["task"]].pair, row
    per_style = Counter((row["model"], row["style"]) for row in ROWS)
    assert per_style == {
        (model, style): 35
        for model, style in [
            ("smollm2", "chat"),
            ("smollm2", "completion"),
            ("gemma", "chat"),
            ("gemma", "completion"),
            ("qwen05", "chat"),
            ("qwen15", "chat"),
        ]
    }


def test_real_answers_are_read_right(record_property: Callable[[str, object], None]) -> None:
    wrong: list[str] = []
    unread: list[str] = []
    per_style: Counter[str] = Counter()
    for row in ROWS:
        label = _parsed(row)
        if label is not None and label != row["read"]:
            wrong.append(_show(row, label))
        elif row["read"] is not None and label is None:
            unread.append(_show(row, label))
            per_style[f"{row['model']}/{row['style']}"] += 1
    readable = sum(row["read"] is not None for row in ROWS)
    rate = (readable - len(unread)) / readable
    record_property("answers", len(ROWS))
    record_property("readable_answers", readable)
    record_property("readable_rate", round(rate, 4))
    record_property("wrong_labels", len(wrong))
    record_property("unread_per_style", dict(per_style))
    summary = (
        f"read {readable - len(unread)} of {readable} readable answers ({rate:.1%}); goal "
        f"{GOAL:.0%}, floor {FLOOR:.1%} (gap to goal {max(0.0, GOAL - rate):.1%}); "
        f"{len(wrong)} wrong labels; unread per model/style: {dict(per_style)}"
    )
    assert not wrong, summary + "\nwrong:\n" + "\n".join(wrong)
    assert rate >= FLOOR, summary + "\nunread:\n" + "\n".join(unread)
