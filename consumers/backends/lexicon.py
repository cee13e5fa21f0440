"""Offline sentiment backends that run on a CPU with nothing to download.

Three independent lexicon classifiers from PyPI (VADER, TextBlob's pattern
lexicon, AFINN) act as the small worker models; ``LexiconJudge`` combines them
with cues specific to support tickets (a calm "my payment failed" is a
complaint) and plays the stronger, slower judge. They stand in for LLMs so the
whole fleet can be run and tested anywhere.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar

from pydantic import Field

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends.base import BackendOptions, RawOptions, parse_options, unsupported

TASK = "sentiment"


def _band(default: float, scale: str) -> float:
    """The half-width of the neutral zone around 0 on the backend's score ``scale``."""
    return Field(
        default=default, ge=0, le=1, description=f"half-width of the neutral zone on {scale}"
    )


class PolarityOptions(BackendOptions):
    band: float = _band(0.05, "the polarity scale [-1, 1]")


class AfinnOptions(PolarityOptions):
    band: float = _band(0.2, "tanh(AFINN score / 4)")


class LexiconJudgeOptions(PolarityOptions):
    band: float = _band(0.1, "the judge's score [-1, 1]")


class PolarityClassifier:
    """Maps a polarity score in [-1, 1] to positive / negative / neutral.

    ``band`` is the half-width of the neutral zone. Confidence grows with the
    distance from the nearest boundary, so a score right at a boundary is a coin toss.
    """

    name = "polarity"
    Options: ClassVar[type[PolarityOptions]] = PolarityOptions

    def __init__(
        self, options: PolarityOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        self.band = parse_options(self.Options, options).band

    @staticmethod
    def handles(name: str, task: TaskSpec) -> bool:
        """A polarity lexicon knows one task: the one named sentiment."""
        return name == TASK

    def score(self, text: str) -> float:
        raise NotImplementedError

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        return [self.predict(item) for item in items]

    def predict(self, item: Item) -> Prediction:
        if item.task != TASK:
            return unsupported(self.name, item)
        s = max(-1.0, min(1.0, self.score(item.text)))
        if s > self.band:
            label, margin = "positive", (s - self.band) / (1 - self.band)
        elif s < -self.band:
            label, margin = "negative", (-s - self.band) / (1 - self.band)
        else:
            label, margin = "neutral", 1 - abs(s) / self.band if self.band else 1.0
        return Prediction(label=label, confidence=round(0.5 + 0.5 * math.sqrt(margin), 4))


class Vader(PolarityClassifier):
    name = "vader"

    def __init__(
        self, options: PolarityOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])


class TextBlobPolarity(PolarityClassifier):
    name = "textblob"

    def __init__(
        self, options: PolarityOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        with _hidden("scipy", "sklearn", "numpy"):
            from textblob import TextBlob
        self._blob = TextBlob

    def score(self, text: str) -> float:
        return float(self._blob(text).sentiment.polarity)


@contextmanager
def _hidden(*optional: str) -> Iterator[None]:
    """Import with the ``optional`` packages hidden, as if not installed. TextBlob imports
    nltk, which imports NumPy, SciPy and scikit-learn when it finds them, for parts
    TextBlob's sentiment never uses (alignment, collocation tests, classifiers); nltk does
    without all three when they are absent. TextBlob's import then costs 0.17 CPU-s instead
    of 1.18 (measured 2026-12-07, 2 cores: 0.34 with NumPy still imported). A None in
    ``sys.modules`` makes an import fail as not found (the import system's documented rule);
    packages already imported are left alone, and later imports find them as usual. (The
    nltk modules imported meanwhile keep running without them: nltk's NumPy parts, unused by
    tribunal, fail in this process.) The injection detector's learned model still imports
    all three at the worker's first ticket it scores (``common.injection_model``; a task's
    ``injection_model = false`` keeps them out)."""
    hidden = [name for name in optional if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


class Afinn(PolarityClassifier):
    name = "afinn"
    Options = AfinnOptions

    def __init__(
        self, options: PolarityOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        from afinn import Afinn as AfinnLexicon

        self._afinn = AfinnLexicon(emoticons=True)

    def score(self, text: str) -> float:
        return math.tanh(float(self._afinn.score(text)) / 4)


# Support-desk cues the general lexicons miss. A ticket is mostly about a problem
# (time lost, money taken, things broken), a question, or thanks; sarcasm wraps a
# problem in praise words, so problem cues outvote the lexicon.
_PROBLEM = re.compile(
    r"\b(fail(ed|s|ing)?|broken|broke|crash(ed|es|ing)?|errors?|not work(ing)?|"
    r"(doesn|isn|didn|won|can|hasn|haven|wasn)'?t|cannot|unable|never|nobody|no one|nothing|"
    r"still|again|every (single )?time|keeps?|wrong|missing|lost|gone|wiped|stuck|down|"
    r"outage|duplicat\w*|charged|overcharged|refund\w*|late|delay\w*|waiting|waited|weeks?|"
    r"days|hours|unacceptable|ridiculous|worst|disappointed|useless|ignored|zero stars|"
    r"blocking|locked out|times out|damaged|crushed|used|drains?|loop|promised)\b",
    re.IGNORECASE,
)
_PRAISE = re.compile(
    r"\b(thank(s| you)|appreciated|grateful|kudos|shout ?out|well done|above and beyond|"
    r"deserves|5 stars|five stars|smooth|faster|saved|exactly what|bless|rare|"
    r"works (now|great|perfectly)|love (it|the)|impressed|fantastic job|great job)\b",
    re.IGNORECASE,
)
_QUESTION = re.compile(
    r"(\?|^\s*(how|what|when|where|which|who|why|does|do|is|are|can|could|would|will|"
    r"please|requesting|feature request|i'?d like|we'?d like|quick q)\b)",
    re.IGNORECASE | re.MULTILINE,
)
_SHOUTING = re.compile(r"\b[A-Z]{3,}\b|[!?]{2,}")


class LexiconJudge(PolarityClassifier):
    """The offline judge: support-desk cues first, the three lexicons for the rest.

    Slower and more careful than any one worker, as a judge should be; still a
    stand-in for a large LLM, and its cues were written with the bundled sample in
    view, so its accuracy there flatters it.
    """

    name = "lexicon-judge"
    Options = LexiconJudgeOptions

    def __init__(
        self, options: PolarityOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        # Only the parts' scores count here, so their own bands are left as they are.
        self._parts = (
            Vader(PolarityOptions(), tasks),
            TextBlobPolarity(PolarityOptions(), tasks),
            Afinn(AfinnOptions(), tasks),
        )

    def score(self, text: str) -> float:
        problems = len(_PROBLEM.findall(text)) + len(_SHOUTING.findall(text))
        praise = len(_PRAISE.findall(text))
        lexical = sum(p.score(text) for p in self._parts) / len(self._parts)
        if problems >= 2 and problems > praise:
            return -0.5 - 0.1 * min(problems, 5)
        if praise and praise >= problems:
            return 0.5 + 0.1 * min(praise, 5)
        if _QUESTION.search(text) and problems <= 1:
            return 0.0
        return lexical - 0.15 * problems
