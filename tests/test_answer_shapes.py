"""What real models and servers answer (issue 14), served over real HTTP by the test server.

Each row is a chat completion in a shape taken from public bug reports against vLLM,
SGLang and llama.cpp-style servers; it goes through the ``openai`` backend with all
defaults, and then through the paper fleet (test_llm_pipeline's servers and in-process
fleet) with ``confidence_threshold = 0.8``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import test_llm_pipeline
import test_openai_backend
from llm_server import JUNK_P, LLMServer, Reply
from test_consumers import Fleet, drain

from common.schemas import Item
from common.tasks import BUILTIN_TASKS
from producers.api import Producer

# The fixtures those modules already build: one test server, or one per model of the fleet.
server = test_openai_backend.server
make_backend = test_openai_backend.make_backend
servers = test_llm_pipeline.servers
fleet = test_llm_pipeline.fleet

LABELS = BUILTIN_TASKS["sentiment"].labels
TICKET = "Not bad, the agent fixed it fast"
SARCASM = "I am so happy to wait three weeks for a refund"
P = 0.9  # the test server's probability for the answer's label token
SHARE = (1 - P - JUNK_P) / 2  # each other label's token
# Where the server cannot find a label verbatim ("Negative.", fullwidth), it lists every
# label's token as an alternative, lowercase "negative" among them.
UNFOUND = (P + (1 - P - JUNK_P) / 3) / (P + (1 - P - JUNK_P))
LLAMA_CPP_LOWEST = -3.4028234663852886e38  # llama.cpp's stand-in for -inf


def other_label_logprob(value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the "positive" alternative's logprob, as servers write a masked token's -inf."""

    def patch(body: dict[str, Any]) -> None:
        for entry in body["choices"][0]["logprobs"]["content"]:
            for alternative in entry["top_logprobs"]:
                if alternative["token"] == "positive":
                    alternative["logprob"] = value

    return patch


def no_choices(body: dict[str, Any]) -> None:
    body["choices"] = []


@dataclass(frozen=True)
class Row:
    reply: Reply
    label: str | None
    confidence: float | None = None
    error: str = ""  # part of the abstention's reason
    ticket: str = TICKET


ROWS = {
    # The rows.
    "cut_off_reasoning": Row(
        Reply("<think>\nThe customer writes thanks, a positive word, but", finish_reason="length"),
        None,
        error="cut off by the token limit (finish_reason 'length') while reasoning",
    ),
    "reasoning_block": Row(
        Reply("<think>the agent fixed nothing</think>\n\nnegative"), "negative", P / (1 - JUNK_P)
    ),
    "reasoning_without_opening_tag": Row(
        Reply("the agent fixed nothing</think>\n\nnegative"), "negative", P / (1 - JUNK_P)
    ),
    "null_logprob": Row(
        Reply("negative", patch=other_label_logprob(None)), "negative", P / (P + SHARE)
    ),
    "infinity_literal_logprob": Row(
        Reply("negative", patch=other_label_logprob(-math.inf)), "negative", P / (P + SHARE)
    ),
    "lowest_float_logprob": Row(
        Reply("negative", patch=other_label_logprob(LLAMA_CPP_LOWEST)), "negative", P / (P + SHARE)
    ),
    "label_then_sentence": Row(
        Reply("Negative. The customer is clearly not satisfied."), "negative", UNFOUND
    ),
    "label_then_explanation": Row(
        Reply("negative\n\nExplanation: the customer is not happy"), "negative", P / (1 - JUNK_P)
    ),
    # Issue 28: a stated label line wins over the words of its reason; two disagree: abstain.
    "label_line_then_reason": Row(
        # the test server spreads its alternatives over "positive", the reason's word: at
        # "negative" it lists none: renormalised over the labels considered, that is 1
        Reply("Label: negative\nReason: nothing positive is said."),
        "negative",
        1.0,
    ),
    "reason_then_final_answer": Row(
        Reply("Reason: the customer is happy, nothing negative.\n**Final answer:** positive"),
        "positive",
        P / (1 - JUNK_P),
    ),
    "two_label_lines": Row(
        Reply("Label: positive\nAnswer: negative"), None, error="ambiguous answer: stated"
    ),
    "quotes_the_ticket": Row(
        Reply(f'The sentiment of the statement "{TICKET}" is positive.'),
        "positive",
        P / (1 - JUNK_P),
    ),
    "quotes_a_sarcastic_ticket": Row(  # the quotation holds another label's synonym
        Reply(f'The customer says "{SARCASM}", which is sarcasm: negative.'),
        "negative",
        P / (1 - JUNK_P),
        ticket=f"Great. {SARCASM}!",
    ),
    "label_score_map": Row(
        Reply('{"positive": 0.05, "negative": 0.9, "neutral": 0.05}'), "negative", None
    ),
    "fullwidth": Row(
        Reply("\uff2e\uff45\uff47\uff41\uff54\uff49\uff56\uff45"), "negative", UNFOUND
    ),
    "no_choices": Row(
        Reply("negative", patch=no_choices), None, error="the server returned no choices"
    ),
    # The reasoning_content field of servers that split reasoning off.
    "reasoning_field": Row(
        Reply("negative", reasoning="Thanks is positive, but nothing was fixed."),
        "negative",
        P / (1 - JUNK_P),
    ),
    "reasoning_field_cut_off": Row(
        Reply(None, reasoning="The customer writes thanks, a positive", finish_reason="length"),
        None,
        error="while reasoning: no answer was given",
    ),
    "answer_filed_as_reasoning": Row(Reply(None, reasoning="negative"), "negative", None),
}


