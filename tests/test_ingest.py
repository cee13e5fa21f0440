"""Files as users have them, read by the one reader that ``produce`` and ``evaluate`` share.

Ticket-system exports and public labeled data sets, as they come: extra fields, no task,
other column names. Each is produced and evaluated (offline, default fleet) without
editing it. Also: a CSV without its text column is refused in one line, up front; the
producer's wait for the workers shows in its progress bar and is logged once; the status
caption tells a capped count from a real one; the report's plots keep every threshold
label apart and every scheme's line in sight.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import orjson
import pytest
import typer.main
from matplotlib.colors import to_rgb
from redis import Redis
from rich.console import Console
from test_cli import cli, flat, items_on_stream  # noqa: F401  (cli: the fixture)
from test_status import status_text

from common.keys import Keys
from common.settings import Settings, load_settings
from common.validation import InvalidItem
from producers.api import Producer
from producers.mapping import CsvColumns, Reading, UnusableSource, default_task
from producers.readers import jsonl_records, records_of
from tribunal.cli.app import app
from tribunal.ops.status import snapshot
from tribunal.quality import report_html
from tribunal.quality.evaluate import run_evaluate
from tribunal.quality.scoring import EvaluationReport

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

SAMPLES = Path(__file__).resolve().parent.parent / "producers" / "samples"
TICKETS = [orjson.loads(line) for line in (SAMPLES / "tickets.jsonl").read_bytes().splitlines()]
PAIRS = [orjson.loads(line) for line in (SAMPLES / "ticket_pairs.jsonl").read_bytes().splitlines()]


def ticket_export(n: int = 40) -> bytes:
    """A help-desk export: no task, the fields the system keeps, one nested."""
    rows = [
        {
            "id": t["id"],
            "text": t["text"],
            "gold": t["gold"],
            "source": "shop" if i % 2 else "mail",
            "created_at": f"2026-03-{i % 28 + 1:02d}T09:00:00Z",
            "customer": {"tier": "gold" if i % 3 else "free", "country": "DE"},
        }
        for i, t in enumerate(TICKETS[:n])
    ]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def data_set(n: int = 40) -> bytes:
    """A public labeled data set: its own names for the text and the label, no id, no task."""
    rows = [{"sentence": t["text"], "label": t["gold"], "split": "test"} for t in TICKETS[:n]]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def csv_export(n: int = 40) -> str:
    """A ticket system's CSV: its own column names, commas and quotes in the text."""
    lines = ["Ticket ID,Subject,Description,Channel,Sentiment"]
    for i, t in enumerate(TICKETS[:n]):
        text = t["text"].replace('"', '""')
        lines.append(f'{t["id"]},"Re: order {i}, again","{text}",email,{t["gold"]}')
    return "\n".join(lines) + "\n"


def evaluate_offline(cli: Any, path: Path, *options: str) -> tuple[Any, dict[str, Any]]:  # noqa: F811
    out = path.parent / f"eval-{path.stem}"
    proc = cli("evaluate", str(path), "--offline", "--out", str(out), *options, timeout=120)
    report = orjson.loads((out / "evaluation.json").read_bytes()) if proc.returncode == 0 else {}
    return proc, report


# --- item 1: extra fields into metadata, --strict, the task of records naming none ------


def reading_of(tmp_path: Path, name: str, data: bytes | str, **how: Any) -> list[Any]:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return list(records_of(str(path), Reading(**how)))


