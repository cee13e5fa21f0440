"""The real ``tribunal`` command line, run as a subprocess against the test Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis

from common.keys import Keys
from common.settings import Settings

COMMANDS = ("demo", "produce", "worker", "aggregator", "judge", "labels", "run")
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def cli(tmp_path: Path, settings: Settings) -> Any:
    """Run ``python -m tribunal ARGS`` in an empty directory (so no .env is read), on the
    test's Redis and namespace; ``env`` entries override (None removes a variable)."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    def run(
        *args: str,
        input: bytes | None = None,
        env: dict[str, str | None] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[bytes]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
        environ.update(
            TRIBUNAL_REDIS_URL=str(settings.redis_url),
            TRIBUNAL_NAMESPACE=settings.namespace,
            TRIBUNAL_BLOCK_MS="200",  # keeps the drain of `labels` short
            COLUMNS="200",  # help text laid out on wide lines, whatever the terminal
        )
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return subprocess.run(
            [sys.executable, "-m", "tribunal", *args],
            input=input,
            cwd=workdir,
            env=environ,
            capture_output=True,
            timeout=timeout,
        )

    run.workdir = workdir  # type: ignore[attr-defined]
    return run


def flat(output: bytes) -> str:
    """Decoded output with runs of whitespace collapsed (rich wraps long lines at 80 columns)."""
    return " ".join(output.decode(errors="replace").split())


def unwrapped(output: bytes) -> str:
    """Output with all whitespace removed, to find paths that rich folded across lines."""
    return "".join(output.decode(errors="replace").split())


def items_on_stream(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"d"]) for _, fields in redis.xrange(keys.items)]


def assert_no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stdout, proc.stdout.decode(errors="replace")


# --- help -------------------------------------------------------------------------------


def test_help_names_every_command(cli: Any) -> None:
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    for command in COMMANDS:
        # one row per command in the command list: the name, then its description
        assert re.search(rf"^\W*{command}\s{{2,}}\w", out, re.MULTILINE), (command, out)


def test_produce_help_explains_the_csv_column_flags(cli: Any) -> None:
    proc = cli("produce", "--help")
    assert proc.returncode == 0, proc.stderr
    out = flat(proc.stdout)
    for flag, what in [
        ("--text-col", "CSV column with the text"),
        ("--text-b-col", "CSV column with the second text"),
        ("--id-col", "CSV column with the item id"),
        ("--task-col", "CSV column with the task"),
        ("--gold-col", "CSV column with a known label"),
    ]:
        assert flag in out, flag
        assert what in out, what
    assert "become metadata" in out
    assert "--format" in out
    assert "--task " in out


# --- produce ----------------------------------------------------------------------------


def test_produce_jsonl_reports_bad_lines_and_produces_the_rest(
    cli: Any, redis: Redis, keys: Keys
) -> None:
    (cli.workdir / "tickets.jsonl").write_bytes(
        b'{"id": "a", "task": "sentiment", "text": "Thank you so much!"}\n'
        b'{"id": "b", "task": "sentiment", "text": \n'
        b'{"id": "c", "task": "sentiment", "text": "My order never arrived."}\n'
        b'{"id": "d", "task": "weather", "text": "Is it sunny?"}\n'
        b'{"id": "e", "task": "sentiment", "text": "How do I reset my password?"}\n'
    )
    proc = cli("produce", "tickets.jsonl")

    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "tickets.jsonl:2: invalid JSON" in err
    assert "tickets.jsonl:4: unknown task 'weather'" in err
    for good_line in (1, 3, 5):
        assert f"tickets.jsonl:{good_line}:" not in err
    assert "produced 3, skipped 2 invalid" in err
    items = items_on_stream(redis, keys)
    assert [i["id"] for i in items] == ["a", "c", "e"]
    assert items[1]["text"] == "My order never arrived."


