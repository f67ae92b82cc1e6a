"""The control plane under many workers (issue 34): jobs/s of N paced workers, and what saturates.

Each worker runs the paced engine (``CQ_ENGINE=paced``: no model, no torch; a step
is a sleep), so 64 worker processes fit on two cores and the figure is what Redis,
PostgreSQL and the workers' queue side sustain. For each N the run starts N workers
(each its own node name) against one redis-server and one PostgreSQL database,
submits enough jobs to keep every worker busy for ``--busy-s`` at the paced rate,
and measures jobs/s over the steady window: from when the last worker finished its
first group (and the submit had ended) to when the first worker ran dry. Meanwhile
it samples the CPU of redis-server, the PostgreSQL processes, the workers' main and
model processes, this client and the rest of the machine, with the database's
commits/s, Redis' commands/s and the database connections, and names the first
resource to saturate.

    flock /tmp/cq-heavy.lock .venv/bin/python -m benchmarks.control_plane \\
        --workers 1,4,16,64 --json /tmp/control-plane.json

Without ``--database-url`` it starts a throwaway PostgreSQL cluster (initdb and
pg_ctl, as the tests do, ``fsync=off``) with ``max_connections`` sized for the
largest N; run it from a checkout (it uses ``tests/services.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from completion_queue import (
    EmbeddedRedis,
    Settings,
    WorkerProcess,
    child_pids,
    flush_size,
    prefetch_count,
    stop_workers,
    worker_env,
)
from db import JobRow, make_engine, make_session_factory, upgrade
from producer import CompletionClient

#: Database connections a worker may hold at once: its main process's pools (dispatch,
#: reaper) and its model process's (runner, progress writer), a few each.
CONNECTIONS_PER_WORKER = 8

#: A process this busy (cores) or more is saturated; the machine, at this share of its cores.
SATURATED = 0.85

#: The shortest steady window measured; a shorter one falls back to the middle of the run.
MIN_WINDOW_S = 5.0

CATEGORIES = ("redis-server", "postgres", "worker main", "worker model", "bench client")


@dataclass
class Sample:
    """One look at the machine: cumulative CPU seconds per process, and the servers' counters."""

    at: float
    cpu_s: dict[int, float]
    machine_busy_s: float
    commits: int
    redis_commands: int
    connections: int


