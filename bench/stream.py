"""A labeled stream through the real fleet, in order, window by window: does the cascade
learn from its judge, and what does a label cost against asking the judge alone?

    python bench/stream.py [--fleet examples/learning.toml] [--data reviews|tickets|pairs|FILE]
                           [--items 1000] [--window 100] [--step 20] [--json] [--plot F.html]

The items are produced ``--step`` at a time, each step once the previous one has ended, so
the judge's labels of earlier items are lessons before later items are voted on (a stream
whose items arrive slower than the fleet labels them). Per window of ``--window`` items:

- judge share: items the judge decided (audits are not counted here: the label stood);
- accuracy: final labels equal to gold; agreement with the judge: on the judge-only sample;
- CPU-seconds per item: what the window cost the cores — the model servers' CPU time and
  the student workers' (from /proc: on a shared 2-core machine, wall time would also count
  the other servers' work), over the window's items; model-seconds per item: the same calls'
  wall time, from the fleet's own ``model_call_seconds`` sums (workers, judge, audits);
- judge-only CPU- and model-seconds per item, measured in the same run: the judge's
  backend asked directly, on the same server, for every ``--sample-every``-th item of the
  window, once the window has ended (the fleet idle), in one batch as the judge consumer
  asks; the ratio is the cascade's CPU-seconds over judge-only's.

The last lines summarise the second half of the stream against issue 25's targets (judge
share <= 25%, accuracy >= judge-only - 1 point, model time <= 0.5x judge-only).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import labeled  # noqa: E402  (bench/, beside this file)
from servers import CPUMeter  # noqa: E402

from common.connection import connect  # noqa: E402
from common.keys import all_partitions  # noqa: E402
from common.metrics import MODEL_CALL  # noqa: E402
from common.schemas import Decision, Item, RawRecord  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from consumers.backends import ask, backend_for  # noqa: E402
from producers.api import Producer  # noqa: E402
from tribunal.demo import load_sample  # noqa: E402
from tribunal.fleet.running import running_fleet, wait_until_live  # noqa: E402
from tribunal.ops.finals import FinalRecords, collect, final_cursors  # noqa: E402


@dataclass
class Window:
    """One window of the stream; every field says what it holds."""

    first_item: int
    items: int
    judge_share: float
    accuracy: float
    agreement_with_judge: float | None
    cpu_seconds_per_item: float
    judge_only_cpu_seconds_per_item: float | None
    model_seconds_per_item: float
    judge_only_model_seconds_per_item: float | None
    judge_only_accuracy: float | None

    @property
    def cost_ratio(self) -> float | None:
        judge = self.judge_only_cpu_seconds_per_item
        return self.cpu_seconds_per_item / judge if judge else None


def load(data: str, n: int) -> list[RawRecord]:
    if data == "reviews":
        return labeled.reviews(n)
    if data in ("tickets", "pairs"):
        return load_sample("sentiment" if data == "tickets" else "similar_ticket", n)
    return labeled.jsonl(Path(data), n)


def model_seconds(redis: object, settings: Settings) -> float:
    """Every model call's seconds so far, summed over workers, judge and partitions."""
    total = 0.0
    prefix = MODEL_CALL.encode()
    for keys in all_partitions(settings.namespace, settings.partitions):
        stats = redis.hgetall(keys.stats)  # type: ignore[attr-defined]
        total += sum(
            float(v) for f, v in stats.items() if f.startswith(prefix) and f.endswith(b"|sum")
        )
    return total


