"""Train the injection detector's learned half (``common.injection_model``) and measure it.

Positive passages: those an adversarial set's twin adds to its clean ticket (a passage of the
twin whose text is not in the clean one; ``common.injection.passages``). Negative: every
passage of the sets' clean tickets, the bundled samples, ``clean_realistic.jsonl``,
``clean_training.jsonl`` and 3,000 review sentences (bench/labeled.py). Lines of two passages
or more are units too (``lines_of``), as ``common.injection.findings`` reads them; only units
of ``MIN_WORDS`` words or more, each as the model reads it (``common.injection.readings``). An
L2-regularised logistic regression (C = 4, classes balanced: the best of 1 and 4, and of
word, character and both n-grams, measured 2026-12-07 by ``--cross-validate``).

    python bench/injection_model.py [--threshold 0.7] [--pair-threshold 0.5]
                                    [--out common/injection_model.npz] [--allow-no-reviews]
    python bench/injection_model.py --cross-validate [--held-out-clean clean_realistic2]

``--cross-validate`` leaves each set out in turn (and the bundled samples, each clean set):
of the twins the cues miss, how many the model catches; of the clean tickets, how many it
flags; at thresholds 0.4-0.9, per text as ``findings`` flags (``flagged``: some unit apart
stays below), though over every unit, not only those without a cue's finding; one-ticket
tasks and pair tasks apart, as each has its threshold.
``--held-out-clean`` names clean sets scored, never trained on.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import orjson
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import labeled  # noqa: E402  (bench/, beside this file)

from common.injection import findings, passages, readings  # noqa: E402
from common.injection_model import (  # noqa: E402
    MODEL_FILE,
    PassageModel,
    eligible,
    features,
    flagged,
    lines_of,
)

SETS = Path(__file__).resolve().parent / "adversarial"
ATTACKS = ["dev", *(f"holdout{i}" for i in range(1, 8))]
CLEAN = ["clean_realistic", "clean_training"]
SAMPLES = [ROOT / "producers/samples/tickets.jsonl", ROOT / "producers/samples/ticket_pairs.jsonl"]
LABELS = {
    "sentiment": ["positive", "negative", "neutral"],
    "similar_ticket": ["similar", "not_similar"],
}
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Chosen by --cross-validate (2026-12-08): one ticket, 0.7 caught 88 of the 104 twins the cues
# miss and flagged 114 of 1,378 clean items (0.6: 92, 130); pairs, 0.5 caught 36 of 43 and
# flagged 12 of 292 (0.7: 30, 9): a pair's attack is a claim about the other ticket, and
# ordinary pair tickets hold few passages that read like one.
THRESHOLD, PAIR_THRESHOLD = 0.7, 0.5


class Row(NamedTuple):
    group: str  # the file it comes from
    item: str  # the item's id and field ("t0197 text")
    twin: bool  # from an injected twin
    reading: str
    injected: bool  # added by the twin's injection
    start: int = 0  # where the unit stands in its text
    end: int = 0
    pair: bool = False  # from a task whose items are pairs of tickets


def _records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _texts(record: dict[str, object]) -> list[tuple[str, str]]:
    return [(f, str(record[f])) for f in ("text", "text_b") if record.get(f)]


def rows(group: str, path: Path) -> list[Row]:
    """The units the model reads in a file's texts (passages, and lines of several passages,
    of ``MIN_WORDS`` words or more); a twin's marked where its clean item lacks them, a line
    whose passages are partly the clean item's left out."""
    records = _records(path)
    by_id = {str(r["id"]): r for r in records}
    out = []
    for r in records:
        meta = r.get("metadata")
        clean = by_id.get(str(meta.get("twin_of"))) if isinstance(meta, dict) else None
        for field, text in _texts(r):
            clean_text = str(clean.get(field) or "") if clean else ""
            spans = passages(text)
            units = [(start, end, text[start:end].strip() in clean_text) for start, end in spans]
            for start, end in lines_of(text, spans):  # lines read whole too
                parts = [
                    inside for s, e, inside in units[: len(spans)] if start <= s and e <= end + 1
                ]
                if all(parts) or not any(parts):  # a line partly the clean item's: neither
                    units.append((start, end, all(parts)))
            key, pair = f"{r['id']} {field}", r.get("task") == "similar_ticket"
            for start, end, inside in units:
                plain, read = readings(text[start:end])
                if eligible(plain):
                    added = clean is not None and not inside
                    out.append(Row(group, key, clean is not None, read, added, start, end, pair))
    return out


