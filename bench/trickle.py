"""Continuous ingestion: how soon a trickled ticket is stored, and what reading costs in bulk.

    python bench/trickle.py [--items 20000] [--trickle 20] [--json]

Two measures, on one embedded valkey, in one run (issue 29):

- **Trickle latency**: a real ``tribunal produce FILE --follow`` and a real ``tribunal
  produce -`` on an open pipe; a ticket is written every 0.3 s and the time from its write
  to its entry in the items stream is taken (XLEN polled every 2 ms). Before issue 29 a
  ticket waited for a chunk of 500, so forever for a trickle.
- **Bulk throughput**: items/s of ``produce`` from a JSONL and a CSV file (the reader:
  ``producers.follow.Lines``, the format's framing and parsing) against the same records
  handed to ``Producer.send`` from memory, the Redis-bound baseline, measured in the same
  run: the ratio is what reading the file costs.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from common.keys import Keys  # noqa: E402
from common.settings import load_settings  # noqa: E402
from producers.api import Producer  # noqa: E402
from producers.readers import followed  # noqa: E402
from tribunal.processes.embedded import EmbeddedRedis  # noqa: E402

GAP_S = 0.3  # between two trickled tickets


def record(n: int, prefix: str) -> dict[str, str]:
    return {"id": f"{prefix}{n}", "task": "sentiment", "text": f"ticket {n}: the printer is down"}


def trickle(url: str, namespace: str, n: int, pipe: bool, workdir: Path) -> list[float]:
    """Seconds from each ticket's write to its entry in the stream, for ``n`` tickets."""
    client, stream = Redis.from_url(url), Keys(namespace).items
    path = workdir / f"{namespace}.jsonl"
    path.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {"TRIBUNAL_REDIS_URL": url, "TRIBUNAL_NAMESPACE": namespace}
    source = "-" if pipe else str(path)
    args = [sys.executable, "-m", "tribunal", "produce", source, *([] if pipe else ["--follow"])]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=workdir
    )
    time.sleep(2.0)  # the interpreter and its imports: not part of a ticket's wait
    waits: list[float] = []
    try:
        for i in range(n):
            line = orjson.dumps(record(i, namespace)) + b"\n"
            written = time.perf_counter()
            if pipe:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            else:
                with path.open("ab") as f:
                    f.write(line)
            while client.xlen(stream) <= i:
                if time.perf_counter() - written > 30:
                    raise SystemExit(f"ticket {i} not stored within 30 s")
                time.sleep(0.002)
            waits.append(time.perf_counter() - written)
            time.sleep(GAP_S)
    finally:
        proc.terminate()
        proc.wait(30)
    return waits


def bulk(url: str, n: int, workdir: Path) -> dict[str, float]:
    """Items/s: from memory, from a JSONL file, from a CSV file (each on its own namespace)."""
    rows = [record(i, "") for i in range(n)]
    jsonl = workdir / "bulk.jsonl"
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["id", "task", "text"])
    writer.writeheader()
    writer.writerows(rows)
    table = workdir / "bulk.csv"
    table.write_text(text.getvalue())

    def rate(namespace: str, source: Any) -> float:
        settings = load_settings(redis_url=url, namespace=namespace, max_backlog=10**9)
        started = time.perf_counter()
        report = Producer(Redis.from_url(url), settings).send(source)
        assert report.produced == n, report
        return n / (time.perf_counter() - started)

    return {
        "memory": rate("mem", rows),
        "jsonl": rate("jsonl", followed(str(jsonl))[0]),
        "csv": rate("csv", followed(str(table))[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="records per bulk file")
    parser.add_argument("--trickle", type=int, default=20, help="tickets trickled per source")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "valkey") as server:
        workdir = Path(tmp)
        rates = bulk(server.url, args.items, workdir)
        waits = {
            "followed file": trickle(server.url, "file", args.trickle, False, workdir),
            "open pipe": trickle(server.url, "pipe", args.trickle, True, workdir),
        }
    latency = {
        name: {
            "p50_ms": 1000 * statistics.median(w),
            "max_ms": 1000 * max(w),
            "tickets": len(w),
        }
        for name, w in waits.items()
    }
    report = {
        "machine": f"{os.cpu_count()} cores",
        "trickle_latency": latency,
        "bulk_items_per_s": rates,
        "bulk_vs_memory": {k: rates[k] / rates["memory"] for k in ("jsonl", "csv")},
    }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    for name, row in latency.items():
        print(
            f"trickle, {name}: stored {row['p50_ms']:.0f} ms after its write (median), "
            f"{row['max_ms']:.0f} ms at most, {row['tickets']} tickets"
        )
    for name in ("memory", "jsonl", "csv"):
        ratio = f" ({rates[name] / rates['memory']:.2f}x from memory)" if name != "memory" else ""
        print(f"bulk, {name}: {rates[name]:,.0f} items/s{ratio}")


if __name__ == "__main__":
    main()
