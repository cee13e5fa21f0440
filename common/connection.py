"""Connecting to Redis, and the embedded valkey server used when no URL is configured."""

from __future__ import annotations

import functools
import logging
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis import exceptions as errors
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster

from common.settings import CLUSTER_SCHEMES, Settings

log = logging.getLogger(__name__)


def connect(
    settings: Settings, url: str | None = None, timeout_s: float | None = None, **extra: Any
) -> Redis:
    """A client for the configured server. The socket timeout sits 10 s above the longest
    command tribunal blocks in (``XREADGROUP BLOCK block_ms``, the producer's ``WAIT
    wait_timeout_ms``): a dead server is noticed, a quiet stream or a slow replica is not
    an error (nor a chunk sent again while the server still holds it).

    ``rediss://`` URLs use TLS, verified against ``tls_ca_file`` (and a client certificate
    when set); a password may come from ``redis_password_file`` instead of the URL.
    ``timeout_s`` makes a client that gives up quickly (status, health, scrapes).

    ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) names a Redis or Valkey
    Cluster by any one of its nodes: the client is redis-py's ``RedisCluster``, which finds
    the others, follows MOVED/ASK redirections and refreshes its slot map after a
    failover. It is typed as ``Redis`` here: every command tribunal sends is one both
    clients have, and all keys of one command share a partition's slot."""
    target = url or settings.redis_url
    if not target:
        raise RuntimeError("no Redis URL: set TRIBUNAL_REDIS_URL or start the embedded server")
    options: dict[str, Any] = {}
    if settings.redis_password_file is not None:
        options["password"] = settings.redis_password_file.read_text().strip()
    tls_files = {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    cluster = target.startswith(CLUSTER_SCHEMES)
    if cluster:
        target = target.replace("+cluster", "", 1)
    if target.startswith("rediss://"):
        options.update({k: str(v) for k, v in tls_files.items() if v is not None})
    elif any(tls_files.values()):
        raise ValueError("TLS files are set but the Redis URL is not rediss://")
    options |= {
        "socket_timeout": timeout_s or longest_block_s(settings) + 10,
        "socket_connect_timeout": timeout_s or 5,
        "health_check_interval": 30,
        "client_name": "tribunal",
    }
    if cluster:
        # A dead primary is retried (topology refreshed each time) until its replica takes
        # over; tribunal's own loops back off around that with their Redis-error handling.
        return cast(Redis, _cluster_class().from_url(target, **options, **extra))
    return Redis.from_url(target, **options, **extra)


def longest_block_s(settings: Settings) -> float:
    """The longest a command may rightly take before it answers: a blocking read, or WAIT."""
    wait_ms = settings.wait_timeout_ms if settings.wait_replicas else 0
    return max(settings.block_ms, wait_ms) / 1000


@functools.cache
def _cluster_class() -> Any:
    from redis.cluster import RedisCluster

    class StreamsCluster(RedisCluster):
        """RedisCluster that finds the slot of XREADGROUP itself. Its keys follow STREAMS,
        so redis-py asks the server where they are (COMMAND GETKEYS, twice per read, as
        measured): two extra round trips on every consumer read."""

        def determine_slot(self, *args: Any) -> Any:
            if str(args[0]).upper() in ("XREADGROUP", "XREAD"):
                at = next(i for i, a in enumerate(args) if a == "STREAMS" or a == b"STREAMS")
                keyslot: Any = self.keyslot
                return keyslot(args[at + 1])
            return super().determine_slot(*args)

    return StreamsCluster


def text(value: bytes | str) -> str:
    """A Redis reply value (bytes from this client) as text."""
    return value.decode() if isinstance(value, bytes) else value


def redact(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# Errors that pass, as redis-py classifies them: the server is down, restarting or loading,
# out of memory for now, or a cluster is moving slots or electing a new primary. Anything
# else is a bug or a refusal and ends the process (its supervisor restarts it; entries in
# flight are reclaimed).
PASSING_ERRORS = (
    errors.ConnectionError,  # BusyLoadingError (LOADING) is one
    errors.TimeoutError,
    errors.ClusterError,  # ClusterDownError (CLUSTERDOWN), MasterDownError (MASTERDOWN)
    errors.SlotNotCoveredError,
    errors.TryAgainError,
    errors.AskError,  # MovedError is one
    errors.ReadOnlyError,
    errors.OutOfMemoryError,
)
# Replies redis-py has no class for (NOREPLICAS), or that reach us as text: the cause inside
# an aborted transaction ("Transaction discarded because of: OOM ...").
# MISCONF: writes refused after a failed background save (a full disk, a failed fork), until a
# save succeeds again.
PASSING_REPLIES = (
    "TRYAGAIN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "LOADING",
    "OOM",
    "MISCONF",
    # A failover: the server turned replica unblocks its blocked readers (XREADGROUP BLOCK)
    # with this, before READONLY answers their next write.
    "UNBLOCKED",
)

# The one backoff of every wait on an unavailable Redis (a consumer's partition, a
# producer's send, a cluster client's first connection): redis-py's own, 0.2 s doubling
# to 2 s: quick after a blip, and back within 2 s of the end of a long outage (its cost,
# one command per process every 2 s, is nothing to a Redis that answers errors).
OUTAGE_BACKOFF = ExponentialBackoff(cap=2.0, base=0.2)


def is_transient(exc: BaseException, client: object) -> bool:
    """Whether waiting and retrying can fix ``exc`` (raised by ``client``'s commands)."""
    if isinstance(exc, errors.AskError) and not is_cluster(client):
        return False  # MOVED to a plain client: the URL names a cluster node (redis+cluster://)
    if isinstance(exc, PASSING_ERRORS):
        return True
    if isinstance(exc, errors.RedisClusterException):
        return "cannot be connected" in str(exc)  # every node down; not a cross-slot bug
    # The reply behind the exception: a pipeline names the failed command first, an aborted
    # transaction its cause.
    reply = str(exc).split("caused error: ", 1)[-1].split("because of: ", 1)[-1]
    return isinstance(exc, errors.RedisError) and reply.startswith(PASSING_REPLIES)


def server_time(redis: Redis, key: str) -> float:
    """Seconds since the epoch by the clock of the server holding ``key`` (on a cluster, its
    slot's primary: each node has its own clock, and the key's is the one that stamped it)."""
    if is_cluster(redis):
        cluster: Any = redis
        reply: Any = cluster.time(target_nodes=cluster.get_node_from_key(key))
    else:
        reply = redis.time()
    seconds, micros = reply
    return int(seconds) + int(micros) / 1e6


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)
