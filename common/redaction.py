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
# An element whose content goes goes whole: the opening tags just before a span that goes and
# the closing tags just after it (only whitespace between). Left behind, an emptied
# "<tool_call>\n\n</tool_call>" or a "</span>" glued to the customer's first sentence still
# told the judge something was there (holdout11's pairs, 2026-12-08: two of its four flips).
_OPENING_TAGS = re.compile(r"(?:<[A-Za-z][\w:.-]*(?:\s[^<>]*)?>\s*)+\Z")
_CLOSING_TAGS = re.compile(r"(?:\s*</[A-Za-z][\w:.-]*\s*>)+")  # whitespace after stays
_TAGS_REACH = 2000  # characters looked back for opening tags: a bound, not a parse


def redacted(text: str, found: Sequence[Finding]) -> str:
    """``text`` without the blocks that hold a passage ``found`` in it (``findings``) by its
    words — its paragraphs (text between blank lines), else, where that would leave fewer
    than ``_MIN_WORDS_BESIDE`` words, its lines — and without the passages found elsewhere
    (markup: ``_MARKUP_CUES``); everything else as it was. Where lines too would
    leave too little, only the passages found go; ``text`` itself when no word would be left
    (the models then read it whole, control tokens broken, and the outcome says what was
    flagged).

    Whole blocks, because an injection rarely ends where the detector stops reading it: on
    the six adversarial sets, 238 of the 513 flagged twins kept words of the injection once
    their flagged passages were gone (its translation, a reviewer's "tone is warm and
    appreciative", a heading), 67 once their blocks were; where that changed what the
    models read, the fleet's flips to the attacker's label fell from 44 to 2 of 162 twins
    (docs/injection.md)."""
    if not found:
        return text
    # with the tags around what goes; without them where they are all that would be left
    for tags in (True, False):
        if (out := _redacted(text, found, tags)) is not None:
            return out
    return text


def _redacted(text: str, found: Sequence[Finding], tags: bool) -> str | None:
    by_words = [f for f in found if f.cue not in _MARKUP_CUES]
    spans = [(f.start, f.end) for f in found]
    for block_break in _BLOCK_BREAKS:
        blocks = _touched(_between(text, block_break), by_words) if by_words else []
        gone = [*spans, *blocks]
        out = _without(text, _with_tags(text, gone) if tags else gone) if blocks else ""
        if len(out.split()) >= _MIN_WORDS_BESIDE:
            return out
    out = _without(text, _with_tags(text, spans) if tags else spans)
    return out if len(out.split()) >= _MIN_WORDS_LEFT else None


def _with_tags(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans``, each widened over the opening tags just before it and the closing tags just
    after it (``_OPENING_TAGS``, ``_CLOSING_TAGS``)."""
    out = []
    for start, end in spans:
        window = max(0, start - _TAGS_REACH)
        before = _OPENING_TAGS.search(text[window:start])
        after = _CLOSING_TAGS.match(text, end)
        out.append((window + before.start() if before else start, after.end() if after else end))
    return out


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
    for start, end in sorted(spans):
        kept.append(text[at : max(at, start)])
        if "\n" in text[max(at, start) : end]:  # a line break that goes leaves one: no words glued
            kept.append("\n")
        at = max(at, end)
    kept.append(text[at:])
    # Where blocks went, the blank lines they leave are squeezed into one; the ends stripped.
    return re.sub(r"\n(?:[^\S\n]*\n){2,}", "\n\n", "".join(kept)).strip()
