"""Redaction: an item's text without the blocks that hold what the injection detector found.

``common.injection.findings`` says which passages of a text speak to the model; ``redacted``
says what the models read instead (``TaskSpec.view`` under ``injection = "redact"`` or
``"review"``). How much goes was measured on the adversarial sets: docs/injection.md.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence

from common.injection import Finding
from common.injection_model import LINE_BREAK

# What is left of a redacted text must still hold a word: else the models read it whole.
_MIN_WORDS_LEFT = 1
# The blocks a finding takes whole: its paragraph, else its line (``redacted``); a block goes
# only where the rest holds a few words.
# (A blank line may hold any whitespace, "\r" of Windows line ends included; U+2029 and
# U+2028 are Unicode's paragraph and line separators.)
_BLOCK_BREAKS = (re.compile(r"\n[^\S\n]*\n|\u2029"), LINE_BREAK)
_MIN_WORDS_BESIDE = 3
# Findings that markup makes: a control token, hidden text, a word a fake turn's markers
# enclose (the role name in "<|start_header_id|>assistant<|end_header_id|>"). Glued to the
# customer's paragraph ("...investigated.<|eot_id|>") they take only themselves, never the
# customer's sentences around them.
_MARKUP_CUES = frozenset({"control token", "inside a fake turn", "hidden text"})
# An element whose content goes goes whole: an opening tag just before what goes and its
# closing tag just after it (only whitespace between, at most one line break), or either one
# whose partner went with the content. Left behind, an emptied "<tool_call>\n\n</tool_call>"
# or a "</span>" glued to the customer's first sentence still told the judge something was
# there (holdout11's pairs, 2026-12-08: two of its four flips). Only tags that pair up go:
# a customer's "List<String>" or "<Enter>" beside an injection stays.
_TAG = re.compile(r"<(/?)([A-Za-z][\w:.-]{0,40})(?:[ \t][^<>\n]{0,200})?/?>")
_TAG_LONGEST = 250  # characters: no tag _TAG reads is longer
_SPACE = " \t\r"


def redacted(text: str, found: Sequence[Finding]) -> str:
    """``text`` without the blocks that hold a passage ``found`` in it (``findings``) by its
    words — its paragraphs (text between blank lines), else, where that would leave fewer
    than ``_MIN_WORDS_BESIDE`` words, its lines — and without the passages found elsewhere
    (markup: ``_MARKUP_CUES``); everything else as it was. What goes takes the elements
    whose content it was (``_elements``: the tags around it that pair up), except where
    they are all that would be left. Where lines too would leave too little, only the
    passages found go; ``text`` itself when nothing would be left (the models then read it
    whole, control tokens broken, and the outcome says what was flagged). "Words" here are
    what whitespace separates, a tag among them.

    Whole blocks, because an injection rarely ends where the detector stops reading it: on
    the six adversarial sets, 238 of the 513 flagged twins kept words of the injection once
    their flagged passages were gone (its translation, a reviewer's "tone is warm and
    appreciative", a heading), 67 once their blocks were; where that changed what the
    models read, the fleet's flips to the attacker's label fell from 44 to 2 of 162 twins
    (docs/injection.md)."""
    if not found:
        return text
    by_words = [f for f in found if f.cue not in _MARKUP_CUES]
    spans = [(f.start, f.end) for f in found]
    for block_break in _BLOCK_BREAKS:
        blocks = _touched(_between(text, block_break), by_words) if by_words else []
        # with the elements around what goes; without, where their tags are all that is left
        for gone in (_elements(text, [*spans, *blocks]), [*spans, *blocks]) if blocks else ():
            if len((out := _without(text, gone)).split()) >= _MIN_WORDS_BESIDE:
                return out
    for gone in (_elements(text, spans), spans):
        if len((out := _without(text, gone)).split()) >= _MIN_WORDS_LEFT:
            return out
    return text


def _elements(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` and the tags around them that pair up: an opening tag just before with the
    closing tag just after (innermost first), or with the closing tag inside the span; a
    closing tag just after with the opening tag inside the span. Spans only whitespace apart
    are read as one (a flagged "<span ...>" and the sentences after it)."""
    out = list(spans)
    for start, end in _joined(spans, text):
        open_inside, closed_inside = [], []  # names, unmatched within the span
        for m in _TAG.finditer(text, start, end):
            name = m.group(2).lower()
            if not m.group(1):
                open_inside.append(name)
            elif open_inside and open_inside[-1] == name:
                open_inside.pop()
            else:
                closed_inside.append(name)
        before, after = _tags_before(text, start), _tags_after(text, end)
        wider, further = start, end
        while before and closed_inside and before[0][1] == closed_inside[0]:
            wider = before.pop(0)[0]  # its content went: the element ends inside the span
            closed_inside.pop(0)
        while after and open_inside and after[0][1] == open_inside[-1]:
            further = after.pop(0)[0]  # its content went: the element began inside the span
            open_inside.pop()
        while before and after and before[0][1] == after[0][1]:  # an element now empty
            wider, further = before.pop(0)[0], after.pop(0)[0]
        out += [(wider, start)] if wider < start else []
        out += [(end, further)] if further > end else []
    return out


def _tags_before(text: str, at: int) -> list[tuple[int, str]]:
    """The opening tags just before ``at``, nearest first: (where each starts, its name)."""
    out = []
    while (k := _skip_space(text, at, -1)) > 0 and text[k - 1] == ">":
        lt = text.rfind("<", max(0, k - _TAG_LONGEST), k)
        m = _TAG.fullmatch(text, lt, k) if lt >= 0 else None
        if m is None or m.group(1):
            break
        out.append((lt, m.group(2).lower()))
        at = lt
    return out


def _tags_after(text: str, at: int) -> list[tuple[int, str]]:
    """The closing tags just after ``at``, nearest first: (where each ends, its name)."""
    out = []
    while (m := _TAG.match(text, _skip_space(text, at, 1))) is not None and m.group(1):
        out.append((m.end(), m.group(2).lower()))
        at = m.end()
    return out


def _skip_space(text: str, at: int, step: int) -> int:
    """``at`` moved over spaces and at most one line break, backwards (``step`` -1: the
    index just after the first character not skipped) or forwards (1)."""
    breaks = 0
    while at > 0 if step < 0 else at < len(text):
        c = text[at - 1] if step < 0 else text[at]
        if breaks == 0 and LINE_BREAK.match(c):
            breaks = 1
        elif c not in _SPACE:
            break
        at += step
    return at


def _between(text: str, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    """The spans of ``text`` between matches of ``separator``."""
    breaks = list(separator.finditer(text))
    starts = [0, *(m.end() for m in breaks)]
    ends = [*(m.start() for m in breaks), len(text)]
    return list(zip(starts, ends, strict=True))


def _touched(spans: list[tuple[int, int]], found: Sequence[Finding]) -> list[tuple[int, int]]:
    """The ``spans`` that a finding overlaps: a bisection each over the findings' starts, so a
    ticket of many blocks and findings costs (blocks + findings) x log(findings)."""
    ordered = sorted(found, key=lambda f: f.start)
    starts = [f.start for f in ordered]
    reach = list(itertools.accumulate((f.end for f in ordered), max))  # furthest end so far
    touched = []
    for start, end in spans:
        before = bisect.bisect_left(starts, end)  # the findings that start before the span ends
        if before and reach[before - 1] > start:
            touched.append((start, end))
    return touched


def _without(text: str, spans: Sequence[tuple[int, int]]) -> str:
    kept, at = [], 0
    for start, end in _joined(list(spans)):
        kept.append(text[at:start])
        if LINE_BREAK.search(text, start, end):  # one goes: one stays, no words glued
            kept.append("\n\n" if _BLOCK_BREAKS[0].search(text, start, end) else "\n")
        at = end
    kept.append(text[at:])
    # Where blocks went, the blank lines they leave are squeezed into one; the ends stripped.
    return re.sub(r"\n(?:[^\S\n]*\n){2,}", "\n\n", "".join(kept)).strip()


def _joined(spans: list[tuple[int, int]], text: str | None = None) -> list[tuple[int, int]]:
    """``spans`` in order, those that overlap or touch joined (one stretch that goes); given
    ``text``, those only whitespace apart in it too."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and (start <= out[-1][1] or (text and text[out[-1][1] : start].isspace())):
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
