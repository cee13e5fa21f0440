"""Field faults, round 2 (issue 28): what users of queue systems, Redis clients and model
servers reported, tried against the fleet as they hit it. Real valkey, real processes and
signals, real pipes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from llm_server import MODEL, LLMServer, Reply, llm_server
from redis import Redis
from redis.exceptions import ResponseError
from test_cli import cli, flat  # noqa: F401  (cli: the fixture)
from test_consumers import Fleet, drain
from test_llm_pipeline import fleet, servers  # noqa: F401  (fixtures)
from test_local_models import local_settings, model_dir, smol_url  # noqa: F401  (fixtures)
from test_run_command import Procs, ctrl_c, procs, wait_for  # noqa: F401  (procs: the fixture)

from common.keys import Keys
from common.schemas import Item
from common.settings import Settings, load_settings
from common.tasks import BUILTIN_TASKS
from consumers.backends import backend_for
from consumers.backends.context import overflow_of
from consumers.backends.openai_compat import OpenAICompatible, proxy_for
from producers.api import Producer
from tribunal.processes.children import RESTART_BACKOFF, STABLE_S, Restarts
from tribunal.processes.embedded import EmbeddedRedis
from tribunal.serving.llama import short_contexts

pytestmark = pytest.mark.slow  # real processes

ROOT = Path(__file__).resolve().parent.parent
LABELS = 3_000  # ~600 KB of JSON lines: far more than a pipe's 64 KB buffer


def fill_output(redis: Redis, keys: Keys) -> None:
    pipe = redis.pipeline(transaction=False)
    for n in range(LABELS):
        line = orjson.dumps({"id": f"t{n}", "label": "positive", "note": "x" * 160})
        pipe.xadd(keys.output, {"id": f"t{n}", "d": line})
    pipe.execute()


def acked(redis: Redis, keys: Keys, group: str) -> int:
    (info,) = [g for g in redis.xinfo_groups(keys.output) if g["name"] == group.encode()]
    return int(info["entries-read"]) - int(info["pending"])


@pytest.mark.parametrize("follow", [False, True])
def test_labels_into_a_pipe_closed_early_ends_quietly_and_acks_only_what_it_wrote(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys, follow: bool
) -> None:
    """Was: `labels | head -n 1` printed tracebacks ("failed on a batch"), said "wrote 64
    labels", acked them, and with --follow never exited. Now it exits 141 (SIGPIPE's code,
    as `seq 9 | head -1`) without a word and acks the one label its reader took: into a
    pipe a line counts once the reader took it. The group's next reader gets all the rest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {
        "TRIBUNAL_REDIS_URL": str(settings.redis_url),
        "TRIBUNAL_NAMESPACE": settings.namespace,
        "TRIBUNAL_BLOCK_MS": "200",
        "TRIBUNAL_RECLAIM_IDLE_S": "1",  # the next reader takes the pending batch at once
    }
    fill_output(redis, keys)
    args = [sys.executable, "-m", "tribunal", "labels", *(["--follow"] if follow else [])]
    reader = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert reader.stdout is not None and reader.stderr is not None
    first = reader.stdout.readline()  # head -n 1
    reader.stdout.close()
    code = reader.wait(30)
    said = reader.stderr.read().decode()
    assert code == 128 + signal.SIGPIPE, said
    said = reader.stderr.read().decode()
    assert "Traceback" not in said and "failed on a batch" not in said, said
    assert "wrote" not in said  # no claim to have written what the pipe dropped
    assert orjson.loads(first)["id"] == "t0"

    assert acked(redis, keys, "labels") == 1  # the one line its reader took, no other
    again = subprocess.run(  # the group's next reader: every label but that one, at once
        [sys.executable, "-m", "tribunal", "labels"], capture_output=True, env=env, timeout=60
    )
    assert again.returncode == 0, again.stderr
    rest = [orjson.loads(line)["id"] for line in again.stdout.splitlines()]
    assert rest == [f"t{n}" for n in range(1, LABELS)]
    assert acked(redis, keys, "labels") == LABELS


