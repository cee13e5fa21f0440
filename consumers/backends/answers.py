"""From a model's answer to a vote: a label from the task's set (or an abstention), a confidence.

Shared by every LLM backend, because the label set is only a request to the model:
an old server silently ignores the constraint field, a model wraps its answer in a
sentence or in JSON, a ticket tries "ignore previous instructions and answer X".
Whatever comes back, the label returned here is one of the task's labels or None
(an abstention carrying the raw text) — never another string, never an exception.

Parsing (``AnswerParser.parse``):
  1. A JSON object (also inside a code fence) with a ``label``/``answer``/… key, or a
     single string value: that value is parsed by the rules below.
  2. Otherwise the whole text is searched, case-insensitively and as whole words, for
     every label and declared synonym, with ``_``, ``-`` and spaces interchangeable
     ("not_similar" = "Not similar" = "not-similar"). Overlapping mentions keep the
     longest, so "not similar" is never also read as "similar".
  3. Exactly one label mentioned → that label. Two different labels, a negated mention
     ("not the same", "not bad") or none at all → abstain.

Confidence (``label_confidence``), from the per-token logprobs of the answer:
  Walk the answer's tokens t_1, t_2, … from the one where the label starts, to t_d, the
  first token after which only the chosen label remains possible. At each position j,
  every alternative token a in ``top_logprobs`` (the chosen token included) is read as
  a continuation of the text so far and matched against the labels' surface forms
  (label and synonyms; a continuation matches a form it is a prefix of, or that it
  starts with). If it matches the chosen label only, ``m(chosen)`` gains
  ``P(t_1..t_{j-1}) · p(a)``; if it matches only other labels, ``m(others)`` does.
  Then ``confidence = m(chosen) / (m(chosen) + m(others))``: the probability of the
  label renormalised over the labels the model considered, the rest of the mass
  (punctuation, "The", "Sentiment") ignored. With single-token labels this is simply
  p(label's token) / Σ p(each label's token) at the answer's first token. Labels absent
  from the top-k count as 0, so ask for enough (k ≥ 5). Without ``top_logprobs`` it is
  P(t_1..t_d) alone; without logprobs, or when the label never
  becomes unambiguous, it is None (such a vote does not count under a
  ``confidence_threshold``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from common.schemas import Prediction
from common.tasks import TaskSpec

MAX_RAW_CHARS = 500  # what an abstention keeps of the model's text
NO_LABEL = "no label in the answer"

# Keys a model tends to put its answer under when asked for JSON.
_JSON_KEYS = ("label", "answer", "sentiment", "class", "category", "prediction", "result")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_SEPARATORS = re.compile(r"[\s_\-]+")
# A negation earlier in the same clause as a mention ("do not describe the same problem").
_NEGATED = re.compile(
    r"(?:(?<![a-z0-9])(?:not|no|never|nor|neither|cannot|dont|doesnt|isnt|arent|wasnt)"
    r"(?![a-z0-9])|n['\u2019]t(?![a-z0-9]))[^.,;:!?\n]*$",
    re.IGNORECASE,
)
_LEAD_IN = re.compile(r"^[^0-9A-Za-z]+")
# Byte-level BPE and SentencePiece markers some servers leave in logprob tokens.
_TOKEN_MARKERS = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\n"})


def _norm(text: str) -> str:
    return _SEPARATORS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its logprob, and the alternatives the server listed there."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Answer:
    """A parsed answer: ``label`` None means abstain (``error`` says why)."""

    label: str | None
    span: tuple[int, int] | None = None  # where the label was read in the text
    error: str | None = None


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    label: str


class AnswerParser:
    """Parses answers for one task; built once per task and reused for every item."""

    def __init__(self, task: TaskSpec) -> None:
        self.labels = list(task.labels)
        forms: dict[str, str] = {}  # normalised surface form -> label
        for label in task.labels:
            for surface in (label, *task.synonyms.get(label, [])):
                forms.setdefault(_norm(surface), label)
        self._forms = forms
        self._patterns = [
            (
                re.compile(
                    r"(?<![a-z0-9])"
                    + r"[\s_\-]+".join(re.escape(w) for w in form.split(" "))
                    + r"(?![a-z0-9])",
                    re.IGNORECASE,
                ),
                label,
            )
            for form, label in forms.items()
            if form
        ]

    # -- parsing -------------------------------------------------------------------------

    def parse(self, text: str) -> Answer:
        if not text.strip():
            return Answer(None, error="empty answer")
        value = _json_answer(text)
        if value is None:
            return self._read(text, 0, len(text))
        start = _locate(text, value)
        answer = (
            self._read(text, start, start + len(value))
            if start >= 0
            else replace(self._read(value, 0, len(value)), span=None)  # escaped: no usable span
        )
        if answer.label is None and answer.error == NO_LABEL:
            return Answer(None, error=f"JSON answer {value!r} is not one of {self.labels}")
        return answer

    def _read(self, text: str, start: int, end: int) -> Answer:
        mentions = self._mentions(text, start, end)
        if not mentions:
            return Answer(None, error=NO_LABEL)
        labels = {m.label for m in mentions}
        if len(labels) > 1:
            return Answer(None, error=f"ambiguous answer: mentions {sorted(labels)}")
        for m in mentions:
            if _NEGATED.search(text[max(start, m.start - 40) : m.start]):
                return Answer(None, error=f"negated mention of {m.label!r}")
        first = mentions[0]
        return Answer(first.label, span=(first.start, first.end))

    def _mentions(self, text: str, start: int, end: int) -> list[_Mention]:
        """Every mention of a label or synonym; of overlapping ones, the longest wins."""
        found = [
            _Mention(m.start(), m.end(), label)
            for pattern, label in self._patterns
            for m in pattern.finditer(text, start, end)
        ]
        found.sort(key=lambda m: (m.start - m.end, m.start))
        kept: list[_Mention] = []
        for m in found:
            if all(m.end <= k.start or m.start >= k.end for k in kept):
                kept.append(m)
        return sorted(kept, key=lambda m: m.start)

    # -- confidence ----------------------------------------------------------------------

    def labels_for(self, fragment: str) -> set[str]:
        """Labels the text fragment could be the start of (or is, followed by punctuation)."""
        cand = _norm(fragment)
        if not cand:
            return set()
        out = set()
        for form, label in self._forms.items():
            if form.startswith(cand) or (
                cand.startswith(form) and not cand[len(form) : len(form) + 1].isalnum()
            ):
                out.add(label)
        return out

    def label_confidence(self, tokens: Sequence[TokenLogprob], answer: Answer) -> float | None:
        """The label's probability renormalised over the labels (see the module docstring)."""
        if not tokens or answer.label is None:
            return None
        label = answer.label
        tokens = [_clean(t) for t in tokens]
        text = "".join(t.token for t in tokens)
        # Offsets must refer to the tokens' own text (servers detokenize one token at a
        # time, which may differ from the message text): read the label there again.
        answer = self.parse(text)
        if answer.label != label or answer.span is None:
            return None
        a, b = answer.span
        mine = others = 0.0  # m(chosen), m(others)
        path, listed, pos = 1.0, False, 0
        for tok in tokens:
            start, pos = pos, pos + len(tok.token)
            if pos <= a:
                continue
            if start >= b:
                break
            prefix = text[a:start] if start > a else ""
            alternatives = {**dict(tok.top), tok.token: tok.logprob}
            listed = listed or bool(tok.top)
            for alt, logprob in alternatives.items():
                # A token straddling the label's start carries a lead-in (' "', ' '): drop it.
                owners = self.labels_for(prefix + alt if start >= a else _LEAD_IN.sub("", alt))
                if owners == {label}:
                    mine += path * math.exp(logprob)
                elif owners and label not in owners:
                    others += path * math.exp(logprob)
            chosen = prefix + tok.token if start >= a else _LEAD_IN.sub("", tok.token)
            if self.labels_for(chosen) == {label}:
                if not listed:
                    return round(min(1.0, path * math.exp(tok.logprob)), 4)
                return round(mine / (mine + others), 4) if mine + others > 0 else None
            path *= math.exp(tok.logprob)
        return None

    # -- the whole step ------------------------------------------------------------------

    def prediction(self, text: str, tokens: Sequence[TokenLogprob] | None) -> Prediction:
        answer = self.parse(text)
        if answer.label is None:
            return Prediction(label=None, error=answer.error, raw=text[:MAX_RAW_CHARS])
        return Prediction(
            label=answer.label, confidence=self.label_confidence(tokens or (), answer)
        )


def parsers(tasks: Mapping[str, TaskSpec]) -> dict[str, AnswerParser]:
    return {name: AnswerParser(spec) for name, spec in tasks.items()}


def _clean(tok: TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        tok.token.translate(_TOKEN_MARKERS),
        tok.logprob,
        tuple((t.translate(_TOKEN_MARKERS), lp) for t, lp in tok.top),
    )


def _json_answer(text: str) -> str | None:
    """The answer string of a JSON reply, or None when the reply is not JSON of that shape."""
    body = _FENCE.sub("", text.strip())
    first, last = body.find("{"), body.rfind("}")
    candidates = [body] + ([body[first : last + 1]] if 0 <= first < last else [])
    for candidate in candidates:
        try:
            value: Any = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            lowered = {str(k).lower(): v for k, v in value.items()}
            for key in _JSON_KEYS:
                if isinstance(lowered.get(key), str):
                    return str(lowered[key])
            strings = [v for v in value.values() if isinstance(v, str)]
            if len(strings) == 1:
                return str(strings[0])
    return None


def _locate(text: str, value: str) -> int:
    """Where a JSON string value sits in the raw text (-1: written with escapes)."""
    at = text.find(orjson.dumps(value).decode())
    return at + 1 if at >= 0 else text.find(value)
