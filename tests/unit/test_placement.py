"""Where `cq up --workers N` puts each worker: a GPU each, or a share of the cores."""

from __future__ import annotations

import pytest

from completion_queue import ConfigError, Settings, worker_placement


def test_one_worker_adds_nothing_to_its_environment() -> None:
    assert worker_placement(Settings(), 1, gpus=["0", "1"], cores=16) == [{}]


def test_workers_on_a_cuda_host_each_see_one_gpu() -> None:
    placed = worker_placement(Settings(), 2, gpus=["2", "5"], cores=16)
    assert placed == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "5"}]


def test_more_workers_than_gpus_are_refused_naming_the_option() -> None:
    with pytest.raises(ConfigError, match=r"--workers must be at most the 2 GPU\(s\) here, got 3"):
        worker_placement(Settings(), 3, gpus=["0", "1"], cores=16)
    with pytest.raises(ConfigError, match=r"--workers must be >= 1, got 0"):
        worker_placement(Settings(), 0, gpus=[], cores=16)
    with pytest.raises(ConfigError, match="CQ_DEVICE must be auto or cuda"):
        worker_placement(Settings(device="cuda:1"), 2, gpus=["0", "1"], cores=16)


def test_workers_on_cpu_share_the_cores_unless_threads_are_set() -> None:
    assert worker_placement(Settings(), 4, gpus=[], cores=9) == [{"CQ_TORCH_THREADS": "2"}] * 4
    assert worker_placement(Settings(), 2, gpus=[], cores=2) == [{"CQ_TORCH_THREADS": "1"}] * 2
    on_cpu = worker_placement(Settings(device="cpu"), 2, gpus=["0", "1"], cores=9)
    assert on_cpu == [{"CQ_TORCH_THREADS": "4"}] * 2
    fixed = worker_placement(Settings(torch_threads=3), 2, gpus=[], cores=9)
    assert fixed == [{"CQ_TORCH_THREADS": "3"}] * 2
