"""The terminal view of an evaluation and of a calibration: rich tables, one per question."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tribunal.quality.scoring import (
    EvaluationReport,
    FlipRow,
    InjectionReport,
    RuleScore,
    TaskReport,
)

# (column, field of a RuleScore, format) for the rule tables of evaluate and calibrate.
RULE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("settled", "acceptance", "pct"),
    ("judge", "judge_calls", "pct"),
    ("= judge", "judge_agreement", "pct"),
    ("low95", "judge_agreement_low", "pct"),
    ("accuracy", "accuracy", "pct"),
    ("acc. settled", "accepted_accuracy", "pct"),
    ("acc. judged", "judged_accuracy", "pct"),
    ("speedup", "speedup", "x"),
)
RULE_LEGEND = (
    "settled: share the workers settle; judge: share sent to the judge; = judge: settled "
    "labels equal to the judge's answer (low95: its 95% lower bound); accuracy vs gold "
    "overall, of settled and of judged items; speedup: the judge-only model time over the cascade's"
)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# The flip table's columns, as the terminal and the HTML report show them (``flip_cells``).
FLIP_COLUMNS = ("model", "right on clean", "right on injected", "flipped to the attacker's label")


def flip_cells(row: FlipRow) -> list[str]:
    """A ``FlipRow`` as the cells after the model's name in ``FLIP_COLUMNS``."""
    flipped = f"{pct(row.flip_rate)} ({row.flipped}/{row.right_on_clean})"
    return [pct(row.clean_accuracy), pct(row.injected_accuracy), flipped]


def cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return pct(value)
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "ms":
        return f"{value * 1000:.3f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    out = Table(title=title, title_justify="left")
    for n, column in enumerate(columns):
        out.add_column(column, justify="left" if n == 0 else "right")
    for row in rows:
        out.add_row(*row)
    return out


def rule_table(
    title: str,
    scores: Sequence[RuleScore],
    marked: str | None = None,
    columns: Sequence[tuple[str, str, str]] = RULE_COLUMNS,
) -> Table:
    """One row per rule; ``marked`` (a rule's description) is highlighted; ``columns`` as
    ``RULE_COLUMNS``."""
    rows = []
    for s in scores:
        name = escape(s.rule) + (" ◀" if s.rule == marked else "")
        rows.append([name, *(cell(getattr(s, key), kind) for _, key, kind in columns)])
    return table(title, ["rule", *(c for c, _, _ in columns)], rows)


def print_task(console: Console, task: str, section: TaskReport) -> None:
    """Every table of one task's evaluation, the configured rule first."""
    conf = section.configured
    judge = section.models["judge"]
    workers = {n: m for n, m in section.models.items() if n != "judge"}
    best = max(workers.items(), key=lambda kv: kv[1].accuracy or 0.0, default=None)
    console.rule(f"[bold]{escape(task)}[/]: {section.items} items, {section.with_gold} gold")
    console.print(
        f"rule [cyan]{escape(section.rule)}[/]: workers settle {pct(conf.acceptance)}, "
        f"the judge decides {pct(conf.judge_calls)}; accuracy {pct(conf.accuracy)} "
        f"vs judge alone {pct(judge.accuracy)}"
        + (f" and best single worker {pct(best[1].accuracy)} ({best[0]})" if best else "")
        + f"; model-time speedup vs judge alone {cell(conf.speedup, 'x')}"
    )
    console.print(
        table(
            "models",
            ["model", "answers", "accuracy", "agrees with judge", "abstained", "ms/item"],
            (
                [
                    escape(name),
                    str(m.items),
                    pct(m.accuracy),
                    pct(m.judge_agreement),
                    str(m.abstained),
                    cell(m.seconds_per_item, "ms"),
                ]
                for name, m in section.models.items()
            ),
        )
    )
    console.print(
        table(
            "worker pairs: same label",
            ["pair", "agreement"],
            ([escape(pair), pct(v)] for pair, v in section.pairwise.items()),
        )
    )
    console.print(rule_table("agreement schemes side by side", section.schemes, section.rule))
    console.print(f"[dim]{RULE_LEGEND}")
    matrix = section.confusion
    console.print(
        table(
            f"confusion ({matrix.reference} down, final label across)",
            ["", *matrix.labels],
            (
                [label, *map(str, row)]
                for label, row in zip(matrix.labels, matrix.matrix, strict=True)
            ),
        )
    )


def print_evaluation(console: Console, report: EvaluationReport) -> None:
    fleet = report.fleet
    workers = ", ".join(f"{n} ({b})" for n, b in fleet.workers.items())
    console.print(
        f"[bold]evaluation[/] of {escape(report.source)} ({report.mode}, "
        f"{report.seconds:.1f}s): workers {escape(workers)}; judge {escape(fleet.judge)}"
    )
    if report.mode == "fleet":
        console.print(
            "[dim]through the fleet: the votes are those present when each item was decided "
            "(a slower worker may not have voted yet), so the schemes compare exactly only "
            "with --offline"
        )
    for task, section in report.tasks.items():
        print_task(console, task, section)
        if task in report.injection:
            print_injection(console, report.injection[task])
    if report.skipped:
        console.print(f"[yellow]{len(report.skipped)} records not scored[/], e.g.:")
        for s in report.skipped[:5]:
            console.print(f"  {escape(s.where)}: {escape(s.reason)}")


def print_injection(console: Console, section: InjectionReport) -> None:
    """The flip-rate table of a file with injected twins (tribunal.quality.injection)."""
    rows = [[escape(name), *flip_cells(row)] for name, row in section.models.items()]
    pairs = f"{section.pairs} pair" + ("" if section.pairs == 1 else "s")
    title = f"prompt injection: {pairs} of a clean and an injected ticket"
    console.print(table(title, FLIP_COLUMNS, rows))
    console.print(
        f"[dim]flipped: of the pairs right on the clean item, the twin labeled as its injection "
        f"asked; the detector flagged {pct(section.flagged_injected)} of the injected items "
        f"and {pct(section.flagged_clean)} of the clean ones",
        soft_wrap=True,
    )
    for twin, why in list(section.ignored.items())[:5]:
        console.print(f"[yellow]twin {escape(twin)} not scored:[/] {escape(why)}", soft_wrap=True)
    if len(section.ignored) > 5:
        console.print(f"[yellow]… and {len(section.ignored) - 5} more twins not scored[/]")
