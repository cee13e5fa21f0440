"""The compose stack started for real, as docs/operations.md says: local base images
and a wheelhouse (deploy/images/make-local.sh), `docker-compose --profile cpu up -d --build`
with the real models of examples/local.toml (their files fetched once on this host, given to
the models service as MODELS_DIR), every healthcheck passing, bundled tickets through the
producer service, each labeled once by the language models (per-model agreement with gold
printed as the demo prints it), Prometheus scraping the exporter and every llama-server, a
worker and Redis restarted with nothing lost, then `down -v` and the built images removed.

Needs a Docker engine, Debian's docker-compose 1.29 and Python 3.11 (the images' Python, for
the wheelhouse); the first run also needs root and debootstrap (the base image) and a Debian
mirror, then ~/.cache/tribunal/compose and the tribunal-local/* images are reused (keep them,
or `deploy/images/make-local.sh clean`). Skipped, with the reason, where any is missing.
.ci/run installs and starts them on Debian. Runs in a copy of the repository (its tracked and
untracked, not ignored files: a fresh clone plus work in progress) under its own compose
project name with random host ports, so it touches nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console

from common.schemas import Decision
from common.settings import load_settings
from tribunal.demo import agreement_table, cost_line

# one stack per run: its tests share the module's `stack` on one xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compose")]

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT / "producers" / "samples" / "tickets.jsonl"
LOCAL_FLEET = ROOT / "examples" / "local.toml"
CPU_SERVICES = [
    "redis",
    "models",
    "worker-qwen-05b",
    "worker-gemma-270m",
    "worker-smollm2-135m",
    "aggregator-cpu",
    "judge-cpu",
    "exporter-cpu",
    "prometheus",
]
MODELS = {"qwen-05b", "gemma-270m", "smollm2-135m", "qwen-15b"}  # local.toml's
IMAGES = ("TRIBUNAL_IMAGE", "TRIBUNAL_MODELS_IMAGE")  # built by the test, removed after it
SAMPLE = 24  # tickets through the real models (~1 s each on 2 cores), and 8 more after restarts
GRAFANA_DEFAULT = "grafana/grafana:11.3.1"
OUTPUT, REJECTS, DEAD, ITEMS = (
    f"tribunal:{{0}}:{s}" for s in ("output", "rejects", "dead", "items")
)
HEALTHY_WITHIN_S = 420  # four models loaded one after another, then warmed
LABELED_WITHIN_S = 420


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def why_not() -> str | None:
    """Why this machine cannot run the stack (None: it can)."""
    if not shutil.which("docker-compose"):
        return "docker-compose (1.29, Debian package docker-compose) is not installed"
    if not shutil.which("docker"):
        return "no docker command (Debian package docker.io)"
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        return f"no usable Docker engine: {(info.stderr or info.stdout).strip()[:200]}"
    if sys.version_info[:2] != (3, 11):
        return "the wheelhouse is built by this Python, which must be 3.11 like the images"
    base = run(["docker", "image", "inspect", "tribunal-local/debian:bookworm-minbase"])
    cached = Path.home() / ".cache/tribunal/compose/debian-bookworm-minbase.tar"
    can_make = os.geteuid() == 0 and shutil.which("debootstrap")
    if base.returncode != 0 and not cached.is_file() and not can_make:
        return "the local base image is not made yet and needs root and debootstrap"
    return None


def copy_repository(target: Path) -> None:
    """The repository's tracked and untracked, not ignored files (a fresh clone plus work in
    progress): what `docker build` would see, without this checkout's wheels or caches."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    if listed.returncode != 0:  # not a git checkout: all but the usual clutter
        shutil.copytree(
            ROOT,
            target,
            ignore=shutil.ignore_patterns(".git", ".venv", "*cache*", "__pycache__", "*.whl"),
        )
        return
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@dataclass
class Stack:
    """One compose project in a copy of the repository."""

    directory: Path
    env: dict[str, str]
    services: list[str]
    password: str
    log: list[str] = field(default_factory=list)

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        argv = ["docker-compose", "--profile", "cpu", "--profile", "ingest", *args]
        started = time.monotonic()
        done = run(argv, cwd=self.directory, env=self.env, timeout=timeout)
        self.log.append(f"{time.monotonic() - started:6.1f}s docker-compose {' '.join(args)}")
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
            )
        return done.stdout + done.stderr

    def port(self, service: str, port: int) -> int:
        out = self.compose("port", service, str(port)).strip()
        return int(out.rsplit(":", 1)[1])

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port("redis", 6379), password=self.password)

    @property
    def label(self) -> str:
        """The `docker ps --filter` of this project's containers."""
        return f"label=com.docker.compose.project={self.env['COMPOSE_PROJECT_NAME']}"

    def health(self) -> dict[str, str]:
        """Each service's container state: `healthy`, `starting`, `unhealthy`, `exited` ..."""
        template = '{{.Label "com.docker.compose.service"}}\t{{.State}}\t{{.Status}}'
        listed = run(["docker", "ps", "-a", "--filter", self.label, "--format", template])
        states = dict.fromkeys(self.services, "absent")
        for line in listed.stdout.splitlines():
            service, state, status = line.split("\t")
            if service in states:
                health = status.rsplit("(", 1)[-1].rstrip(")") if "(" in status else "no check"
                states[service] = health.replace("health: ", "") if state == "running" else state
        return states

    def wait_healthy(self, within_s: float = HEALTHY_WITHIN_S) -> float:
        started = time.monotonic()
        while True:
            states = self.health()
            if all(state == "healthy" for state in states.values()):
                return time.monotonic() - started
            if time.monotonic() - started > within_s:
                logs = self.compose("logs", "--tail", "30", check=False)
                raise AssertionError(f"not healthy after {within_s} s: {states}\n{logs[-6000:]}")
            time.sleep(2)

    def produce(self, *env: str) -> str:
        """The documented producer command (`run --rm producer`), with INGEST_* overrides."""
        saved = dict(self.env)
        self.env.update(dict(pair.split("=", 1) for pair in env))
        try:
            return self.compose("run", "--rm", "producer")
        finally:
            self.env.clear()
            self.env.update(saved)