def run(args: argparse.Namespace) -> list[Window]:
    settings = load_settings(args.fleet)
    records = load(args.data, args.items)
    tasks = sorted({str(r.get("task") or settings.default_task) for r in records})
    missing = [t for t in tasks if t not in settings.all_tasks]
    if missing:
        sys.exit(f"the fleet has no task {missing[0]!r} (examples/learning.toml defines 'review')")
    windows: list[Window] = []
    with running_fleet(settings, console(args), "stream bench", tasks=tasks) as session:
        live = session.settings.model_copy(
            update={"model_urls": session.fleet.servers.urls() if session.fleet.servers else {}}
        )
        redis = connect(live)
        wait_until_live(redis, live, session.fleet, console(args))
        judge = backend_for(live.judge, live)
        fleet = session.fleet
        pids = {s.name: s.process.pid for s in fleet.servers.servers if s.process}
        judge_model = str(live.judge.options.get("model"))
        learners = {f"worker:{n}" for n, w in live.workers.items() if w.backend == "student"}
        producer = Producer(redis, live)
        outcome, cursors = FinalRecords(), final_cursors(live)
        for start in range(0, len(records), args.window):
            chunk = records[start : start + args.window]
            before = model_seconds(redis, live)
            students = {c.role: c.process.pid for c in fleet.children if c.process}
            meter = CPUMeter(
                {**pids, **{r: p for r, p in students.items() if r in learners}}
            ).start()
            for s in range(0, len(chunk), args.step):
                producer.send(chunk[s : s + args.step])
                wanted = start + min(s + args.step, len(chunk))
                deadline = time.monotonic() + args.stall_s
                while outcome.ended < wanted and time.monotonic() < deadline:
                    session.fleet.supervise()
                    collect(redis, cursors, outcome)
                    time.sleep(0.05)
                if outcome.ended < wanted:
                    sys.exit(f"stalled: {wanted - outcome.ended} items not ended")
            spent = model_seconds(redis, live) - before
            cpu = sum(meter.stop().values())
            decided = {d.id: d for d in outcome.decisions}
            judge_pid = {judge_model: pids[judge_model]} if judge_model in pids else {}
            windows.append(
                window(start, chunk, decided, (spent, cpu), (judge, judge_pid), live, args)
            )
            report(args, windows[-1])
    return windows


def window(
    start: int,
    chunk: list[RawRecord],
    decided: dict[str, Decision],
    spent: tuple[float, float],
    judge_and_pid: tuple[object, dict[str, int]],
    settings: Settings,
    args: argparse.Namespace,
) -> Window:
    finals = [decided.get(str(r["id"])) for r in chunk]
    sample = [r for i, r in enumerate(chunk) if i % args.sample_every == 0]
    items = [
        Item(id=str(r["id"]), task=str(r.get("task") or settings.default_task), text=r["text"],
             text_b=r.get("text_b"))
        for r in sample
    ]  # fmt: skip
    judge, judge_pid = judge_and_pid
    meter = CPUMeter(judge_pid).start()
    call = ask(judge, "judge", items, settings.all_tasks)  # type: ignore[arg-type]
    judge_cpu = sum(meter.stop().values())
    judge_labels = {item.id: vote.label for item, vote in zip(items, call.votes, strict=True)}
    agree = [
        decided[i].label == label for i, label in judge_labels.items() if i in decided and label
    ]
    judge_right = [label == r["gold"] for r in sample if (label := judge_labels[str(r["id"])])]
    return Window(
        first_item=start,
        items=len(chunk),
        judge_share=sum(1 for d in finals if d and d.source == "judge") / len(chunk),
        accuracy=sum(1 for d, r in zip(finals, chunk, strict=True) if d and d.label == r["gold"])
        / len(chunk),
        agreement_with_judge=sum(agree) / len(agree) if agree else None,
        cpu_seconds_per_item=spent[1] / len(chunk),
        judge_only_cpu_seconds_per_item=judge_cpu / len(items) if items and judge_pid else None,
        model_seconds_per_item=spent[0] / len(chunk),
        judge_only_model_seconds_per_item=call.seconds / len(items) if items else None,
        judge_only_accuracy=sum(judge_right) / len(judge_right) if judge_right else None,
    )


def console(args: argparse.Namespace) -> Console:
    return Console(stderr=args.json)


def report(args: argparse.Namespace, w: Window) -> None:
    """A window's line: on stdout, or on stderr beside --json's document."""
    ratio = f"{w.cost_ratio:.2f}x" if w.cost_ratio is not None else "-"
    agree = f"{w.agreement_with_judge:.0%}" if w.agreement_with_judge is not None else "-"
    judge_acc = f"{w.judge_only_accuracy:.0%}" if w.judge_only_accuracy is not None else "-"
    print(
        f"items {w.first_item:>5}-{w.first_item + w.items - 1:<5} judge {w.judge_share:>4.0%}  "
        f"accuracy {w.accuracy:>4.0%} (judge alone {judge_acc:>4})  agree {agree:>4}  "
        f"CPU-s/item {w.cpu_seconds_per_item:.3f} vs judge-only "
        f"{w.judge_only_cpu_seconds_per_item or 0:.3f} ({ratio})  model-s/item "
        f"{w.model_seconds_per_item:.3f} vs {w.judge_only_model_seconds_per_item or 0:.3f}",
        file=sys.stderr if args.json else sys.stdout,
        flush=True,
    )


