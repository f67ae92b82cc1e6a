"""`cq up` and `cq demo` stopped by a signal, a second `cq up` refused, and a broker that is gone.

Each test runs `.venv/bin/cq` as a user does, on a data directory of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from completion_queue import EmbeddedRedis, Settings, broker_url_file
from completion_queue.redis_server import free_port
from db import JobStatus, upgrade
from producer import CompletionClient
from tests.conftest import until

CQ = str(Path(sys.executable).parent / "cq")

#: The commands that read the broker: each must fail on one line when it is gone.
BROKER_COMMANDS = [["submit", "Hello"], ["stats"], ["workers"]]


def cq_env(data_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of a user with only this data directory (and ``variables``) set."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CQ_")}
    return {**env, "CQ_DATA_DIR": str(data_dir), **variables}


def cq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CQ, *args], env=env, capture_output=True, text=True, timeout=10)


@dataclass
class Running:
    """A `cq up` / `cq demo` process, its output file and the processes it started."""

    process: subprocess.Popen[bytes]
    out: Path
    children: list[psutil.Process]

    def output(self) -> str:
        return self.out.read_text(errors="replace")


@contextlib.contextmanager
def running(env: dict[str, str], tmp_path: Path, *args: str, ready: str) -> Iterator[Running]:
    """Start ``cq *args`` and wait for ``ready`` in its output; leave nothing running after."""
    out = tmp_path / f"{args[0]}.out"
    with out.open("wb") as sink:
        process = subprocess.Popen([CQ, *args], env=env, stdout=sink, stderr=subprocess.STDOUT)
    run = Running(process, out, [])
    try:
        until(lambda: ready in run.output() or process.poll() is not None, timeout_s=180)
        assert process.poll() is None, run.output()
        run.children = psutil.Process(process.pid).children(recursive=True)
        yield run
    finally:
        if process.poll() is None:
            process.kill()
        for proc in run.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        process.wait(30)


def commands(procs: list[psutil.Process]) -> list[str]:
    return [" ".join(proc.cmdline()) for proc in procs]


def servers_on(directory: Path) -> list[psutil.Process]:
    """The redis-servers serving ``directory`` (``--dir`` makes it their working directory)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "redis-server" and proc.cwd() == str(directory.resolve()):
                found.append(proc)
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_stops_worker_and_broker(
    signum: signal.Signals, tiny_model: Path, tmp_path: Path
) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model))
    published = broker_url_file(Settings(data_dir=tmp_path / "data"))
    # Given a `cq up` serving, with the redis-server and the worker it started
    with running(env, tmp_path, "up", ready="serving") as up:
        started = commands(up.children)
        assert any("redis-server" in line for line in started), started
        assert any("-m workers" in line for line in started), started
        assert published.is_file()
        # When it receives the signal
        up.process.send_signal(signum)
        code = up.process.wait(120)
        # Then it stops them all, removes its broker file and says so on one line
        _, alive = psutil.wait_procs(up.children, timeout=15)
        assert alive == []
        assert not published.exists()
        assert code == 0, up.output()
        assert up.output().strip().splitlines()[-1] == (
            f"stopped on {signum.name}: worker and embedded broker shut down"
        )
        assert "Traceback" not in up.output()


def test_a_killed_up_leaves_no_worker_or_broker(tiny_model: Path, tmp_path: Path) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model))
    published = broker_url_file(Settings(data_dir=tmp_path / "data"))
    # Given a `cq up` serving
    with running(env, tmp_path, "up", ready="serving") as up:
        # When it is killed outright
        up.process.kill()
        up.process.wait(30)
        # Then its redis-server and worker stop too, and the next command names the stale file
        _, alive = psutil.wait_procs(up.children, timeout=30)
        assert alive == [], commands(alive)
        done = cq(env, "submit", "Hello")
        assert done.returncode == 5, done.stderr
        assert "is stale" in done.stderr
        assert not published.exists()


def test_a_client_follows_the_broker_of_a_restarted_up(tiny_model: Path, tmp_path: Path) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model))
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_model))
    # Given a long-lived client (as `cq api` holds one) of a `cq up` that served it
    with running(env, tmp_path, "up", ready="serving") as up:
        client = CompletionClient(settings=settings)
        first = client.wait(client.submit("Hello", max_new_tokens=2), timeout=60)
        before = client.app.conf.broker_url
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(120) == 0
    # When `cq up` starts again, its redis-server on another port
    with client, running(env, tmp_path, "up", ready="serving"):
        # Then the same client submits and waits through the new broker
        second = client.wait(client.submit("Hello", max_new_tokens=2), timeout=60)
        assert client.app.conf.broker_url != before
    assert first.status is second.status is JobStatus.SUCCEEDED


def test_a_second_up_on_the_same_data_dir_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model))
    published = broker_url_file(Settings(data_dir=tmp_path / "data"))
    # Given a `cq up` serving
    with running(env, tmp_path, "up", ready="serving") as first:
        url = published.read_text()
        # When another starts on the same data directory
        second = subprocess.run([CQ, "up"], env=env, capture_output=True, text=True, timeout=60)
        # Then it is refused, naming the first; the first goes on with its one broker
        assert second.returncode != 0
        assert second.stderr.splitlines() == [
            f"error: another `cq up` or `cq demo` (pid {first.process.pid}) runs the embedded "
            f"broker of {tmp_path / 'data'} ({url}): stop it first, or set CQ_DATA_DIR to "
            "another directory; `cq worker` adds a worker to it"
        ]
        assert first.process.poll() is None
        assert published.read_text() == url
        assert len(servers_on(published.parent)) == 1
        first.process.terminate()
        assert first.process.wait(120) == 0


