"""``cq`` commands that run things: up, worker, demo, bench, api, flower, model.

The worker, the API server and the benchmark are imported when their command
runs, so that every other ``cq`` command starts without loading them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from cli.demo import run_demo
from cli.group import cli, database, migrated, settings_from_env
from completion_queue import (
    TINY_MODEL_NAME,
    CompletionError,
    ConfigError,
    Settings,
    Stopped,
    WorkerProcess,
    embedded_broker,
    is_loopback,
    redact_url,
    require_extra,
    run_flower,
    stop_on_signals,
    stop_workers,
    worker_env,
    worker_placement,
)
from db import has_live_tenants
from engine.shapes import SHAPES, make_shaped_model


@cli.command()
@click.option("--jobs", "n_jobs", default=32, show_default=True, help="How many prompts to run.")
@click.option("--new-tokens", default=24, show_default=True, help="max_new_tokens per job.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for all jobs.")
def demo(n_jobs: int, new_tokens: int, timeout: float) -> None:
    """Start Redis and one worker, run prompts through the queue, print the results."""
    require_extra("worker", "cq demo")
    sys.exit(
        run_demo(
            migrated(settings_from_env()), n_jobs=n_jobs, new_tokens=new_tokens, timeout=timeout
        )
    )


@cli.command()
@click.option(
    "--workers",
    "n_workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes: one per GPU on a CUDA host (CUDA_VISIBLE_DEVICES=i each), "
    "or sharing the cores on CPU (CQ_TORCH_THREADS=(cores-1)//N each, unless set).",
)
def up(n_workers: int) -> None:
    """Run an embedded broker and its workers in the foreground until Ctrl-C or SIGTERM.

    SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop them all: each worker finishes its batch
    (warm shutdown; killed after 30 s), then the broker stops and its URL file is
    removed. One `cq up` per CQ_DATA_DIR: a second one is refused.
    """
    require_extra("worker", "cq up")
    settings = settings_from_env()
    placement = up_placement(settings, n_workers)
    try:
        with stop_on_signals():
            run_up(settings, placement)
    except Stopped as stop:
        what = "worker" if n_workers == 1 else f"{n_workers} workers"
        if not settings.broker_url:
            what += " and embedded broker"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            click.echo(f"stopped on {stop.signal.name}: {what} shut down")


def up_placement(settings: Settings, count: int) -> list[dict[str, str]]:
    """What each of `cq up`'s ``count`` workers adds to its environment (GPUs are counted,
    importing torch, only for several workers)."""
    gpus: list[str] = []
    if count > 1 and settings.device != "cpu":
        from engine.devices import visible_gpus

        gpus = visible_gpus()
    return worker_placement(settings, count, gpus=gpus, cores=os.cpu_count() or 1)


def run_up(settings: Settings, placement: list[dict[str, str]] | None = None) -> None:
    """Run `cq up`'s broker and its workers (one per item of ``placement``: what each adds
    to its environment) until a stop signal; raise if a worker exits first.

    The broker starts first: a command started at the same time waits for its URL
    while this one migrates the embedded database (or waits for that command to).
    """
    placement = placement or [{}]
    several = len(placement) > 1
    with embedded_broker(settings) as live:
        migrated(live)
        click.echo(f"broker: {redact_url(live.broker_url)}")
        click.echo(f"database: {redact_url(live.resolved_database_url())}")
        build_tiny_model(live)
        workers = [
            WorkerProcess(
                {**worker_env(live), **extra},
                live.data_dir / (f"worker-{i}.log" if several else "worker.log"),
            )
            for i, extra in enumerate(placement)
        ]
        try:
            for worker in workers:
                worker.start()
            for worker, extra in zip(workers, placement, strict=True):
                worker.wait_ready()
                gpu = extra.get("CUDA_VISIBLE_DEVICES")
                on = f" on GPU {gpu}" if gpu is not None else ""
                click.echo(f"worker {worker.pid} serving {live.model}{on}; log: {worker.log_path}")
            click.echo("submit from another shell: cq submit 'Hello' --wait   (Ctrl-C to stop)")
            while not (gone := [w for w in workers if w.process and w.process.poll() is not None]):
                time.sleep(0.5)
        finally:
            stop_workers(workers)
        code = gone[0].process.returncode if gone[0].process else None
        raise CompletionError(
            f"worker {gone[0].pid} exited with code {code}; log: {gone[0].log_path}"
        )


@cli.command()
@click.option("--model", help="Hugging Face id or local path to serve [env CQ_MODEL].")
@click.option("--device", help="auto, cpu or cuda:N [env CQ_DEVICE].")
@click.option("--dtype", help="auto, float32, float16 or bfloat16 [env CQ_DTYPE].")
@click.option("--batch-size", type=int, help="Jobs per micro-batch [env CQ_BATCH_SIZE].")
@click.option(
    "--batch-wait-ms",
    type=int,
    help="Wait to fill a batch, up to 4x while a burst still arrives [env CQ_BATCH_WAIT_MS].",
)
@click.option(
    "--metrics-port", type=int, help="Prometheus /metrics port; 0 = off [env CQ_METRICS_PORT]."
)
@click.option(
    "--hostname", help="Celery node name (default cq<pid>-<model>@<host>; %h = host name)."
)
@click.option(
    "--engine",
    type=click.Choice(["static", "continuous", "vllm", "auto", "paced"]),
    help="static, continuous, vllm (`make install-vllm`), auto: vllm where it is "
    "installed and runs here, else static; or paced: no model, each decoding step a "
    "sleep of CQ_PACED_STEP_MS (control-plane tests and benches) [env CQ_ENGINE].",
)
def worker(
    model: str | None,
    device: str | None,
    dtype: str | None,
    batch_size: int | None,
    batch_wait_ms: int | None,
    metrics_port: int | None,
    hostname: str | None,
    engine: str | None,
) -> None:
    """Run one worker process: load the model once, then serve its queue in micro-batches."""
    settings = settings_from_env(
        model=model,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        metrics_port=metrics_port,
        engine=engine,
    )
    # A vLLM worker runs in vLLM's own venv, whose transformers the [worker] floor excludes.
    require_extra("vllm" if settings.engine == "vllm" else "worker", "cq worker")
    from workers.main import run_worker

    build_tiny_model(settings)
    run_worker(migrated(settings), hostname=hostname)


def build_tiny_model(settings: Settings) -> None:
    """Build the tiny model before a worker starts, when it is the model served and not built."""
    from engine.tiny import ensure_tiny_model, is_current

    path = settings.model_path()
    if settings.model == TINY_MODEL_NAME and not is_current(path):
        click.echo("building the tiny model (once, about 20 s on 2 cores)", err=True)
        ensure_tiny_model(path)


@cli.command()
@click.option("--jobs", default=1024, show_default=True, help="Jobs in the uniform workload.")
@click.option("--new-tokens", default=32, show_default=True, help="max_new_tokens per job.")
@click.option("--batch-size", default=32, show_default=True, help="Worker (and raw) batch size.")
@click.option("--model", default=None, help="Model to run [default: CQ_MODEL].")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="auto, float32, float16 or bfloat16: the worker's and raw's.",
)
@click.option("--workers", default=1, show_default=True, help="Also run with this many workers.")
@click.option(
    "--engine",
    type=click.Choice(["static", "continuous", "vllm"]),
    default="static",
    show_default=True,
    help="Worker engine; vllm (from `make install-vllm`'s venv) is measured against "
    "vLLM's own offline LLM.generate instead of direct generate.",
)
@click.option("--mixed-jobs", default=512, show_default=True, help="Jobs in the mixed workload.")
@click.option(
    "--schema-jobs",
    default=256,
    show_default=True,
    help="Jobs in the structured-output workload (run three times: greedy, half "
    "with a JSON schema, then sampled at temperature 1).",
)
@click.option(
    "--naive-jobs",
    default=48,
    show_default=True,
    help="Jobs run one generate call each (the naive baseline).",
)
@click.option(
    "--queue-jobs",
    default=2000,
    show_default=True,
    help="Trivial jobs (max_new_tokens=1), and bare Celery no-op tasks.",
)
@click.option(
    "--latency-jobs",
    default=20,
    show_default=True,
    help="Jobs run one at a time for the latency figures.",
)
@click.option(
    "--stream-jobs",
    default=64,
    show_default=True,
    help="Streamed jobs submitted at once for time to first token.",
)
@click.option(
    "--shared-prefix-tokens",
    default=0,
    show_default=True,
    help="Also run jobs that share a header of this many tokens, with prefix reuse "
    "at its default and off (0: skip).",
)
@click.option(
    "--shared-prefix-jobs",
    default=64,
    show_default=True,
    help="Jobs in the shared-prefix workload.",
)
@click.option(
    "--backlog-jobs",
    default=256,
    show_default=True,
    help="Batch jobs running while 8 short jobs measure time to first token (0: skip).",
)
@click.option(
    "--backlog-new-tokens",
    default=128,
    show_default=True,
    help="max_new_tokens of each backlog job.",
)
@click.option(
    "--batch-lookahead",
    default=8,
    show_default=True,
    help="Batches' worth of jobs a worker takes at once.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the figures to this JSON file.",
)
def bench(json_path: Path | None, model: str | None, **options: Any) -> None:
    """Measure the pipeline against direct generate and bare Celery, in one run."""
    require_extra("worker", "cq bench")
    if options["engine"] == "vllm":
        require_extra("vllm", "cq bench --engine vllm")
    from bench.report import print_report
    from bench.run import BenchConfig, run_bench

    config = BenchConfig(model=model or settings_from_env().model, **options)
    figures = run_bench(config, progress=lambda line: click.echo(f"- {line}", err=True))
    print_report(figures)
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level.")
def api(host: str, port: int, log_level: str) -> None:
    """Serve the HTTP API (native jobs, OpenAI-compatible completions and batches).

    Each API key is a tenant that sees only its own jobs, files and batches
    (`cq keys create`, or CQ_API_KEYS). With no key at all, it binds to and
    answers loopback only, without auth. OpenAPI docs at /docs.
    """
    require_extra("api", "cq api")
    import uvicorn

    from api import create_api

    settings = migrated(settings_from_env())
    if not is_loopback(host) and not settings.api_keys and not database_has_keys(settings):
        raise ConfigError(
            f"refusing to bind {host} without an API key: create one with `cq keys create "
            "NAME` (or set CQ_API_KEYS), or bind 127.0.0.1"
        )
    app = create_api(settings)
    click.echo(f"serving the API on http://{host}:{port} (docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def database_has_keys(settings: Settings) -> bool:
    """True when the database holds a live tenant's key (see `cq keys`)."""
    with database(settings) as sessions, sessions() as session:
        return has_live_tenants(session)