@dataclass
class Probe:
    """Samples the processes of one run every ``interval_s`` in a thread."""

    groups: dict[str, list[int]]
    broker: redis.Redis
    pg_dsn: str
    postmaster: int | None
    #: Submit every job before the workers start (else once they are ready).
    submit_first: bool = False
    interval_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _processes: dict[int, psutil.Process] = field(default_factory=dict)

    def start(self) -> None:
        """Sample until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="cq-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            while True:
                self.samples.append(self._sample(conn))
                if self._stop.wait(self.interval_s):
                    self.samples.append(self._sample(conn))
                    return

    def pids(self) -> dict[int, str]:
        """Every process of the run now, with its category."""
        found = {pid: name for name, pids in self.groups.items() for pid in pids}
        if self.postmaster is not None:
            found[self.postmaster] = "postgres"
        mains = set(self.groups["worker main"])
        # One pass over /proc: a children() call per worker would read it 64 times a sample.
        for process in psutil.process_iter(["ppid"]):
            parent = process.info["ppid"]
            if parent == self.postmaster:
                found[process.pid] = "postgres"
            elif parent in mains:
                found[process.pid] = "worker model"
        return found

    def _sample(self, conn: psycopg.Connection[Any]) -> Sample:
        cpu_s: dict[int, float] = {}
        for pid in self.pids():
            try:
                process = self._processes.setdefault(pid, psutil.Process(pid))
                times = process.cpu_times()
                cpu_s[pid] = times.user + times.system
            except psutil.Error:
                continue
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        commits = conn.execute("SELECT sum(xact_commit) FROM pg_stat_database").fetchone()
        backends = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
        stats: Any = self.broker.info("stats")
        return Sample(
            at=time.time(),
            cpu_s=cpu_s,
            machine_busy_s=busy,
            commits=int(commits[0] or 0) if commits else 0,
            redis_commands=int(stats["total_commands_processed"]),
            connections=int(backends[0]) if backends else 0,
        )

    def window(self, start: float, end: float) -> dict[str, Any]:
        """CPU (cores) per category and the busiest process of each, and rates, in a window."""
        inside = [s for s in self.samples if start <= s.at <= end]
        if len(inside) < 2:
            inside = self.samples[-2:]
        first, last = inside[0], inside[-1]
        seconds = max(last.at - first.at, 1e-9)
        kinds = self.pids()
        cores: dict[str, float] = defaultdict(float)
        busiest: dict[str, float] = defaultdict(float)
        for pid, used in last.cpu_s.items():
            share = (used - first.cpu_s.get(pid, 0.0)) / seconds
            kind = kinds.get(pid, "postgres")
            cores[kind] += share
            busiest[kind] = max(busiest[kind], share)
        machine = (last.machine_busy_s - first.machine_busy_s) / seconds
        ours = sum(cores.values())
        return {
            "cores": {k: round(cores[k], 3) for k in CATEGORIES},
            "busiest_process_cores": {k: round(busiest[k], 3) for k in CATEGORIES},
            "machine_busy_cores": round(machine, 3),
            "other_processes_cores": round(max(0.0, machine - ours), 3),
            "db_commits_per_s": round((last.commits - first.commits) / seconds, 1),
            "redis_commands_per_s": round((last.redis_commands - first.redis_commands) / seconds),
            "db_connections_max": max(s.connections for s in self.samples),
        }


def _libpq(url: str) -> str:
    """The libpq DSN of a SQLAlchemy PostgreSQL URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _postmaster(url: str) -> int | None:
    """The local postmaster's pid, read from the server (None when it runs elsewhere)."""
    with psycopg.connect(_libpq(url)) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    pid_file = Path(str(row[0]) if row else "", "postmaster.pid")
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _memory(workers: Sequence[WorkerProcess]) -> dict[str, float]:
    """Mean RSS of the workers' main and model processes, and all their PSS together (MB)."""
    mains: list[float] = []
    models: list[float] = []
    pss = 0.0
    for worker in workers:
        for pid, into in [(worker.pid, mains), *((c, models) for c in child_pids(worker.pid))]:
            try:
                info = psutil.Process(pid).memory_full_info()
            except psutil.Error:
                continue
            into.append(info.rss / 2**20)
            pss += getattr(info, "pss", info.rss) / 2**20
    return {
        "main_rss_mb": round(statistics.fmean(mains), 1) if mains else math.nan,
        "model_rss_mb": round(statistics.fmean(models), 1) if models else math.nan,
        "all_workers_pss_mb": round(pss, 1),
    }


def steady(rows: Sequence[tuple[str, datetime]], submitted: float) -> tuple[float, float, int]:
    """The window in which every worker that ran jobs was running, and the jobs finished in it.

    From the later of the submit's end and the last worker's first finish, to the first
    worker's last finish (POSIX seconds).
    """
    firsts: dict[str, float] = {}
    lasts: dict[str, float] = {}
    for worker, finished in rows:
        at = finished.timestamp()
        firsts[worker] = min(firsts.get(worker, at), at)
        lasts[worker] = max(lasts.get(worker, at), at)
    start = max(submitted, *firsts.values())
    end = min(lasts.values())
    count = sum(start < finished.timestamp() <= end for _, finished in rows)
    return start, end, count


def summed_rates(rows: Sequence[tuple[str, datetime]], start: float, end: float) -> float:
    """Each worker's jobs/s from its first to its last commit in the window, added up.

    A worker commits a group's jobs at once, so counting the jobs in a window would be
    off by up to a group per worker at its edges; between a worker's commits it is not.
    """
    times: dict[str, list[float]] = defaultdict(list)
    for worker, finished in rows:
        if start <= (at := finished.timestamp()) <= end:
            times[worker].append(at)
    total = 0.0
    for mine in times.values():
        first, last = min(mine), max(mine)
        if last > first:
            total += sum(at > first for at in mine) / (last - first)
    return total