def corpus(held_out_clean: list[str], allow_no_reviews: bool = False) -> list[Row]:
    out = [row for name in ATTACKS for row in rows(name, SETS / f"{name}.jsonl")]
    out += [row for path in SAMPLES for row in rows("bundled", path)]
    out += [row for name in CLEAN + held_out_clean for row in rows(name, SETS / f"{name}.jsonl")]
    try:
        reviews = labeled.reviews(3000, seed=1)
    except labeled.DataUnavailable as exc:
        if not allow_no_reviews:
            raise SystemExit(
                f"no review sentences ({exc}); --allow-no-reviews trains without"
            ) from None
        print(f"no review sentences ({exc}); training without them", file=sys.stderr)
        reviews = []
    for r in reviews:
        plain, read = readings(str(r["text"]))
        if eligible(plain):
            out.append(Row("reviews", str(r["id"]), False, read, False))
    return out


def fit(train: list[Row]) -> LogisticRegression:
    model = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced")
    return model.fit(features([r.reading for r in train]), [r.injected for r in train])


def cross_validate(data: list[Row], held_out_clean: list[str]) -> None:
    missed = _cue_misses()
    totals: dict[tuple[float, bool, str], int] = defaultdict(int)
    for group in [*ATTACKS, "bundled", *CLEAN, *held_out_clean]:
        train = [r for r in data if r.group != group and r.group not in held_out_clean]
        test = [r for r in data if r.group == group]
        model = fit(train)
        by_text: dict[str, list[Row]] = defaultdict(list)
        for row in test:
            by_text[row.item].append(row)
        for threshold in THRESHOLDS:
            coef, intercept = model.coef_[0], float(model.intercept_[0])
            at = {  # a pair task's units below THRESHOLD are its customers' words (flagged)
                False: PassageModel.from_coefficients(coef, intercept, threshold, threshold),
                True: PassageModel.from_coefficients(coef, intercept, THRESHOLD, threshold),
            }
            caught: set[str] = set()
            flagged_items: set[str] = set()
            for key, text_rows in by_text.items():
                units = [(r.start, r.end, r.reading) for r in text_rows]
                pair = text_rows[0].pair
                spans = set(flagged(units, at[pair], pair=pair))
                for row in text_rows:
                    if (row.start, row.end) in spans:
                        item = key.split()[0]
                        (caught if row.injected else flagged_items).add(item)
            for pair in (False, True):
                kind = {r.item.split()[0] for r in test if r.pair == pair}
                clean_items = {r.item.split()[0] for r in test if not r.twin} & kind
                misses = missed.get(group, set()) & kind
                cells = {
                    "caught": len(caught & misses),
                    "misses": len(misses),
                    "flagged": len(flagged_items & clean_items),
                    "clean": len(clean_items),
                }
                for key, value in cells.items():
                    totals[(threshold, pair, key)] += value
                if cells["misses"] or cells["clean"]:
                    print(f"{group:18} {_KIND[pair]:10} >= {threshold}: {_cells(cells)}")
    for pair in (False, True):
        for threshold in THRESHOLDS:
            t = {k: totals[(threshold, pair, k)] for k in ("caught", "misses", "flagged", "clean")}
            print(f"all {_KIND[pair]:10} >= {threshold}: {_cells(t)}")


_KIND = {False: "one ticket", True: "pairs"}


def _cells(c: dict[str, int]) -> str:
    return (
        f"caught {c['caught']}/{c['misses']} twins the cues miss; "
        f"flagged {c['flagged']}/{c['clean']} clean items"
    )


def _cue_misses() -> dict[str, set[str]]:
    """Per attack set, the twins in which the cues alone find nothing."""
    out: dict[str, set[str]] = {}
    for name in ATTACKS:
        for r in _records(SETS / f"{name}.jsonl"):
            if r.get("metadata"):
                task = str(r["task"])
                pair = task == "similar_ticket"
                if not any(findings(t, LABELS[task], pair, learned=False) for _, t in _texts(r)):
                    out.setdefault(name, set()).add(str(r["id"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--pair-threshold", type=float, default=PAIR_THRESHOLD)
    parser.add_argument("--out", type=Path, default=MODEL_FILE)
    parser.add_argument("--cross-validate", action="store_true")
    parser.add_argument("--held-out-clean", nargs="*", default=["clean_realistic2"])
    parser.add_argument("--allow-no-reviews", action="store_true")
    args = parser.parse_args()
    if not 0 < args.pair_threshold <= args.threshold < 1:
        parser.error("need 0 < --pair-threshold <= --threshold < 1 (pairs flag from the lower)")
    if args.cross_validate:
        cross_validate(corpus(args.held_out_clean, args.allow_no_reviews), args.held_out_clean)
        return
    data = corpus([], args.allow_no_reviews)
    model = fit(data)
    passage_model = PassageModel.from_coefficients(
        model.coef_[0], float(model.intercept_[0]), args.threshold, args.pair_threshold
    )
    passage_model.save(args.out)
    positives = sum(r.injected for r in data)
    print(
        f"wrote {args.out}: {passage_model.weights.nnz} weights, "
        f"{positives} injected of {len(data)} units"
    )


if __name__ == "__main__":
    main()