def test_extra_jsonl_fields_go_into_metadata_beside_the_records_own(tmp_path: Path) -> None:
    line = {"id": "a-1", "text": "Screen cracked on arrival.", "gold": "negative"}
    rows = [
        {**line, "source": "shop"},
        {**line, "id": "a-2", "source": "shop", "metadata": {"agent": "Kim"}},
        {**line, "id": "a-3", "source": "shop", "metadata": {"source": "app"}},  # a clash
        {**line, "id": "a-4", "task": "similar_ticket", "text_b": "Cracked screen", "x": None},
    ]
    data = b"\n".join(orjson.dumps(r) for r in rows)
    records = reading_of(tmp_path, "e.jsonl", data, task="sentiment")
    assert records[0][1] == {**line, "task": "sentiment", "metadata": {"source": "shop"}}
    assert records[1][1]["metadata"] == {"agent": "Kim", "source": "shop"}
    assert isinstance(records[2][1], InvalidItem)
    assert "'source' is both a top-level field and in metadata" in str(records[2][1])
    assert records[3][1]["task"] == "similar_ticket"  # a record's own task wins
    assert records[3][1]["metadata"] == {"x": None}


def test_strict_refuses_unknown_fields_per_record_and_unknown_columns_up_front(
    tmp_path: Path,
) -> None:
    data = b'{"text": "ok", "task": "sentiment"}\n{"text": "ok", "task": "sentiment", "s": 1}\n'
    records = reading_of(tmp_path, "s.jsonl", data, strict=True)
    assert records[0][1] == {"text": "ok", "task": "sentiment"}
    assert str(records[1][1]) == "unknown field 's'"
    with pytest.raises(UnusableSource, match=r"columns no item field takes: channel \(--strict"):
        reading_of(tmp_path, "s.csv", "text,task,channel\nhi,sentiment,web\n", strict=True)


def test_extra_fields_count_toward_the_metadata_limit(
    make_settings: Any, redis: Redis, keys: Keys
) -> None:
    s = make_settings(max_metadata_bytes=60)
    lines = [
        b'{"text": "fine", "source": "shop"}\n',
        b'{"text": "long", "note": "' + b"n" * 80 + b'"}\n',
    ]
    records = jsonl_records(iter(lines), "m.jsonl", Reading(task="sentiment"))
    report = Producer(redis, s).send(records)
    assert report.produced == 1
    assert report.invalid == [("m.jsonl:2", "metadata is 91 bytes, over the limit of 60")]
    assert items_on_stream(redis, keys)[0]["metadata"] == {"source": "shop"}


def test_the_task_of_records_naming_none(tmp_path: Path, make_settings: Any) -> None:
    plain = make_settings()
    assert default_task(plain) is None  # two built-in tasks, none configured: no guess
    assert default_task(plain, "similar_ticket") == "similar_ticket"
    assert default_task(make_settings(default_task="sentiment")) == "sentiment"
    assert default_task(make_settings(default_task="sentiment"), "similar_ticket") == (
        "similar_ticket"
    )
    fleet = tmp_path / "one-task.toml"
    fleet.write_text(
        '[tasks.urgency]\nlabels = ["urgent", "routine"]\ninstructions = "How urgent?"\n'
    )
    assert default_task(load_settings(fleet)) == "urgency"
    with pytest.raises(ValueError, match="default_task 'weather' is not a task"):
        make_settings(default_task="weather")
    with pytest.raises(UnusableSource, match="unknown task 'weather'"):
        Reading(task="weather").for_fleet(plain)
    ((_, unresolved),) = reading_of(tmp_path, "n.jsonl", b'{"text": "hi"}\n')
    assert unresolved == {"text": "hi"}  # the Python reader leaves it to the validation
    ((_, refused),) = records_of(str(tmp_path / "n.jsonl"), Reading().for_fleet(plain))
    assert str(refused) == "missing field 'task' (give --task, or set default_task)"


def test_a_ticket_export_is_produced_as_it_is(cli: Any, redis: Redis, keys: Keys) -> None:  # noqa: F811
    (cli.workdir / "export.jsonl").write_bytes(ticket_export(5))
    refused = cli("produce", "export.jsonl")
    assert refused.returncode == 1
    assert "export.jsonl:1: missing field 'task' (give --task" in flat(refused.stderr)

    proc = cli("produce", "export.jsonl", "--task", "sentiment")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"produced 5\b.*skipped 0 invalid", flat(proc.stderr)), proc.stderr
    item = items_on_stream(redis, keys)[0]
    assert (item["id"], item["task"], item["gold"]) == ("t0001", "sentiment", "negative")
    assert item["metadata"] == {
        "source": "mail",
        "created_at": "2026-03-01T09:00:00Z",
        "customer": {"tier": "free", "country": "DE"},
    }

    strict = cli("produce", "export.jsonl", "--task", "sentiment", "--strict")
    assert strict.returncode == 1
    assert "export.jsonl:1: unknown field 'source'" in flat(strict.stderr)


