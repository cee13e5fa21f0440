"""The thread budget's arithmetic and the cores it counts (tribunal/serving/budget.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tribunal.serving.budget import available_cores, cgroup_quota, thread_budget

UNSET: dict[str, int | None] = dict.fromkeys(("qwen-05b", "gemma", "smol", "judge"))


def test_every_server_gets_the_cores_and_waits_passively() -> None:
    budget = thread_budget(UNSET, cores=2)
    assert budget.threads == {"qwen-05b": 2, "gemma": 2, "smol": 2, "judge": 2}
    assert budget.fixed == frozenset() and budget.oversubscribed == []
    line = budget.describe()
    assert "4 model server(s) on 2 cores" in line and "OMP_WAIT_POLICY=passive" in line
    assert "compete" not in line
    assert thread_budget({"judge": None}, cores=16).threads == {"judge": 16}


def test_a_fleet_file_count_is_kept_and_more_than_the_cores_is_told() -> None:
    budget = thread_budget({**UNSET, "judge": 1}, cores=8)
    assert budget.threads == {"qwen-05b": 8, "gemma": 8, "smol": 8, "judge": 1}
    assert budget.fixed == {"judge"} and "judge 1 (fleet file)" in budget.describe()
    budget = thread_budget({"a": 4, "b": None}, cores=2)
    assert budget.threads == {"a": 4, "b": 2} and budget.oversubscribed == ["a"]
    assert "the fleet file gives a more threads than cores: they compete" in budget.describe()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_or_v1_files(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(tmp_path) == expected


def test_the_cores_are_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == affinity  # no quota files: the affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 4) * 100000} 100000\n")
    assert available_cores(tmp_path) == affinity  # a quota above the affinity changes nothing
