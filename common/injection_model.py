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

A unit (a passage, or a line of several) is scored only where it holds ``MIN_WORDS`` words: a
short one ("System:", "<p>", "Positive") says too little to be read by its words, and the
cues read those. A ticket whose only unit of that size is the injection ("Hi,\\n<injection>\\n
Thanks") is not flagged by the model: nothing stands apart from it (``flagged``).

The weights are a NumPy ``.npz`` (read with ``allow_pickle=False``: no code in a model file).
NumPy, SciPy and scikit-learn are imported at the first ticket with a unit to score (about a
CPU-second, once per process), not with this module.
"""

from __future__ import annotations

import functools
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import scipy.sparse as sp
    from numpy.typing import NDArray
    from sklearn.feature_extraction.text import HashingVectorizer

log = logging.getLogger(__name__)

MODEL_FILE = Path(__file__).with_name("injection_model.npz")
# Per vectorizer: the training units hold ~150,000 distinct n-grams, so 2**18 buckets collide
# little; the file stores only the nonzero weights.
N_FEATURES = 2**18
# Below four words, headers and labels ("Date: Thu, May 16") were most of the false alarms
# (bench/injection_model.py --cross-validate, 2026-12-07).
MIN_WORDS = 4
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word: two letters or more, in any script
# Scripts written without spaces (CJK, kana, Thai, Lao, Khmer, Myanmar): two characters count
# as a word, so a Japanese sentence is read like an English one.
_UNSPACED = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    r"\u0e00-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f]"
)
LINE_BREAK = re.compile(r"[\n\u2028\u2029\x85]")  # and Unicode's line and paragraph separators

Unit = tuple[int, int, str]  # start, end (characters), the unit as the model reads it


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


def eligible(plain: str) -> bool:
    """Whether a unit has words enough to be scored; ``plain``: its first reading
    (``common.injection.readings``), not the spelled-out second one."""
    return len(_WORD.findall(plain)) + len(_UNSPACED.findall(plain)) // 2 >= MIN_WORDS


def features(readings: Sequence[str]) -> sp.csr_matrix:
    """The rows the model reads: one per unit, ``2 * N_FEATURES`` columns (word n-grams,
    then character n-grams), each half L2-normalized."""
    import scipy.sparse as sp

    words, chars = _vectorizers()
    return sp.hstack([words.transform(readings), chars.transform(readings)]).tocsr()


def lines_of(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The lines of ``text`` (start, end, without their blank ends) that hold two or more of
    ``spans`` (start, end; in order and apart, as ``passages`` gives them) whole: units of
    their own. One pass over the lines and the spans together."""
    out, at = [], 0
    starts = [0, *(m.end() for m in LINE_BREAK.finditer(text))]
    for start, end in zip(starts, [*(s - 1 for s in starts[1:]), len(text)], strict=True):
        while at < len(spans) and spans[at][0] < start:
            at += 1
        inside = 0
        while at < len(spans) and spans[at][1] <= end + 1:  # a sentence may end with its "\n"
            inside, at = inside + 1, at + 1
        line = text[start:end]
        if inside >= 2 and line.strip():
            lead = len(line) - len(line.lstrip())
            out.append((start + lead, start + lead + len(line.strip())))
    return out


def flagged(
    units: Sequence[Unit], model: PassageModel | None = None, pair: bool = False
) -> list[tuple[int, int]]:
    """The spans of ``units`` that ``model`` (default: ``shipped()``) reads as written to the
    labeler — from the model's ``threshold``, or its lower ``pair_threshold`` in a ``pair``
    task's ticket — each only where some unit apart from it stays below ``threshold``, none
    inside another flagged one. An injection stands out from the customer's words around it;
    a ticket the model reads as odd throughout (one written in Russian: the sets' injections
    in other languages taught it that) stands out from nothing. What counts as the customer's
    words does not move with the task: a pair ticket's one other sentence at 0.6 is still
    them. [] where the model cannot be read (logged once): the cues still read."""
    if not units:
        return []
    if model is None and (model := _shipped_or_none()) is None:
        return []
    threshold = model.pair_threshold if pair else model.threshold
    scored = list(zip(units, model.probabilities([r for *_, r in units]), strict=True))
    below = [(s, e) for (s, e, _), p in scored if p < model.threshold]
    if not below:
        return []
    # a unit below stands apart from (s, e) where it ends by s or starts from e
    first_end, last_start = min(e for _, e in below), max(s for s, _ in below)
    above = sorted(
        ((s, e) for (s, e, _), p in scored if p >= threshold),
        key=lambda span: (span[0], -span[1]),
    )
    out, reach = [], -1
    for s, e in above:
        if e <= reach:  # inside a flagged unit that starts no later (a line holds passages)
            continue
        if first_end <= s or last_start >= e:
            out.append((s, e))
            reach = e  # only a flagged unit hides those inside it: a line not flagged does not
    return out


@dataclass(frozen=True)
class PassageModel:
    """A linear model over ``features``: ``weights`` one per column (sparse), ``intercept``;
    a unit is flagged where its probability reaches ``threshold`` (``pair_threshold`` in a
    task whose items are pairs of tickets: there a claim about the other ticket is the whole
    attack; both chosen by ``bench/injection_model.py --cross-validate``, which writes them
    with the weights)."""

    weights: sp.csr_matrix  # shape (2 * N_FEATURES, 1)
    intercept: float
    threshold: float
    pair_threshold: float

    def probabilities(self, readings: Sequence[str]) -> list[float]:
        """P(written to the labeler) for each reading, in order; [] for none."""
        if not readings:
            return []
        import numpy as np

        logits = (features(readings) @ self.weights).toarray().ravel() + self.intercept
        return [float(p) for p in 1.0 / (1.0 + np.exp(-logits))]

    def save(self, path: Path) -> None:
        """Writes the nonzero weights, the intercept and the thresholds to ``path``, a
        compressed ``.npz`` of NumPy arrays only. Raises OSError."""
        import numpy as np

        coo = self.weights.tocoo()
        np.savez_compressed(
            path,
            index=coo.row.astype(np.int32),
            weight=coo.data.astype(np.float32),
            intercept=np.float64(self.intercept),
            threshold=np.float64(self.threshold),
            pair_threshold=np.float64(self.pair_threshold),
            n_features=np.int64(N_FEATURES),
        )

    @classmethod
    def load(cls, path: Path) -> PassageModel:
        """Raises OSError (no file), zipfile.BadZipFile (no ``.npz``), KeyError (the ``.npz``
        of something else), ValueError (a model for other features)."""
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            if int(data["n_features"]) != N_FEATURES:
                raise ValueError(f"{path}: trained for {int(data['n_features'])} features")
            weights = _column(data["index"], data["weight"].astype(np.float64))
            return cls(
                weights,
                float(data["intercept"]),
                float(data["threshold"]),
                float(data["pair_threshold"]),
            )

    @classmethod
    def from_coefficients(
        cls, coef: Sequence[float], intercept: float, threshold: float, pair_threshold: float
    ) -> PassageModel:
        """A fitted logistic regression's dense ``coef`` (``2 * N_FEATURES`` of them), kept
        where nonzero."""
        import numpy as np

        dense = np.asarray(coef, dtype=np.float64)
        kept = np.flatnonzero(dense)
        return cls(_column(kept, dense[kept]), intercept, threshold, pair_threshold)


def _column(index: NDArray[np.integer], values: NDArray[np.float64]) -> sp.csr_matrix:
    """``values`` at rows ``index`` of a sparse ``(2 * N_FEATURES, 1)`` column."""
    import numpy as np
    import scipy.sparse as sp

    return sp.csr_matrix((values, (index, np.zeros_like(index))), shape=(2 * N_FEATURES, 1))


@functools.cache
def shipped() -> PassageModel:
    """The model packaged with tribunal (``MODEL_FILE``), read once per process (about a
    CPU-second with its imports). Raises as ``PassageModel.load``."""
    return PassageModel.load(MODEL_FILE)


@functools.cache
def _shipped_or_none() -> PassageModel | None:
    try:
        return shipped()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.error("injection model unreadable, the detector reads with its cues only: %s", exc)
        return None
