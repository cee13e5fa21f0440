"""The evaluation report as one self-contained HTML page, for choosing how to configure a fleet.

Everything the page needs is inline (CSS, plots as base64 PNG), so it can be mailed,
attached to a ticket or opened offline. Every string taken from the report is escaped:
ids, reasons and model names come from user files.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Literal, TypedDict

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display: the page is rendered on servers and in CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from matplotlib.transforms import Bbox

from tribunal.quality.report import FLIP_COLUMNS, flip_cells
from tribunal.quality.scoring import Confusion, EvaluationReport, ModelRow, RuleScore, TaskReport

Metric = Literal["accuracy", "judge_agreement"]  # the quality a trade-off plot shows
Dash = str | tuple[int, tuple[int, ...]]  # a matplotlib line style
Point = tuple[float, float, float | None]  # judge calls, quality, threshold
Mark = tuple[float, float, str, str]  # x, y, label, colour
DASH, TIMES = "\u2013", "\u00d7"  # escapes: ruff flags look-alike characters in literals
MARKERS = "osD^v"
DASHES: list[Dash] = ["-", (0, (5, 3)), (0, (1, 2)), (0, (6, 2, 1, 2)), (0, (3, 3))]
LABEL_GAP = 3  # pixels kept clear around a threshold label
LABEL: dict[str, Any] = {"fontsize": 7, "va": "center"}
RING: dict[str, Any] = dict(s=300, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
ALIGN = {-1: "right", 0: "center", 1: "left"}
# Where a threshold label may go around its point (offset in points), tried in order.
AROUND = ((7, 0), (-7, 0), (0, 9), (0, -9), (5, 8), (5, -8), (-5, 8), (-5, -8))
SPOTS = [(r * x, r * y) for r in (1, 2.2) for x, y in AROUND]  # near first, then farther out
RATES = ("acceptance", "judge_calls", "accuracy", "accepted_accuracy", "judged_accuracy")
RULE_HEADERS = "rule|acceptance|judge calls|accuracy|accuracy of settled|accuracy of judged|"
RULE_HEADERS += "agreement with judge (95% low)|speedup"
MODEL_HEADERS = "model|backend|items|accuracy vs gold|agreement with judge|abstained|time / item"
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h2 { border-bottom: 2px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } tr.mark { background: #fff4cc; font-weight: 600; }
.headline { background: #f6f8fa; border-left: 4px solid #4a7; padding: .6em 1em; }
.warn { color: #a40; font-weight: 600; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
img { max-width: 100%; } dt { font-weight: 600; float: left; width: 7em; } dd { margin-left: 8em; }
"""


def pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def duration(seconds: float | None) -> str:
    """Small models answer in microseconds, which would print as 0.000 s."""
    if seconds is None:
        return DASH
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def ratio(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}{TIMES}"


def threshold_text(t: float | None) -> str:
    return "off" if t is None else f"{t:g}"


def esc(x: object) -> str:
    return html.escape(str(x))


