"""The injection detector's learned half: does a passage read as written to the labeler?

The cues (``common.injection_cues``) read what an attacker must spell — a role marker, a
label word after an imperative, a note to the AI. What got past them on the held-out sets
reads like desk text and names no label: a fake agent's "they're actually delighted", a
"satisfaction survey: 5/5" footer, a request in Turkish, a claim that two tickets were
merged. This model reads such a passage by its words: a logistic regression over hashed word
uni- and bigrams and character 2-5-grams (scikit-learn's ``HashingVectorizer``: stateless, so
the file holds only the weights), trained by ``bench/injection_model.py`` on the passages the
adversarial sets' twins add to their clean tickets (positive) and on the passages of ordinary
tickets (negative: the bundled samples, the sets' clean tickets, ``clean_realistic.jsonl``,
``clean_training.jsonl``, review sentences). How it was measured: docs/injection.md.

A passage is scored only where it holds ``MIN_WORDS`` words: a short one ("System:", "<p>",
"Positive") says too little to be read by its words, and the cues read those.

The weights are a NumPy ``.npz`` (read with ``allow_pickle=False``: no code in a model file).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scipy and scikit-learn take a second to import: only where a model is read
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import HashingVectorizer

MODEL_FILE = Path(__file__).with_name("injection_model.npz")
N_FEATURES = 2**18  # per vectorizer; collisions cost little at a few thousand passages
MIN_WORDS = 4
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word: two letters or more, in any script
LINE_BREAK = re.compile(r"[\n\u2028\u2029\x85]")  # and Unicode's line and paragraph separators


@functools.cache
def _vectorizers() -> tuple[HashingVectorizer, HashingVectorizer]:
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(
        analyzer="word",
        ngram_range=(1, 2),
        token_pattern=r"(?u)\b\w+\b|[^\w\s]",  # punctuation is a token: ":" and "{" tell a lot
        n_features=N_FEATURES,
        alternate_sign=False,
    )
    chars = HashingVectorizer(
        analyzer="char_wb", ngram_range=(2, 5), n_features=N_FEATURES, alternate_sign=False
    )
    return words, chars


def eligible(reading: str) -> bool:
    """Whether a unit (as the cues read it, ``common.injection.reading``) has words enough
    to be scored: counted in its first reading, since a second one spells the same words
    out ("HX7731" read as digits for letters is no more words)."""
    return len(_WORD.findall(reading.split("\n", 1)[0])) >= MIN_WORDS


def features(readings: Sequence[str]) -> sp.csr_matrix:
    """The rows the model reads: one per passage, ``2 * N_FEATURES`` columns (word n-grams,
    then character n-grams), each half L2-normalized."""
    import scipy.sparse as sp

    words, chars = _vectorizers()
    return sp.hstack([words.transform(readings), chars.transform(readings)]).tocsr()


def lines_of(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The lines of ``text`` (start, end, without their blank ends) that hold two or more of
    ``spans`` (start, end) whole: read as units of their own."""
    out = []
    starts = [0, *(m.end() for m in LINE_BREAK.finditer(text))]
    for start, end in zip(starts, [*(s - 1 for s in starts[1:]), len(text)], strict=True):
        inside = sum(start <= s and e <= end + 1 for s, e in spans)
        line = text[start:end]
        if inside >= 2 and line.strip():
            lead = len(line) - len(line.lstrip())
            out.append((start + lead, start + lead + len(line.strip())))
    return out


def flagged(units: Sequence[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """The units (start, end, reading) the shipped model reads as written to the labeler,
    where some unit apart from them stays below its threshold; none of a unit inside another
    flagged one. An injection stands out from the customer's words around it; a ticket the
    model reads as odd throughout (one written in Russian: the sets' injections in other
    languages taught it that) stands out from nothing, and none of it is flagged."""
    model = shipped()
    probabilities = model.probabilities([r for *_, r in units])
    above = [
        (s, e) for (s, e, _), p in zip(units, probabilities, strict=True) if p >= model.threshold
    ]
    below = [(s, e) for s, e, _ in units if (s, e) not in above]
    if not any(all(e <= fs or fe <= s for fs, fe in above) for s, e in below):
        return []
    return [
        (s, e)
        for s, e in above
        if not any(ls <= s and e <= le and (ls, le) != (s, e) for ls, le in above)
    ]


@dataclass(frozen=True)
class PassageModel:
    """A linear model over ``features``: ``weights`` one per column (sparse), ``intercept``;
    a passage is flagged where its probability reaches ``threshold``."""

    weights: sp.csr_matrix  # shape (2 * N_FEATURES, 1)
    intercept: float
    threshold: float

    def probabilities(self, readings: Sequence[str]) -> list[float]:
        """P(written to the labeler) for each reading, in order; [] for none."""
        if not readings:
            return []
        logits = (features(readings) @ self.weights).toarray().ravel() + self.intercept
        return [float(p) for p in 1.0 / (1.0 + np.exp(-logits))]

    def save(self, path: Path) -> None:
        coo = self.weights.tocoo()
        np.savez_compressed(
            path,
            index=coo.row.astype(np.int32),
            weight=coo.data.astype(np.float32),
            intercept=np.float64(self.intercept),
            threshold=np.float64(self.threshold),
            n_features=np.int64(N_FEATURES),
        )

    @classmethod
    def load(cls, path: Path) -> PassageModel:
        """Raises OSError (no file), ValueError (not such a model, or for other features)."""
        import scipy.sparse as sp

        with np.load(path, allow_pickle=False) as data:
            if int(data["n_features"]) != N_FEATURES:
                raise ValueError(f"{path}: trained for {int(data['n_features'])} features")
            index, weight = data["index"], data["weight"].astype(np.float64)
            weights = sp.csr_matrix(
                (weight, (index, np.zeros_like(index))), shape=(2 * N_FEATURES, 1)
            )
            return cls(weights, float(data["intercept"]), float(data["threshold"]))


@functools.cache
def shipped() -> PassageModel:
    """The model packaged with tribunal (``MODEL_FILE``), read once per process."""
    return PassageModel.load(MODEL_FILE)
