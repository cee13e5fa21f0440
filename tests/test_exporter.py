"""``tribunal exporter`` as a real process, scraped over real HTTP, checked against Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from test_status import TTL_S, cli_env, fresh_records, start_fleet, wait_until

from common.connection import connect
from common.keys import Keys
from common.settings import Settings, load_settings
from producers.api import Producer
from tribunal.processes.embedded import EmbeddedRedis

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "dashboards" / "tribunal.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def start_exporter(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tribunal", "exporter", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the exporter never answered")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def total(found: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in found.items() if n == name and wanted <= lbls)


@pytest.fixture(scope="module")
def live(redis_url: str) -> Iterator[dict[str, Any]]:
    """One fleet run in its own namespace: a scrape while it runs (everything settled),
    and one after it stopped and more items arrived."""
    settings = load_settings(
        redis_url=redis_url, namespace=f"t{uuid.uuid4().hex[:10]}", heartbeat_ttl_s=TTL_S
    )
    redis = connect(settings)
    exporter, url = start_exporter(cli_env(settings))
    n, m = 30, 7
    fleet = start_fleet(settings)
    try:
        Producer(redis, settings).send(fresh_records(n))
        wait_until(lambda: redis.xlen(Keys(settings.namespace).output), lambda x: x == n)
        running = scrape(url)
        stats_while_running: Any = redis.hgetall(Keys(settings.namespace).stats)
    finally:
        fleet.stop()
    Producer(redis, settings).send(fresh_records(m, offset=n))
    stopped = wait_until(
        lambda: samples(scrape(url)),
        lambda s: total(s, "tribunal_live_consumers") == 0,
        timeout=TTL_S + 10,
    )
    yield {
        "settings": settings,
        "redis": redis,
        "running": running,
        "stats": stats_while_running,
        "stopped": stopped,
        "n": n,
        "m": m,
    }
    exporter.terminate()
    exporter.wait(10)


def test_metrics_match_redis_while_the_fleet_runs(live: dict[str, Any]) -> None:
    settings: Settings = live["settings"]
    redis: Redis = live["redis"]
    keys = Keys(settings.namespace)
    found, n = samples(live["running"]), live["n"]
    assert value(found, "tribunal_up") == 1
    assert value(found, "tribunal_stream_entries_added_total", stream="items") == n
    assert value(found, "tribunal_stream_length", stream="output") == n == redis.xlen(keys.output)
    assert value(found, "tribunal_stream_length", stream="judge") == redis.xlen(keys.judge)
    for name in settings.workers:
        group = f"worker:{name}"
        assert value(found, "tribunal_group_lag", stream="items", group=group) == 0
        assert value(found, "tribunal_group_entries_read_total", stream="items", group=group) == n
        assert value(found, "tribunal_group_live_consumers", stream="items", group=group) == 1
        assert value(found, "tribunal_group_stalled", stream="items", group=group) == 0
        assert value(found, "tribunal_live_consumers", role=group) == 1
    stats = {k.decode(): float(v) for k, v in live["stats"].items()}
    assert total(found, "tribunal_decisions_total") == n
    for source in ("workers", "judge"):
        assert total(found, "tribunal_decisions_total", source=source) == stats.get(
            f"decisions_total|source={source}", 0
        )
    assert value(found, "tribunal_escalations_total") == redis.xlen(keys.judge)
    assert total(found, "tribunal_votes_total") == sum(
        v for k, v in stats.items() if k.startswith("votes_total|")
    )
    assert value(found, "tribunal_rejects_total") == 0


def test_histograms_are_cumulative_with_count_and_sum(live: dict[str, Any]) -> None:
    families = {f.name: f for f in text_string_to_metric_families(live["running"])}
    latency = families["tribunal_item_latency_seconds"]
    assert latency.type == "histogram"
    series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    counts, sums = {}, {}
    for s in latency.samples:
        labels = frozenset((k, v) for k, v in s.labels.items() if k != "le")
        if s.name.endswith("_bucket"):
            series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            counts[labels] = s.value
        elif s.name.endswith("_sum"):
            sums[labels] = s.value
    assert sum(counts.values()) == live["n"]
    stats = {k.decode(): float(v) for k, v in live["stats"].items()}
    for labels, buckets in series.items():
        values = [v for _, v in sorted(buckets)]
        assert values == sorted(values), "buckets must be cumulative"
        assert sorted(buckets)[-1][0] == float("inf") and values[-1] == counts[labels]
        source = dict(labels)["source"]
        assert sums[labels] == pytest.approx(
            stats[f"item_latency_seconds|source={source}|sum"], rel=1e-6
        )
        assert 0.005 in {le for le, _ in buckets}  # every known bound, even empty ones
    for name in ("tribunal_model_call_seconds", "tribunal_batch_size"):
        assert families[name].type == "histogram" and families[name].samples


def test_lag_comes_back_when_the_consumers_stop(live: dict[str, Any]) -> None:
    found, m = live["stopped"], live["m"]
    for name in live["settings"].workers:
        group = f"worker:{name}"
        assert value(found, "tribunal_group_lag", stream="items", group=group) == m
        assert value(found, "tribunal_group_stalled", stream="items", group=group) == 1
        assert value(found, "tribunal_live_consumers", role=group) == 0
    assert value(found, "tribunal_stream_entries_added_total", stream="items") == live["n"] + m


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label matchers, grouping labels or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?", expr):
        word = match.group(0)
        if match.group(1) is None and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def served_names(text: str) -> set[str]:
    """Every sample name the exporter serves, including those of families with no sample
    yet (a counter ``x`` serves ``x_total``; a histogram its ``_bucket/_sum/_count``)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names |= {family.name + tail for tail in suffixes.get(family.type, [""])}
    return names


def test_dashboard_queries_use_only_served_metrics(live: dict[str, Any]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert len(exprs) > 15
    used = set().union(*(metric_names(e) for e in exprs))
    served = served_names(live["running"])
    ours = {name for name in used if not name.startswith("vllm:")}
    assert ours and ours <= served, sorted(ours - served)
    assert {"vllm:num_requests_waiting", "vllm:e2e_request_latency_seconds_bucket"} <= used
    assert metric_names('sum by (le, x) (rate(a_b{c="d"}[5m])) / on(x) b') == {"a_b", "b"}


def test_scrape_answers_up_0_while_redis_is_down(tmp_path: Path, make_settings: Any) -> None:
    settings = make_settings()
    with EmbeddedRedis(tmp_path / "valkey") as server:
        env = {**cli_env(settings), "TRIBUNAL_REDIS_URL": server.url}
        exporter, url = start_exporter(env)
        try:
            assert value(samples(scrape(url)), "tribunal_up") == 1
            server.stop()
            down = samples(scrape(url))  # still HTTP 200
            assert value(down, "tribunal_up") == 0
            assert not any(name == "tribunal_group_lag" for name, _ in down)
            server.restart()
            assert value(samples(scrape(url)), "tribunal_up") == 1
        finally:
            exporter.terminate()
            exporter.wait(10)