def test_up_refuses_a_live_broker_that_no_up_owns(tmp_path: Path) -> None:
    # Given a broker file naming a server that still answers: its `cq up` was SIGKILLed
    published = broker_url_file(Settings(data_dir=tmp_path / "data"))
    published.parent.mkdir(parents=True)
    with EmbeddedRedis(tmp_path / "orphan") as orphan:
        published.write_text(orphan.url)
        # When `cq up` starts on that data directory
        done = subprocess.run(
            [CQ, "up"], env=cq_env(tmp_path / "data"), capture_output=True, text=True, timeout=60
        )
        # Then it refuses on one line naming the file, and starts no second server
        assert done.returncode != 0
        assert done.stderr.splitlines() == [
            f"error: {published} names a broker that still answers at {orphan.url}, but no "
            "`cq up` or `cq demo` owns it (one was killed): stop that redis-server, or set "
            "CQ_BROKER_URL to use it"
        ]
        assert servers_on(published.parent) == []
        assert published.read_text() == orphan.url


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: c[0])
def test_a_stale_broker_file_is_named_and_removed(command: list[str], tmp_path: Path) -> None:
    # Given a broker file whose server is gone: nothing answers at its URL
    settings = Settings(data_dir=tmp_path / "data")
    published = broker_url_file(settings)
    published.parent.mkdir(parents=True)
    upgrade(settings.resolved_database_url())
    url = f"redis://127.0.0.1:{free_port()}/0"
    published.write_text(url)
    # When a command needs the broker
    done = cq(cq_env(settings.data_dir), *command)
    # Then it fails on one line naming the stale file, which is removed; nothing was queued
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: CQ_BROKER_URL is unset and no embedded broker is running: {published} is "
        f"stale (nothing answers at {url}); start one with `cq up` (or set "
        "CQ_BROKER_URL=redis://host:6379/0)"
    ]
    assert "Traceback" not in done.stdout
    assert not published.exists()
    with CompletionClient(settings=settings) as client:
        assert client.list() == []


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: c[0])
def test_a_broker_url_nothing_answers_fails_on_one_line(command: list[str], tmp_path: Path) -> None:
    # Given CQ_BROKER_URL on a port where nothing listens
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = cq_env(tmp_path / "data", CQ_BROKER_URL=url)
    # When a command needs the broker
    done = cq(env, *command)
    # Then it fails on one error line naming the broker, with no traceback
    assert done.returncode != 0
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and url in line and "Connection refused" in line
    assert "Traceback" not in done.stdout


def test_sigterm_stops_the_demo_and_its_worker_and_broker(tiny_model: Path, tmp_path: Path) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model))
    published = broker_url_file(Settings(data_dir=tmp_path / "data"))
    # Given a `cq demo` waiting for many jobs
    with running(env, tmp_path, "demo", "--jobs", "5000", ready="submitted") as demo:
        assert any("-m workers" in line for line in commands(demo.children))
        # When it receives SIGTERM
        demo.process.send_signal(signal.SIGTERM)
        code = demo.process.wait(120)
        # Then it stops its worker and broker, removes the broker file and exits 128 + 15
        _, alive = psutil.wait_procs(demo.children, timeout=15)
        assert alive == []
        assert not published.exists()
        assert code == 128 + signal.SIGTERM, demo.output()
        assert "stopped on SIGTERM: worker and embedded broker shut down" in demo.output()
        assert "Traceback" not in demo.output()


def test_up_with_two_workers_on_cpu_lists_both_and_stops_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    env = cq_env(tmp_path / "data", CQ_MODEL=str(tiny_model), CQ_DEVICE="cpu")
    # Given `cq up --workers 2` on CPU, serving
    with running(env, tmp_path, "up", "--workers", "2", ready="submit from another") as up:
        # Then `cq workers` lists two workers, each its own process sharing the cores
        listed = cq(env, "workers", "--json")
        assert listed.returncode == 0, listed.stderr
        found = json.loads(listed.stdout)
        assert len({w["hostname"] for w in found}) == 2, found
        assert [w["threads"] for w in found] == [max(1, ((os.cpu_count() or 1) - 1) // 2)] * 2
        # When it receives SIGTERM
        up.process.send_signal(signal.SIGTERM)
        code = up.process.wait(120)
        # Then it stops both workers and the broker, and says so on one line
        _, alive = psutil.wait_procs(up.children, timeout=15)
        assert alive == [], commands(alive)
        assert code == 0, up.output()
        assert up.output().strip().splitlines()[-1] == (
            "stopped on SIGTERM: 2 workers and embedded broker shut down"
        )


def test_up_refuses_fewer_than_one_worker_before_starting_anything(tmp_path: Path) -> None:
    env = cq_env(tmp_path / "data", CQ_DEVICE="cpu")
    # A count below one is refused on one line naming --workers, before any broker starts
    done = subprocess.run(
        [CQ, "up", "--workers", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "--workers must be >= 1, got 0" in done.stderr
    assert servers_on(tmp_path / "data") == []