def summary(windows: list[Window]) -> dict[str, float | None]:
    """The second half of the stream, weighted by items."""
    half = windows[len(windows) // 2 :] or windows
    n = sum(w.items for w in half)

    def mean(values: list[tuple[float | None, int]]) -> float | None:
        known = [(v, k) for v, k in values if v is not None]
        weight = sum(k for _, k in known)
        return sum(v * k for v, k in known) / weight if weight else None

    judge_only = mean([(w.judge_only_cpu_seconds_per_item, w.items) for w in half])
    cost = sum(w.cpu_seconds_per_item * w.items for w in half) / n
    return {
        "items": n,
        "judge_share": sum(w.judge_share * w.items for w in half) / n,
        "accuracy": sum(w.accuracy * w.items for w in half) / n,
        "judge_only_accuracy": mean([(w.judge_only_accuracy, w.items) for w in half]),
        "agreement_with_judge": mean([(w.agreement_with_judge, w.items) for w in half]),
        "cpu_seconds_per_item": cost,
        "judge_only_cpu_seconds_per_item": judge_only,
        "model_seconds_per_item": sum(w.model_seconds_per_item * w.items for w in half) / n,
        "judge_only_model_seconds_per_item": mean(
            [(w.judge_only_model_seconds_per_item, w.items) for w in half]
        ),
        "cost_ratio": cost / judge_only if judge_only else None,
    }


def plot(path: Path, windows: list[Window], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tribunal.quality.report_html import png

    x = [w.first_item + w.items for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    fig.suptitle(title)
    top.plot(x, [w.judge_share for w in windows], marker="o", label="judge share")
    top.plot(x, [w.accuracy for w in windows], marker="o", label="accuracy (gold)")
    top.set_ylim(0, 1.02)
    top.legend()
    bottom.plot(x, [w.cost_ratio or 0 for w in windows], marker="o", label="CPU / judge-only")
    bottom.axhline(1.0, color="grey", linestyle=":")
    bottom.set_xlabel("items labeled")
    bottom.legend()
    if path.suffix == ".png":
        fig.savefig(path, dpi=80)
        return
    page = (
        f"<html><body><h1>tribunal: learning from the judge</h1>{png(fig, 'curve')}</body></html>"
    )
    path.write_text(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fleet", default=str(ROOT / "examples" / "learning.toml"), help="the fleet file"
    )
    parser.add_argument(
        "--data", default="reviews", help="reviews (Rotten Tomatoes), tickets, pairs or a JSONL"
    )
    parser.add_argument("--items", type=int, default=1000, help="how many items, in order")
    parser.add_argument("--window", type=int, default=100, help="items per row of the table")
    parser.add_argument("--step", type=int, default=20, help="items produced at a time")
    parser.add_argument(
        "--sample-every", type=int, default=10, help="ask the judge alone every N-th item"
    )
    parser.add_argument(
        "--stall-s", type=float, default=600.0, help="give up when no item ends this long"
    )
    parser.add_argument("--json", action="store_true", help="print the windows as JSON")
    parser.add_argument("--plot", type=Path, help="write the learning curve: F.html or F.png")
    args = parser.parse_args()
    try:
        windows = run(args)
    except labeled.DataUnavailable as exc:
        sys.exit(f"stream bench: {exc}")
    result = summary(windows)
    if args.plot:
        plot(args.plot, windows, f"{Path(args.fleet).name}, {args.data}, {args.items} items")
    if args.json:
        print(
            orjson.dumps({"windows": [asdict(w) for w in windows], "second_half": result}).decode()
        )
        return
    print(
        "second half:",
        ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
        ),
    )


if __name__ == "__main__":
    main()
