"""The fleet against its own model servers: real local models, one run, one machine.

    python bench/models.py [--fleet examples/local.toml] [--items 24] [--json]

What a user pays for is model time, so these are measured side by side with the same
llama-server processes, on the first ``--items`` bundled tickets:

- alone: each model's server driven directly by its backend at the fleet's concurrency
  (batches of ``batch_size``): items/s, and the server's **CPU seconds per item** (its
  process's user + system time, from /proc: what the item costs the cores, where wall
  time on a shared machine also counts the others); judge-only is the judge's row.
- the fleet: the same items through the whole fleet (producer → worker processes →
  aggregator → judge, embedded valkey): items/s from the first XADD to the last label,
  the judge-call rate, accuracy, each server's CPU seconds per item of the run and its
  prompt-cache hit rate (tokens its server took from its prompt cache, as the fleet
  counts them for ``status``).
- **capacity**: the items/s the cores could label if they did nothing but the models'
  work of this run, ``cores / Σ CPU-s per item`` over the servers (cores: the thread
  budget's count); the fleet's items/s as a share of it says what the queue, Python and
  scheduling leave on the table (goal ≥ 90%, issue 26).
- speedup: judge-only model time over the cascade's, per item.

While the fleet runs, each server's ``/metrics`` (``llamacpp:requests_processing``,
``requests_deferred``) is sampled to show whether its slots were kept busy. Speed is
only ever measured here, never asserted.

    python bench/models.py --feeding …   # bench/feeding.py: one worker's slot occupancy
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import feeding  # noqa: E402  (bench/, beside this file)
from servers import CPUMeter, SlotSampler, label_all  # noqa: E402

from common.connection import connect  # noqa: E402
from common.schemas import Item  # noqa: E402
from common.settings import ModelSpec, Settings, load_settings  # noqa: E402
from consumers.backends import ask, backend_for  # noqa: E402
from tribunal.demo import load_sample  # noqa: E402
from tribunal.fleet.running import running_fleet  # noqa: E402
from tribunal.ops.status import snapshot  # noqa: E402
from tribunal.serving.llama import servers_for  # noqa: E402
from tribunal.serving.warm import warm_prompt_caches  # noqa: E402


def per_role(settings: Settings) -> dict[str, tuple[ModelSpec, str]]:
    """Worker (and "judge") -> its spec and the name of the local model serving it."""
    specs = {**settings.workers, "judge": settings.judge}
    return {role: (spec, str(spec.options.get("model"))) for role, spec in specs.items()}


def alone(settings: Settings, items: list[Item]) -> dict[str, dict[str, float]]:
    """Each model by itself, asked in the fleet's batches at its concurrency, on servers
    warmed as the fleet's are: items/s, server CPU-s per item, prompt-cache hit rate."""
    servers = servers_for(settings, Path("/tmp/tribunal-bench-models")).start()
    out: dict[str, dict[str, float]] = {}
    try:
        warm_prompt_caches(settings, servers.urls(), ["sentiment"])
        live = settings.model_copy(update={"model_urls": servers.urls()})
        pids = {s.name: s.process.pid for s in servers.servers if s.process}
        for role, (spec, model) in per_role(settings).items():
            backend = backend_for(spec, live)
            meter = CPUMeter({model: pids[model]}).start()
            started, prompt, cached = time.perf_counter(), 0, 0
            for i in range(0, len(items), settings.batch_size):
                call = ask(backend, role, items[i : i + settings.batch_size], settings.all_tasks)
                prompt, cached = prompt + call.prompt_tokens, cached + call.cached_tokens
            seconds = time.perf_counter() - started
            cpu = meter.stop()[model]
            out[role] = {
                "items_per_s": round(len(items) / seconds, 3),
                "cpu_s_per_item": round(cpu / len(items), 3),
                "cache_hit_rate": round(cached / prompt, 3) if prompt else 0.0,
            }
            close = getattr(backend, "close", None)
            if close:
                close()
    finally:
        servers.stop()
    return out