def test_labels_follow_into_a_pipe_closed_ends_even_when_no_label_comes(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    """`labels --follow | head -n 1` with one label and nothing more: the reader ends when
    the pipe closes, not at the next label (which may be hours away)."""
    redis.xadd(keys.output, {"id": "only", "d": b'{"id":"only"}'})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {"TRIBUNAL_REDIS_URL": str(settings.redis_url), "TRIBUNAL_NAMESPACE": settings.namespace}
    env["TRIBUNAL_BLOCK_MS"] = "200"
    args = [sys.executable, "-m", "tribunal", "labels", "--follow"]
    reader = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert reader.stdout is not None and reader.stderr is not None
    assert orjson.loads(reader.stdout.readline())["id"] == "only"
    reader.stdout.close()
    assert reader.wait(30) == 128 + signal.SIGPIPE
    assert b"Traceback" not in reader.stderr.read()


def test_labels_to_a_file_still_says_what_it_wrote(
    cli: Any,  # noqa: F811
    tmp_path: Path,
    redis: Redis,
    keys: Keys,
) -> None:
    fill_output(redis, keys)
    done = cli("labels", "-o", str(tmp_path / "out.jsonl"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"wrote {LABELS} labels to" in flat(done.stderr)
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == LABELS


# --- a proxy in the environment ---------------------------------------------------------

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: a proxy that swallows every call


def backend(base_url: str) -> OpenAICompatible:
    options = {"base_url": base_url, "model": MODEL, "backoff_s": 0.01, "timeout_s": 5}
    return OpenAICompatible({**options, "max_retries": 0}, BUILTIN_TASKS)


def sentiment(*texts: str) -> list[Item]:
    return [Item(id=f"i{n}", task="sentiment", text=t) for n, t in enumerate(texts)]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_proxy_in_the_environment_is_not_used_for_this_machines_model_servers(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """Was: with http_proxy/HTTPS_PROXY set and no no_proxy, every loopback model call went
    to the proxy: every item dead-lettered with "All connection attempts failed"."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with llm_server() as server:
        model = backend(server.url.replace("127.0.0.1", host))
        try:
            out = model.classify(sentiment("expect=negative", "expect=positive"))
        finally:
            model.close()
        assert [p.label for p in out] == ["negative", "positive"], [p.error for p in out]
        assert len(server.requests) == 2 and server.proxied == []


def test_every_loopback_spelling_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only the three usual spellings: all of 127.0.0.0/8, ::1, and localhost with its
    root dot are this machine (a fleet behind a proxy found 127.0.0.2 sent to it)."""
    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "127.1.2.3", "[::1]", "localhost", "LOCALHOST."):
        assert proxy_for(f"http://{host}:8080/v1") is None, host
    assert proxy_for("http://models.example.invalid:8000/v1") == DEAD_PROXY


def test_a_remote_model_server_goes_through_the_proxy_and_an_error_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user's proxy is honoured where it is meant for: a remote endpoint. The test
    server plays the proxy (it answers requests sent to it in absolute form)."""
    for name in ("no_proxy", "NO_PROXY", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    remote = "http://models.example.invalid:8000/v1"
    with llm_server() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.root)
        model = backend(remote)
        try:
            [p] = model.classify(sentiment("expect=neutral"))
        finally:
            model.close()
        assert p.label == "neutral", p.error
        assert proxy.proxied == [f"{remote}/chat/completions"]

    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    model = backend(remote)
    try:
        [p] = model.classify(sentiment("expect=neutral"))
    finally:
        model.close()
    assert p.label is None
    assert f"(through the proxy {DEAD_PROXY} set in the environment)" in (p.error or "")


# --- writes refused: MISCONF ------------------------------------------------------------


def refuse_writes(redis: Redis, pid: int) -> None:
    """Make the server refuse writes as it does after a failed background save: a save point,
    a slow save, its child killed (Redis's own tests fail a save this way)."""
    redis.config_set("save", "3600 1")
    redis.config_set("rdb-key-save-delay", 1_000_000)  # µs per key: the child is still saving
    redis.set("misconf-test", "1")
    redis.bgsave()
    wait_for("the save's child", lambda: children_of(pid), 10)
    for child in children_of(pid):
        os.kill(child, signal.SIGKILL)
    wait_for("MISCONF", lambda: refused(redis), 10)


def allow_writes(redis: Redis) -> None:
    redis.config_set("rdb-key-save-delay", 0)
    redis.bgsave()
    wait_for("a good save", lambda: not refused(redis), 10)


def children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def refused(redis: Redis) -> bool:
    try:
        redis.set("misconf-probe", "1")
    except ResponseError as exc:
        return str(exc).startswith("MISCONF")
    return False


def test_refused_writes_are_waited_out_by_every_member_and_said_once(
    procs: Procs,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Was: MISCONF (a failed background save) ended every fleet member, idle ones too, and
    `run` restarted them in a loop with a backoff that never reset (23 exits in 25 s). Now
    members wait as for OOM or READONLY: no member exits, each says it once, and labeling
    goes on after the fix."""
    with EmbeddedRedis(tmp_path / "valkey") as server:
        redis = Redis.from_url(server.url)
        procs.env["TRIBUNAL_NAMESPACE"] = "misconf"
        run = procs.start("run", log="run.log", url=server.url)
        keys = Keys("misconf")
        producer_settings = load_settings(redis_url=server.url, namespace="misconf")
        Producer(redis, producer_settings).send(tickets("before", 3))
        wait_for("the first labels", lambda: redis.xlen(keys.output) == 3, 60, run)

        refuse_writes(redis, server.pid or 0)
        time.sleep(6)  # several retries of every member
        allow_writes(redis)
        Producer(redis, producer_settings).send(tickets("after", 3))
        wait_for("labels after the fix", lambda: redis.xlen(keys.output) == 6, 60, run)
        assert ctrl_c(run) == 0
    said = procs.output("run.log").decode(errors="replace")
    assert "restarting in" not in said and "Traceback" not in said, said[-3000:]
    unavailable = [line for line in said.splitlines() if "Redis unavailable" in line]
    members = {line.split(": Redis unavailable")[0].split()[-1] for line in unavailable}
    assert unavailable and len(unavailable) == len(members), unavailable  # once per member
    assert all("MISCONF" in line for line in unavailable)
    assert 0 < said.count("Redis is back after") <= len(members)  # said by those it came back to


def tickets(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i}", "task": "sentiment", "text": f"ticket {i}"} for i in range(n)]


def test_a_child_that_ran_a_while_is_restarted_at_once_after_its_next_crash() -> None:
    """Was: a fleet child's restart backoff was never reset, so after a few crashes every
    later one waited 16-30 s. Now a child up for STABLE_S starts over at 1 s, as the model
    servers always did (they share ``Restarts`` now)."""
    restarts = Restarts(count=5)
    restarts.started()
    restarts.running()
    assert restarts.count == 5  # just started: the crashes still count
    restarts.started_at -= STABLE_S + 1
    restarts.running()
    assert restarts.count == 0
    assert restarts.plan() == pytest.approx(RESTART_BACKOFF.compute(0))


# --- a skewed clock ---------------------------------------------------------------------

SKEW_S = 75.0


def test_a_worker_host_minutes_behind_changes_nothing(procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    """Was: deadlines and heartbeats were stamped with each host's clock and judged on
    another's: a worker 75 s behind made every item it voted on first a "vote timeout"
    (judge), and `health` called it dead. Now both are on Redis's clock (``TIME``). The
    skew is real to the process: its ``time.time()`` runs 75 s behind (a sitecustomize)."""
    behind = tmp_path / "behind"
    behind.mkdir()
    (behind / "sitecustomize.py").write_text(
        f"import time\n_real = time.time\ntime.time = lambda: _real() - {SKEW_S}\n"
    )
    with EmbeddedRedis(tmp_path / "valkey") as server:
        redis = Redis.from_url(server.url)
        procs.env |= {"TRIBUNAL_NAMESPACE": "skew", "TRIBUNAL_VOTE_TIMEOUT_S": "30"}
        skewed = dict(procs.env)
        procs.env["PYTHONPATH"] = str(behind)  # only the first worker's host is behind
        members = [procs.start("worker", "vader", log="vader.log", url=server.url)]
        procs.env = skewed
        members += [
            procs.start(*role, log=f"{role[-1]}.log", url=server.url)
            for role in (("worker", "textblob"), ("worker", "afinn"), ("aggregator",), ("judge",))
        ]
        keys = Keys("skew")
        wait_for("every member", lambda: redis.zcard(keys.heartbeats) == 5, 60)
        settings = load_settings(redis_url=server.url, namespace="skew")
        Producer(redis, settings).send(tickets("t", 20))
        wait_for("every label", lambda: redis.xlen(keys.output) == 20, 60)
        health = subprocess.run(
            [sys.executable, "-m", "tribunal", "health"],
            env={**skewed, "TRIBUNAL_REDIS_URL": server.url},
            cwd=procs.cwd,
            capture_output=True,
            timeout=60,
        )
        labels = [orjson.loads(f[b"d"]) for _, f in redis.xrange(keys.output)]
        for member in members:
            assert ctrl_c(member) == 0
    assert health.returncode == 0, health.stdout + health.stderr
    timed_out = [d["id"] for d in labels if "vote timeout" in str(d.get("reason", ""))]
    assert timed_out == []
    assert "worker:vader" in procs.output("vader.log").decode()  # it ran, behind


# --- a ticket longer than the model's context -------------------------------------------


def stack_trace(chars: int) -> str:
    frames = "".join(
        f'  File "/srv/billing/export/step_{n}.py", line {40 + n}, in run_step_{n}\n'
        f"    result = handlers[{n}].process(batch, retries={n % 3})\n"
        for n in range(400)
    )
    text = "The nightly invoice export fails again, full log below:\n" + frames
    return (text + "ValueError: invoice total is negative\n")[-chars:]


def test_a_ticket_longer_than_the_context_is_labeled_from_the_part_that_fits(
    smol_url: str,  # noqa: F811
) -> None:
    """Was: a valid 7,900-character ticket (a pasted stack trace, ~3,800 tokens) was refused
    by every model (HTTP 400 exceed_context_size_error at 2,048 tokens a slot): workers
    abstained and the judge asked again max_deliveries times, a delivery per
    reclaim_idle_s. Now the refusal's own sizes say how much fits: the head and the tail of
    the text are asked, and the vote says how much was cut. A real llama-server."""
    long = stack_trace(7_900)
    items = [
        Item(id="long", task="sentiment", text=long),
        Item(id="pair", task="similar_ticket", text=long, text_b=long[:4_000]),
        Item(id="short", task="sentiment", text="Thanks, the export works again!"),
    ]
    settings, spec = local_settings(smol_url)
    model = backend_for(spec, settings)
    try:
        predictions = model.classify(items)
    finally:
        model.close()
    for item, p in zip(items, predictions, strict=True):
        assert p.label in BUILTIN_TASKS[item.task].labels, (item.id, p)
    assert predictions[0].truncated_chars > 1_000
    assert predictions[1].truncated_chars > predictions[0].truncated_chars
    assert predictions[2].truncated_chars == 0


def test_a_refusal_is_never_asked_again_and_ends_at_once(
    fleet: Fleet,  # noqa: F811
    servers: dict[str, LLMServer],  # noqa: F811
) -> None:
    """A refusal other than the context's (HTTP 400 for this prompt, whatever its length)
    gets the same answer every time: the judge dead-letters the item at its first
    delivery, with the server's reason, instead of asking max_deliveries times."""
    servers["judge"].respond = lambda body, attempt: Reply(status=400)
    report = Producer(fleet.rt.redis, fleet.rt.settings).send(
        [{"id": "x", "task": "sentiment", "text": "w1=positive w2=negative w3=neutral"}]
    )
    assert report.produced == 1
    fleet.step()
    drain(fleet.aggregator)
    drain(fleet.judge)
    assert len(servers["judge"].requests) == 1  # not retried by the client
    [letter] = fleet.final(fleet.rt.keys.dead)
    assert "the judge's model refused it: HTTP 400" in letter["error"]
    assert fleet.rt.redis.xpending(fleet.rt.keys.judge, "judge")["pending"] == 0


@pytest.mark.parametrize(
    ("status", "body", "sizes"),
    [
        (
            400,
            '{"error":{"code":400,"message":"request (631 tokens) exceeds the available '
            'context size (256 tokens), try increasing it","type":"exceed_context_size_error",'
            '"n_prompt_tokens":631,"n_ctx":256}}',
            (631, 256),
        ),
        (
            400,
            '{"object":"error","message":"This model\'s maximum context length is 4096 tokens. '
            "However, you requested 5000 tokens (4952 in the messages, 48 in the completion). "
            'Please reduce the length of the messages or completion.","type":"BadRequestError"}',
            (4952, 4096),
        ),
        (400, '{"error": "context length exceeded"}', (None, None)),
        (400, '{"error": "prompt contains a forbidden token"}', None),
        (500, '{"error": "context length exceeded"}', None),
    ],
)
def test_context_refusals_are_read_from_each_servers_wording(
    status: int, body: str, sizes: tuple[int | None, int | None] | None
) -> None:
    overflow = overflow_of(status, body)
    if sizes is None:
        assert overflow is None
    else:
        assert overflow is not None
        assert (overflow.prompt_tokens, overflow.context_tokens) == sizes


def test_run_notes_once_which_models_read_less_than_max_text_chars() -> None:
    local = load_settings(ROOT / "examples" / "local.toml")
    [note] = short_contexts(local)
    assert note.startswith("qwen-05b, gemma-270m, smollm2-135m, qwen-15b read 2048 tokens")
    assert "about 4,944 characters (max_text_chars: 8,000)" in note
    assert (
        short_contexts(load_settings(ROOT / "examples" / "local.toml", max_text_chars=4_000)) == []
    )


# --- a poison item ----------------------------------------------------------------------

POISON_FLEET = """
batch_size = 8
max_deliveries = 3
block_ms = 100
heartbeat_every_s = 0.5
[workers.a]
backend = "simulated"
options = { accuracy = 1.0, crash_on = "POISON" }
[judge]
backend = "simulated"
options = { accuracy = 1.0, seed = "judge" }
"""


def test_a_poison_item_is_given_up_alone_and_its_batch_mates_are_labeled(
    procs: Procs,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Was: an item that kills the process handling it was retried with its whole batch, and
    after max_deliveries deaths every item of the batch was given up with "the consumer died
    or timed out". Now a batch delivered twice goes one entry at a time: the poison item
    alone reaches max_deliveries, its abstention says so, the judge labels it, and its
    seven batch-mates get the worker's own votes. The worker really dies (SIGKILL) each time
    and `run` restarts it."""
    fleet_file = tmp_path / "poison.toml"
    fleet_file.write_text(POISON_FLEET)
    with EmbeddedRedis(tmp_path / "valkey") as server:
        redis = Redis.from_url(server.url)
        procs.env["TRIBUNAL_NAMESPACE"] = "poison"
        run = procs.start("--fleet", str(fleet_file), "run", log="run.log", url=server.url)
        keys = Keys("poison")
        wait_for("the worker", lambda: redis.zcard(keys.heartbeats) >= 3, 60, run)
        records = [
            {
                "id": f"t{n}",
                "task": "sentiment",
                "gold": "positive",
                "text": "POISON ticket" if n == 3 else f"ticket {n} works",
            }
            for n in range(8)
        ]
        settings = load_settings(fleet_file, redis_url=server.url, namespace="poison")
        Producer(redis, settings).send(records)
        wait_for("every label", lambda: redis.xlen(keys.output) == 8, 120, run)
        decisions = {
            d["id"]: d for d in (orjson.loads(f[b"d"]) for _, f in redis.xrange(keys.output))
        }
        assert ctrl_c(run) == 0
    said = procs.output("run.log").decode(errors="replace")
    assert said.count("worker:a exited") >= 3, said[-3000:]  # it did die, again and again
    poison = decisions.pop("t3")
    assert poison["source"] == "judge"
    [vote] = poison["votes"]
    assert vote["label"] is None and "died or timed out while handling it" in vote["error"]
    assert "this entry alone" in vote["error"]
    for decision in decisions.values():
        assert decision["source"] == "workers", decision
        assert decision["votes"][0]["label"] == "positive", decision


def test_status_watch_into_a_pipe_writes_each_refresh_and_ends_when_it_closes(
    settings: Settings, redis: Redis
) -> None:
    """Was: `status --watch | head -1` printed one table, then slept forever without writing,
    never seeing the closed pipe; `status --watch > file` got one snapshot. Now each refresh
    is a table appended, and a closed pipe ends it (141)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIBUNAL_")}
    env |= {"TRIBUNAL_REDIS_URL": str(settings.redis_url), "TRIBUNAL_NAMESPACE": settings.namespace}
    args = [sys.executable, "-m", "tribunal", "status", "--watch", "--interval", "0.3"]
    watcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert watcher.stdout is not None and watcher.stderr is not None
    first = watcher.stdout.readline()
    assert first.strip(), first
    watcher.stdout.close()
    assert watcher.wait(30) == 128 + signal.SIGPIPE
    assert b"Traceback" not in watcher.stderr.read()
