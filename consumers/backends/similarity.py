"""Offline backends for pair tasks (``similar_ticket``): CPU only, nothing to download.

Three lexical scorers play the small worker models, each seeing the pair differently:
``jaccard`` (shared content words), ``tfidf`` (shared words weighted by rarity, the
document frequencies taken from the bundled support tickets, so "account" or "app"
count less than "VAT" or "SAML") and ``char-ngrams`` (character trigram cosine, which
matches "import"/"importing" and typos). ``similarity-judge`` adds support-desk cues:
which product area each ticket is about (billing, access, delivery, …) and what goes
wrong (missing, duplicated, wrong, slow, …). Two tickets are similar when they share
the problem, not the words: "order #48213 hasn't arrived" and "order #48213 arrived
damaged" share nearly every word and are different problems.

Each scorer maps its score s to P(similar) = sigmoid((s - threshold) / scale); the label
is the likelier side and the confidence its probability. Thresholds are where each
scorer is most often right on the bundled pairs, scales come from a logistic fit there,
so the confidences are honest: a near-chance worker says 0.50 to 0.65, and a
``confidence_threshold`` can tell its guesses from its better bets. On the bundled 120
gold pairs (producers/samples/ticket_pairs.jsonl, written to defeat word overlap) the
workers are near chance (jaccard 58%, tfidf 55%, char-ngrams 62%) and the judge reaches
77% — its weights were fitted there by logistic regression, so that figure flatters it;
fitted on one half and scored on the other it gets 73% and 80%. On this set the lexical scores
add nothing once the cues are known (their weight is ≈ 0): the cues carry the judge.
tests/test_similarity.py measures all four.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import ClassVar

import orjson
from pydantic import Field

from common.schemas import Item, Prediction
from common.tasks import TaskSpec
from consumers.backends.base import BackendOptions, RawOptions, parse_options, unsupported

SIMILAR, NOT_SIMILAR = "similar", "not_similar"

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORD_LIST = (
    "a an the and or but if of to in on for with at by from up out is are was were be been "
    "being it its this that these those i me my we our us you your they them their he she his "
    "her do does did doing have has had having can could would should will just so than too "
    "very as into about after before over under again once here there when where why how all "
    "any both each few more most other some such only own s t now what which who whom also get "
    "got still even since because while until please hi hello thanks"
)
_STOPWORDS = frozenset(_STOPWORD_LIST.split())


def stem(word: str) -> str:
    """A crude suffix stripper: enough to match "imports"/"imported"/"importing"."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def cosine(u: Mapping[str, float], v: Mapping[str, float]) -> float:
    dot = sum(x * v.get(k, 0.0) for k, x in u.items())
    norm = math.sqrt(sum(x * x for x in u.values())) * math.sqrt(sum(x * x for x in v.values()))
    return dot / norm if norm else 0.0


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


@cache
def document_frequencies() -> tuple[int, Counter[str]]:
    """Document frequencies over the bundled support tickets: the IDF background corpus."""
    path = resources.files("producers") / "samples" / "tickets.jsonl"
    texts = [orjson.loads(line)["text"] for line in path.read_bytes().splitlines() if line.strip()]
    return len(texts), Counter(w for t in texts for w in set(content_words(t)))


def _threshold(default: float) -> float:
    return Field(default=default, description="score at which both answers are equally likely")


def _scale(default: float) -> float:
    return Field(
        default=default, gt=0, description="score distance that moves P(similar) from 0.5 to 0.73"
    )


class PairOptions(BackendOptions):
    threshold: float = _threshold(0.1)
    scale: float = _scale(0.05)


class JaccardOptions(PairOptions):
    threshold: float = _threshold(0.10)
    scale: float = _scale(0.45)


class TfIdfOptions(PairOptions):
    threshold: float = _threshold(0.15)
    scale: float = _scale(0.6)


class CharNgramsOptions(PairOptions):
    threshold: float = _threshold(0.15)
    scale: float = _scale(0.4)
    n: int = Field(default=3, ge=1, description="characters per n-gram")


class SimilarityJudgeOptions(PairOptions):
    threshold: float = _threshold(0.0)  # the score is already the logit
    scale: float = _scale(1.0)
    n: int = Field(default=3, ge=1, description="characters per n-gram of its char-ngrams part")