def middle_rate(rows: Sequence[tuple[str, datetime]], submitted: float) -> tuple[float, float, int]:
    """The window from the 10th to the 90th percentile finish after the submit, and its jobs."""
    times = sorted(t for _, f in rows if (t := f.timestamp()) > submitted)
    if not times:
        return submitted, submitted, 0
    first, last = int(0.1 * len(times)), int(0.9 * len(times))
    return times[first], times[last], last - first


def group_overheads_ms(
    rows: Sequence[tuple[str, datetime]], group_s: float, start: float, end: float
) -> list[float]:
    """Per worker, the time between two groups' commits beyond the paced group, in the window."""
    commits: dict[str, set[float]] = defaultdict(set)
    for worker, finished in rows:
        commits[worker].add(finished.timestamp())
    gaps = []
    for times in commits.values():
        ordered = sorted(t for t in times if start <= t <= end)
        gaps += [(b - a - group_s) * 1000 for a, b in itertools.pairwise(ordered)]
    return gaps


def bottleneck(figures: dict[str, Any]) -> str:
    """Name what saturates in a run, from its CPU split and its rate against the paced ideal."""
    busiest = figures["busiest_process_cores"]
    single = {
        "redis-server": "redis-server (one thread)",
        "postgres": "one PostgreSQL backend",
        "worker main": "a worker's main process (one Python thread)",
        "bench client": "the bench's submitting client",
    }
    for kind, what in single.items():
        if busiest[kind] >= SATURATED:
            return f"{what} at {busiest[kind]:.2f} of a core"
    cpus = psutil.cpu_count() or 1
    machine = figures["machine_busy_cores"]
    if machine >= SATURATED * cpus:
        split = {**figures["cores"], "other processes": figures["other_processes_cores"]}
        parts = ", ".join(
            f"{kind} {used:.2f}" for kind, used in sorted(split.items(), key=lambda kv: -kv[1])
        )
        return f"the CPU: {machine:.2f} of {cpus} cores busy ({parts})"
    if figures["over_paced_ideal"] >= 0.9:
        return "nothing: the workers' pace bounds the rate"
    return (
        f"no resource at its limit ({machine:.2f} of {cpus} cores busy): the time between "
        f"groups (p95 {figures['group_overhead_ms_p95']:.0f} ms beyond the paced group)"
    )


