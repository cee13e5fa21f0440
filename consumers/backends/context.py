"""A ticket longer than a model's context: read the part that fits, head and tail, and say so.

A server refuses a prompt over its context with HTTP 400, and asking again gets the same
answer: a pasted stack trace of 3,777 tokens against llama-server's 2,048 per slot was
refused by every model of the fleet, and retried until it was dead-lettered. Instead the
item's text is cut to what fits and asked again; the cut is recorded in the vote
(``Vote.truncated_chars``). What is kept is the head and the tail of each text (the
ticket's subject and opening, its last lines), joined by a marker naming how much was cut.

The sizes come from the refusal itself:
- llama-server: ``{"error": {"type": "exceed_context_size_error", "n_prompt_tokens": 3777,
  "n_ctx": 2048, ...}}`` (measured on llama.cpp's server, 2026-12);
- vLLM and OpenAI: "This model's maximum context length is 4096 tokens. However, you
  requested 5000 tokens (4952 in the messages, 48 in the completion)" / "your messages
  resulted in 5000 tokens".
Without numbers (another server's wording) each try keeps half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from common.schemas import Item

CUT_MARK = "\n[... {n} characters cut ...]\n"
MARGIN_TOKENS = 16  # the chat template's closing tokens and rounding
HEAD_SHARE = 0.6  # of what is kept, from the start of the text

_CONTEXT = re.compile(r"context (length|size|window)", re.IGNORECASE)
_LIMIT = re.compile(r"maximum context length is (\d+) tokens", re.IGNORECASE)
# The prompt's size, most precise wording first ("requested" also counts the completion).
_ASKED = [re.compile(p) for p in (r"(\d+) in the messages", r"resulted in (\d+) tokens")]
_ASKED.append(re.compile(r"requested (\d+) tokens"))


@dataclass(frozen=True)
class Overflow:
    """A refusal for a prompt over the context: its size and the context's, in tokens,
    where the server said them."""

    prompt_tokens: int | None = None
    context_tokens: int | None = None

    def keep(self, max_tokens: int) -> float:
        """The share of the item's text to keep for the next try (0.05-0.9)."""
        if not self.prompt_tokens or not self.context_tokens:
            return 0.5
        room = self.context_tokens - max_tokens - MARGIN_TOKENS
        # The prompt's fixed part (instructions, few-shot examples) is counted in
        # prompt_tokens but is not cut: 0.9 leaves room for it, and the next refusal, if
        # any, brings new sizes.
        return max(0.05, min(0.9, 0.9 * room / self.prompt_tokens))


def overflow_of(status: int, body: str) -> Overflow | None:
    """The overflow a refusal reports, or None when it is a refusal of another kind."""
    if status not in (400, 413, 422):
        return None
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
        prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
        return Overflow(_int(prompt), _int(context))
    if not _CONTEXT.search(body):
        return None
    limit = _LIMIT.search(body)
    asked = next((m for m in (p.search(body) for p in _ASKED) if m), None)
    prompt = int(asked.group(1)) if asked else None
    return Overflow(prompt, int(limit.group(1)) if limit else None)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def shortened(item: Item, keep: float) -> tuple[Item, int]:
    """The item with each text cut to ``keep`` of its length (head and tail kept, a marker
    between), and how many characters were cut in all."""
    text, cut = _cut(item.text, keep)
    update: dict[str, str] = {"text": text}
    if item.text_b is not None:
        update["text_b"], cut_b = _cut(item.text_b, keep)
        cut += cut_b
    return item.model_copy(update=update), cut


def _cut(text: str, keep: float) -> tuple[str, int]:
    kept = int(len(text) * keep)
    if kept >= len(text) or len(text) < 64:
        return text, 0
    head = int(kept * HEAD_SHARE)
    cut = len(text) - kept
    tail = text[len(text) - (kept - head) :] if kept > head else ""
    return text[:head] + CUT_MARK.format(n=cut) + tail, cut
