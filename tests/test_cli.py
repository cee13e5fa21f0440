"""The real ``tribunal`` command line, run as a subprocess against the test Redis."""

from __future__ import annotations

import os
import re
import signal
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

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

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
        timeout: float = 120,  # a hang guard, generous: the suite runs two processes per core
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
    proc = cli("produce", "odd.jsonl", "--strict")
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
    lines = proc.stderr.decode().splitlines()
    assert [line for line in lines if f"{path}:2" in line] == [
        next(
            line
            for line in lines
            if line.endswith(f"WARNING producers.api: {path}:2: missing field 'text'")
        )
    ], proc.stderr
    assert "skipped 1 invalid (each named above)" in flat(proc.stderr)


def test_produce_lists_what_it_skipped_when_warnings_are_not_logged(cli: Any) -> None:
    (cli.workdir / "t.jsonl").write_bytes(b'{"task": "sentiment", "text": "ok"}\n{"task": 1}\n')
    proc = cli("--log-level", "ERROR", "produce", "t.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr.decode()
    assert "skipped t.jsonl:2: " in flat(proc.stderr)
    assert "produced 1, skipped 1 invalid" in flat(proc.stderr)
    assert "named above" not in flat(proc.stderr)


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


def test_a_label_reader_that_is_gone_is_forgotten_and_retention_trims_again(
    cli: Any, redis: Redis, keys: Keys
) -> None:
    from consumers.retention import trim

    old = redis.xadd(keys.output, {"id": "x", "d": b'{"id":"x"}'}, id="1-0")  # long ago
    assert cli("labels", "--group", "gone", timeout=20).returncode == 0  # read it, never back
    redis.xadd(keys.output, {"id": "y", "d": b'{"id":"y"}'}, id="2-0")  # unread by "gone"
    assert trim(redis, keys.output, None, max_age_s=1, approximate=False) == 1  # only x
    assert [eid for eid, _ in redis.xrange(keys.output)] == [b"2-0"] and old == b"1-0"

    proc = cli("labels", "--group", "gone", "--forget", timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""  # nothing read
    assert "forgot the label reader 'gone'" in flat(proc.stderr)
    assert redis.xinfo_groups(keys.output) == []
    assert trim(redis, keys.output, None, max_age_s=1, approximate=False) == 1  # y too now

    again = cli("labels", "--group", "gone", "--forget", timeout=20)
    assert again.returncode == 1
    assert flat(again.stderr) == "error: no label reader's group 'gone' on the output stream"


def test_a_label_reader_that_is_reading_is_not_forgotten(
    cli: Any, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Deleting the group under a running `labels --follow` would make it recreate the group
    and write every kept label again."""
    redis.xadd(keys.output, {"id": "x", "d": b'{"id":"x"}'})
    follower = started(cli.workdir, on(settings), "labels", "--follow", "--group", "live")
    try:
        wait_for(
            lambda: redis.exists(keys.output) and _consumers(redis, keys, "live"),
            30,
            "the follower to join its group",
        )
        proc = cli("labels", "--group", "live", "--forget", timeout=20)
        assert proc.returncode == 1, proc.stderr
        assert "error: label reader 'live' is reading now (consumer labels@" in flat(proc.stderr)
        assert _consumers(redis, keys, "live")  # the group is still there
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(30)


def _consumers(redis: Redis, keys: Keys, group: str) -> int:
    groups: Any = redis.xinfo_groups(keys.output)
    return sum(int(g["consumers"]) for g in groups if g["name"] == group.encode())


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


# --- field faults: repeated, unconfirmed and interrupted produce; every command, Redis dead --

ROOT = Path(__file__).resolve().parent.parent


def started(workdir: Path, env: dict[str, str], *args: str) -> Any:
    """``python -m tribunal ARGS`` in ``workdir`` with ``env`` as its TRIBUNAL_* settings,
    started in a process group of its own (as a terminal's foreground job), stdin a pipe,
    stderr to a file (``.err`` holds its path)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    environ |= {"COLUMNS": "200", **env}
    err = workdir / f"stderr-{time.monotonic_ns()}.txt"
    with open(err, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tribunal", *args],
            cwd=workdir,
            env=environ,
            stdin=subprocess.PIPE,
            stderr=sink,
            start_new_session=True,
        )
    proc.err = err  # type: ignore[attr-defined]
    return proc


def on(settings: Settings) -> dict[str, str]:
    """The environment of a command on the test's Redis and namespace."""
    return {"TRIBUNAL_REDIS_URL": str(settings.redis_url), "TRIBUNAL_NAMESPACE": settings.namespace}


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)


def finished(proc: Any, timeout: float) -> bytes:
    """The process's stderr once it has exited (killed, and the test failed, if it does not)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {timeout:.0f}s: {proc.err.read_bytes()[-2000:]!r}")
    return bytes(proc.err.read_bytes())


def test_producing_the_same_records_again_reports_them_already_known(
    cli: Any, redis: Redis, keys: Keys
) -> None:
    (cli.workdir / "two.jsonl").write_bytes(
        b'{"id": "k1", "task": "sentiment", "text": "one"}\n'
        b'{"id": "k2", "task": "sentiment", "text": "two"}\n'
    )
    first = cli("produce", "two.jsonl")
    assert first.returncode == 0, first.stderr
    assert "produced 2, skipped 0 invalid" in flat(first.stderr)
    again = cli("produce", "two.jsonl")
    assert again.returncode == 0, again.stderr
    assert_no_traceback(again)
    assert "produced 0 new, 2 already known (not added again), skipped 0 invalid" in flat(
        again.stderr
    )
    assert redis.xlen(keys.items) == 2


def test_produce_waits_for_a_replica_longer_than_the_old_socket_timeout(
    cli: Any, redis: Redis, keys: Keys
) -> None:
    """A real WAIT of 12 s with no replica attached (the socket timeout used to be block_ms +
    10 s): the items are reported stored but unconfirmed, exit 0, each added once."""
    (cli.workdir / "three.jsonl").write_bytes(
        b"".join(b'{"task": "sentiment", "text": "t%d"}\n' % n for n in range(3))
    )
    wait = {"TRIBUNAL_WAIT_REPLICAS": "1", "TRIBUNAL_WAIT_TIMEOUT_MS": "12000"}
    proc = cli("produce", "three.jsonl", env=wait, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    err = flat(proc.stderr)
    assert "produced 3, skipped 0 invalid" in err
    assert "3 items were stored but not confirmed by 1 replicas within 12000 ms" in err
    assert redis.xlen(keys.items) == 3


def test_ctrl_c_on_produce_from_a_pipe_stores_what_was_read_and_exits_130(
    cli: Any, settings: Settings, redis: Redis, keys: Keys
) -> None:
    proc = started(cli.workdir, on(settings), "produce", "-", "--chunk-size", "1")
    try:
        proc.stdin.write(
            b'{"task": "sentiment", "text": "a"}\n{"task": "sentiment", "text": "b"}\n'
        )
        proc.stdin.flush()
        wait_for(lambda: redis.xlen(keys.items) == 2, 30, "two items stored")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the foreground group
        err = finished(proc, 20)  # the read waiting on the pipe is cut short
    finally:
        proc.stdin.close()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err, err
    assert "interrupted (SIGINT): produced 2, skipped 0 invalid; stopped reading after stdin:2" in (
        flat(err)
    )
    assert redis.xlen(keys.items) == 2


def test_a_second_ctrl_c_stops_produce_at_once_while_it_waits_for_the_workers(
    cli: Any, settings: Settings, redis: Redis, keys: Keys
) -> None:
    env = on(settings) | {"TRIBUNAL_MAX_BACKLOG": "1"}
    proc = started(cli.workdir, env, "produce", "-", "--chunk-size", "1")
    try:
        proc.stdin.write(b"".join(b'{"task": "sentiment", "text": "%d"}\n' % n for n in range(3)))
        proc.stdin.flush()
        wait_for(lambda: redis.xlen(keys.items) == 2, 30, "two items stored")
        time.sleep(0.5)  # the third waits: the backlog is over max_backlog
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the first Ctrl-C must let what was read be stored"
        os.killpg(proc.pid, signal.SIGINT)
        err = finished(proc, 10)
    finally:
        proc.stdin.close()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err, err
    out = flat(err)
    assert "interrupted (SIGINT): produced 2, skipped 0 invalid" in out
    assert "stopped at once: the chunk being sent may be stored or not" in out
    assert redis.xlen(keys.items) == 2


OFFLINE_FLEET = str(ROOT / "examples" / "offline.toml")
SAMPLE = str(ROOT / "producers" / "samples" / "tickets.jsonl")
# Commands that answer once: with Redis unreachable, one line naming it, exit 3.
ANSWERING = [
    ("produce", "one.jsonl"),
    ("labels",),
    ("dlq", "list"),
    ("dlq", "replay", "--all"),
    ("status",),
    ("health",),
    ("calibrate",),
    ("teach", "one.jsonl"),
    ("serve", "--port", "1"),  # serves until stopped, but checks Redis before it binds
    ("demo", "--offline", "--limit", "2"),
    pytest.param(("--fleet", OFFLINE_FLEET, "evaluate", SAMPLE), id="evaluate"),
]
# Commands that serve until stopped: they wait Redis out (a line per retry), and stop cleanly.
SERVING = [
    (("worker", "vader"), "Redis unavailable"),
    (("aggregator",), "Redis unavailable"),
    (("judge",), "Redis unavailable"),
    (("run", "--data-dir", "valkey"), "Redis unavailable"),
    (("exporter", "--port", "0"), "serving fleet metrics"),
]
NOT_USING_REDIS = {"acl", "models"}


def test_every_command_is_tried_against_a_dead_redis() -> None:
    from tribunal.cli.app import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
    commands |= {str(g.name) for g in app.registered_groups}
    answering = [getattr(a, "values", (a,))[0] for a in ANSWERING]  # pytest.param: values
    tried = {args[2] if args[0] == "--fleet" else args[0] for args in answering}
    tried |= {args[0] for args, _ in SERVING}
    assert commands == tried | NOT_USING_REDIS


DEAD = {"TRIBUNAL_REDIS_URL": CLOSED_PORT_URL}  # nothing listens there: no Redis fixture


@pytest.mark.parametrize("args", ANSWERING, ids=" ".join)
def test_a_command_with_redis_unreachable_says_so_in_a_line_and_exits_3(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "one.jsonl").write_bytes(b'{"task": "sentiment", "text": "hello"}\n')
    proc = started(tmp_path, DEAD, *args)
    proc.stdin.close()
    err = finished(proc, 90)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert proc.returncode == 3, err
    assert "Redis" in flat(err) and "127.0.0.1:1" in flat(err), err


@pytest.mark.parametrize(("args", "marker"), SERVING, ids=[" ".join(a) for a, _ in SERVING])
def test_a_serving_command_waits_redis_out_and_stops_cleanly(
    tmp_path: Path, args: tuple[str, ...], marker: str
) -> None:
    proc = started(tmp_path, DEAD, *args)
    try:
        wait_for(lambda: marker.encode() in proc.err.read_bytes(), 60, marker)
        os.killpg(proc.pid, signal.SIGTERM)
        err = finished(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
