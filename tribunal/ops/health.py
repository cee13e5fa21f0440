"""``tribunal health``: exit 0 when every asked role has a live consumer, for healthchecks.

Liveness is the heartbeat set (``consumers.engine.consumer``): each consumer loop stamps its name
(``role@host:pid``) with the time it last came round, so a consumer counts as live only
while its loop really turns — a process that hangs in a model call, or lost Redis, stops
stamping even though it still runs. ``--local`` counts only consumers on this host name,
which in a container is the container's own: the healthcheck of a worker container then
judges that container, not its replicas elsewhere.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

from redis.exceptions import RedisClusterException, RedisError

from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, LABELS_ROLE, SERVE_ROLE, Keys
from common.settings import Settings
from tribunal.ops.queues import expected_roles, quick_client, read_heartbeats, role_of

# Roles of a consumer besides worker:NAME (``consume(role=…)``).
ROLES = (AGGREGATOR_GROUP, JUDGE_GROUP, LABELS_ROLE, SERVE_ROLE)


def missing_roles(
    heartbeats: dict[str, float], roles: Sequence[str], ttl_s: float, host: str | None = None
) -> dict[str, str]:
    """Role -> why it is not live, for every asked role without a live consumer."""
    missing = {}
    for role in roles:
        ages = [
            age
            for name, age in heartbeats.items()
            if role_of(name) == role and (host is None or _host_of(name) == host)
        ]
        if not ages:
            missing[role] = "never seen" + (f" on {host}" if host else "")
        elif min(ages) > ttl_s:
            missing[role] = f"last heartbeat {min(ages):.0f}s ago (ttl {ttl_s:g}s)"
    return missing


def _host_of(consumer: str) -> str:
    """``worker:vader@host:123`` -> ``host``."""
    return consumer.partition("@")[2].rpartition(":")[0]


def run_health(settings: Settings, roles: Sequence[str] = (), local: bool = False) -> int:
    """Print the verdict; return 0 (all live), 1 (a role has no live consumer), 2 (a role
    that no consumer can have: a typo) or 3 (Redis cannot be read: nothing can be said to be
    live)."""
    asked = list(roles) or expected_roles(settings)
    unknown = [r for r in asked if r not in ROLES and not (r.startswith("worker:") and r[7:])]
    if unknown:
        known = ", ".join([*expected_roles(settings), LABELS_ROLE, SERVE_ROLE])
        print(f"error: no such role {unknown[0]!r} (this fleet's: {known})", file=sys.stderr)
        return 2
    try:
        beats = read_heartbeats(quick_client(settings), Keys(settings.namespace))
    except (RedisError, RedisClusterException) as exc:  # a cluster client connects when made
        print(f"unhealthy: cannot read Redis: {exc}", file=sys.stderr)
        return 3
    host = socket.gethostname() if local else None
    missing = missing_roles(beats, asked, settings.heartbeat_ttl_s, host)
    if missing:
        detail = "; ".join(f"{role}: {why}" for role, why in missing.items())
        print(f"unhealthy: no live consumer for {detail}", file=sys.stderr)
        return 1
    print("healthy: " + ", ".join(asked))
    return 0