class PairScorer:
    """One score in [0, 1] per pair → similar / not_similar with a confidence."""

    name = "pair"
    Options: ClassVar[type[PairOptions]] = PairOptions

    def __init__(self, options: PairOptions | RawOptions, tasks: Mapping[str, TaskSpec]) -> None:
        self.tasks = tasks
        self.opts = parse_options(self.Options, options)
        self.threshold = self.opts.threshold
        self.scale = self.opts.scale

    @staticmethod
    def handles(name: str, task: TaskSpec) -> bool:
        """Any pair task labeled similar / not_similar."""
        return task.pair and set(task.labels) == {SIMILAR, NOT_SIMILAR}

    def score(self, a: str, b: str) -> float:
        raise NotImplementedError

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        return [self.predict(item) for item in items]

    def predict(self, item: Item) -> Prediction:
        task = self.tasks.get(item.task)
        if task is None or not self.handles(item.task, task):
            return unsupported(self.name, item)
        z = (self.score(item.text, item.text_b or "") - self.threshold) / self.scale
        p = 1 / (1 + math.exp(-max(-50.0, min(50.0, z))))
        label = SIMILAR if p >= 0.5 else NOT_SIMILAR
        return Prediction(label=label, confidence=round(max(p, 1 - p), 4))


class Jaccard(PairScorer):
    name = "jaccard"
    Options = JaccardOptions

    def score(self, a: str, b: str) -> float:
        return jaccard(set(content_words(a)), set(content_words(b)))


class TfIdf(PairScorer):
    name = "tfidf"
    Options = TfIdfOptions

    def score(self, a: str, b: str) -> float:
        n, df = document_frequencies()

        def vector(text: str) -> dict[str, float]:
            counts = Counter(content_words(text))
            return {w: c * (math.log((n + 1) / (df[w] + 1)) + 1) for w, c in counts.items()}

        return cosine(vector(a), vector(b))