def test_the_default_task_setting_and_a_one_task_fleet(cli: Any, redis: Redis, keys: Keys) -> None:  # noqa: F811
    (cli.workdir / "export.jsonl").write_bytes(ticket_export(3))
    proc = cli("produce", "export.jsonl", env={"TRIBUNAL_DEFAULT_TASK": "sentiment"})
    assert proc.returncode == 0, proc.stderr
    (cli.workdir / "fleet.toml").write_text(
        '[tasks.urgency]\nlabels = ["urgent", "routine"]\ninstructions = "How urgent?"\n'
    )
    (cli.workdir / "new.jsonl").write_bytes(b'{"text": "The site is down for everyone"}\n')
    proc = cli("--fleet", "fleet.toml", "produce", "new.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert [i["task"] for i in items_on_stream(redis, keys)] == ["sentiment"] * 3 + ["urgency"]


def test_a_ticket_export_is_evaluated_as_it_is(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "export.jsonl"
    path.write_bytes(ticket_export())
    proc, report = evaluate_offline(cli, path, "--task", "sentiment")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert "sentiment: 40 items, 40 gold" in proc.stdout.decode()
    assert report["skipped"] == []

    proc, _ = evaluate_offline(cli, path)  # no task anywhere: said once, with what to do
    assert proc.returncode == 2
    assert "export.jsonl:1 (and 39 more): missing field 'task' (give --task" in flat(proc.stdout)


# --- item 2: one reader, one set of options, for produce and evaluate ------------------


def test_produce_and_evaluate_take_the_same_reader_options() -> None:
    command = typer.main.get_command(app)
    options = {
        name: {opt for p in command.commands[name].params for opt in p.opts}  # type: ignore[attr-defined]
        for name in ("produce", "evaluate")
    }
    reader = {"--format", "--task", "--strict", "--text-col", "--text-b-col", "--id-col"}
    reader |= {"--task-col", "--gold-col"}
    assert reader <= options["produce"] and reader <= options["evaluate"]
    # calibrate reads an evaluation report or the live audits, never records
    calibrate = {opt for p in command.commands["calibrate"].params for opt in p.opts}  # type: ignore[attr-defined]
    assert not calibrate & (reader - {"--task"})


def test_a_public_data_set_is_evaluated_with_its_own_field_names(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "dataset.jsonl"
    path.write_bytes(data_set())
    proc, report = evaluate_offline(
        cli, path, "--text-col", "sentence", "--gold-col", "label", "--task", "sentiment"
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert "sentiment: 40 items, 40 gold" in proc.stdout.decode()
    assert [o["id"] for o in report["observations"]][:2] == ["row-1", "row-2"]

    unmapped, _ = evaluate_offline(cli, path, "--task", "sentiment")
    assert unmapped.returncode == 2
    said = flat(unmapped.stdout)
    assert "missing field 'text' (this record has label, sentence, split: name the text's" in said


def test_a_csv_export_is_produced_and_evaluated_with_the_same_options(
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    path = tmp_path / "export.csv"
    path.write_text(csv_export())
    columns = ("--text-col", "Description", "--id-col", "Ticket ID", "--gold-col", "Sentiment")
    proc, report = evaluate_offline(cli, path, *columns, "--task", "sentiment")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert "sentiment: 40 items, 40 gold" in proc.stdout.decode()
    assert report["observations"][0]["id"] == "t0001"

    produced = cli("produce", str(path), *columns, "--task", "sentiment")
    assert produced.returncode == 0, produced.stderr
    item = items_on_stream(redis, keys)[0]
    assert (item["id"], item["gold"], item["text"]) == ("t0001", "negative", TICKETS[0]["text"])
    assert item["metadata"] == {"Subject": "Re: order 0, again", "Channel": "email"}


def test_pairs_without_a_task_take_the_one_given(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(orjson.dumps({**p, "task": None}) + b"\n" for p in PAIRS[:30]))
    proc, report = evaluate_offline(cli, path, "--task", "similar_ticket")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert "similar_offline.toml" in proc.stderr.decode()  # the fleet follows the task given
    assert set(report["tasks"]) == {"similar_ticket"}


# --- item 3: a CSV without the text column, said once ----------------------------------


def test_a_csv_without_its_text_column_is_refused_in_one_line(cli: Any, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "export.csv"
    path.write_text(csv_export(2000))
    for command in (["produce"], ["evaluate", "--offline", "--out", str(tmp_path / "o")]):
        proc = cli(*command, str(path), "--task", "sentiment")
        assert proc.returncode == 2
        said = [line for line in (proc.stdout + proc.stderr).decode().splitlines() if line]
        assert said == [
            f"error: {path} has no column 'text' with the text (columns: Ticket ID, Subject, "
            "Description, Channel, Sentiment): name it with --text-col COLUMN"
        ], (command, said)


def test_csv_columns_named_by_a_flag_or_a_missing_task_are_checked_up_front(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("body,channel\nhello,web\n")
    with pytest.raises(UnusableSource, match=r"no column 'label' with a known label .*--gold-col"):
        list(records_of(str(path), Reading(columns=CsvColumns(text="body", gold="label"))))
    needs_task = Reading(columns=CsvColumns(text="body")).for_fleet(settings)
    with pytest.raises(UnusableSource, match=r"no column 'task' .* give --task NAME"):
        records_of(str(path), needs_task)
    assert len(list(records_of(str(path), Reading(columns=CsvColumns(text="body"))))) == 1


# --- item 5: the wait for the workers, in the bar, logged once --------------------------


def slow_reader(redis_url: str, keys: Keys, stop: threading.Event, per_tick: int = 20) -> None:
    """The one worker group, reading and acking ``per_tick`` entries each 0.1 s."""
    with Redis.from_url(redis_url) as reader:
        while not stop.is_set():
            reply = reader.xreadgroup("worker:slow", "c1", {keys.items: ">"}, count=per_tick)
            for _stream, entries in reply or []:
                reader.xack(keys.items, "worker:slow", *[entry_id for entry_id, _ in entries])
            time.sleep(0.1)


def test_a_stretch_of_waits_is_logged_once_and_reported_to_on_wait(
    redis: Redis, make_settings: Any, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    s = make_settings(max_backlog=40)
    redis.xgroup_create(keys.items, "worker:slow", id="0", mkstream=True)
    seen: list[int] = []
    producer = Producer(redis, s, chunk_size=20, default_task="sentiment", on_wait=seen.append)
    stop = threading.Event()
    reader = threading.Thread(target=slow_reader, args=(s.redis_url, keys, stop), daemon=True)
    reader.start()
    try:
        with caplog.at_level(logging.INFO, logger="producers.api"):
            report = producer.send([{"text": f"ticket {n}"} for n in range(200)])
    finally:
        stop.set()
        reader.join(5)
    assert report.produced == 200 and report.waited_s > 0
    waits = [r for r in caplog.records if "waiting for the workers" in r.getMessage()]
    assert len(waits) == 1, [r.getMessage() for r in waits]
    assert seen.count(0) >= 2  # one wait after another, each ended, one line
    assert {n for n in seen if n} and all(n > s.max_backlog for n in seen if n)


def test_the_progress_bar_shows_the_wait_and_its_clock_runs(
    settings: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(b'{"text": "ticket %d"}\n' % n for n in range(600)))
    redis.xgroup_create(keys.items, "worker:slow", id="0", mkstream=True)
    stop = threading.Event()
    reader = threading.Thread(
        target=slow_reader, args=(settings.redis_url, keys, stop), daemon=True
    )
    reader.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {"TRIBUNAL_REDIS_URL": str(settings.redis_url), "TRIBUNAL_NAMESPACE": settings.namespace}
    env |= {"TRIBUNAL_MAX_BACKLOG": "100", "COLUMNS": "160", "TERM": "xterm"}
    command = [sys.executable, "-m", "tribunal", "produce", str(path), "--task", "sentiment"]
    main, child = pty.openpty()  # a terminal: rich draws a live bar only on one
    proc = subprocess.Popen(
        [*command, "--chunk-size", "50"], stdin=child, stdout=child, stderr=child, env=env
    )
    os.close(child)
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0, shown
    finally:
        proc.kill()
        stop.set()
        reader.join(5)
        os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert any("waiting for the workers (backlog" in line for line in lines), text
    assert any(re.search(r"produced 0:00:0[1-9]", line) for line in lines), text  # it ticks
    logged = [line for line in lines if "producers.api: backlog" in line]
    assert len(logged) == 1, logged
    assert re.match(r"\d\d:\d\d:\d\d INFO", logged[0]), logged  # a line of its own
    assert re.search(r"produced 600\b.*skipped 0 invalid", text), text


# --- item 7: the status caption past the read cap ---------------------------------------


def test_status_caption_does_not_call_a_capped_count_the_minute(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    def caption() -> str:
        return status_text(snapshot(redis, settings))

    pipe = redis.pipeline(transaction=False)
    for n in range(5):
        pipe.xadd(keys.output, {b"d": b'{"n": %d}' % n})
    pipe.execute()
    assert "labels/s (5 in the last minute)" in caption()
    for n in range(1500):
        pipe.xadd(keys.output, {b"d": b'{"n": %d}' % n})
    pipe.execute()
    text = caption()
    assert "1000 in the last minute)" not in text.replace("least 1000", "")
    assert "labels/s over the newest 1000 labels (at least 1000 in the last minute)" in text


# --- item 8: the report's plots ---------------------------------------------------------


def sweep_figure(monkeypatch: pytest.MonkeyPatch, report: EvaluationReport) -> Any:
    """The accuracy / judge-calls figure of the report's first task, before it becomes PNG."""
    figures: list[Any] = []
    monkeypatch.setattr(report_html, "png", lambda fig, alt: figures.append(fig) or "")
    task = next(iter(report.tasks.values()))
    report_html.tradeoff_plot(task, "accuracy")
    return figures[0]


def test_threshold_labels_never_touch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_settings: Any
) -> None:
    out = tmp_path / "eval"
    quiet = Console(file=io.StringIO())
    reading = Reading(task="sentiment")
    assert (
        run_evaluate(make_settings(), str(SAMPLES / "tickets.jsonl"), out, True, reading, quiet)
        == 0
    )
    report = EvaluationReport.model_validate_json((out / "evaluation.json").read_bytes())
    figure = sweep_figure(monkeypatch, report)
    (ax,) = figure.axes
    boxes = [(t.get_text(), t.get_window_extent()) for t in ax.texts]
    assert len(boxes) >= 10
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.padded(report_html.LABEL_GAP / 2 - 0.01).overlaps(box_b), (a, b)
    plt.close(figure)


def test_a_line_sharing_a_stretch_with_another_does_not_hide_it() -> None:
    xs, ys = [0.1, 0.3, 0.5, 0.7, 0.9], [0.2, 0.5, 0.4, 0.7, 0.8]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for n in range(3):  # three schemes with the very same points, the worst case
        ax.plot(xs, ys, **report_html.style(n, 3, f"scheme {n}"))
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    plt.close(fig)

    def shown(color: str) -> int:
        return int((np.abs(pixels - np.array(to_rgb(color))).max(axis=-1) < 0.12).sum())

    counts = [shown(f"C{n}") for n in range(3)]
    assert min(counts) > 0.3 * max(counts), counts
