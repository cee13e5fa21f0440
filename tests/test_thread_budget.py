"""The thread budget's arithmetic and the cores it counts (tribunal/serving/budget.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tribunal.serving.budget import available_cores, cgroup_quota, thread_budget

MB = 1_000_000
# The local fleet's servers, by weights size: three workers and the judge.
SIZES = {"qwen-05b": 491 * MB, "gemma": 253 * MB, "smol": 98 * MB, "judge": 1117 * MB}
UNSET: dict[str, int | None] = dict.fromkeys(SIZES)


def test_more_servers_than_cores_get_one_thread_each_and_say_they_take_turns() -> None:
    budget = thread_budget(UNSET, SIZES, cores=2)
    assert budget.threads == {"qwen-05b": 1, "gemma": 1, "smol": 1, "judge": 1}
    assert budget.total == 4 and budget.oversubscribed
    assert "more servers than cores" in budget.describe()
    assert "OMP_WAIT_POLICY=passive" in budget.describe()


def test_spare_cores_go_to_the_largest_models_first_and_the_sum_is_the_cores() -> None:
    budget = thread_budget(UNSET, SIZES, cores=6)
    assert budget.threads == {"qwen-05b": 2, "gemma": 1, "smol": 1, "judge": 2}
    budget = thread_budget(UNSET, SIZES, cores=16)
    assert budget.threads == {"qwen-05b": 4, "gemma": 4, "smol": 4, "judge": 4}
    assert budget.total == 16 and not budget.oversubscribed
    assert "take turns" not in budget.describe()


def test_a_fleet_file_count_is_kept_and_the_others_share_what_it_leaves() -> None:
    wanted = {**UNSET, "judge": 4}
    budget = thread_budget(wanted, SIZES, cores=8)
    assert budget.threads == {"qwen-05b": 2, "gemma": 1, "smol": 1, "judge": 4}
    assert budget.fixed == {"judge"} and budget.total == 8
    assert "judge 4 (fleet file)" in budget.describe()


def test_a_fleet_file_that_asks_for_more_than_the_cores_is_told_so() -> None:
    budget = thread_budget({"a": 2, "b": 2}, {}, cores=2)
    assert budget.threads == {"a": 2, "b": 2} and budget.oversubscribed
    assert "the fleet file asks for more threads than cores" in budget.describe()


def test_one_server_gets_every_core() -> None:
    assert thread_budget({"judge": None}, {}, cores=8).threads == {"judge": 8}


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
