"""The text-level half of reading a model's answer: the steps that know no task's labels.

``answers.AnswerParser`` holds the rules (its module docstring) and reads labels; this
module holds what it does to the text, kept apart so that the same steps serve every task:
  - Normalisation (``NormalText``): NFKC, so fullwidth and styled letters are plain;
    invisible format characters (category Cf) dropped; Cyrillic and Greek lookalikes
    folded inside Latin words. Each normalised character keeps the span of the raw text
    it came from, so that a label read here is located in what the model wrote.
  - Reasoning (``skip_reasoning``, rule 1): ``<think>…</think>`` blocks (also
    ``thinking``, ``thought``, ``reasoning``) are blanked out; a closing tag without an
    opening one (chat templates put ``<think>`` in the prompt) blanks everything before
    it; an unclosed block, everything after it. Blanked, not cut, so offsets still hold.
  - JSON (``json_value``, ``keyed_answer``, ``locate``: rule 2), quotations
    (``blank_quotations``: rule 3), words and negations (``phrase_pattern``,
    ``negated_at``, ``first_part``: rule 4), and logprob tokens as text (``plain_token``,
    ``without_lead_in``: confidence).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_WORD_CHAR = r"[^\W_]"  # a letter or digit of any script: what a word boundary is made of
ALNUM = re.compile(_WORD_CHAR)
_SEPARATORS = re.compile(r"[\s_\-]+")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_THINK_TAG = re.compile(r"<\s*(/?)\s*(?:think|thinking|thought|reasoning)\s*>", re.IGNORECASE)
# Where an answer's first part ends: "Negative. …", "negative\n…", "Negative — …".
_PART_END = re.compile(r"[.!?;:,()\[\]\n\u2013\u2014]|\s-\s")
# Cyrillic a e o p c y x i j s d h q w, A B E K M H O P C T X I J S and Greek a o i v,
# A B E Z H I K M N O P T Y X, drawn like Latin letters (a "negative" spelt with a
# Cyrillic "ie"). Folded only inside words that also hold Latin letters, so a Cyrillic or
# Greek word (Russian "no" in Cyrillic means "but") is never read as a Latin one.
_LOOKALIKES = str.maketrans(
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u0501\u04bb\u051b\u051d"
    "\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0425\u0406\u0408\u0405"
    "\u03b1\u03bf\u03b9\u03bd"
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7",
    "aeopcyxijsdhqwABEKMHOPCTXIJSaoivABEZHIKMNOPTYX",
)
_LETTERS = re.compile(r"[^\W\d_]+")
# Keys a model tends to put its answer under when asked for JSON.
_JSON_KEYS = ("label", "answer", "sentiment", "class", "category", "prediction", "result")
# A line stating the answer under an answer-like key: "Label: negative", "**Final answer:**
# Negative." Its value is read before the rest, so an explanation's words do not drown it.
# Not a quotation ("> Label: x") nor a code block: those are the ticket's words, echoed.
# Each run of blanks is matched once (no two adjacent runs): linear on a line of spaces.
_STATED = re.compile(
    r"^[ \t]*(?:[*_#-]+[ \t]*)?(?:final[ \t]+)?(?:"
    + "|".join((*_JSON_KEYS, "classification", "verdict"))
    + r")[ \t]*(?:[*_]+[ \t]*)?[:=][*_]*(?P<value>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_FENCED = re.compile(r"^[ \t]*```.*?(?:^[ \t]*```|\Z)", re.MULTILINE | re.DOTALL)
# A negation earlier in the same clause as a mention ("do not describe the same problem").
_NEGATED = re.compile(
    rf"(?:(?<!{_WORD_CHAR})(?:not|no|never|nor|neither|cannot|dont|doesnt|isnt|arent|wasnt)"
    rf"(?!{_WORD_CHAR})|n['\u2019]t(?!{_WORD_CHAR}))[^.,;:!?\n\u2013\u2014]*$",
    re.IGNORECASE,
)
_LEAD_IN = re.compile(r"^[\W_]+")
# Byte-level BPE and SentencePiece markers some servers leave in logprob tokens.
_TOKEN_MARKERS = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\n"})
_QUOTED = re.compile(
    r'"([^"\n]+)"|\u201c([^\u201c\u201d\n]+)\u201d|\u201e([^\u201c\u201d\n]+)[\u201c\u201d]'
    r"|\u00ab([^\u00ab\u00bb\n]+)\u00bb|\u300c([^\u300c\u300d\n]+)\u300d"
)


@dataclass(frozen=True)
class NormalText:
    """A text normalised for reading, and the span of the original each character came from
    (None: ASCII, unchanged), so labels read here are located in what the model wrote."""

    text: str
    starts: tuple[int, ...] | None = None
    ends: tuple[int, ...] | None = None

    @classmethod
    def of(cls, raw: str) -> NormalText:
        """``raw`` normalised (module docstring), with each character's origin in ``raw``."""
        if raw.isascii():
            return cls(raw)
        pieces: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        i = 0
        while i < len(raw):
            j = i + 1
            while j < len(raw) and unicodedata.combining(raw[j]):
                j += 1  # a letter and its accents normalise together ("e" + U+0301 → "é")
            kept = "".join(c for c in raw[i:j] if unicodedata.category(c) != "Cf")
            piece = unicodedata.normalize("NFKC", kept)
            pieces.append(piece)
            starts += [i] * len(piece)
            ends += [j] * len(piece)
            i = j
        return cls(_LETTERS.sub(_fold, "".join(pieces)), tuple(starts), tuple(ends))

    def origin(self, span: tuple[int, int]) -> tuple[int, int]:
        """The raw text's span that the normalised ``span`` was read from."""
        if self.starts is None or self.ends is None:
            return span
        return self.starts[span[0]], self.ends[span[1] - 1]