def through_fleet(settings: Settings, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The records through the whole fleet: wall time, judge calls, each server's CPU and
    cache hits, slot occupancy, and the capacity the cores had for this run's model work."""
    from rich.console import Console

    from tribunal.fleet.running import wait_until_live

    console = Console(stderr=True)
    with running_fleet(settings, console, "bench: the fleet", tasks=["sentiment"]) as session:
        live = session.settings
        redis = connect(live)
        wait_until_live(redis, live, session.fleet, console)
        servers = session.fleet.servers
        sampler = SlotSampler(servers.urls())
        meter = CPUMeter({s.name: s.process.pid for s in servers.servers if s.process})
        sampler.start()
        meter.start()
        started = time.perf_counter()
        outcome = label_all(session, redis, records, poll_s=0.1)
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        sampler.done.set()
        caches = snapshot(redis, live).prompt_cache
        cores = servers.budget.cores
    n = len(records)
    judged = sum(d.source == "judge" for d in outcome.decisions)
    right = sum(d.label == d.gold for d in outcome.decisions)
    cpu_per_item = {name: round(s / n, 3) for name, s in cpu.items()}
    capacity = cores / max(sum(cpu.values()) / n, 1e-9)
    return {
        "seconds": round(seconds, 1),
        "items_per_s": round(n / seconds, 3),
        "ended": outcome.ended,
        "judge_call_rate": round(judged / max(len(outcome.decisions), 1), 3),
        "accuracy": round(right / max(len(outcome.decisions), 1), 3),
        "cpu_s_per_item": cpu_per_item,
        "cores": cores,
        "capacity_items_per_s": round(capacity, 3),
        "share_of_capacity": round(n / seconds / capacity, 3),
        "cache_hit_rate": {role: c.hit_rate for role, c in caches.items()},
        "slots": sampler.summary(),
    }


def main() -> None:
    if "--feeding" in sys.argv:
        feeding.main([a for a in sys.argv[1:] if a != "--feeding"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", default=str(ROOT / "examples" / "local.toml"))
    parser.add_argument("--items", type=int, default=24, help="tickets (default 24)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--feeding", action="store_true", help="instead: bench/feeding.py (its own flags)"
    )
    args = parser.parse_args()
    settings = load_settings(args.fleet)
    records = load_sample("sentiment", args.items)
    items = [Item(id=r["id"], task=r["task"], text=r["text"], gold=r["gold"]) for r in records]
    print(f"each model alone on {len(items)} tickets ...", file=sys.stderr)
    single = alone(settings, items)
    print("the same tickets through the fleet ...", file=sys.stderr)
    fleet = through_fleet(settings, records)
    workers = {k: v for k, v in single.items() if k != "judge"}
    judge = single["judge"]
    cascade_cpu = sum(w["cpu_s_per_item"] for w in workers.values())
    cascade_cpu += fleet["judge_call_rate"] * judge["cpu_s_per_item"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "items": len(items),
        "alone": single,
        "fleet": fleet,
        "judge_only_seconds": round(len(items) / judge["items_per_s"], 1),
        "speedup_vs_judge_only": round(len(items) / judge["items_per_s"] / fleet["seconds"], 3),
        "cpu_s_per_item": {
            "judge_only": judge["cpu_s_per_item"],
            "cascade": round(cascade_cpu, 3),
        },
    }
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"{'alone':<14}{'items/s':>9}{'CPU-s/item':>12}{'cache hit':>11}")
    for role, row in single.items():
        print(
            f"{role:<14}{row['items_per_s']:>9.2f}{row['cpu_s_per_item']:>12.3f}"
            f"{row['cache_hit_rate']:>11.0%}"
        )
    print(
        f"fleet: {fleet['items_per_s']} items/s over {fleet['seconds']} s, judge calls "
        f"{fleet['judge_call_rate']:.0%}, accuracy {fleet['accuracy']:.0%}; server CPU-s/item "
        f"{fleet['cpu_s_per_item']}; cache hits {fleet['cache_hit_rate']}"
    )
    print(
        f"capacity of {fleet['cores']} cores for this model work: "
        f"{fleet['capacity_items_per_s']} items/s; the fleet ran at "
        f"{fleet['share_of_capacity']:.0%} of it"
    )
    print(
        f"judge alone: {result['judge_only_seconds']} s; speedup of the cascade "
        f"{result['speedup_vs_judge_only']}x; CPU-s per item {result['cpu_s_per_item']}"
    )
    print(f"server slots while the fleet ran: {fleet['slots']}")


if __name__ == "__main__":
    main()