def table(headers: str, rows: Iterable[Sequence[object]], mark: int = -1) -> str:
    """Every table of the page (headers "a|b|c"); cells are escaped here, so none is missed."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers.split("|"))
    body = "".join(
        f"<tr{' class=mark' if i == mark else ''}>"
        + "".join(f"<td>{esc(c)}</td>" for c in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def png(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


class LineStyle(TypedDict):
    """Keyword arguments of ``Axes.plot`` for one line of a plot (``style``)."""

    label: str
    color: str
    ls: Dash
    marker: str
    ms: float
    mfc: str
    mew: float
    lw: float


class Legend(TypedDict):
    """Keyword arguments of ``Axes.legend`` (``finish``)."""

    loc: Literal["upper left", "upper center"]
    bbox_to_anchor: tuple[float, float]
    fontsize: int


def metric_of(row: RuleScore | ModelRow, metric: Metric) -> float | None:
    """The share ``metric`` names (accuracy vs gold, or agreement with the judge) of a row."""
    return row.accuracy if metric == "accuracy" else row.judge_agreement


def families(sweep: Sequence[RuleScore]) -> dict[str, list[RuleScore]]:
    """Sweep rows by rule without its threshold. Families with identical results are merged
    (with three workers majority 3/3 is unanimous 3/3), so no line silently hides another."""
    by_rule: dict[str, list[RuleScore]] = {}
    for row in sweep:
        by_rule.setdefault(row.rule.partition(",")[0], []).append(row)
    merged: dict[tuple[Any, ...], tuple[list[str], list[RuleScore]]] = {}
    for name, rows in by_rule.items():
        key = tuple((r.acceptance, r.accuracy, r.judge_agreement) for r in rows)
        merged.setdefault(key, ([], rows))[0].append(name)
    return {" = ".join(names): rows for names, rows in merged.values()}


def label_runs(points: Sequence[Point], span: float) -> list[tuple[Point, str]]:
    """One label per run of nearby points ("off-0.6"): eleven labels per line would pile up."""
    runs: list[list[Point]] = []
    for p in points:
        first = runs[-1][0] if runs else p
        if runs and math.dist((p[0], p[1] / span), (first[0], first[1] / span)) < 0.025:
            runs[-1].append(p)
        else:
            runs.append([p])
    ends = [(threshold_text(run[0][2]), threshold_text(run[-1][2])) for run in runs]
    return [(run[0], a if a == b else a + DASH + b) for run, (a, b) in zip(runs, ends, strict=True)]


def obstacles(ax: Axes) -> list[Bbox]:
    """Display boxes along every line and around every scatter mark, for labels to avoid."""
    boxes: list[Bbox] = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
        for (x0, y0), (x1, y1) in itertools.pairwise(xy):
            n = int(math.dist((x0, y0), (x1, y1)) / 5) + 1
            boxes += [square(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, 5) for i in range(n)]
        boxes += [square(x, y, 6) for x, y in xy]
    for marks in ax.collections:
        offsets = np.asarray(marks.get_offsets(), dtype=float)
        boxes += [square(x, y, 14) for x, y in marks.get_offset_transform().transform(offsets)]
    return boxes


def square(x: float, y: float, r: float) -> Bbox:
    return Bbox.from_extents(x - r, y - r, x + r, y + r)


def place_labels(fig: Figure, ax: Axes, marks: Sequence[Mark]) -> None:
    """Each label takes the first spot around its point that covers no line, mark or earlier
    label, or is left out (the tables hold every number): piled-up labels help no one."""
    fig.draw_without_rendering()  # settles the layout, so the extents below are final
    taken, frame = obstacles(ax), ax.get_window_extent()
    for x, y, text, color in marks:
        for dx, dy in SPOTS:
            how = {**LABEL, "color": color, "ha": ALIGN[(dx > 0) - (dx < 0)]}
            put = partial(ax.annotate, text, (x, y), (dx, dy), "data", "offset points", **how)
            label = put()
            box = label.get_window_extent()
            label.remove()
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box.padded(LABEL_GAP))  # "0.8" and "0.85" never touch
                far = abs(dx) + abs(dy) > 14  # a leader line ties a distant label to its point
                put(arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5} if far else None)
                break


def style(n: int, count: int, name: str) -> LineStyle:
    """Line ``n`` of ``count``: earlier lines wider and solid, later ones narrower and dashed
    with hollow marks, so where two share a stretch the one beneath shows through the gaps
    and around the marks."""
    wide = count - n
    return LineStyle(
        label=name,
        color=f"C{n}",
        ls=DASHES[n % len(DASHES)],
        marker=MARKERS[n % len(MARKERS)],
        ms=2 * wide + 3,
        mfc="none" if n else f"C{n}",
        mew=1.2,
        lw=1.1 * wide + 0.7,
    )


def tradeoff_plot(task: TaskReport, metric: Metric) -> str:
    """What each rule buys: quality (y) against the share of items paying for the judge (x)."""
    fig, ax = plt.subplots(figsize=(10, 5.6), layout="constrained")
    lines = families(task.sweep)
    values = [v for rows in lines.values() for r in rows if (v := metric_of(r, metric)) is not None]
    span = (max(values) - min(values) if values else 0.0) or 1.0  # y is scaled by it
    marks: list[Mark] = []
    for n, (name, rows) in enumerate(lines.items()):
        points: list[Point] = [
            (r.judge_calls, v, r.threshold) for r in rows if (v := metric_of(r, metric)) is not None
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], **style(n, len(lines), name))
        for (x, y, _), text in label_runs(points, span):
            if not any(math.dist((x, y), m[:2]) < 1e-9 for m in marks):
                marks.append((x, y, text, f"C{n}"))
    workers = {
        k: v
        for k, m in task.models.items()
        if k != "judge" and (v := metric_of(m, metric)) is not None
    }
    if workers:
        best = max(workers, key=lambda k: workers[k])
        share = workers[best]
        ax.axhline(share, ls=":", color="gray", label=f"best worker ({best}): {pct(share)}")
    judge = task.models["judge"].accuracy if "judge" in task.models else None
    if metric == "accuracy" and judge is not None:
        ax.axhline(judge, ls="--", color="black", label=f"judge only: {pct(judge)}")
    configured = metric_of(task.configured, metric)
    if configured is not None:
        where = [task.configured.judge_calls], [configured]
        ax.scatter(*where, label=f"configured: {task.rule}", **RING)
    gold = metric == "accuracy"
    quality = "Accuracy" if gold else "Agreement with judge"
    ax.set(
        title=f"{quality} vs judge calls; point labels: confidence threshold (off = none)",
        xlabel="judge calls (share of items sent to the judge)",
        ylabel="accuracy vs gold" if gold else "agreement with judge, worker-settled (no gold)",
        xlim=(-0.04, 1.08),
    )
    ax.margins(y=0.08)
    finish(ax, Legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8), percent_x=True)
    place_labels(fig, ax, marks)
    return png(fig, f"{quality} vs judge calls")


def finish(ax: Axes, legend: Legend, percent_x: bool = False) -> None:
    """Percent axes, grid and legend: shared by the line plots."""
    if percent_x:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def acceptance_plot(task: TaskReport) -> str:
    """Where the threshold starts to bite: the share the workers settle at each threshold."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    lines = families(task.sweep)
    for n, (name, rows) in enumerate(lines.items()):
        xs = [threshold_text(r.threshold) for r in rows]
        ax.plot(xs, [r.acceptance for r in rows], **style(n, len(lines), name))
    ax.set(title="Acceptance vs confidence threshold", xlabel="confidence threshold")
    ax.set(ylabel="acceptance (settled by the workers)", ylim=(-0.03, 1.05))
    finish(ax, Legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7))
    return png(fig, "Acceptance vs confidence threshold")