# End-of-turn markers written out as text: a base model served through a fallback chat
# template (Gemma-270M under ChatML) does not know the marker as a special token, so the
# server does not stop there and the model goes on inventing the next turn.
# finish_reason values that mean the server stopped the text, not the model.
CUT_OFF = {
    "length": "cut off by the token limit (finish_reason 'length')",
    "content_filter": "cut off by the server's content filter",
    "abort": "aborted by the server",
}

END_OF_TURN = re.compile(r"<\|im_end\|>|<end_of_turn>|<\|eot_id\|>|<\|endoftext\|>|<\|end\|>|</s>")


def _fold(word: re.Match[str]) -> str:
    text = word.group()
    return text.translate(_LOOKALIKES) if any(c.isascii() for c in text) else text


def norm(text: str) -> str:
    """A surface form's key: normalised, lower case, runs of spaces, ``_`` and ``-`` made
    one space, so "Not_Similar" and "not similar" are one form."""
    return _SEPARATORS.sub(" ", NormalText.of(text).text.lower()).strip()


def flat(text: str) -> str:
    """For finding one text inside another: normalised, case-folded, spaces collapsed."""
    return " ".join(NormalText.of(text).text.casefold().split())


def phrase_pattern(form: str) -> re.Pattern[str]:
    """A regex for ``form`` (a ``norm`` key) as whole words (Unicode word boundaries), any
    case, with spaces, ``_`` and ``-`` between its words interchangeable."""
    words = r"[\s_\-]+".join(re.escape(w) for w in form.split(" "))
    return re.compile(rf"(?<!{_WORD_CHAR}){words}(?!{_WORD_CHAR})", re.IGNORECASE)


def negated_at(text: str, at: int) -> bool:
    """Whether a negation precedes position ``at`` in its clause ("not bad"), looking back
    at most 40 characters."""
    return _NEGATED.search(text[max(0, at - 40) : at]) is not None


def blank_quotations(text: str, sources: Sequence[str | None], keep: Callable[[str], bool]) -> str:
    """``text`` with each quotation ("…", “…”, „…“, «…», 「…」) of one of the ``sources``
    blanked out (offsets kept), unless ``keep`` accepts what it quotes (``flat``, trimmed
    of punctuation). The sources are flattened only where there is a quotation at all."""
    if not _QUOTED.search(text):
        return text
    flats = [flat(t) for t in sources if t]

    def blank(match: re.Match[str]) -> str:
        quoted = flat(next(g for g in match.groups() if g)).strip(" .,;:!?'")
        copied = quoted and not keep(quoted)
        if copied and any(quoted in source for source in flats):
            return " " * len(match.group())
        return match.group()

    return _QUOTED.sub(blank, text)


