"""Items/s through the HTTP endpoint (`tribunal serve`) beside `produce` from a file, in one run
on one embedded valkey, so the ratios hold on a noisy machine.

    python bench/endpoint.py [--items 20000] [--batch 100] [--single-items 2000]
                             [--concurrency 4] [--json]

- file: the records of a JSONL file read by the one reader and sent by ``Producer.send``
  (chunks of 500, one round trip each), as ``tribunal produce FILE`` does;
- batches: the same number of records POSTed to a real ``tribunal serve`` process as JSON
  arrays of ``--batch``, from ``--concurrency`` client threads (httpx, kept-alive
  connections); each answer says what became of each record, so the endpoint stores a
  batch one record per round trip;
- single: ``--single-items`` records, one POST each (a help desk's webhook per ticket).

No workers run and ``max_backlog`` is raised out of the way: only getting items in is
measured. Each run has its own namespace, so every id is new.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workload import records  # noqa: E402  (bench/, beside this file)

from common.connection import connect  # noqa: E402
from common.keys import Keys  # noqa: E402
from common.settings import load_settings  # noqa: E402
from producers.api import Producer  # noqa: E402
from producers.mapping import Reading  # noqa: E402
from producers.readers import records_of  # noqa: E402
from tribunal.processes.embedded import EmbeddedRedis  # noqa: E402

NO_BACKLOG_LIMIT = str(10**9)


def from_file(url: str, path: Path, n: int) -> float:
    """Items/s of ``Producer.send`` over the records of ``path``."""
    settings = load_settings(redis_url=url, namespace="file", max_backlog=int(NO_BACKLOG_LIMIT))
    redis = connect(settings)
    started = time.perf_counter()
    report = Producer(redis, settings).send(records_of(str(path), Reading().for_fleet(settings)))
    seconds = time.perf_counter() - started
    assert report.new == n and redis.xlen(Keys("file").items) == n, report
    return n / seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Endpoint:
    """A ``tribunal serve`` process on ``url``, namespace ``endpoint``, until ``close``."""

    def __init__(self, url: str, log: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
        env |= {
            "TRIBUNAL_REDIS_URL": url,
            "TRIBUNAL_NAMESPACE": "endpoint",
            "TRIBUNAL_MAX_BACKLOG": NO_BACKLOG_LIMIT,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tribunal", "serve", "--port", str(self.port)],
            env=env,
            cwd=log.parent,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"tribunal serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def post(self, body: bytes) -> int:
        """POST one body; how many records it stored (any other answer fails the bench)."""
        response = self.client.post(
            "/items", content=body, headers={"Content-Type": "application/json"}
        )
        reply = response.json()
        assert response.status_code == 200 and not reply["invalid"], response.text
        return int(reply["stored"])

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def timed(post: Callable[[bytes], int], bodies: Sequence[bytes], threads: int) -> float:
    """Items/s storing ``bodies`` from ``threads`` client threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        stored = sum(pool.map(post, bodies))
    return stored / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-bench-"))
    batch = records(args.items, "b")
    single = records(args.single_items, "s")
    path = workdir / "tickets.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records(args.items, "f")))
    with EmbeddedRedis(workdir / "valkey") as server:
        file_rate = from_file(server.url, path, args.items)
        endpoint = Endpoint(server.url, workdir / "serve.log")
        try:
            batches = [
                orjson.dumps(batch[i : i + args.batch]) for i in range(0, args.items, args.batch)
            ]
            batch_rate = timed(endpoint.post, batches, args.concurrency)
            single_rate = timed(endpoint.post, [orjson.dumps(r) for r in single], args.concurrency)
        finally:
            endpoint.close()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "items": args.items,
        "batch": args.batch,
        "single_items": args.single_items,
        "concurrency": args.concurrency,
        "file_items_per_s": file_rate,
        "batch_items_per_s": batch_rate,
        "single_items_per_s": single_rate,
        "batch_vs_file": batch_rate / file_rate,
        "single_vs_file": single_rate / file_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--items", type=int, default=20_000, help="records from the file and in batches"
    )
    parser.add_argument("--batch", type=int, default=100, help="records per POSTed JSON array")
    parser.add_argument("--single-items", type=int, default=2000, help="records POSTed one each")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    f = result["file_items_per_s"]
    print(f"produce from a file     {f:8.0f} items/s")
    print(
        f"POST arrays of {args.batch:<5d}   {result['batch_items_per_s']:8.0f} items/s"
        f"  = {result['batch_vs_file']:.2f}x the file"
    )
    print(
        f"POST one item each      {result['single_items_per_s']:8.0f} items/s"
        f"  = {result['single_vs_file']:.2f}x the file  ({args.concurrency} client threads)"
    )


if __name__ == "__main__":
    main()
