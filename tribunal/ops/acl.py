"""The least each role needs from Redis, as ACL rules: which commands, which keys.

One place for the rules, so the shipped ACL file, the docs and the tests agree.
Scripts run with the caller's permissions, so a role that casts votes or settles
items also needs the commands its Lua scripts call. ``tribunal acl`` prints a
users file with passwords taken from the environment, stored only as SHA-256.
"""

from __future__ import annotations

import hashlib

ROLES = ("producer", "serve", "worker", "aggregator", "judge", "labels", "monitor")

# CLUSTER SLOTS/SHARDS and COMMAND: what redis-py's cluster client needs to find slots and keys.
_CONNECT = "+ping +client|setname +cluster|slots +cluster|shards +command +time"
# XINFO CONSUMERS and XCLAIM: take over what a silent consumer holds; EVAL of the scripts that
# renew the claim on a running batch and remove a silent consumer holding nothing.
_CONSUMER = (
    "+xreadgroup +xack +xautoclaim +xpending +xgroup|create +xgroup|delconsumer +multi +exec "
    "+xinfo|consumers +xclaim +eval "
    "+zadd +zrem +zremrangebyscore +hincrby +hincrbyfloat"  # heartbeats and stats
)
# EVAL plus what common/scripts.py's scripts call inside.
_SCRIPTS = "+eval +exists +get +set +del +hset +hsetnx +hlen +hincrby +hgetall +zadd +zrem +xadd"
_JANITOR = "+xinfo|groups +xinfo|consumers +xpending +xtrim +exists"


def _keys(namespace: str, *names: str) -> str:
    return " ".join(f"~{namespace}:{{*}}:{name}" for name in names)


def rules(role: str, namespace: str = "tribunal") -> str:
    """ACL rules (without user name and password) for one role."""
    ns = namespace
    per_role = {
        # WAIT: with wait_replicas, each chunk waits for replicas to have it. EVAL: the script
        # that adds a chunk once, skipping ids the fleet knows (settled, voted on or queued).
        "producer": (
            "+xadd +xinfo|groups +xlen +exists +wait +get +set +eval",
            _keys(ns, "items", "partitions", "produced:*", "state:*", "votes:*", "queued:*"),
        ),
        # MGET: which items of a batch are settled. XRANGE, GET, SET: a student reads the
        # lessons and keeps its snapshot (student:NAME).
        "worker": (
            f"{_CONSUMER} {_SCRIPTS} +mget +xrange",
            _keys(
                ns,
                "items",
                "tier:*",
                "lessons",
                "student:*",
                "votes:*",
                "state:*",
                "queued:*",
                "ready",
                "deadlines",
                "rejects",
                "stats",
                "heartbeats",
                "partitions",
            ),
        ),
        "aggregator": (
            f"{_CONSUMER} {_SCRIPTS} {_JANITOR} +hgetall +hget +zrangebyscore +xrange",
            _keys(
                ns,
                "ready",
                "votes:*",
                "state:*",
                "queued:*",
                "deadlines",
                "judge",
                "output",
                "dead",
                "stats",
                "heartbeats",
                "items",
                "tier:*",
                "rejects",
                "audits",
                "review",
                "lessons",
                "partitions",
            ),
        ),
        "judge": (
            f"{_CONSUMER} {_SCRIPTS}",
            _keys(
                ns,
                "judge",
                "state:*",
                "votes:*",
                "queued:*",
                "deadlines",
                "output",
                "dead",
                "audits",
                "review",
                "lessons",
                "stats",
                "heartbeats",
                "partitions",
            ),
        ),
        # tribunal serve: what a producer does, its heartbeat (a script on TIME) and
        # counters, and an item's lookup (its keys, PTTL, the final streams around its end).
        "serve": (
            "+xadd +xinfo|groups +xlen +exists +wait +get +set +eval +pttl +xrange +xrevrange "
            "+zadd +zrem +zremrangebyscore +hincrby",
            _keys(ns, "items", "partitions", "produced:*", "state:*", "votes:*", "queued:*")
            + " "
            + _keys(ns, "stats", "heartbeats")
            + " "
            + _keys(ns, "output", "rejects", "dead").replace("~", "%R~"),  # read only
        ),
        "labels": (
            f"{_CONSUMER} +get +set",
            _keys(ns, "output", "stats", "heartbeats", "partitions"),
        ),
        "monitor": (
            "+xinfo|stream +xinfo|groups +xinfo|consumers +xlen +xrange +xrevrange +xpending "
            "+hgetall +zrange +zrangebyscore +zcard +exists +scan +time",
            f"%R~{ns}:*",
        ),
    }
    if role not in per_role:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    commands, keys = per_role[role]
    return f"resetkeys resetchannels -@all {_CONNECT} {commands} {keys}"


def user_line(
    role: str, password: str, namespace: str = "tribunal", user: str | None = None
) -> str:
    """One line of an ACL users file; the password is stored only as its SHA-256."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user {user or 'tribunal-' + role} on #{digest} {rules(role, namespace)}"