def confusion_plot(confusion: Confusion) -> str:
    """Counts, reference in rows; the "none" row and column are dropped when empty."""
    labels: list[str] = list(confusion.labels)
    matrix: list[list[int]] = [list(r) for r in confusion.matrix]
    if labels[-1:] == ["none"] and not any(matrix[-1]) and not any(r[-1] for r in matrix):
        labels, matrix = labels[:-1], [r[:-1] for r in matrix[:-1]]
    size = 1.8 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 0.6, size), layout="constrained")
    ax.imshow(matrix, cmap="Blues", vmin=0)  # from zero, so the shade is the count
    top = max((c for r in matrix for c in r), default=0)
    for i, r in enumerate(matrix):
        for j, count in enumerate(r):
            color = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    title = f"Confusion matrix ({confusion.reference} vs final label)"
    ax.set(title=title, xlabel="final label (configured rule)")
    ax.set_ylabel(f"reference: {confusion.reference}")
    return png(fig, title)


def rule_row(r: RuleScore) -> list[str]:
    agreement = f"{pct(r.judge_agreement)} (\u2265 {pct(r.judge_agreement_low)})"
    return [r.rule, *(pct(getattr(r, k)) for k in RATES), agreement, ratio(r.speedup)]


def model_row(name: str, r: ModelRow, backend: str) -> list[object]:
    rates = pct(r.accuracy), pct(r.judge_agreement)
    return [name, backend, r.items, *rates, r.abstained, duration(r.seconds_per_item)]


