"""Per-token logprobs as servers return them, and the numbers read from them.

Shared by the wire formats (``openai_wire``, ``vllm_engine``) that build them and the answer
reader (``answers``) that turns them into a label's confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from consumers.backends.answer_text import plain_token


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its logprob, and the alternatives the server listed there.
    A logprob is None where the server gave none (null, or a field left out)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float | None], ...] = ()


def logprob_of(value: object) -> float | None:
    """A logprob from a JSON body: a number, else None (servers write null for -inf)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def probability(logprob: float | None) -> float:
    """exp(logprob), 0 for no usable number: None, NaN, ±inf, a sentinel that underflows."""
    if logprob is None or not -math.inf < logprob < 1.0:  # NaN fails every comparison
        return 0.0
    return min(1.0, math.exp(logprob))


def plain(tok: TokenLogprob) -> TokenLogprob:
    """The token and its alternatives without the tokenizer's space and newline markers."""
    return TokenLogprob(
        plain_token(tok.token),
        tok.logprob,
        tuple((plain_token(t), lp) for t, lp in tok.top),
    )