def skip_reasoning(text: str) -> tuple[str, bool, bool]:
    """Rule 1: the text with its reasoning blanked out (offsets kept), whether there was
    any, and whether a block was left open."""
    spans: list[tuple[int, int]] = []
    opened: int | None = None
    done = 0
    for tag in _THINK_TAG.finditer(text):
        if not tag.group(1):
            opened = tag.start() if opened is None else opened
            continue
        spans.append((done if opened is None else opened, tag.end()))
        done, opened = tag.end(), None
    if opened is not None:
        spans.append((opened, len(text)))
    for a, b in spans:
        text = text[:a] + " " * (b - a) + text[b:]
    return text, bool(spans), opened is not None


def no_answer(cut: str | None, reasoned: bool, unclosed: bool) -> str:
    """Why an answer with nothing left to read abstains. ``cut``: how the server stopped
    the text (None: the model did); ``reasoned``: it held reasoning; ``unclosed``: a
    reasoning block was never closed."""
    if cut and reasoned:
        return f"{cut} while reasoning: no answer was given (raise max_tokens, or no reasoning)"
    if unclosed:
        return "the reasoning never ended (no </think>): no answer was given"
    if reasoned:
        return "no answer after its reasoning"
    return f"empty answer ({cut})" if cut else "empty answer"


def first_part(
    text: str, start: int, end: int, marks: Sequence[int]
) -> tuple[int, int, str | None] | None:
    """The first part of text[start:end] holding a letter or digit, skipping one heading
    ("Sentiment:"): its span and what closed it (None: the text's end). ``marks`` are
    where the caller's label mentions start: a part holding one is never a heading."""
    pos, headed = start, False
    while pos < end:
        stop = _PART_END.search(text, pos, end)
        b = stop.start() if stop else end
        closer = stop.group() if stop else None
        if ALNUM.search(text, pos, b):
            heading = closer == ":" and not any(pos <= m < b for m in marks)
            if not heading or headed:
                return pos, b, closer
            headed = True
        if stop is None:
            return None
        pos = stop.end()
    return None


def plain_token(token: str) -> str:
    """A logprob token as the text it stands for: BPE and SentencePiece space and newline
    markers made plain, so tokens join into the answer's text."""
    return token.translate(_TOKEN_MARKERS)


def without_lead_in(token: str) -> str:
    """A token less what leads up to a word (' "', ' '), for a token that straddles the
    start of a label."""
    return _LEAD_IN.sub("", token)


def json_value(text: str) -> Any:
    """The decoded JSON string or object of a JSON reply (also in a code fence or among
    prose), or None when the reply is not JSON."""
    body = _FENCE.sub("", text.strip())
    first, last = body.find("{"), body.rfind("}")
    candidates = [body] + ([body[first : last + 1]] if 0 <= first < last else [])
    for candidate in candidates:
        try:
            value: Any = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, str | dict):
            return value
    return None


def stated_values(
    text: str, complete: bool, inputs: Sequence[str | None] = ()
) -> list[tuple[int, int]]:
    """The spans of the values of lines that state an answer (``_STATED``), outside code
    blocks and not found as they are in ``inputs`` (the item's texts: a ticket's own
    "Label: x" line, echoed, is not the model's word); with ``complete``, only lines a
    newline ended (a cut text's last line may be unfinished)."""
    fenced = [m.span() for m in _FENCED.finditer(text)]
    found = []
    for m in _STATED.finditer(text):
        if complete and not text.startswith("\n", m.end()):
            continue
        if any(a <= m.start() < b for a, b in fenced):
            continue
        line = m.group().strip()
        if any(given and line in given for given in inputs):
            continue
        found.append(m.span("value"))
    return found


def keyed_answer(obj: dict[Any, Any]) -> str | None:
    """The string a JSON object holds under an answer-like key (``label``, ``answer``, …;
    any case, the first of those keys that holds a string), or None."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in _JSON_KEYS:
        if isinstance(lowered.get(key), str):
            return str(lowered[key])
    return None


def locate(text: str, value: str) -> int:
    """Where a JSON string value sits in the raw text (-1: written with escapes)."""
    at = text.find(orjson.dumps(value).decode())
    return at + 1 if at >= 0 else text.find(value)