@dataclass
class Run:
    """What every N of one bench shares: the broker, the database, the workload."""

    base: Path
    broker: EmbeddedRedis
    database_url: str
    step_ms: float
    new_tokens: int
    busy_s: float
    postmaster: int | None
    #: Submit every job before the workers start (else once they are ready).
    submit_first: bool = False

    def settings(self, model: str) -> Settings:
        """Every worker's (and the client's) settings: the defaults but for the engine."""
        return Settings(
            broker_url=self.broker.url,
            database_url=self.database_url,
            data_dir=self.base,
            model=model,
            engine="paced",
            paced_step_ms=self.step_ms,
        )

    def measure(self, count: int, show: Any = print) -> dict[str, Any]:
        """Start ``count`` paced workers, keep them busy, measure; stop them."""
        model = f"paced-{count}-{os.getpid()}"
        settings = self.settings(model)
        group_s = self.new_tokens * self.step_ms / 1000
        ideal = count * settings.batch_size / group_s
        per_worker = settings.batch_size * math.ceil(self.busy_s / group_s)
        if self.submit_first:
            # Every worker must find jobs left when it starts, after the earlier ones took
            # all they hold: a flush and the prefetch.
            per_worker += flush_size(settings) + prefetch_count(settings)
        logs = self.base / f"workers-{count}"
        workers = [
            WorkerProcess(worker_env(settings), logs / f"worker-{i}.log") for i in range(count)
        ]
        submits = self._submit(settings, per_worker * count, show) if self.submit_first else None
        started = time.perf_counter()
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready(timeout_s=600)
            show(f"{count} workers ready in {time.perf_counter() - started:.0f} s")
            if submits is None:
                time.sleep(2)
            figures = self._load(
                count, settings, workers, per_worker * count, group_s, show, submits
            )
            figures.update(_memory(workers))
        finally:
            stop_workers(workers, timeout_s=60)
        figures["ideal_jobs_per_s"] = round(ideal, 1)
        figures["over_paced_ideal"] = round(figures["jobs_per_s"] / ideal, 3)
        figures["first_bottleneck"] = bottleneck(figures)
        return figures

    def _submit(self, settings: Settings, jobs: int, show: Any) -> tuple[float, float]:
        """Submit ``jobs`` jobs; return when the submit began and ended (POSIX seconds)."""
        began = time.time()
        with CompletionClient(settings=settings) as client:
            for chunk in _chunks(jobs, settings.max_batch_requests // 2):
                client.submit_many(
                    [{"prompt": f"job {i}", "max_new_tokens": self.new_tokens} for i in chunk]
                )
        submitted = time.time()
        show(f"{jobs} jobs submitted in {submitted - began:.1f} s")
        return began, submitted

    def _load(
        self,
        count: int,
        settings: Settings,
        workers: Sequence[WorkerProcess],
        jobs: int,
        group_s: float,
        show: Any,
        submits: tuple[float, float] | None,
    ) -> dict[str, Any]:
        """Submit ``jobs`` unless ``submits`` (their start and end) says they were; measure."""
        broker = redis.Redis.from_url(self.broker.url)
        probe = Probe(
            groups={
                "redis-server": [self.broker.process.pid] if self.broker.process else [],
                "worker main": [w.pid for w in workers],
                "bench client": [os.getpid()],
            },
            broker=broker,
            pg_dsn=_libpq(self.database_url),
            postmaster=self.postmaster,
        )
        probe.start()
        database = make_engine(self.database_url)
        sessions = make_session_factory(database)
        try:
            began, submitted = submits or self._submit(settings, jobs, show)
            deadline = time.monotonic() + 900
            unfinished = select(func.count()).where(
                JobRow.model == settings.model, JobRow.finished_at.is_(None)
            )
            while time.monotonic() < deadline:
                with sessions() as session:
                    if not session.scalar(unfinished):
                        break
                time.sleep(1)
            else:
                raise RuntimeError(f"{count} workers did not finish {jobs} jobs in 900 s")
        finally:
            probe.stop()
            broker.close()
        with sessions() as session:
            done = session.execute(
                select(JobRow.worker, JobRow.finished_at, JobRow.status).where(
                    JobRow.model == settings.model
                )
            ).all()
        database.dispose()
        rows = [(str(w), f) for w, f, _ in done if f is not None]
        failed = sum(s.value != "succeeded" for *_, s in done)
        start, end, finished = steady(rows, submitted)
        middle = middle_rate(rows, submitted)
        window = "every worker running"
        if end - start < MIN_WINDOW_S:
            # Jobs spread unevenly (one worker ran dry early): the middle 80% of the run instead.
            start, end, finished = middle
            window = "middle 80% of the jobs"
        gaps = group_overheads_ms(rows, group_s, start, end)
        figures = {
            "workers": count,
            "jobs": jobs,
            "failed": failed,
            "workers_that_ran_jobs": len({w for w, _ in rows}),
            "window": window,
            "window_s": round(end - start, 1),
            "middle_80_jobs_per_s": round(middle[2] / max(middle[1] - middle[0], 1e-9), 1),
            "jobs_per_s": round(summed_rates(rows, start, end), 1),
            "window_jobs_per_s": round(finished / max(end - start, 1e-9), 1),
            "submit_jobs_per_s": round(jobs / max(submitted - began, 1e-9)),
            "group_overhead_ms_p50": round(_quantile(gaps, 0.5), 1),
            "group_overhead_ms_p95": round(_quantile(gaps, 0.95), 1),
        }
        figures.update(probe.window(start, end))
        return figures


def _chunks(total: int, size: int) -> Iterator[range]:
    for first in range(0, total, size):
        yield range(first, min(total, first + size))


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(runs: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table, ratios against one worker, and the first bottleneck."""
    one = next((r["jobs_per_s"] for r in runs if r["workers"] == 1), None)
    lines = [
        "| workers | jobs/s | x one | paced ideal | CPU busy (of "
        f"{psutil.cpu_count()}) | redis | postgres | worker main | worker model | others | "
        "commits/s | redis cmds/s | DB conns | group overhead p95 ms | PSS all workers MB |",
        "|" + "---|" * 15,
    ]
    for r in runs:
        cores = r["cores"]
        ratio = f"{r['jobs_per_s'] / one:.1f}" if one else "-"
        lines.append(
            f"| {r['workers']} | {r['jobs_per_s']:,.0f} | {ratio} | {r['ideal_jobs_per_s']:,.0f} "
            f"| {r['machine_busy_cores']:.2f} | {cores['redis-server']:.2f} "
            f"| {cores['postgres']:.2f} | {cores['worker main']:.2f} "
            f"| {cores['worker model']:.2f} | {r['other_processes_cores']:.2f} "
            f"| {r['db_commits_per_s']:,.0f} | {r['redis_commands_per_s']:,} "
            f"| {r['db_connections_max']} | {r['group_overhead_ms_p95']:.0f} "
            f"| {r['all_workers_pss_mb']:,.0f} |"
        )
    for r in runs:
        lines.append(f"- {r['workers']} workers: {r['first_bottleneck']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the bench at each worker count; print the table, write the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,4,16,64", help="worker counts, comma-separated")
    parser.add_argument("--step-ms", type=float, default=25.0, help="the paced decoding step")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of each job")
    parser.add_argument("--busy-s", type=float, default=30.0, help="paced work per worker")
    parser.add_argument(
        "--submit-first",
        action="store_true",
        help="submit the backlog before the workers start: where the workers load the CPU, "
        "a submit beside them measures the submitter",
    )
    parser.add_argument("--database-url", help="PostgreSQL URL (default: a throwaway cluster)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    for name, value in (("--step-ms", args.step_ms), ("--new-tokens", args.new_tokens)):
        if value <= 0:
            parser.error(f"{name} must be > 0, got {value}")
    if min(counts) < 1:
        parser.error(f"every --workers count must be >= 1, got {args.workers}")
    base = Path(tempfile.mkdtemp(prefix="cq-control-plane-"))
    cluster = None
    url = args.database_url
    if url is None:
        from tests.services import PostgresCluster

        connections = 50 + CONNECTIONS_PER_WORKER * max(counts)
        cluster = PostgresCluster(settings=[f"max_connections={connections}"]).start()
        url = cluster.create_database("cq_control_plane")
    upgrade(url)
    broker = EmbeddedRedis(base / "redis", appendonly=False).start()
    try:
        run = Run(
            base=base,
            broker=broker,
            database_url=url,
            step_ms=args.step_ms,
            new_tokens=args.new_tokens,
            busy_s=args.busy_s,
            postmaster=_postmaster(url),
            submit_first=args.submit_first,
        )
        runs = []
        for count in counts:
            figures = run.measure(count)
            print(json.dumps(figures), flush=True)
            runs.append(figures)
    finally:
        broker.stop()
        if cluster is not None:
            cluster.stop()
    print(report(runs))
    machine = {
        "cpu": _cpu_model(),
        "cores": psutil.cpu_count(),
        "step_ms": args.step_ms,
        "new_tokens": args.new_tokens,
        "busy_s": args.busy_s,
        "submit_first": args.submit_first,
    }
    print(", ".join(f"{k}={v}" for k, v in machine.items()))
    if args.json:
        args.json.write_text(json.dumps({**machine, "runs": runs}, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