def test_produce_only_invalid_records_exits_1(cli: Any, redis: Redis, keys: Keys) -> None:
    (cli.workdir / "bad.jsonl").write_bytes(b'{"task": "sentiment"}\n[1, 2]\n')
    proc = cli("produce", "bad.jsonl")
    assert proc.returncode == 1, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "bad.jsonl:1: missing field 'text'" in err
    assert "bad.jsonl:2: expected a JSON object, got list" in err
    assert redis.xlen(keys.items) == 0


def test_produce_csv_with_a_custom_text_column(cli: Any, redis: Redis, keys: Keys) -> None:
    (cli.workdir / "tickets.csv").write_text(
        'id,body,channel\nt1,"Refund, please. Now.",email\nt2,Great service,chat\nt3,,phone\n'
    )
    proc = cli("produce", "tickets.csv", "--text-col", "body", "--task", "sentiment")

    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "tickets.csv:4: text is empty" in err
    assert "produced 2, skipped 1 invalid" in err
    items = items_on_stream(redis, keys)
    assert [(i["id"], i["task"], i["text"]) for i in items] == [
        ("t1", "sentiment", "Refund, please. Now."),
        ("t2", "sentiment", "Great service"),
    ]
    assert [i["metadata"] for i in items] == [{"channel": "email"}, {"channel": "chat"}]


def test_produce_reads_stdin(cli: Any, redis: Redis, keys: Keys) -> None:
    stdin = (
        b'{"task": "sentiment", "text": "from a pipe"}\n'
        b"not json\n"
        b'{"task": "similar_ticket", "text": "a", "text_b": "b", "id": "p-1"}\n'
    )
    proc = cli("produce", "-", input=stdin)

    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "stdin:2: invalid JSON" in err
    assert "produced 2, skipped 1 invalid" in err
    items = items_on_stream(redis, keys)
    assert [i["text"] for i in items] == ["from a pipe", "a"]
    assert items[1]["id"] == "p-1"


def test_produce_stdin_with_default_task_and_csv_format(cli: Any, redis: Redis, keys: Keys) -> None:
    proc = cli(
        "produce", "-", "--format", "csv", "--task", "sentiment", input=b"text\nhello\nbye\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert [(i["task"], i["text"]) for i in items_on_stream(redis, keys)] == [
        ("sentiment", "hello"),
        ("sentiment", "bye"),
    ]


def test_produce_a_missing_file_exits_2_with_a_message(cli: Any, redis: Redis, keys: Keys) -> None:
    proc = cli("produce", "missing.jsonl")
    assert proc.returncode == 2, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "cannot read missing.jsonl" in err
    assert "No such file" in err
    assert redis.xlen(keys.items) == 0


def test_produce_with_redis_unreachable_fails_fast_and_clearly(cli: Any) -> None:
    (cli.workdir / "one.jsonl").write_bytes(b'{"task": "sentiment", "text": "hello"}\n')
    started = time.monotonic()
    proc = cli("produce", "one.jsonl", env={"TRIBUNAL_REDIS_URL": CLOSED_PORT_URL}, timeout=20)
    elapsed = time.monotonic() - started

    assert proc.returncode not in (0, None), proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "cannot reach Redis" in err
    assert "127.0.0.1:1" in err
    assert elapsed < 15


def test_produce_reports_bad_records_whose_data_looks_like_markup(
    cli: Any, redis: Redis, keys: Keys
) -> None:
    (cli.workdir / "odd.jsonl").write_bytes(
        b'{"task": "sentiment", "text": "fine", "[/]": 1}\n'
        b'{"task": "sentiment", "text": "also fine"}\n'
    )
    proc = cli("produce", "odd.jsonl")
    assert redis.xlen(keys.items) == 1
    assert_no_traceback(proc)
    assert proc.returncode == 0
    err = flat(proc.stderr)
    assert "odd.jsonl:1: unknown field '[/]'" in err
    assert "produced 1, skipped 1 invalid" in err


