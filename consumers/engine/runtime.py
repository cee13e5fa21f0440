"""What every consumer process shares: settings, one Redis client, key names, scripts, stop flag.

A process context only: handlers decide what happens to items, ``consumers.outcomes``
records it, ``consumers.engine.loop.consume`` runs the consumers.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

from redis import Redis
from redis.exceptions import RedisClusterException, RedisError

from common.connection import OUTAGE_BACKOFF, connect, is_transient
from common.keys import Keys
from common.lifecycle import StopFlag
from common.scripts import Scripts
from common.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    keys: Keys
    scripts: Scripts
    stop: StopFlag

    @classmethod
    def create(cls, settings: Settings, stop: StopFlag | None = None) -> Runtime:
        """The runtime of partition 0 (``partition(p)`` gives the others)."""
        keys = Keys(settings.namespace)
        scripts = Scripts(keys, settings.decided_ttl_s)
        stop = stop or StopFlag()
        return cls(settings, _connect_waiting(settings, stop), keys, scripts, stop)

    def partition(self, partition: int) -> Runtime:
        """The same process and connection, with the key names of another partition."""
        keys = Keys(self.settings.namespace, partition)
        return replace(self, keys=keys, scripts=Scripts(keys, self.settings.decided_ttl_s))


def _connect_waiting(settings: Settings, stop: StopFlag) -> Redis:
    """A client; a cluster client must reach a node to start, so while none answers it is
    waited for (like an outage later on) instead of failing the process."""
    for failures in itertools.count():
        try:
            return connect(settings)
        except (RedisError, RedisClusterException) as exc:
            if not is_transient(exc, None) or stop.is_set():
                raise
            delay = OUTAGE_BACKOFF.compute(failures)
            log.warning("cannot reach the cluster (%s); retrying in %.1fs", exc, delay)
            stop.wait(delay)
    raise AssertionError("unreachable")
