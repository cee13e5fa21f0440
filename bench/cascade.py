"""Model cost of each voting policy, on the real fleet, against a judge-only baseline.

    python bench/cascade.py [--items 1500] [--quick] [--json]
                            [--accuracy 0.9[,0.9,0.9]] [--judge-accuracy 0.97] [--threshold T]

Why: the method exists to spend less GPU time than asking the large model about every
item. The real fleet (worker, aggregator and judge subprocesses on an embedded valkey)
runs once per policy on the same items, with simulated models whose speed comes from
``CALIBRATION`` and whose answers are seeded per (model, item): every run sees the same
votes, and every figure is a ratio to a baseline measured in the same run.

Calibration: each model has its own vLLM engine on an A100-80GB in bf16 (the 32B judge
just fits), so models overlap in wall time and model-seconds are GPU-seconds. An answer
is a label and an end token, so a call is a ~200-token prefill per item plus ~3 decode
steps for the whole batch. Per item: prefill is compute-bound, 2 x params FLOPs per
token at an assumed share of the 312 TFLOP/s peak (MFU 0.35 for 3B-class models, whose
narrow matrices keep the tensor cores less busy; 0.55 for 32B): ~12-14 ms on a worker,
~76 ms on the judge. Per call: a decode step is memory-bound, reading every weight once
(2 bytes per parameter at 70% of 2.0 TB/s), so it scales inversely with parameter count;
plus ~8 ms of engine work: ~22-25 ms on a worker, ~149 ms on the judge. A batch of 64
costs ~0.78 s on a 3B worker and ~5.0 s on the judge: ~6.5x. These are roofline
estimates, not measurements; edit the dict to match a measured engine. Latencies are
then multiplied by ``time_scale`` (0.25) so a run takes about a minute; the fleet's own
overhead is not scaled, which slightly favours judge-only. Errors are independent across
models (the backend seeds per model); real models err together on hard tickets, so the
cascade's accuracy here is optimistic and its agreement is set by the accuracies alone.

Runs, on the same items:

- ``judge-only``: a fleet whose one worker *is* the judge model (quorum 1): every item
  costs one judge-model call, in the same batches, streams and overhead as the others.
  (A quorum that can never be met would also run the workers; a time computed offline
  would leave the fleet out.)
- ``parallel``: every worker votes on every item, early exit off (the paper's scheme).
- ``parallel+exit``: the same with early exit: a lagging worker skips settled items. It
  saves only when a worker is slower than the others, so the workers differ in size as
  real 3B-class models do (3.1B, 3.2B, 3.8B).
- ``staged``: the first two workers vote; the third (listed last: the largest, the one
  worth sparing) runs only when they split or, with ``--threshold``, a vote is unsure.

Worker model-seconds are the sums of ``model_call_seconds`` in the fleet's stats hash.
"Same decisions" compares every item's final label with the ``parallel`` run: with a
plain majority and seeded workers, staged gives the same label whenever the first two
agree, and when they split the third decides in both, so anything below 100% is a
finding (a vote timeout, see ``timeouts``), not noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from redis import Redis
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import metrics  # noqa: E402
from common.keys import Keys  # noqa: E402
from common.schemas import Item  # noqa: E402
from common.settings import load_settings  # noqa: E402
from consumers.backends.simulated import Simulated  # noqa: E402
from producers.api import Producer  # noqa: E402
from tribunal.fleet.supervisor import Fleet, log_file  # noqa: E402
from tribunal.ops.finals import Cursors, FinalRecords, collect  # noqa: E402
from tribunal.processes.embedded import EmbeddedRedis  # noqa: E402

CALIBRATION: dict[str, Any] = {
    "gpu": "A100-SXM4-80GB, bf16, one vLLM engine per model",
    "peak_tflops": 312.0,  # dense bf16 tensor-core peak, A100 datasheet
    "hbm_tb_per_s": 2.0,  # A100-80GB SXM: 2,039 GB/s, datasheet
    "hbm_efficiency": 0.7,  # share of peak bandwidth a decode step reaches (assumed)
    "prompt_tokens": 200,  # sentiment instructions (~120 tokens) + a short ticket
    "answer_tokens": 3,  # label + end of sequence = decode steps per call
    "engine_ms_per_call": 8.0,  # scheduler, tokenizer, sampling per batch (assumed)
    "batch_size": 64,  # items per model call: the fleet's default batch_size
    "time_scale": 0.25,  # every latency times this, so a run takes about a minute
    # Workers in fleet order: staged asks the first two, the last only on a split.
    "workers": {
        "qwen25-3b": {"params_b": 3.09, "mfu": 0.35, "accuracy": 0.90},
        "llama32-3b": {"params_b": 3.21, "mfu": 0.35, "accuracy": 0.90},
        "phi35-mini": {"params_b": 3.82, "mfu": 0.35, "accuracy": 0.90},
    },
    "judge": {"name": "qwen25-32b", "params_b": 32.8, "mfu": 0.55, "accuracy": 0.97},
}
LABELS = ("positive", "negative", "neutral")  # the built-in sentiment task
POLICIES: dict[str, dict[str, Any]] = {
    "judge-only": {},
    "parallel": {"policy": "parallel", "early_exit": False},
    "parallel+exit": {"policy": "parallel", "early_exit": True},
    "staged": {"policy": "staged", "early_exit": True},
}


def latencies(model: dict[str, Any], cal: dict[str, Any]) -> dict[str, float]:
    """Simulated backend options (scaled ms per call and per item) for one model."""
    params = model["params_b"] * 1e9
    prefill_s = 2 * params * cal["prompt_tokens"] / (cal["peak_tflops"] * 1e12 * model["mfu"])
    step_s = 2 * params / (cal["hbm_tb_per_s"] * 1e12 * cal["hbm_efficiency"])
    call_ms = cal["answer_tokens"] * step_s * 1000 + cal["engine_ms_per_call"]
    scale = cal["time_scale"]
    return {
        "latency_ms_per_call": round(call_ms * scale, 3),
        "latency_ms_per_item": round(prefill_s * 1000 * scale, 3),
    }


def model_options(name: str, model: dict[str, Any], cal: dict[str, Any]) -> dict[str, Any]:
    """Seeded by the model's name: the same answers in every run, unlike any other model's."""
    return {**latencies(model, cal), "accuracy": model["accuracy"], "seed": name}


def all_models(cal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**cal["workers"], cal["judge"]["name"]: cal["judge"]}


def fleet_toml(cal: dict[str, Any], run: str, threshold: float | None) -> str:
    """The fleet file of one run (TOML written by hand: the stdlib only reads TOML)."""
    judge = cal["judge"]
    workers = {judge["name"]: judge} if run == "judge-only" else cal["workers"]
    lines = [f"batch_size = {cal['batch_size']}", "block_ms = 100"]
    for key, value in POLICIES[run].items():
        lines.append(f"{key} = {json.dumps(value)}")
    if threshold is not None and run != "judge-only":
        lines.append(f"confidence_threshold = {threshold}")
    for table, name in [*((f"[workers.{w}]", w) for w in workers), ("[judge]", judge["name"])]:
        options = model_options(name, all_models(cal)[name], cal)
        inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
        lines += ["", table, 'backend = "simulated"', f"options = {{ {inline} }}"]
    return "\n".join(lines) + "\n"


def make_records(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"t{i}", "task": "sentiment", "text": f"ticket {i}", "gold": LABELS[i % 3]}
        for i in range(n)
    ]


def answers(cal: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Every model's label per item, computed in-process exactly as the fleet's backends
    will (same options, same seeds): the agreement structure of the run."""
    tasks = load_settings().all_tasks
    items = [Item.model_validate(r) for r in records]
    out: dict[str, dict[str, str]] = {}
    for name, model in all_models(cal).items():
        backend = Simulated(model_options(name, model, cal), tasks)
        out[name] = {it.id: str(backend.predict(it).label) for it in items}
    out["judge"] = out[cal["judge"]["name"]]  # the judge's verdicts name it "judge"
    return out