def test_produce_keeps_each_skipped_record_on_one_line(cli: Any, redis: Redis) -> None:
    folder = cli.workdir / ("a-rather-long-directory-name-for-exported-tickets-" * 2)
    folder.mkdir()
    path = folder / "tickets.jsonl"
    path.write_bytes(b'{"task": "sentiment", "text": "ok"}\n{"task": "sentiment"}\n')
    proc = cli("produce", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"{path}:2:missingfield'text'" in unwrapped(proc.stderr)  # reported, if folded
    skipped = [line for line in proc.stderr.decode().splitlines() if line.startswith("skipped")]
    assert skipped == [f"skipped {path}:2: missing field 'text'"], proc.stderr


def test_produce_does_not_claim_to_have_waited_without_backpressure(cli: Any) -> None:
    (cli.workdir / "one.jsonl").write_bytes(b'{"task": "sentiment", "text": "hello"}\n')
    proc = cli("produce", "one.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "produced 1, skipped 0 invalid" in flat(proc.stderr)
    assert b"waited" not in proc.stderr


# --- other commands ---------------------------------------------------------------------


def test_worker_with_an_unknown_name_lists_the_known_workers(cli: Any) -> None:
    proc = cli("worker", "nosuchworker")
    assert proc.returncode != 0
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "nosuchworker" in err
    for known in ("vader", "textblob", "afinn"):
        assert known in err


def test_labels_prints_new_output_once_per_group(cli: Any, redis: Redis, keys: Keys) -> None:
    redis.xadd(keys.output, {"id": "x", "d": b'{"id":"x"}'})

    first = cli("labels", timeout=20)
    assert first.returncode == 0, first.stderr
    assert_no_traceback(first)
    assert first.stdout == b'{"id":"x"}\n'
    assert "wrote 1 labels" in flat(first.stderr)

    second = cli("labels", timeout=20)
    assert second.returncode == 0, second.stderr
    assert second.stdout == b""
    assert "wrote 0 labels" in flat(second.stderr)

    # a new decision is delivered to the same group exactly once more
    redis.xadd(keys.output, {"id": "y", "d": b'{"id":"y"}'})
    third = cli("labels", timeout=20)
    assert third.returncode == 0, third.stderr
    assert third.stdout == b'{"id":"y"}\n'

    # another group gets everything from the start
    other = cli("labels", "--group", "archive", timeout=20)
    assert other.returncode == 0, other.stderr
    assert other.stdout == b'{"id":"x"}\n{"id":"y"}\n'


def test_labels_can_append_to_a_file(cli: Any, redis: Redis, keys: Keys) -> None:
    out = cli.workdir / "labels.jsonl"
    out.write_bytes(b'{"id":"old"}\n')
    redis.xadd(keys.output, {"id": "x", "d": b'{"id":"x"}'})
    proc = cli("labels", "--output", "labels.jsonl", timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert out.read_bytes() == b'{"id":"old"}\n{"id":"x"}\n'


def test_labels_with_redis_unreachable_fails_instead_of_hanging(cli: Any) -> None:
    proc = cli("labels", env={"TRIBUNAL_REDIS_URL": CLOSED_PORT_URL}, timeout=4)
    assert proc.returncode != 0
    assert_no_traceback(proc)
    assert "cannot reach Redis" in flat(proc.stderr)


def test_fleet_file_that_does_not_exist_exits_2(cli: Any, redis: Redis, keys: Keys) -> None:
    (cli.workdir / "one.jsonl").write_bytes(b'{"task": "sentiment", "text": "hello"}\n')
    proc = cli("--fleet", "nope.toml", "produce", "one.jsonl")
    assert proc.returncode == 2, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "fleet file not found" in err
    assert "nope.toml" in unwrapped(proc.stderr)
    assert redis.xlen(keys.items) == 0

    via_env = cli("labels", env={"TRIBUNAL_FLEET_FILE": "missing-fleet.toml"})
    assert via_env.returncode == 2, via_env.stderr
    assert_no_traceback(via_env)
    assert "missing-fleet.toml" in unwrapped(via_env.stderr)