def headline(task: TaskReport) -> str:
    """The configured rule in a few sentences, its costs stated even when they are bad."""
    c, judge = task.configured, task.models.get("judge")
    parts = [
        f"Configured rule <b>{esc(task.rule)}</b>: the workers settle {pct(c.acceptance)}"
        f" of {task.items} items, {pct(c.judge_calls)} go to the judge."
    ]
    if c.accuracy is not None:
        parts.append(
            f"Accuracy <b>{pct(c.accuracy)}</b> vs <b>{pct(judge.accuracy if judge else None)}</b> "
            f"judge-only ({task.with_gold} items with gold)."
        )
    else:
        parts.append("No gold labels: quality below is agreement with the judge.")
    parts.append(
        f"Settled labels agree with the judge on {pct(c.judge_agreement)} "
        f"(95% lower bound {pct(c.judge_agreement_low)})."
    )
    speed = f"Speedup {ratio(c.speedup)} (judge-only / cascade model-seconds)."
    if c.speedup is not None and c.speedup < 1:
        speed = f'<span class="warn">{speed} Below 1: the cascade costs more than the judge.</span>'
    return '<p class="headline">' + " ".join([*parts, speed]) + "</p>"


def task_section(name: str, task: TaskReport, backends: dict[str, str]) -> str:
    models = [model_row(m, r, backends.get(m, "")) for m, r in task.models.items()]
    pairs = [[p, pct(v)] for p, v in task.pairwise.items()]
    configured = next((i for i, r in enumerate(task.schemes) if r.rule == task.rule), -1)
    metric: Metric = "accuracy" if task.configured.accuracy is not None else "judge_agreement"
    with plt.rc_context({"text.parse_math": False}):  # a "$" in user text is no TeX
        plots = tradeoff_plot(task, metric) + confusion_plot(task.confusion) + acceptance_plot(task)
    return "\n".join(
        [
            f"<h2>Task: {esc(name)}</h2>",
            headline(task),
            f"<h3>Models</h3>{table(MODEL_HEADERS, models)}",
            f"<h3>Worker agreement</h3>{table('workers|same label', pairs)}",
            "<h3>Agreement schemes</h3>",
            table(RULE_HEADERS, map(rule_row, task.schemes), mark=configured),
            f'<h3>Plots</h3><div class="plots">{plots}</div>',
            "<details><summary>All candidate rules</summary>",
            f"{table(RULE_HEADERS, map(rule_row, task.sweep))}</details>",
        ]
    )


def render_html(report: EvaluationReport) -> str:
    """The whole page: how the answers were collected, then one section per task."""
    fleet, tasks, skipped = report.fleet, report.tasks, report.skipped
    backends = {**fleet.workers, "judge": fleet.judge}
    facts = {
        "source": report.source,
        "mode": report.mode,
        "run time": duration(report.seconds),
        "workers": ", ".join(f"{w} ({b})" for w, b in fleet.workers.items()),
        "judge": fleet.judge,
        "rule": fleet.rule,
        "policy": fleet.policy,
        "items": sum(t.items for t in tasks.values()),
        "skipped": len(skipped),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tribunal evaluation: {esc(report.source)}</title>",
        f"<style>{CSS}</style></head><body><h1>Evaluation report</h1><h2>Run</h2><dl>",
        *(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts.items()),
        "</dl>",
    ]
    if skipped:
        shown = [[s.where, s.reason] for s in skipped[:10]]
        parts += ["<h3>Skipped items</h3>", table("where|reason", shown)]
        if len(skipped) > 10:
            parts.append(f"<p>... and {len(skipped) - 10} more.</p>")
    parts += [task_section(name, task, backends) for name, task in tasks.items()]
    for name, inj in report.injection.items():
        rows = [[model, *flip_cells(row)] for model, row in inj.models.items()]
        title = f"<h3>Prompt injection: {esc(name)}, {inj.pairs} pairs</h3>"
        parts += [title, table("|".join(FLIP_COLUMNS), rows)]
    if not tasks:
        parts.append("<p>No item could be scored.</p>")
    return "\n".join([*parts, "</body></html>"])