def agreement(cal: dict[str, Any], said: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Measured and expected pairwise agreement; a wrong answer is uniform over the other
    labels, so two workers of accuracy p and q agree on pq + (1-p)(1-q)/(L-1)."""
    rows = []
    for a, b in itertools.combinations(cal["workers"], 2):
        p, q = cal["workers"][a]["accuracy"], cal["workers"][b]["accuracy"]
        same = sum(said[a][i] == said[b][i] for i in said[a]) / len(said[a])
        expected = p * q + (1 - p) * (1 - q) / (len(LABELS) - 1)
        rows.append({"pair": f"{a} / {b}", "measured": same, "expected": expected})
    return rows


def wait_until_live(client: Redis, keys: Keys, n: int, timeout: float = 60.0) -> None:
    """Every child's consumer loop has come round once (a heartbeat), so a run's clock
    does not include Python imports."""
    deadline = time.monotonic() + timeout
    while client.zcard(keys.heartbeats) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fleet did not come up within {timeout:.0f}s")
        time.sleep(0.05)


def run_policy(
    server: EmbeddedRedis,
    workdir: Path,
    run: str,
    toml: str,
    records: list[dict[str, Any]],
    stall_s: float = 90.0,
) -> dict[str, Any]:
    """One real fleet, one policy: produce every record, wait for every label, read stats."""
    path = workdir / f"{run}.toml"
    path.write_text(toml)
    namespace = "cascade-" + run.replace("+", "-")
    settings = load_settings(path, redis_url=server.url, namespace=namespace, max_backlog=10**9)
    client, keys = Redis.from_url(server.url), Keys(namespace)
    outcome, cursors = FinalRecords(), Cursors.of([keys])
    with log_file(workdir / run) as logs:
        fleet = Fleet(settings, server.url, log_level="WARNING", log_to=logs).start()
        try:
            wait_until_live(client, keys, len(fleet.children))
            started = time.time()
            Producer(client, settings).send(records)
            seen, last_progress = 0, time.monotonic()
            while outcome.ended < len(records):
                fleet.supervise()
                collect(client, cursors, outcome)
                if outcome.ended > seen:
                    seen, last_progress = outcome.ended, time.monotonic()
                elif time.monotonic() - last_progress > stall_s:
                    raise RuntimeError(f"{run}: stalled at {seen}/{len(records)}; see {logs.name}")
                time.sleep(0.05)
        finally:
            fleet.stop()
    if outcome.rejects or outcome.dead:
        raise RuntimeError(f"{run}: {len(outcome.rejects)} rejects, {len(outcome.dead)} dead")
    stats: dict[bytes, bytes] = client.hgetall(keys.stats)  # type: ignore[assignment]
    return summarize(run, settings.workers, outcome, stats, started)


def summarize(
    run: str,
    workers: dict[str, Any],
    outcome: FinalRecords,
    stats: dict[bytes, bytes],
    started: float,
) -> dict[str, Any]:
    model_s: dict[str, float] = {}
    votes: dict[str, int] = dict.fromkeys(workers, 0)  # stored while the item was open
    skipped = tiebreaks = 0
    for raw, value in stats.items():
        name, labels = metrics.parse_field(raw.decode())
        if name == metrics.MODEL_CALL and raw.endswith(b"|sum"):
            model_s[labels["worker"]] = model_s.get(labels["worker"], 0.0) + float(value)
        elif name == metrics.VOTES:
            votes[labels["worker"]] += int(value)
        elif name == metrics.SKIPPED:
            skipped += int(value)
        elif name == metrics.TIEBREAKS:
            tiebreaks += int(value)
    decisions = outcome.decisions
    judge_only = run == "judge-only"
    worker_s = 0.0 if judge_only else sum(s for w, s in model_s.items() if w != "judge")
    judged = len(decisions) if judge_only else sum(d.source == "judge" for d in decisions)
    return {
        "items": len(decisions),
        "wall_s": max(d.decided_at for d in decisions) - started,
        "judge_fraction": judged / len(decisions),
        "worker_model_s": worker_s,
        "judge_model_s": sum(model_s.values()) - worker_s,
        "model_s_by_worker": model_s,
        "votes_recorded": votes,
        "skipped": skipped,
        "tiebreaks": tiebreaks,
        "timeouts": sum("vote timeout" in d.reason for d in decisions),
        "accuracy": sum(d.label == d.gold for d in decisions) / len(decisions),
        "labels": {d.id: d.label for d in decisions},
        "decisions": {d.id: d.model_dump() for d in decisions},  # as JSON
    }


def vote_mismatches(result: dict[str, Any], said: dict[str, dict[str, str]]) -> int:
    """Votes in the output that differ from the in-process answers (expected: none)."""
    bad = 0
    for d in result["decisions"].values():
        cast = [*d["votes"], *([d["judge"]] if d.get("judge") else [])]
        bad += sum(v["label"] != said.get(v["worker"], {}).get(d["id"], v["label"]) for v in cast)
    return bad


def same_decisions(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    differ = sorted(i for i in a["labels"] if a["labels"][i] != b["labels"].get(i))
    examples = [{"id": i, "parallel": a["decisions"][i], "this": b["decisions"][i]} for i in differ]
    return {"identical": 1 - len(differ) / len(a["labels"]), "differ": differ, "ex": examples[:5]}


def benchmark(cal: dict[str, Any], n: int, threshold: float | None) -> dict[str, Any]:
    records = make_records(n)
    said = answers(cal, records)
    first, second, *_ = cal["workers"]
    workdir = Path(tempfile.mkdtemp(prefix="tribunal-cascade-"))
    with EmbeddedRedis(workdir / "valkey") as server:
        runs = {
            run: run_policy(server, workdir, run, fleet_toml(cal, run, threshold), records)
            for run in POLICIES
        }
    shutil.rmtree(workdir, ignore_errors=True)  # kept only when a run failed: its logs
    ref, staged, base = runs["parallel"], runs["staged"], runs["judge-only"]
    for run, r in runs.items():
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["vote_mismatches"] = vote_mismatches(r, said)
        r["same_as_parallel"] = same_decisions(ref, r) if run != "judge-only" else None
    split = sum(said[first][i] != said[second][i] for i in said[first]) / n
    per_item = {w: latencies(m, cal)["latency_ms_per_item"] for w, m in cal["workers"].items()}
    backup_share = per_item[list(per_item)[-1]] / sum(per_item.values())
    pairs = agreement(cal, said)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {sys.platform}",
        "items": n,
        "threshold": threshold,
        "calibration": cal,
        "latencies": {name: latencies(m, cal) for name, m in all_models(cal).items()},
        "agreement": pairs,
        "mean_agreement": sum(p["measured"] for p in pairs) / len(pairs),
        "first_two_split": split,
        "runs": runs,
        "staged_worker_cut": 1 - staged["worker_model_s"] / ref["worker_model_s"],
        # What staged would save if a call cost nothing but its items.
        "staged_worker_cut_ideal": (1 - staged["tiebreaks"] / n) * backup_share,
        "exit_worker_cut": 1 - runs["parallel+exit"]["worker_model_s"] / ref["worker_model_s"],
    }


def report(r: dict[str, Any], console: Console) -> None:
    cal, lat = r["calibration"], r["latencies"]
    models = Table(title=f"Simulated models: x{cal['time_scale']} of {cal['gpu']}")
    for col in ("model", "params", "ms/call", "ms/item", "accuracy"):
        models.add_column(col, justify="left" if col == "model" else "right")
    for name, m in all_models(cal).items():
        call, item = lat[name]["latency_ms_per_call"], lat[name]["latency_ms_per_item"]
        role = " (judge)" if name == cal["judge"]["name"] else ""
        models.add_row(
            name + role, f"{m['params_b']}B", f"{call:.1f}", f"{item:.2f}", f"{m['accuracy']:.0%}"
        )
    console.print(models)
    pairs = ", ".join(
        f"{p['pair']} {p['measured']:.1%} ({p['expected']:.1%})" for p in r["agreement"]
    )
    console.print(f"pairwise agreement, measured (expected): {pairs}")
    table = Table(title=f"{r['items']} items, batch {cal['batch_size']}, {r['date']}")
    columns = ("policy", "wall s", "vs judge-only", "judged", "worker model-s", "judge model-s")
    for col in (*columns, "skipped", "tiebreaks", "accuracy", "same labels"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for run, x in r["runs"].items():
        same = x["same_as_parallel"]
        table.add_row(
            run,
            f"{x['wall_s']:.2f}",
            f"{x['speedup']:.2f}x",
            f"{x['judge_fraction']:.1%}",
            f"{x['worker_model_s']:.2f}",
            f"{x['judge_model_s']:.2f}",
            str(x["skipped"]),
            str(x["tiebreaks"]),
            f"{x['accuracy']:.1%}",
            "-" if same is None else f"{same['identical']:.1%}",
        )
    console.print(table)
    verdict = "met" if r["staged_worker_cut"] >= 0.25 else "NOT met"
    if r["mean_agreement"] < 0.8:
        verdict = "not applicable (workers agree < 80%)"
    console.print(
        f"staged cuts worker model-seconds by {r['staged_worker_cut']:.1%} vs parallel "
        f"(per-item cost only: {r['staged_worker_cut_ideal']:.1%}; the first two split on "
        f"{r['first_two_split']:.1%}); target ≥ 25% when workers agree ≥ 80% "
        f"(mean {r['mean_agreement']:.1%}): {verdict}"
    )
    console.print(f"early exit cuts worker model-seconds by {r['exit_worker_cut']:.1%}")
    for run, x in r["runs"].items():
        if x["same_as_parallel"] and x["same_as_parallel"]["differ"]:
            ids = ", ".join(x["same_as_parallel"]["differ"][:5])
            console.print(f"[yellow]{run}: labels differ from parallel on {ids} (see --json)")
        if x["vote_mismatches"] or x["timeouts"]:
            console.print(
                f"[yellow]{run}: {x['vote_mismatches']} votes differ from the seeded answers, "
                f"{x['timeouts']} items decided by vote timeout"
            )


def parse_accuracies(text: str, n: int) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        values *= n
    if len(values) != n or not all(0 <= v <= 1 for v in values):
        raise SystemExit(f"--accuracy: one value or {n} values in [0, 1], got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="tiny run (120 items)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--accuracy", default="", help="worker accuracy: one, or one each")
    parser.add_argument("--judge-accuracy", type=float, default=CALIBRATION["judge"]["accuracy"])
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold")
    parser.add_argument("--time-scale", type=float, default=CALIBRATION["time_scale"])
    args = parser.parse_args()
    if args.items < 1:
        parser.error("--items must be at least 1")
    # The bench defines the whole fleet; a TRIBUNAL_* variable would override its files.
    for var in [v for v in os.environ if v.startswith("TRIBUNAL_")]:
        del os.environ[var]
    cal = orjson.loads(orjson.dumps(CALIBRATION))  # a copy to adjust
    if args.accuracy:
        accuracies = parse_accuracies(args.accuracy, len(cal["workers"]))
        for model, accuracy in zip(cal["workers"].values(), accuracies, strict=True):
            model["accuracy"] = accuracy
    cal["judge"]["accuracy"], cal["time_scale"] = args.judge_accuracy, args.time_scale
    result = benchmark(cal, 120 if args.quick else args.items, args.threshold)
    if args.json:
        for x in result["runs"].values():
            del x["labels"], x["decisions"]
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        report(result, Console(width=max(Console().width, 140)))


if __name__ == "__main__":
    main()