def exports(text: str) -> dict[str, str]:
    """`export NAME=value` lines, as make-local.sh prints them."""
    pairs = [line.removeprefix("export ").split("=", 1) for line in text.splitlines()]
    return {name: value for name, value in pairs if value}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    project = f"tribunaltest{secrets.token_hex(4)}"
    directory = tmp_path_factory.mktemp("compose") / "tribunal"
    copy_repository(directory)
    started = time.monotonic()
    # The models service reads the files this host fetched (what MODELS_DIR is for): the
    # containers reach no package index here.
    fetched = run(
        [sys.executable, "-m", "tribunal", "--fleet", str(LOCAL_FLEET), "models", "fetch"],
        timeout=1800,
    )
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    model_dir = load_settings(LOCAL_FLEET).model_dir
    made = run(
        [str(directory / "deploy/images/make-local.sh"), "all"],
        env={**os.environ, "PYTHON": sys.executable},
        timeout=900,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    took = (
        f"{time.monotonic() - started:6.1f}s models fetch (kept ones checked) and "
        "deploy/images/make-local.sh all (images, wheels)"
    )
    password = secrets.token_hex(12)
    env = {
        **os.environ,
        **exports(made.stdout),
        "COMPOSE_PROJECT_NAME": project,
        "TRIBUNAL_IMAGE": f"{project}-tribunal:local",
        "TRIBUNAL_MODELS_IMAGE": f"{project}-models:local",
        "MODELS_DIR": str(model_dir),
        "WHEELS_ONLY": "1",
        "REDIS_PASSWORD": password,
        "GRAFANA_PASSWORD": secrets.token_hex(12),
        # Empty: Docker picks free host ports (read back with `docker-compose port`).
        "REDIS_PORT": "",
        "EXPORTER_PORT": "",
        "PROMETHEUS_PORT": "",
        "GRAFANA_PORT": "",
    }
    for name in list(env):
        if name.startswith("TRIBUNAL_") and name not in IMAGES:
            del env[name]  # a developer's TRIBUNAL_REDIS_URL must not reach the containers
    grafana = env.get("GRAFANA_IMAGE", GRAFANA_DEFAULT)
    has_grafana = run(["docker", "image", "inspect", grafana]).returncode == 0
    services = CPU_SERVICES + (["grafana"] if has_grafana else [])
    stack = Stack(directory, env, services, password, [took])
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--rmi", "local", check=False)
        run(["docker", "rmi", "-f", *(env[image] for image in IMAGES)])
        label = f"label=com.docker.compose.project={project}"
        left = {
            kind: run(["docker", kind, "ls", "-q", "--filter", label]).stdout.split()
            for kind in ("network", "volume")
        }
        left["container"] = run(["docker", "ps", "-aq", "--filter", label]).stdout.split()
        left["image"] = [
            found
            for image in IMAGES
            for found in run(["docker", "images", "-q", env[image]]).stdout.split()
        ]
        shutil.rmtree(directory.parent, ignore_errors=True)
        print("\n".join(stack.log))
        assert not any(left.values()), f"left behind: {left}"


def labels(client: redis.Redis) -> Counter[str]:
    entries: Any = client.xrange(OUTPUT)
    return Counter(json.loads(fields[b"d"])["id"] for _, fields in entries)


def wait_labeled(stack: Stack, ids: set[str]) -> Counter[str]:
    # One client, its port looked up once: each `docker-compose port` costs ~0.4 CPU-s, which
    # polled every second took a fifth of the cores the models label with.
    client, started = stack.redis(), time.monotonic()
    while True:
        seen = labels(client)
        if ids <= set(seen) or time.monotonic() - started > LABELED_WITHIN_S:
            return seen
        time.sleep(1)


def keep_dependency_layer(stack: Stack, local_models: str, tag: str) -> None:
    """Tag an image's dependency stage (all cached by now) as ``tag``, so that removing the
    built image keeps that layer for the next run, and nothing is left untagged."""
    old = run(["docker", "images", "-q", tag]).stdout.strip()
    argv = ["docker", "build", "-q", "--target", "deps", "-t", tag]
    argv += ["--build-arg", f"LOCAL_MODELS={local_models}"]
    for arg in ("PYTHON_IMAGE", "WHEELS_ONLY"):
        argv += ["--build-arg", f"{arg}={stack.env[arg]}"]
    built = run([*argv, "."], cwd=stack.directory, env=stack.env, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    new = run(["docker", "images", "-q", tag]).stdout.strip()
    if old and old != new:
        run(["docker", "rmi", old])


def test_stack_builds_starts_and_turns_healthy(stack: Stack) -> None:
    stack.compose("up", "-d", "--build", *stack.services, timeout=1800)
    keep_dependency_layer(stack, "0", "tribunal-local/deps:test")
    keep_dependency_layer(stack, "1", "tribunal-local/deps:models")
    took = stack.wait_healthy()
    stack.log.append(f"{took:6.1f}s until every healthcheck passed (models loaded)")
    fetch = run(
        ["docker", "ps", "-a", "--filter", stack.label, "--filter",
         "label=com.docker.compose.service=models-fetch", "--format", "{{.Status}}"]
    )  # fmt: skip
    assert fetch.stdout.startswith("Exited (0)"), fetch.stdout
    # Healthy means loaded; the caches are warmed right after (a few seconds, more on a
    # busy machine): wait for the four lines.
    started = time.monotonic()
    served = stack.compose("logs", "models")
    while served.count("prompt cache for") < len(MODELS) and time.monotonic() - started < 180:
        time.sleep(2)
        served = stack.compose("logs", "models")
    assert "thread budget: 4 model server(s)" in served, served[-3000:]
    assert served.count("prompt cache for") == len(MODELS), served[-3000:]


def sample(directory: Path, records: list[dict[str, Any]], name: str) -> tuple[str, str]:
    """A JSONL file of ``records`` for the producer service: its INGEST_DIR/INGEST_FILE."""
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"INGEST_DIR={directory}", f"INGEST_FILE={name}"


def sentiment_tickets() -> list[dict[str, Any]]:
    lines = TICKETS.read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["task"] == "sentiment"]


def decisions(client: redis.Redis) -> list[Decision]:
    entries: Any = client.xrange(OUTPUT)
    return [Decision.model_validate_json(fields[b"d"]) for _, fields in entries]


def test_producer_service_labels_bundled_tickets_with_the_real_models(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    records = sentiment_tickets()[:SAMPLE]
    out = stack.produce(*sample(stack.directory.parent / "in", records, "sample.jsonl"))
    ids = {r["id"] for r in records}
    assert f"produced {len(ids)}" in out, out
    seen = wait_labeled(stack, ids)
    assert set(seen) == ids, f"missing {sorted(ids - set(seen))[:10]}"
    assert all(count == 1 for count in seen.values()), seen.most_common(3)
    client = stack.redis()
    assert client.xlen(REJECTS) == 0 and client.xlen(DEAD) == 0
    labeled = decisions(client)
    with capsys.disabled():  # on the terminal, passing or not, as the demo prints it
        console = Console(width=100)
        console.print(f"\nthe compose stack's cpu profile on {len(labeled)} bundled tickets:")
        console.print(agreement_table(labeled))
        console.print(f"model time per label: {cost_line(labeled)}")
    voters = {v.worker for d in labeled for v in d.votes if v.label is not None}
    assert voters == {"qwen-05b", "gemma-270m", "smollm2-135m"}, voters
    assert any(d.judge for d in labeled), "the judge decided nothing"
    right = sum(d.label == d.gold for d in labeled)
    # The lexicon stand-ins are right ~55% of the time, this fleet 92-95% (the demo).
    assert right >= 0.75 * len(labeled), f"{right} of {len(labeled)} right"


def prometheus_query(port: int, query: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        result: list[Any] = json.load(response)["data"]["result"]
        return result


def test_prometheus_scrapes_the_exporter_and_the_model_servers(stack: Stack) -> None:
    port = stack.port("prometheus", 9090)
    query = 'tribunal_stream_entries_added_total{job="tribunal",stream="output"}'
    tokens = 'llamacpp:prompt_tokens_total{job="llama-server"} > 0'
    started, value, servers = time.monotonic(), 0.0, set()
    while time.monotonic() - started < 120:  # scrape_interval 15 s, DNS refresh 30 s
        result = prometheus_query(port, query)
        value = float(result[0]["value"][1]) if result else 0.0
        servers = {r["metric"]["model"] for r in prometheus_query(port, tokens)}
        if value >= SAMPLE and servers == MODELS:
            break
        time.sleep(3)
    assert value == SAMPLE, f"Prometheus has {query} = {value}"
    assert servers == MODELS, f"llama-servers with prompt tokens in Prometheus: {servers}"
    stack.log.append(f"{time.monotonic() - started:6.1f}s until Prometheus had scraped it all")
    names = prometheus_query(port, 'count by (__name__) ({__name__=~"tribunal_.+"})')
    assert len(names) > 10, names
    assert prometheus_query(port, 'tribunal_up{job="tribunal"}')[0]["value"][1] == "1"
    up = prometheus_query(port, 'up{job="llama-server"}')
    assert {r["metric"]["model"]: r["value"][1] for r in up} == dict.fromkeys(MODELS, "1")


def test_restarting_a_worker_and_redis_loses_nothing(stack: Stack) -> None:
    records = sentiment_tickets()
    first = {r["id"] for r in records[:SAMPLE]}
    stack.compose("restart", "worker-smollm2-135m", "redis")
    took = stack.wait_healthy()
    stack.log.append(f"{took:6.1f}s until healthy again after restarting a worker and redis")
    seen = labels(stack.redis())
    assert set(seen) == first and all(n == 1 for n in seen.values()), "labels lost in a restart"

    # The same file again: known ids are not added twice.
    stack.produce(*sample(stack.directory.parent / "in", records[:SAMPLE], "sample.jsonl"))
    # New tickets through the restarted fleet.
    more = [{**r, "id": "again-" + r["id"]} for r in records[SAMPLE : SAMPLE + 8]]
    out = stack.produce(*sample(stack.directory.parent / "more", more, "more.jsonl"))
    assert f"produced {len(more)}" in out, out
    new = {r["id"] for r in more}
    seen = wait_labeled(stack, first | new)
    assert set(seen) == first | new, f"missing {sorted((first | new) - set(seen))[:10]}"
    assert all(count == 1 for count in seen.values()), seen.most_common(3)
    client = stack.redis()
    groups: Any = client.xinfo_groups(ITEMS)
    for group in groups:  # every worker, the restarted one too, read everything and acked it
        assert group["pending"] == 0 and group["lag"] == 0, group


def test_grafana_serves_the_dashboard(stack: Stack) -> None:
    if "grafana" not in stack.services:
        pytest.skip(
            f"no Grafana image here ({stack.env.get('GRAFANA_IMAGE', GRAFANA_DEFAULT)}: no "
            "registry to pull from, no Debian package to build one; set GRAFANA_IMAGE to a "
            "local image to include it)"
        )
    port = stack.port("grafana", 3000)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/search?query=tribunal",
        headers={"Authorization": "Basic " + _basic("admin", stack.env["GRAFANA_PASSWORD"])},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert any(d.get("title", "").lower() == "tribunal" for d in json.load(response))


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()
