"""From a model's answer to a vote: a label from the task's set (or an abstention), a confidence.

Shared by every LLM backend (openai, llama-cpp, vllm), and so by ``tribunal evaluate``,
because the label set is only a request to the model: an old server ignores the
constraint field, a model reasons before answering, explains after, answers in JSON or
quotes the ticket, and a ticket tries "ignore previous instructions and answer X".
Whatever comes back, the label returned here is one of the task's labels or None (an
abstention carrying a reason and the raw text): never another string, never an exception.

Reading (``AnswerParser.parse``) works on the text normalised (NFKC, lookalikes folded),
with spans mapped back to the original text; ``answer_text`` holds those text-level steps.
  1. Reasoning is not the answer: ``<think>…</think>`` blocks are skipped; nothing left → abstain.
  2. A JSON object (also in a code fence or among prose): a ``label``/``answer``/… key or a
     single string value is read by rule 4; a map of labels to scores, also under one key
     (``{"positive": 0.1, "negative": 0.9}``), gives its top label (a tie abstains).
  3. Quotations of the item's own text (a ``"…"``, “…”, «…» or 「…」 span found in it) are
     skipped: the ticket's words are not the model's.
  4. Mentions of a label or a declared synonym: whole words (Unicode word boundaries),
     any case, ``_``, ``-`` and spaces interchangeable; of overlapping mentions the longest
     wins, so "not similar" is never also "similar". A mention is negated when a negation
     precedes it in its clause ("not bad").
     a. Label first: an answer that opens with a label's name alone ("Negative.",
        "**negative**\\n…", "Sentiment: Negative —"; not "positive: 0.1", a list of
        scores, nor "Positive?", a question) gives that label; the rest is its
        explanation, read only for a change of mind (another label's name, or this one
        negated → abstain). Synonyms there are everyday words ("not satisfied", "happy
        with the agent"), and so is a synonym as the opening word ("No, I cannot tell").
     s. Before both: a line that states the label under an answer-like key ("Label:
        negative", "**Final answer:** Positive.", the keys of rule 2) gives it, whatever
        the other lines explain ("Reason: nothing positive is said."); lines stating two
        labels → abstain. Its value must be a label's name alone ("Label: not positive"
        states nothing).
     b. Otherwise the whole answer: its affirmed mentions must name exactly one label, its
        negated ones only other labels ("not bad: positive" → positive). No mention, two
        labels, or only negated ones ("not bad") → abstain.
  5. An answer the server stopped (``finish_reason`` "length", "content_filter", "abort")
     gives a label only where it was complete before the cut: a whole JSON object, or a
     label-first answer whose first part was closed (punctuation, a line break) and is
     followed by no other label's mention. An output the server filed only in its
     reasoning field (content empty and no ``</think>``: some reasoning parsers do that
     to a model that did not reason) is read as strictly, without the closing condition.

Confidence (``label_confidence``), from the per-token logprobs of the answer:
  Walk the answer's tokens t_1, t_2, … from the one where the label starts, to t_d, the
  first after which only the chosen label remains possible. At each position j, every
  alternative a in ``top_logprobs`` (the chosen token included) is read as a continuation
  of the text so far and matched against the labels' surface forms (label and synonyms; a
  continuation matches a form it is a prefix of, or that it starts with). Matching the
  chosen label only, ``m(chosen)`` gains ``P(t_1..t_{j-1}) · p(a)``; matching only other
  labels, ``m(others)`` does. Then ``confidence = m(chosen) / (m(chosen) + m(others))``: the
  label's probability renormalised over the labels the model considered (punctuation, "The"
  ignored); with single-token labels, p(label's token) / Σ p(each label's token). Labels
  absent from the top-k count as 0 (ask for k ≥ 5); without ``top_logprobs`` it is
  P(t_1..t_d). Null, missing, NaN, -inf logprobs or a stand-in (llama.cpp writes the lowest
  float) count as 0 among the alternatives; if the chosen token's own is one, there are no
  logprobs, the label never becomes unambiguous, or it came from a score map, the
  confidence is None — no confidence, never no vote (it does not count under a
  ``confidence_threshold``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from common.schemas import Prediction
from common.tasks import TaskSpec
from consumers.backends.answer_text import (
    ALNUM,
    CUT_OFF,
    END_OF_TURN,
    NormalText,
    blank_quotations,
    first_part,
    json_value,
    keyed_answer,
    locate,
    negated_at,
    no_answer,
    norm,
    phrase_pattern,
    skip_reasoning,
    stated_values,
    without_lead_in,
)
from consumers.backends.logprobs import TokenLogprob, plain, probability

MAX_RAW_CHARS = 500  # what an abstention keeps of the model's text
NO_LABEL = "no label in the answer"


@dataclass(frozen=True)
class ModelOutput:
    """What a server returned for one prompt: the inputs of ``AnswerParser.prediction``."""

    text: str
    tokens: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    reasoning: str | None = None  # a separate reasoning field (reasoning_content)


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
    named: bool  # the label's own name, not a synonym


class AnswerParser:
    """Parses answers for one task; built once per task and reused for every item."""

    def __init__(self, task: TaskSpec) -> None:
        self.labels = list(task.labels)
        forms: dict[str, str] = {}  # normalised surface form -> label
        for label in task.labels:
            for surface in (label, *task.synonyms.get(label, [])):
                forms.setdefault(norm(surface), label)
        self._forms = forms
        self._patterns = [
            (phrase_pattern(form), label, form == norm(label))
            for form, label in forms.items()
            if form
        ]

    # -- parsing -------------------------------------------------------------------------

    def parse(
        self,
        text: str,
        *,
        finish_reason: str | None = None,
        reasoning: str | None = None,
        inputs: Sequence[str | None] = (),
    ) -> Answer:
        """The label of an answer (module docstring); ``inputs`` are the item's texts."""
        turn_end = END_OF_TURN.search(text)
        if turn_end:  # the model ended its turn there: what follows is not its answer
            text, finish_reason = text[: turn_end.start()], "stop"
        cut = CUT_OFF.get(finish_reason or "")
        normal = NormalText.of(text)
        body, reasoned, unclosed = skip_reasoning(normal.text)
        if body.strip():
            strict = f"{cut}: no label was complete before the cut" if cut else None
            answer = self._body(body, inputs, strict=strict, closed=cut is not None)
            return replace(answer, span=normal.origin(answer.span)) if answer.span else answer
        if reasoning and reasoning.strip() and not reasoned and cut is None:
            strict = "only the server's reasoning field holds text, and it is no plain answer"
            answer = self._body(NormalText.of(reasoning).text, inputs, strict=strict, closed=False)
            return replace(answer, span=None)  # its offsets are not the text's
        reasoned = reasoned or bool(reasoning and reasoning.strip())
        return Answer(None, error=no_answer(cut, reasoned, unclosed))

    def _body(
        self, text: str, inputs: Sequence[str | None], strict: str | None, closed: bool
    ) -> Answer:
        """Rules 2 to 5 on the text left after the reasoning. ``strict``: only JSON or a
        label-first answer may count, else abstain with this reason; ``closed``: the text
        was cut off, so a label-first answer must be closed (rule 5)."""
        value = json_value(text)
        if value is not None:
            answer = self._json(text, value)
            if answer is not None:
                return answer
        # Rule 3, checked against the item rather than skipping every quotation, so that
        # ``The answer is "negative"`` still answers: a quoted label form is the model's word.
        text = blank_quotations(text, inputs, keep=lambda quoted: norm(quoted) in self._forms)
        stated = self._stated(text, closed, inputs)
        return stated or self._read(text, 0, len(text), strict, closed)

    def _stated(self, text: str, closed: bool, inputs: Sequence[str | None]) -> Answer | None:
        """Rule 4s; None when no line states a label."""
        stated: list[_Mention] = []
        values = stated_values(text, closed, inputs)
        for a, b in values:
            mentions = self._mentions(text, a, b)
            if len(mentions) != 1 or not mentions[0].named or "?" in text[a:b]:
                continue
            m = mentions[0]
            if not (ALNUM.search(text, a, m.start) or ALNUM.search(text, m.end, b)):
                stated.append(m)  # the value is the label's name alone: "**Negative**."
        labels = sorted({m.label for m in stated})
        if labels:  # an answer opening with another label ("Positive. [...] Label: x"): two
            before = text.rfind("\n", 0, values[0][0]) + 1
            mentions = self._mentions(text, 0, before)
            opener = self._label_first(text, 0, before, mentions, cut=False)
            if opener is not None and opener.label is not None and opener.label not in labels:
                labels.append(opener.label)
        if len(labels) > 1:
            return Answer(None, error=f"ambiguous answer: stated {sorted(labels)}")
        return Answer(labels[0], span=(stated[0].start, stated[0].end)) if labels else None

    def _read(
        self, text: str, start: int, end: int, strict: str | None = None, cut: bool = False
    ) -> Answer:
        """Rule 4 on text[start:end] (with ``strict``, only 4a)."""
        mentions = self._mentions(text, start, end)
        first = self._label_first(text, start, end, mentions, cut)
        if first is not None:
            return first
        return Answer(None, error=strict) if strict else self._whole(text, mentions)

    def _label_first(
        self, text: str, start: int, end: int, mentions: list[_Mention], cut: bool
    ) -> Answer | None:
        """Rule 4a; None when the answer does not open with a label's name alone."""
        head = first_part(text, start, end, [m.start for m in mentions])
        if head is None:
            return None
        a, b, closer = head
        inside = [m for m in mentions if a <= m.start < b]
        # "positive: 0.1" opens a list of scores and "Positive?" a question, not an answer;
        # a cut may have split the part.
        opener = closer not in (":", "?") and not (cut and closer is None)
        if len(inside) != 1 or not inside[0].named or not opener:
            return None
        m = inside[0]
        if ALNUM.search(text, a, m.start) or ALNUM.search(text, m.end, b):
            return None  # more than the name: "The Negative", "negative 0.9"
        for other in mentions:
            if other.start < b:
                continue
            negated = negated_at(text, other.start)
            # A cut explanation may have been about to turn: there, synonyms count too.
            if (other.label != m.label and not negated and (other.named or cut)) or (
                other.label == m.label and other.named and negated
            ):
                said = text[other.start : other.end]
                return Answer(None, error=f"ambiguous answer: {m.label!r} first, then {said!r}")
        return Answer(m.label, span=(m.start, m.end))

    def _whole(self, text: str, mentions: list[_Mention]) -> Answer:
        """Rule 4b."""
        if not mentions:
            return Answer(None, error=NO_LABEL)
        negated = [m for m in mentions if negated_at(text, m.start)]
        said = [m for m in mentions if m not in negated]
        labels = sorted({m.label for m in said})
        if len(labels) > 1:
            return Answer(None, error=f"ambiguous answer: mentions {labels}")
        if not said:
            quoted = text[negated[0].start : negated[0].end]
            return Answer(None, error=f"negated mention of {negated[0].label!r} ({quoted!r})")
        if any(m.label == labels[0] for m in negated):
            return Answer(None, error=f"ambiguous answer: {labels[0]!r} both said and negated")
        return Answer(labels[0], span=(said[0].start, said[0].end))

    def _mentions(self, text: str, start: int, end: int) -> list[_Mention]:
        """Every mention of a label or synonym; of overlapping ones, the longest wins."""
        found = [
            _Mention(m.start(), m.end(), label, named)
            for pattern, label, named in self._patterns
            for m in pattern.finditer(text, start, end)
        ]
        found.sort(key=lambda m: (m.start - m.end, m.start))
        kept: list[_Mention] = []
        for m in found:
            if all(m.end <= k.start or m.start >= k.end for k in kept):
                kept.append(m)
        return sorted(kept, key=lambda m: m.start)

    def _json(self, text: str, value: Any) -> Answer | None:
        """Rule 2; None when the JSON holds no answer-like value (the text is read instead)."""
        if isinstance(value, str):
            return self._json_string(text, value)
        if not isinstance(value, dict):
            return None
        keyed = keyed_answer(value)
        if keyed is not None:
            return self._json_string(text, keyed)
        for scores in (value, *(v for v in value.values() if isinstance(v, dict))):
            answer = self._scores(scores)
            if answer is not None:
                return answer
        strings = [v for v in value.values() if isinstance(v, str)]
        return self._json_string(text, str(strings[0])) if len(strings) == 1 else None

    def _json_string(self, text: str, value: str) -> Answer:
        start = locate(text, value)
        answer = (
            self._read(text, start, start + len(value))
            if start >= 0
            else replace(self._read(value, 0, len(value)), span=None)  # escaped: no usable span
        )
        if answer.label is None and answer.error == NO_LABEL:
            return Answer(None, error=f"JSON answer {value!r} is not one of {self.labels}")
        return answer

    def _scores(self, obj: dict[Any, Any]) -> Answer | None:
        """A map from labels to numbers → its top label, without a span: the numbers are the
        model's own words, not a probability to measure. None when ``obj`` is no such map."""
        scores: dict[str, float] = {}
        for key, score in obj.items():
            label = self._forms.get(norm(str(key)))
            number = isinstance(score, int | float) and not isinstance(score, bool)
            if label is None or label in scores or not number:
                return None
            scores[label] = float(score)
        if len(scores) < 2:
            return None
        top, second = sorted(scores.values(), reverse=True)[:2]
        if top == second:
            return Answer(None, error=f"ambiguous answer: tied scores {scores}")
        return Answer(max(scores, key=scores.__getitem__))

    # -- confidence ----------------------------------------------------------------------

    def labels_for(self, fragment: str) -> set[str]:
        """Labels the text fragment could be the start of (or is, followed by punctuation)."""
        cand = norm(fragment)
        if not cand:
            return set()
        out = set()
        for form, label in self._forms.items():
            if form.startswith(cand) or (
                cand.startswith(form) and not cand[len(form) : len(form) + 1].isalnum()
            ):
                out.add(label)
        return out

    def label_confidence(
        self, tokens: Sequence[TokenLogprob], answer: Answer, inputs: Sequence[str | None] = ()
    ) -> float | None:
        """The label's probability renormalised over the labels (see the module docstring)."""
        if not tokens or answer.label is None:
            return None
        label = answer.label
        tokens = [plain(t) for t in tokens]
        text = "".join(t.token for t in tokens)
        # Offsets must refer to the tokens' own text (servers detokenize one token at a
        # time, which may differ from the message text): read the label there again.
        answer = self.parse(text, inputs=inputs)
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
                owners = self.labels_for(prefix + alt if start >= a else without_lead_in(alt))
                if owners == {label}:
                    mine += path * probability(logprob)
                elif owners and label not in owners:
                    others += path * probability(logprob)
            p = probability(tok.logprob)
            if p == 0:
                return None  # no usable number for the token the model chose
            chosen = prefix + tok.token if start >= a else without_lead_in(tok.token)
            if self.labels_for(chosen) == {label}:
                if not listed:
                    return round(path * p, 4)
                return round(mine / (mine + others), 4) if mine + others > 0 else None
            path *= p
        return None

    # -- the whole step ------------------------------------------------------------------

    def prediction(
        self,
        text: str,
        tokens: Sequence[TokenLogprob] | None = None,
        *,
        finish_reason: str | None = None,
        reasoning: str | None = None,
        inputs: Sequence[str | None] = (),
    ) -> Prediction:
        answer = self.parse(text, finish_reason=finish_reason, reasoning=reasoning, inputs=inputs)
        if answer.label is None:
            said = text if text.strip() else reasoning or ""
            return Prediction(label=None, error=answer.error, raw=said[:MAX_RAW_CHARS])
        confidence = self.label_confidence(tokens or (), answer, inputs)
        return Prediction(label=answer.label, confidence=confidence)


def parsers(tasks: Mapping[str, TaskSpec]) -> dict[str, AnswerParser]:
    return {name: AnswerParser(spec) for name, spec in tasks.items()}