class CharNgrams(PairScorer):
    name = "char-ngrams"
    Options = CharNgramsOptions

    def __init__(
        self, options: CharNgramsOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        self.n = parse_options(CharNgramsOptions, self.opts).n

    def grams(self, text: str) -> Counter[str]:
        padded = " " + " ".join(_WORD.findall(text.lower())) + " "
        return Counter(padded[i : i + self.n] for i in range(len(padded) - self.n + 1))

    def score(self, a: str, b: str) -> float:
        return cosine(self.grams(a), self.grams(b))


def _cues(patterns: dict[str, str]) -> dict[str, re.Pattern[str]]:
    return {k: re.compile(rf"(?<![a-z0-9])(?:{v})(?![a-z0-9])") for k, v in patterns.items()}


# What a ticket is about. General support-desk vocabulary, one regex per area.
AREAS = _cues(
    {
        "billing": r"invoices?|bill(?:ed|ing|s)?|charg\w*|payments?|paid|pay|fees?|pric\w*|"
        r"refund\w*|vat|tax|card|statement|money|overage|prorat\w*|discount|promo|coupon|quote",
        "plan": r"subscription|plan|tier|upgrad\w*|downgrad\w*|renew\w*|trial|seats?|cancel\w*|"
        r"pro|free",
        "access": r"log ?in|login|log(?:s|ged)? (?:me )?out|sign(?:ed)? ?in|password|2fa|"
        r"two.factor|authenticator|sso|saml|okta|credentials|locked|session|verification|reset",
        "delivery": r"deliver\w*|parcel|package|courier|driver|shipp?\w*|tracking|arriv\w*|box|"
        r"packing|order(?:ed)?|items?|received",
        "mobile": r"app|ios|iphone|ipad|android|mobile|widget|pixel|samsung|battery",
        "messaging": r"notifications?|alerts?|push|emails?|messages?|sms|text message|spam|inbox|"
        r"posts?|posting|channel",
        "integration": r"slack|zapier|zaps?|salesforce|crm|hubspot|calendar|webhooks?|"
        r"integration|sync\w*|oauth",
        "api": r"api|endpoints?|requests?|calls?|rate limit|quota|4\d\d|5\d\d",
        "data": r"import\w*|export\w*|csv|reports?|dashboard|search\w*|filters?|views?|upload\w*|"
        r"attach\w*|files?|pdf|documents?|download\w*",
        "telecom": r"internet|wi-?fi|fibre|fiber|connection|router|speed|mbps|phone calls?|calls?|"
        r"sim|number|port|roaming|carrier|volte|signal|voicemail",
        "display": r"dark mode|font|text|labels?|colou?r|screen|display\w*|format|dates?|"
        r"time ?zone|utc|region",
        "users": r"users?|members?|team|teammates?|workspace|accounts?|invit\w*|remove|delete|"
        r"merge",
    }
)
# What goes wrong. Two tickets about one area with different problems are not similar.
PROBLEMS = _cues(
    {
        "absent": r"never (?:arriv\w+|shows? up|received|came)|not (?:arriv\w+|received|showing|"
        r"appear\w*|delivered|being delivered)|(?:isn't|aren't|hasn't|haven't|doesn't|don't|"
        r"didn't) (?:arriv\w+|show(?:n)? up|appear|get|received?|fire|trigger\w*|tick)|missing|"
        r"still (?:not|nothing|pending|isn't|hasn't)|no (?:alerts?|results?|errors?)|"
        r"nothing (?:arrived|appears|happens)|stopped \w+ing|not on my card",
        "duplicate": r"twice|duplicat\w*|double\w*|two identical|copies|"
        r"(?:three|four|five|several) times|same \w+ showing up",
        "wrong": r"wrong|incorrect|instead of|doesn't match|don't match|mismatch|off|higher than|"
        r"less than|garbled|question marks|outdated|stale|old price|invalid|"
        r"(?:not|isn't) recogni[sz]ed|says i|month/day|us format",
        "slow": r"slow\w*|delay\w*|late|behind|forever|latency|time[sd]? out|timing out|timeout|"
        r"hours?|long after|spins?|p95",
        "crash": r"crash\w*|closes? itself|freez\w*|force[sd]?|logs? me out|logout|cold start",
        "blocked": r"fail\w*|errors?|broken|not working|doesn't work|404|can't|cannot|unable|"
        r"won't|greyed out|disabled|does nothing|nothing happens|refus\w+|rejected|declined|"
        r"locked|no option|bounced|loops?|going in circles|disconnect\w*",
        "lost": r"disappear\w*|vanished|lost|drops?|dropping|cut(?:s|ting)? (?:off|out)|deleted|"
        r"empty|blank|white|invisible|unreadable|gone",
        "charged": r"charged|billed|taken|fee|charge|went through|money was taken",
    }
)
# A how-to question or a request, as opposed to a problem report.
QUESTION = re.compile(
    r"^(?:how|can|could|what|when|is there|please add|feature request|i'd like|we'd like)\b|"
    r"\bhow do (?:i|we)\b|\bcan (?:i|we|you)\b|\bfeature request\b"
)


def cues(text: str) -> tuple[set[str], set[str], bool]:
    """(areas, problems, is a question or request) of one ticket."""
    t = text.lower().replace("\u2019", "'")
    areas = {k for k, rx in AREAS.items() if rx.search(t)}
    problems = {k for k, rx in PROBLEMS.items() if rx.search(t)}
    return areas, problems, QUESTION.search(t) is not None


class SimilarityJudge(PairScorer):
    """The three lexical scores and the cues, weighed by a logistic model.

    Features: mean lexical score, Jaccard of the areas, Jaccard of the problems, one
    ticket a question and the other not, both name problems but none in common.
    """

    name = "similarity-judge"
    Options = SimilarityJudgeOptions
    WEIGHTS = (-0.58, -0.03, 1.06, 1.62, -0.91, -1.0)  # fitted on the bundled pairs

    def __init__(
        self, options: SimilarityJudgeOptions | RawOptions, tasks: Mapping[str, TaskSpec]
    ) -> None:
        super().__init__(options, tasks)
        # Only the parts' scores count here (not their thresholds), and n shapes one of them.
        n = parse_options(SimilarityJudgeOptions, self.opts).n
        self.parts = (
            Jaccard(JaccardOptions(), tasks),
            TfIdf(TfIdfOptions(), tasks),
            CharNgrams(CharNgramsOptions(n=n), tasks),
        )

    def features(self, a: str, b: str) -> tuple[float, ...]:
        (areas_a, problems_a, ask_a), (areas_b, problems_b, ask_b) = cues(a), cues(b)
        lexical = sum(p.score(a, b) for p in self.parts) / len(self.parts)
        disjoint = bool(problems_a) and bool(problems_b) and not problems_a & problems_b
        return (
            1.0,
            lexical,
            jaccard(areas_a, areas_b),
            jaccard(problems_a, problems_b),
            float(ask_a != ask_b),
            float(disjoint),
        )

    def score(self, a: str, b: str) -> float:
        return sum(w * x for w, x in zip(self.WEIGHTS, self.features(a, b), strict=True))
