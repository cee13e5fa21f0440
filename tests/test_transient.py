"""Which Redis errors a consumer waits out, and which it reports: a passing outage must never
end a consumer, a configuration error must not be waited out forever."""

from __future__ import annotations

import pytest
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    ExecAbortError,
    MovedError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)

from common.connection import is_transient

PLAIN = Redis()  # never connects: is_transient only looks at its type
CLUSTER = RedisCluster.__new__(RedisCluster)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        ResponseError("NOREPLICAS Not enough good replicas to write."),
        ResponseError("Command # 2 (EVAL local done = {} ...) of pipeline caused error: TRYAGAIN"),
        ExecAbortError("Transaction discarded because of: OOM command not allowed"),
        ResponseError("LOADING Redis is loading the dataset in memory"),
        ResponseError("MISCONF Valkey is configured to save RDB snapshots, but it's currently"),
        ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed"),
        ResponseError("Command # 2 (HINCRBY s f 1) of pipeline caused error: MISCONF Valkey is"),
        RedisClusterException("Redis Cluster cannot be connected. Please provide at least one"),
    ],
)
def test_outages_are_waited_out(exc: Exception) -> None:
    assert is_transient(exc, PLAIN)


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        NoPermissionError("this user has no permissions to run the 'eval' command"),
        ExecAbortError("Transaction discarded because of: NOPERM this user has no permissions"),
        RedisClusterException("Keys in request don't hash to the same slot"),
        ValueError("a bug"),
    ],
)
def test_bugs_and_refusals_are_not(exc: Exception) -> None:
    assert not is_transient(exc, PLAIN)


def test_moved_is_an_outage_for_a_cluster_client_and_a_wrong_url_for_a_plain_one() -> None:
    moved = MovedError("3999 127.0.0.1:7001")
    assert is_transient(moved, CLUSTER)
    assert not is_transient(moved, PLAIN)  # the URL names a cluster node: redis+cluster://
