"""The control-plane bench's arithmetic: its steady window and the bottleneck it names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks.control_plane import bottleneck, group_overheads_ms, steady, summed_rates

T0 = datetime(2026, 12, 7, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_steady_window_is_while_every_worker_runs_after_the_submit() -> None:
    # Given worker a committing groups of 2 at 1..10 s and worker b at 3..6 s
    rows = [("a", at(s)) for s in range(1, 11) for _ in range(2)]
    rows += [("b", at(s)) for s in range(3, 7) for _ in range(2)]
    # When the submit ended at 2 s
    start, end, finished = steady(rows, T0.timestamp() + 2)
    # Then the window runs from b's first commit to b's last, and holds what both
    # committed after its start: a at 4, 5, 6 and b at 4, 5, 6
    assert (start - T0.timestamp(), end - T0.timestamp()) == (3, 6)
    assert finished == 12


def test_the_rate_adds_each_workers_rate_between_its_commits() -> None:
    # Given a committing 2 jobs every second and b 4 jobs every 2 s, out of phase
    rows = [("a", at(s)) for s in range(0, 11) for _ in range(2)]
    rows += [("b", at(s + 0.5)) for s in range(0, 11, 2) for _ in range(4)]
    # Then the rate between 0 and 10 s is 2 + 2 jobs/s, whatever the window's edges
    assert summed_rates(rows, T0.timestamp(), T0.timestamp() + 10) == 4.0


def test_group_overheads_are_the_gaps_beyond_the_paced_group() -> None:
    rows = [("a", at(s)) for s in (0.0, 1.5, 3.25)]
    gaps = group_overheads_ms(rows, 1.5, T0.timestamp(), T0.timestamp() + 10)
    assert [round(g) for g in gaps] == [0, 250]


def figures(**changed: Any) -> dict[str, Any]:
    idle = dict.fromkeys(
        ("redis-server", "postgres", "worker main", "worker model", "bench client"), 0.1
    )
    return {
        "cores": idle,
        "busiest_process_cores": dict(idle),
        "machine_busy_cores": 0.6,
        "other_processes_cores": 0.1,
        "over_paced_ideal": 0.97,
        "group_overhead_ms_p95": 40.0,
        **changed,
    }


def test_the_bottleneck_named_is_a_saturated_process_then_the_cpu_then_none() -> None:
    hot = figures()
    hot["busiest_process_cores"]["redis-server"] = 0.95
    assert bottleneck(hot).startswith("redis-server (one thread) at 0.95")
    busy = bottleneck(figures(machine_busy_cores=64.0))
    assert busy.startswith("the CPU: 64.00 of")
    assert bottleneck(figures()) == "nothing: the workers' pace bounds the rate"
    assert "p95 40 ms" in bottleneck(figures(over_paced_ideal=0.5))
