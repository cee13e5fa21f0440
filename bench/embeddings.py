"""Does a student on a served model's embeddings pay for itself (issue 25)? Review snippets
in stream order (bench/labeled.py; ``--data tickets``: the bundled sentiment tickets), the
first ``--train`` as labels, the next ``--test`` held out; per number of labels, held-out
accuracy and the share a classifier is sure of (top probability >= 0.9) with its accuracy
there, for:

- the student's features: hashed word 1-2-grams with multinomial naive Bayes
  (``consumers.backends.student``'s model; its CPU per item is that of the features alone);
- mean-pooled embeddings from llama-server (``--embeddings --pooling mean``, its
  OpenAI-compatible ``/v1/embeddings``) of each ``--model``, standardised, with an
  L2-regularised logistic regression (C = 0.01: the best of 0.01, 0.1, 1 measured
  2026-12-07); CPU-seconds per item are the server process's, from /proc.

    python bench/embeddings.py [--model qwen2.5-coder-0.5b-instruct ...] [--train 1000]
                               [--test 400] [--data reviews|tickets] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from numpy.typing import NDArray
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import labeled  # noqa: E402  (bench/, beside this file)
import orjson  # noqa: E402
from workload import cpu_seconds  # noqa: E402  (bench/)

from common.settings import LocalModel, load_settings  # noqa: E402
from tribunal.demo import load_sample  # noqa: E402
from tribunal.serving.llama import ModelServers  # noqa: E402

SURE = 0.9


def embed(package: str, texts: list[str]) -> tuple[NDArray[np.float64], float]:
    """Each text's embedding from ``package`` served by llama-server, and the server's CPU
    seconds per text."""
    model = LocalModel(package=package, extra_args=["--embeddings", "--pooling", "mean"])
    with tempfile.TemporaryDirectory() as logs:
        servers = ModelServers({"m": model}, load_settings().model_dir, Path(logs)).start()
        try:
            (server,) = servers.servers
            assert server.process is not None
            before, vectors = cpu_seconds(server.process.pid), []
            with httpx.Client(timeout=600, trust_env=False) as client:
                for i in range(0, len(texts), 16):
                    body = {"input": texts[i : i + 16], "model": "m"}
                    answer = client.post(f"{servers.urls()['m']}/embeddings", json=body)
                    answer.raise_for_status()
                    rows = sorted(answer.json()["data"], key=lambda d: d["index"])
                    vectors += [row["embedding"] for row in rows]
            spent = cpu_seconds(server.process.pid) - before
        finally:
            servers.stop()
    return np.array(vectors, float), spent / len(texts)


def scores(model: object, x: object, gold: NDArray[np.str_]) -> dict[str, float | None]:
    """Held-out accuracy; the share with a top probability >= SURE, and its accuracy."""
    p = model.predict_proba(x)  # type: ignore[attr-defined]
    right = model.classes_[p.argmax(axis=1)] == gold  # type: ignore[attr-defined]
    sure = p.max(axis=1) >= SURE
    return {
        "accuracy": round(float(right.mean()), 3),
        "sure_share": round(float(sure.mean()), 3),
        "sure_accuracy": round(float(right[sure].mean()), 3) if sure.any() else None,
    }


def line(k: int, row: dict[str, float | None]) -> str:
    sure = f"{row['sure_accuracy']:.0%}" if row["sure_accuracy"] is not None else "-"
    return f"  {k:5d} labels: {row['accuracy']:.1%} (sure on {row['sure_share']:.0%}: {sure} right)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--data", choices=["reviews", "tickets"], default="reviews")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    n = args.train + args.test
    records = labeled.reviews(n) if args.data == "reviews" else load_sample("sentiment", n)
    texts = [r["text"] for r in records]
    gold = np.array([r["gold"] for r in records])
    train, test = gold[: args.train], gold[args.train :]
    sizes = [k for k in (50, 100, 200, 400, 1000, 2000) if k < args.train] + [args.train]
    hashed = HashingVectorizer(
        ngram_range=(1, 2), binary=True, alternate_sign=False, n_features=2**18, norm=None
    )
    started = time.process_time()
    features = hashed.transform(texts)
    results = [
        {
            "features": "naive Bayes on hashed 1-2-grams",
            "cpu_s_per_item": (time.process_time() - started) / len(texts),
            "by_labels": {
                k: scores(
                    MultinomialNB().fit(features[:k], train[:k]), features[args.train :], test
                )
                for k in sizes
            },
        }
    ]
    for package in args.model or ["qwen2.5-coder-0.5b-instruct"]:
        vectors, per_item = embed(package, texts)
        x = StandardScaler().fit(vectors[: args.train]).transform(vectors)
        fitted = {k: LogisticRegression(C=0.01, max_iter=5000).fit(x[:k], train[:k]) for k in sizes}
        results.append(
            {
                "features": f"{package} embeddings, logistic regression",
                "cpu_s_per_item": per_item,
                "by_labels": {k: scores(m, x[args.train :], test) for k, m in fitted.items()},
            }
        )
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_NON_STR_KEYS).decode())
        return
    for result in results:
        print(f"{result['features']} ({result['cpu_s_per_item'] * 1000:.3f} CPU-ms per item)")
        for k, row in result["by_labels"].items():
            print(line(k, row))


if __name__ == "__main__":
    main()
