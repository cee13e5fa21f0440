"""LocalCluster: a real 3-primary, 3-replica valkey cluster, driven with redis-py's RedisCluster.

Each test gets its own cluster (startup takes about 2 s), so the one that kills a primary
leaves nothing behind for the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from localcluster import LocalCluster
from redis import Redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas=1, data_dir=tmp_path) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    # The sync RedisCluster takes only the count from ``retry`` (redis-py 8.1 ignores its
    # backoff): a ConnectionError makes it re-read the topology and try again at once.
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    rc = RedisCluster(startup_nodes=nodes, decode_responses=True, retry=Retry(NoBackoff(), 10))
    yield rc
    rc.close()


def test_cluster_serves_keys_scripts_and_streams(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    nodes = cluster.nodes()
    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(primaries) == 3 and len(replicas) == 3
    assert {r.primary_id for r in replicas} == {p.node_id for p in primaries}
    assert len({n.pid for n in nodes}) == 6 and all(n.alive for n in nodes)
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert (cluster.data_dir / str(nodes[0].port) / "valkey.log").stat().st_size > 0

    # plain keys spread over every primary
    keys = [f"key:{i}" for i in range(30)]
    for key in keys:
        client.set(key, key.upper())
    assert [client.get(key) for key in keys] == [key.upper() for key in keys]
    owners = {cluster.primary_for_slot(client.keyslot(key)).port for key in keys}
    assert owners == {p.port for p in primaries}
    assert (
        client.get_node_from_key("key:0").port
        == cluster.primary_for_slot(client.keyslot("key:0")).port
    )

    # one hash tag, one slot: multi-key commands and two-key scripts work
    assert client.keyslot("{3}:a") == client.keyslot("{3}:b") == client.keyslot("3")
    client.mset({"{3}:a": "1", "{3}:b": "2"})
    assert client.mget("{3}:a", "{3}:b") == ["1", "2"]
    script = "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('INCRBY', KEYS[2], 5)"
    assert client.eval(script, 2, "{3}:x", "{3}:n", "set") == 5
    assert client.get("{3}:x") == "set"
    with pytest.raises(RedisClusterException, match="same key slot"):
        client.eval(script, 2, "{1}:x", "{2}:n", "set")  # refused before it is sent

    # streams: XADD, XREADGROUP, XACK on one stream; several streams only under one tag
    stream, other = "{3}:items", "{3}:more"
    for name in (stream, other):
        client.xgroup_create(name, "workers", id="0", mkstream=True)
    entry_id = client.xadd(stream, {"ticket": "t1"})
    client.xadd(other, {"ticket": "t2"})
    reply = client.xreadgroup("workers", "w1", {stream: ">", other: ">"}, count=10)
    assert sorted((s, [f for _, f in entries]) for s, entries in reply) == [
        (stream, [{"ticket": "t1"}]),
        (other, [{"ticket": "t2"}]),
    ]
    assert client.xack(stream, "workers", entry_id) == 1
    assert client.xpending(stream, "workers")["pending"] == 0
    with pytest.raises(RedisClusterException, match="same key slot"):
        client.xreadgroup("workers", "w1", {"{1}:items": ">", "{2}:items": ">"})


def test_failover_promotes_the_replica_and_keeps_replicated_data(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    key, stream = "{failover}:key", "{failover}:items"
    old = cluster.primary_for_slot(client.keyslot(key))
    replica = next(n for n in cluster.nodes() if n.primary_id == old.node_id)

    # written on the old primary and acknowledged by its replica (WAIT on the same connection)
    with Redis("127.0.0.1", old.port, decode_responses=True, single_connection_client=True) as r:
        r.set(key, "before")
        r.xgroup_create(stream, "workers", id="0", mkstream=True)
        r.xadd(stream, {"ticket": "t1"})
        r.xreadgroup("workers", "w1", {stream: ">"})  # delivered, not yet acknowledged
        assert r.wait(1, 5000) == 1

    client.get(key)  # the client knows the old topology
    cluster.kill(old)
    assert not old.alive
    promoted = cluster.wait_for_failover(old)
    assert promoted is replica and promoted.role == "primary"
    assert cluster.primary_for_slot(client.keyslot(key)) is promoted

    # the first try hits the dead node; the client re-reads the slots and retries
    assert client.get(key) == "before"
    client.set(key, "after")
    assert client.get(key) == "after"
    assert client.get_node_from_key(key).port == promoted.port
    pending = client.xpending(stream, "workers")
    assert pending["pending"] == 1  # the consumer group's PEL was replicated too
    [(entry_id, _)] = client.xrange(stream)
    assert client.xack(stream, "workers", entry_id) == 1
    assert sum(n.role == "primary" and n.alive for n in cluster.nodes()) == 3


def test_failed_start_says_why_and_leaves_no_process(tmp_path: Path) -> None:
    broken = LocalCluster(primaries=3, replicas=1, data_dir=tmp_path)
    with pytest.raises(TimeoutError, match="local cluster: timed out") as failure:
        broken.start(timeout_s=0.3)
    assert "valkey.log" in str(failure.value) and "CLUSTER INFO" in str(failure.value)
    assert not any(node.alive for node in broken.nodes())
    assert list(tmp_path.glob("*/valkey.log"))