def answer(row: Row) -> Callable[[dict[str, Any], int], Reply]:
    return lambda body, attempt: replace(row.reply, labels=LABELS)


@pytest.mark.parametrize("shape", ROWS)
def test_each_shape_gives_its_label_or_abstains_with_the_reason(
    make_backend: Any, server: LLMServer, shape: str
) -> None:
    row = ROWS[shape]
    server.respond = answer(row)
    [p] = make_backend().classify([Item(id="x", task="sentiment", text=row.ticket)])
    assert p.label == row.label, p
    if row.label is None:
        assert row.error in (p.error or "") and p.confidence is None
    elif row.confidence is None:
        assert p.confidence is None
    else:
        assert p.confidence == pytest.approx(row.confidence, abs=1e-3)


def test_a_fleet_fed_these_shapes_labels_every_item_once_without_dead_letters(
    fleet: Fleet, servers: dict[str, LLMServer]
) -> None:
    """Every worker answers an item in its row's shape; the judge answers plainly. Votes
    without a confidence do not count under the threshold, so those items go to the judge
    too; the cut-off answer, once read as "positive" at 0.96, never settles an item."""
    fleet.aggregator_handler.rule = replace(fleet.aggregator_handler.rule, threshold=0.8)

    def by_shape(body: dict[str, Any], attempt: int) -> Reply:
        shape = re.search(r"shape=(\w+)", body["messages"][-1]["content"])
        assert shape is not None
        return answer(ROWS[shape.group(1)])(body, attempt)

    for tag in ("w1", "w2", "w3"):
        servers[tag].respond = by_shape
    truth = {shape: row.label or "negative" for shape, row in ROWS.items()}
    records = [
        {"id": s, "task": "sentiment", "text": f"{row.ticket} shape={s} judge={truth[s]}"}
        for s, row in ROWS.items()
    ]
    assert Producer(fleet.rt.redis, fleet.rt.settings).send(records).produced == len(records)
    fleet.step()
    drain(fleet.aggregator)
    decisions = fleet.outputs()
    assert sorted(d["id"] for d in decisions) == sorted(ROWS)
    assert fleet.final(fleet.rt.keys.dead) == [] and fleet.final(fleet.rt.keys.rejects) == []
    counted = {s for s, row in ROWS.items() if row.label and (row.confidence or 0) >= 0.8}
    assert {d["id"]: (d["label"], d["source"]) for d in decisions} == {
        shape: (label, "workers" if shape in counted else "judge") for shape, label in truth.items()
    }