@cli.command()
@click.option("--address", help="Address to bind [env CQ_FLOWER_ADDRESS, default 127.0.0.1].")
@click.option("--port", type=int, help="Port to bind [env CQ_FLOWER_PORT, default 5555].")
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep Flower's state in this file across restarts [env CQ_FLOWER_DB].",
)
def flower(address: str | None, port: int | None, db_path: Path | None) -> None:
    """Run Flower (`celery flower`) for the cluster; basic auth from CQ_FLOWER_BASIC_AUTH.

    Bound beyond loopback, Flower refuses to start without basic auth. /metrics
    (Prometheus) and /healthcheck stay open, as Flower serves them.
    """
    run_flower(settings_from_env(flower_address=address, flower_port=port, flower_db=db_path))


@cli.group()
def model() -> None:
    """Model commands."""


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--shape",
    type=click.Choice(SHAPES),
    default="tiny",
    show_default=True,
    help="tiny: 2 layers, trained for seconds. gpt2-small: GPT-2-small's shape "
    "(124M parameters) with random weights and the tiny model's tokenizer, "
    "for benchmarks.",
)
def make_tiny(directory: Path, seed: int, shape: str) -> None:
    """Build the tiny GPT-2-style model (trained for seconds on local text) into DIRECTORY.

    With --shape gpt2-small, build a GPT-2-small-shaped model with random weights
    instead; its tokenizer is the tiny model's, taken from CQ_DATA_DIR (built there
    first if missing).
    """
    require_extra("worker", "cq model make-tiny")
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} exists and is not empty")
    try:  # before the build, so a path that cannot be written is said at once
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create {directory}: {exc.strerror}", param_hint="DIRECTORY"
        ) from None
    tiny = None if shape == "tiny" else settings_from_env().model_path(TINY_MODEL_NAME)
    path = make_shaped_model(directory, shape=shape, seed=seed, tokenizer_from=tiny)
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    click.echo(f"built {shape} model in {path} ({size:.1f} MB)")
