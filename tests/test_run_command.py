"""`tribunal run` as an operator runs it: real supervisor, embedded valkey and fleet processes.

Ctrl-C is a SIGINT to the run's whole process group, as a terminal sends it; a second
`run` on the same data directory is a real second process; the follower of labels is a
real `labels --follow` across a restart. The fleet is the default one (offline models),
so no model server is needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from ports import free_port, port_is_free
from redis import Redis

from common.keys import Keys
from tribunal.processes.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips

KEYS = Keys("tribunal")
HOST = "127.0.0.1"
DEFAULT_PORT = 16379
STARTED = re.compile(rb"started (\S+) \(pid (\d+)\)")
URL = re.compile(rb"export TRIBUNAL_REDIS_URL=(\S+)")


class Procs:
    """Starts `tribunal` processes marked in their environment, so every process they start
    (fleet members, valkey: each in a session of its own) is found and killed afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path.resolve()
        self.mark = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
        self.env.update(
            RUN_TEST_MARK=self.mark,
            TRIBUNAL_BLOCK_MS="200",
            TRIBUNAL_HEARTBEAT_EVERY_S="0.5",
            TRIBUNAL_RECLAIM_EVERY_S="1",
            COLUMNS="250",
        )
        self.cwd = tmp_path / "cwd"  # no .env there
        self.cwd.mkdir()

    def start(
        self, *args: str, log: str, url: str | None = None, stdin: Any = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        """``python -m tribunal ARGS`` in a new session, as a shell starts a foreground job:
        its pid is its process group; stdout and stderr go to the file ``log``."""
        env = dict(self.env, **({"TRIBUNAL_REDIS_URL": url} if url else {}))
        with open(self.tmp_path / log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tribunal", *args],
                cwd=self.cwd,
                env=env,
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self, log: str) -> bytes:
        return (self.tmp_path / log).read_bytes()

    def alive(self) -> list[int]:
        """Every live process started here or below: marked in its environment, or working
        in this test's directory (valkey overwrites its environment with its process
        title, and runs in its data directory)."""
        needle = f"RUN_TEST_MARK={self.mark}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
                marked = needle in (entry / "environ").read_bytes().split(b"\0")
                marked = marked or (entry / "cwd").resolve().is_relative_to(self.tmp_path)
            except (OSError, IndexError):
                continue
            if marked:
                found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    procs = Procs(tmp_path)
    yield procs
    procs.kill_all()


def wait_for(
    what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def start_run(
    procs: Procs, log: str, *args: str, members: int = 5
) -> tuple[subprocess.Popen[bytes], str, dict[str, int]]:
    """A `tribunal run`, once every fleet member reads its stream: the process, the URL it
    printed, the pid of each member."""
    run = procs.start("run", *args, log=log)

    def ready() -> tuple[str, dict[str, int]] | None:
        out = procs.output(log)
        url, started = URL.search(out), STARTED.findall(out)
        reading = {int(pid) for pid in re.findall(rb"@\S+:(\d+) reading ", out)}
        pids = {role.decode(): int(pid) for role, pid in started}
        if url and len(pids) == members and set(pids.values()) <= reading:
            return url.group(1).decode(), pids
        return None

    url, pids = wait_for(f"{log} to be ready", ready, 90, run)
    return run, url, pids


def ctrl_c(process: subprocess.Popen[bytes], timeout: float = 90) -> int:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout)


def produce(procs: Procs, url: str, records: list[dict[str, Any]], log: str) -> None:
    lines = b"".join(orjson.dumps(r) + b"\n" for r in records)
    proc = procs.start("produce", "--format", "jsonl", "-", log=log, url=url, stdin=subprocess.PIPE)
    proc.communicate(lines, timeout=120)
    assert proc.returncode == 0, procs.output(log).decode(errors="replace")


def tickets(prefix: str, n: int) -> list[dict[str, Any]]:
    texts = [
        "Thank you so much, the fix works perfectly!",
        "My order never arrived and nobody answers.",
        "The export has failed every night this week.",
        "Great support, quick and friendly.",
        "I was charged twice, this is unacceptable.",
        "The invoice is attached as requested.",
    ]
    return [
        {"id": f"{prefix}{i}", "task": "sentiment", "text": f"{texts[i % len(texts)]} (#{i})"}
        for i in range(n)
    ]


def endings(redis: Redis) -> dict[str, list[dict[str, Any]]]:
    """Each id in the final streams with every record it ended as (a list, to catch doubles)."""
    where: dict[str, list[dict[str, Any]]] = {}
    for stream in KEYS.final_streams:
        entries: Any = redis.xrange(stream)
        for _, fields in entries:
            record = orjson.loads(fields[b"d"])
            record["stream"] = stream.rsplit(":", 1)[1]
            where.setdefault(fields[b"id"].decode(), []).append(record)
    return where


def assert_stopped_gracefully(out: bytes, pids: dict[str, int]) -> None:
    text = out.decode(errors="replace")
    for role, pid in pids.items():
        assert re.search(rf"@\S+:{pid} stopped", text), f"{role} did not finish cleanly:\n{text}"
        assert f"{role} exited (0)" in text, text
    for hard in ("exiting now", "did not stop", "second SIG"):
        assert hard not in text, text
    assert "fleet stopped" in text


# --- item 4: one Ctrl-C, one graceful stop ----------------------------------------------


def test_ctrl_c_stops_the_whole_fleet_gracefully_and_a_restart_loses_no_vote(
    procs: Procs, tmp_path: Path
) -> None:
    data, port = str(tmp_path / "valkey"), str(free_port())
    run, url, pids = start_run(procs, "run1.log", "--data-dir", data, "--port", port)
    redis = Redis.from_url(url)
    items = tickets("t", 3000)
    produce(procs, url, items, "produce.log")
    wait_for("the first labels", lambda: redis.xlen(KEYS.output) > 0, 60, run)

    assert ctrl_c(run) == 0, procs.output("run1.log").decode(errors="replace")
    first = procs.output("run1.log")
    assert_stopped_gracefully(first, pids)
    assert first.count(b": SIGINT: ") == 1  # the supervisor's; no child saw the terminal's
    assert first.count(b": SIGTERM: ") == 5  # one SIGTERM per child, from the supervisor
    # each bound said once, by whoever keeps it: the children's batch, the supervisor's whole
    # (the default fleet serves no model: no model servers to stop)
    assert (
        b"SIGINT: stopping the fleet: its members finish their batches (at most 30s); "
        b"at most 60s in all, then exiting" in first
    )
    # each child names itself in its line: they share the terminal
    names = re.findall(
        rb"SIGTERM: (worker \w+|aggregator|judge), pid \d+: finishing the current batch "
        rb"\(at most 30s\)",
        first,
    )
    assert sorted(names) == [b"aggregator", b"judge", b"worker afinn", b"worker textblob",
                             b"worker vader"]  # fmt: skip

    run, url2, pids = start_run(procs, "run2.log", "--data-dir", data, "--port", port)
    assert url2 == url
    redis = Redis.from_url(url)
    wait_for("every item to end", lambda: len(endings(redis)) == len(items), 120, run)
    time.sleep(1.5)  # a doubled outcome or a vote-timeout sweep would show by now
    where = endings(redis)
    assert ctrl_c(run) == 0
    second = procs.output("run2.log")
    assert_stopped_gracefully(second, pids)

    assert set(where) == {item["id"] for item in items}
    assert all(len(ends) == 1 for ends in where.values()), [e for e in where.values() if len(e) > 1]
    reasons = [ends[0].get("reason", "") for ends in where.values()]
    assert not [r for r in reasons if "vote timeout" in r]
    assert b"vote timeout" not in first + second
    assert b"reclaimed" not in second  # nothing was left pending to take over


SLOW_FLEET = """
batch_size = 5
[workers.slow]
backend = "simulated"
options = { latency_ms_per_call = 120000 }
"""


def test_a_second_ctrl_c_stops_everything_at_once(procs: Procs, tmp_path: Path) -> None:
    fleet = tmp_path / "slow.toml"
    fleet.write_text(SLOW_FLEET)
    procs.env["TRIBUNAL_FLEET_FILE"] = str(fleet)
    args = ("--data-dir", str(tmp_path / "valkey"), "--port", str(free_port()))
    run, url, _ = start_run(procs, "run1.log", *args, members=3)
    produce(procs, url, tickets("s", 5), "produce.log")
    redis = Redis.from_url(url)

    def in_model_call() -> bool:
        groups: Any = redis.xinfo_groups(KEYS.items) if redis.exists(KEYS.items) else []
        return any(g["name"] == b"worker:slow" and g["pending"] == 5 for g in groups)

    wait_for("the worker's batch", in_model_call, 60, run)
    os.killpg(run.pid, signal.SIGINT)
    time.sleep(2)
    assert run.poll() is None  # the first Ctrl-C waits for the batch (up to its grace)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(15) == 128 + signal.SIGINT
    assert b"second SIGINT: exiting now" in procs.output("run1.log")
    wait_for("no process left", lambda: not procs.alive(), 15)
    # The data directory is free again.
    run, _, _ = start_run(procs, "run2.log", *args, members=3)
    assert ctrl_c(run) == 0


# --- item 5: one data directory, one server ---------------------------------------------


def test_a_second_run_on_the_same_data_dir_exits_naming_the_first(
    procs: Procs, tmp_path: Path
) -> None:
    data = str(tmp_path / "valkey")
    run, url, _ = start_run(procs, "run1.log", "--data-dir", data, "--port", str(free_port()))
    # The default (offline) fleet's lexicons know sentiment only, and `run` says so, naming
    # a fleet file that labels it by a path that holds wherever tribunal is installed.
    note = procs.output("run1.log").decode().replace("\n", " ")
    assert "no model of this fleet handles task 'similar_ticket'" in note
    assert re.search(r"start with --fleet /\S+/tribunal/fleets/local\.toml", note), note
    other_port = free_port()
    second = procs.start("run", "--data-dir", data, "--port", str(other_port), log="run2.log")
    assert second.wait(60) == 1
    lines = procs.output("run2.log").decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "is in use" in lines[0], lines
    assert f"pid {run.pid}," in lines[0] and url in lines[0], lines
    assert port_is_free(other_port)  # it started no server
    assert Redis.from_url(url).ping()  # and the first one's is untouched
    assert ctrl_c(run) == 0

    # Unlocked once stopped; the file left behind does not block the next run (port 0: any).
    run, url, _ = start_run(procs, "run3.log", "--data-dir", data, "--port", "0")
    assert not url.endswith(":0/0") and Redis.from_url(url).ping()
    assert ctrl_c(run) == 0
    assert f"embedded valkey stopped, data kept in {data}" in procs.output("run3.log").decode()


def test_the_lock_lives_as_long_as_the_server_not_the_lock_file(
    procs: Procs, tmp_path: Path
) -> None:
    data, port = tmp_path / "valkey", free_port()
    run, url, _ = start_run(procs, "run1.log", "--data-dir", str(data), "--port", str(port))
    Redis.from_url(url).set("kept", "1")
    holder = (data / "run.lock").read_text()
    valkey_pid = int(re.findall(r"valkey-server \(pid (\d+)\)", holder)[0])

    # A server that outlives its supervisor (here: stopped, so the parent-death SIGTERM
    # waits) keeps the data directory locked, though the lock file's writer is gone.
    os.kill(valkey_pid, signal.SIGSTOP)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    second = procs.start("run", "--data-dir", str(data), "--port", str(port), log="run2.log")
    assert second.wait(60) == 1
    assert f"valkey-server (pid {valkey_pid})" in procs.output("run2.log").decode()

    os.kill(valkey_pid, signal.SIGCONT)  # the pending SIGTERM: it shuts down by itself
    wait_for("the port to be free", lambda: port_is_free(port), 30)
    run, url, _ = start_run(procs, "run3.log", "--data-dir", str(data), "--port", str(port))
    assert Redis.from_url(url).get("kept") == b"1"  # the same data, from the AOF
    assert ctrl_c(run) == 0


def test_a_killed_run_takes_its_members_and_server_with_it(procs: Procs, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, kill -9) leaves the supervisor no time to stop anyone: the
    kernel's parent-death signal does, gracefully, so nothing lives on unsupervised and the
    next run starts on the same data directory and port."""
    data, port = str(tmp_path / "valkey"), str(free_port())
    run, _, pids = start_run(procs, "run1.log", "--data-dir", data, "--port", port)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    wait_for("every member and the server gone", lambda: not procs.alive(), 60)
    text = procs.output("run1.log").decode(errors="replace")
    for role, pid in pids.items():
        assert re.search(rf"@\S+:{pid} stopped", text), f"{role} did not stop cleanly:\n{text}"
    run, _, _ = start_run(procs, "run2.log", "--data-dir", data, "--port", port)
    assert ctrl_c(run) == 0


def test_a_port_held_by_another_program_is_one_clear_line(procs: Procs, tmp_path: Path) -> None:
    data = str(tmp_path / "valkey")
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        port = other.getsockname()[1]
        proc = procs.start("run", "--data-dir", data, "--port", str(port), log="run.log")
        assert proc.wait(60) == 1
    lines = procs.output("run.log").decode().strip().splitlines()
    assert len(lines) == 1 and f"port {port} " in lines[0] and "taken" in lines[0], lines
    # The failed start let go of the data directory.
    run, _, _ = start_run(procs, "run2.log", "--data-dir", data, "--port", str(free_port()))
    assert ctrl_c(run) == 0


# --- item 6: the same URL after a restart -----------------------------------------------


def test_a_restart_keeps_the_url_so_other_shells_carry_on(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    # The default port when it is free here; the behaviour under test is the same on any.
    port = [] if port_is_free(DEFAULT_PORT) else ["--port", str(free_port())]
    run, url, _ = start_run(procs, "run1.log", "--data-dir", str(data), *port)
    if not port:
        assert url == f"redis://{HOST}:{DEFAULT_PORT}/0"
    assert (data / "redis.url").read_text().strip() == url
    follower = procs.start("labels", "--follow", log="labels.jsonl", url=url)

    def labeled() -> int:
        lines = procs.output("labels.jsonl").splitlines()
        return sum(1 for line in lines if line.startswith(b"{"))

    produce(procs, url, tickets("a", 20), "produce1.log")
    wait_for("the first labels", lambda: labeled() == 20, 60, follower)
    assert ctrl_c(run) == 0

    run, url2, _ = start_run(procs, "run2.log", "--data-dir", str(data), *port)
    assert url2 == url
    produce(procs, url, tickets("b", 20), "produce2.log")  # the same export, unchanged
    wait_for("labels after the restart", lambda: labeled() == 40, 60, follower)
    status = procs.start("status", "--json", log="status.json", url=url)
    assert status.wait(30) == 0, procs.output("status.json")
    assert ctrl_c(follower, 30) == 0
    assert ctrl_c(run) == 0


# --- a fleet member that stops on a configuration error ---------------------------------


def test_another_partition_count_is_refused_once_before_anything_starts(
    procs: Procs, tmp_path: Path
) -> None:
    """Every member would refuse it too, each with the same reason: the supervisor checks once
    and starts nobody."""
    with EmbeddedRedis(tmp_path / "valkey") as server:
        Redis.from_url(server.url).set(Keys("tribunal").partitions, 2)  # the fleet runs 1
        run = procs.start("run", log="run.log", url=server.url)
        assert run.wait(90) == 2, procs.output("run.log").decode()[-2000:]
    out = procs.output("run.log").decode()
    reason = "uses 2 partitions but this process is set up with 1: set TRIBUNAL_PARTITIONS=2"
    assert out.count(reason) == 1, out
    assert "started " not in out and "Traceback" not in out, out
    wait_for("every fleet member gone", lambda: not procs.alive(), timeout=30)


def test_a_member_failing_on_its_configuration_stops_the_fleet_not_a_restart_loop(
    procs: Procs, tmp_path: Path
) -> None:
    """Restarting a child that exits 2 would fail the same way forever: `run` stops with one
    line naming it, the child's own reason above it, and leaves nothing running. Here the
    namespace's partition count changes under a running fleet and one member is killed: its
    restart finds the new count."""
    with EmbeddedRedis(tmp_path / "valkey") as server:
        run = procs.start("run", log="run.log", url=server.url)

        def reading() -> dict[str, int] | None:
            out = procs.output("run.log")
            pids = {role.decode(): int(pid) for role, pid in STARTED.findall(out)}
            ready = {int(pid) for pid in re.findall(rb"@\S+:(\d+) reading ", out)}
            return pids if len(pids) == 5 and set(pids.values()) <= ready else None

        pids = wait_for("the fleet to read its streams", reading, 90, run)
        Redis.from_url(server.url).set(Keys("tribunal").partitions, 2)
        os.kill(pids["judge"], signal.SIGKILL)
        assert run.wait(90) == 2, procs.output("run.log").decode()[-2000:]
    out = procs.output("run.log").decode()
    # The killed judge's restart finds the new count; a member that reads it again meanwhile
    # (the aggregator, on a loaded machine) may find it first: whichever stops is named.
    stopped = re.findall(r"error: (\S+) stopped on a configuration error \(exit 2", out)
    assert len(stopped) == 1 and stopped[0] in pids, out[-2000:]
    assert "uses 2 partitions but this process is set up with 1" in out, out[-2000:]
    assert out.count("restarting in") == 1, out[-2000:]  # the SIGKILL's, not the exit 2's
    assert "Traceback" not in out
    wait_for("every fleet member gone", lambda: not procs.alive(), timeout=30)
