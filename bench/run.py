"""The benchmark run: baselines and the real pipeline, on one model, in one run.

Every ratio compares figures measured in the same run on the same machine, so a
shared, noisy machine moves both sides together. :func:`run_bench` lists the run's
phases; each is one step of :class:`_Run`, which holds what the steps share.

With ``engine="vllm"`` (run from vLLM's venv, ``make install-vllm``) the workers run the
vLLM engine and the baseline is vLLM's own offline ``LLM.generate`` on the same items
(:mod:`bench.vllm_offline`). The direct ``generate`` baselines do not run there: that
venv's transformers is older than the one the static engine and its baselines are
measured on; the figures say so under ``skipped``.
"""

from __future__ import annotations

import importlib
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.direct import Direct
from bench.hardware import dtype_name, matmul_peak_gflops, memory_gbps, mfu, roofline_tokens_per_s
from bench.pipeline import (
    Cluster,
    celery_noop_rate,
    first_token_ms,
    first_tokens_behind_backlog,
    model_process_rss_mb,
    run_jobs,
)
from bench.report import Phases
from bench.vllm_offline import measure_offline
from bench.workloads import Item, mixed, shared_prefix, uniform
from completion_queue import (
    TINY_MODEL_NAME,
    Settings,
    WorkerProcess,
    engine_rows,
    stop_workers,
)
from engine.tiny import ensure_tiny_model
from producer import CompletionClient
from producer.stats import percentile

#: Short streamed jobs whose time to first token :meth:`_Run.behind_backlog` measures.
PROBE_JOBS = 8
PROBE_NEW_TOKENS = 8

#: The shared-prefix workload's workers compute a shared header once from this length on.
PREFIX_MIN_TOKENS: int = Settings.model_fields["prefix_min_tokens"].default


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the issue's defaults finish in under 3 minutes on 2 CPU cores."""

    jobs: int = 1024
    new_tokens: int = 32
    batch_size: int = 32
    model: str = TINY_MODEL_NAME
    device: str = "auto"
    dtype: str = "auto"
    workers: int = 1
    engine: Literal["static", "continuous", "vllm"] = "static"
    batch_wait_ms: int = 20
    batch_lookahead: int = Settings.model_fields["batch_lookahead"].default
    mixed_jobs: int = 512
    naive_jobs: int = 48
    queue_jobs: int = 2000
    latency_jobs: int = 20
    schema_jobs: int = 256
    stream_jobs: int = 64
    #: Tokens of the header every job of the shared-prefix workload starts with (0: no run).
    shared_prefix_tokens: int = 0
    shared_prefix_jobs: int = 64
    #: Batch jobs of ``backlog_new_tokens`` running while probes measure time to first
    #: token (0: no run).
    backlog_jobs: int = 256
    backlog_new_tokens: int = 128


def run_bench(config: BenchConfig, *, progress: Any = print) -> dict[str, Any]:
    """Run every measurement of ``cq bench`` and return the figures."""
    # Before the clock starts: torch's import (seconds) is no phase, nor part of ``bench_s``.
    importlib.import_module("torch")
    run = _Run(config, Phases(progress))
    run.direct_baselines()
    run.fp32_baseline()
    run.matmul_peak()
    run.memory_bandwidth()
    with tempfile.TemporaryDirectory(prefix="cq-bench-") as tmp:
        run.vllm_offline(Path(tmp))
        cluster = run.start_cluster(Path(tmp))
        try:
            workers = cluster.start_workers(1)
            with CompletionClient(settings=cluster.settings(1)) as client:
                run.uniform(client, workers[0])
                run.mixed(client, workers[0])
                run.queue(client)
                run.latency(client)
                run.time_to_first_token(client)
                run.behind_backlog(client)
                run.structured(client)
                run.sampled(client)
                run.vllm_shared_prefix(client)
            stop_workers(workers)
            run.celery_noop(cluster)
            run.shared_prefix(cluster)
            run.more_workers(cluster)
        finally:
            cluster.stop()
    run.against_hardware()
    run.ratios()
    run.describe()
    return run.finish()


class _Run:
    """One run's state: its config, the model's path and workloads, the figures so far.

    Each step measures one thing, announces it on one progress line (a phase of
    ``phase_s``) and adds its figures.
    """

    def __init__(self, config: BenchConfig, progress: Phases) -> None:
        """Load the model plainly (the direct baselines' copy) and make the workloads."""
        self.config = config
        self.progress = progress
        # A phase of its own: a second or more, which bench_s counts and phase_s must too.
        progress(f"load {config.model} and make the workloads")
        self.path = Settings(model=config.model).model_path()
        if config.model == TINY_MODEL_NAME:
            ensure_tiny_model(self.path)
        self.direct = Direct(self.path, config.device, config.dtype)
        self.tokenizer = self.direct.tokenizer
        self.items = uniform(self.tokenizer, config.jobs, config.new_tokens)
        self.mixed_items = mixed(self.tokenizer, config.mixed_jobs)
        self.figures: dict[str, Any] = {
            "params": self.direct.params,
            "weight_bytes": self.direct.weight_bytes,
            "dtype": dtype_name(self.direct.dtype),
        }

    def direct_baselines(self) -> None:
        """Raw (batched), naive (one prompt per call) and mixed raw ``generate``; free the model."""
        config, direct = self.config, self.direct
        if config.engine == "vllm":
            self.figures["skipped"] = {"direct generate": DIRECT_SKIPPED}
            direct.close()
            return
        self.progress(
            f"direct generate ({self.figures['dtype']}): warm-up, raw (batched) and naive "
            "(one prompt per call)"
        )
        direct.run(self.items[: config.batch_size], config.batch_size)
        tokens, seconds = direct.run(self.items, config.batch_size)
        self.figures["raw_tokens_per_s"] = tokens / seconds
        tokens, seconds = direct.run(self.items[: config.naive_jobs], 1)
        self.figures["naive_tokens_per_s"] = tokens / seconds
        tokens, seconds = direct.run(self.mixed_items, config.batch_size)
        self.figures["mixed_raw_tokens_per_s"] = tokens / seconds
        direct.close()

    def fp32_baseline(self) -> None:
        """Raw ``generate`` in float32, the same items; a float32 run reuses its raw figure."""
        config = self.config
        if config.engine == "vllm":
            return
        self.figures["fp32_raw_tokens_per_s"] = self.figures["raw_tokens_per_s"]
        if self.figures["dtype"] == "float32":
            return
        self.progress("direct generate in float32: warm-up, raw (batched)")
        direct = Direct(self.path, config.device, "float32")
        direct.run(self.items[: config.batch_size], config.batch_size)
        tokens, seconds = direct.run(self.items, config.batch_size)
        self.figures["fp32_raw_tokens_per_s"] = tokens / seconds
        direct.close()

    def matmul_peak(self) -> None:
        """The best square matmul in the worker's dtype, on its threads."""
        from engine.devices import model_threads, resolve_device, resolve_dtype

        device = resolve_device(self.config.device)
        self.progress(f"matmul peak: {self.figures['dtype']} on {device}{_threads(device)}")
        self.figures["matmul_peak_gflops"] = matmul_peak_gflops(
            device, resolve_dtype(self.config.dtype, device), threads=model_threads()
        )

    def memory_bandwidth(self) -> None:
        """The best copy of a 256 MiB buffer, on the worker's threads."""
        from engine.devices import model_threads, resolve_device

        device = resolve_device(self.config.device)
        self.progress(f"memory bandwidth: a 256 MiB copy on {device}{_threads(device)}")
        self.figures["memory_gbps"] = memory_gbps(device, threads=model_threads())

    def vllm_offline(self, base: Path) -> None:
        """With the vLLM engine: vLLM's own ``LLM.generate`` on the pipeline's very items."""
        config = self.config
        if config.engine != "vllm":
            return
        workloads = {"": self.items, "mixed_": self.mixed_items}
        salted = []
        if config.shared_prefix_tokens:
            workloads["prefix_"] = workloads["prefix_off_"] = self.prefix_items()
            salted.append("prefix_off_")
        self.progress(
            f"vLLM offline LLM.generate ({self.figures['dtype']}): start, warm-up, then "
            + ", ".join(
                f"{(name or 'uniform_')[:-1]} {len(items)} jobs"
                for name, items in workloads.items()
            )
        )
        found = measure_offline(
            self.path,
            dtype=self.figures["dtype"],
            # The rows the worker's engine runs at once.
            max_rows=engine_rows(
                Settings(batch_size=config.batch_size, batch_lookahead=config.batch_lookahead)
            ),
            kv_rows=config.batch_size,
            warm_up=config.batch_size,
            workloads=workloads,
            salted=salted,
            base=base,
        )
        for name, result in found["results"].items():
            self.figures[f"{name}vllm_offline_tokens_per_s"] = result["tokens"] / result["seconds"]
        self.figures.update(
            vllm=found["vllm"],
            vllm_offline_threads=found["threads"],
            vllm_offline_dtype=found["dtype"],
            vllm_offline_load_s=found["load_s"],
        )

    def start_cluster(self, base: Path) -> Cluster:
        """An embedded Redis and a fresh database under ``base``, for workers of this config."""
        config = self.config
        return Cluster(
            base,
            # The model where it was loaded above (the tiny one built in CQ_DATA_DIR): the
            # workers' data dir is ``base``, where a model named tiny-gpt2 was never built.
            model=self.path,
            device=config.device,
            # vLLM's workers get the dtype its offline baseline ran, not their own ``auto``:
            # auto times bf16 against float32 in each process, and may choose otherwise.
            dtype=self.figures["dtype"] if config.engine == "vllm" else config.dtype,
            engine=config.engine,
            batch_size=config.batch_size,
            batch_wait_ms=config.batch_wait_ms,
            batch_lookahead=config.batch_lookahead,
            max_batch_requests=max(10_000, config.queue_jobs, config.jobs),
        )

    def uniform(self, client: CompletionClient, worker: WorkerProcess) -> None:
        """The uniform workload's throughput through one worker, and its model process's RSS."""
        config = self.config
        self.progress(f"pipeline: {config.jobs} jobs x {config.new_tokens} tokens, 1 worker")
        tokens, seconds, _ = run_jobs(client, self.items)
        self.figures["pipeline_tokens_per_s"] = tokens / seconds
        self.figures["worker_rss_mb"] = model_process_rss_mb(worker)

    def mixed(self, client: CompletionClient, worker: WorkerProcess) -> None:
        """The mixed workload's throughput through the same worker, and its RSS after."""
        self.progress(f"pipeline: mixed workload, {self.config.mixed_jobs} jobs")
        tokens, seconds, _ = run_jobs(client, self.mixed_items)
        self.figures["mixed_pipeline_tokens_per_s"] = tokens / seconds
        self.figures["worker_rss_after_mixed_mb"] = model_process_rss_mb(worker)

    def queue(self, client: CompletionClient) -> None:
        """Jobs per second of one-token jobs (the per-job cost), and of their submission."""
        count = self.config.queue_jobs
        self.progress(f"queue: {count} trivial jobs (max_new_tokens=1)")
        trivial = [Item(f"job {i}", 1) for i in range(count)]
        _, seconds, submit_s = run_jobs(client, trivial)
        self.figures["queue_jobs_per_s"] = count / seconds
        self.figures["submit_jobs_per_s"] = count / submit_s

    def latency(self, client: CompletionClient) -> None:
        """p50 and p95 latency of jobs submitted one at a time, each waited for."""
        self.progress(f"latency: {self.config.latency_jobs} jobs one at a time")
        latencies = []
        for item in self.items[: self.config.latency_jobs]:
            job = client.wait(client.submit(**item.request()), timeout=600)
            latencies.append((job.latency_s or 0) * 1000)
        self.figures["p50_latency_ms"] = percentile(latencies, 50)
        self.figures["p95_latency_ms"] = percentile(latencies, 95)

    def time_to_first_token(self, client: CompletionClient) -> None:
        """p50 and p95 time to first token of streamed jobs submitted at once."""
        self.progress(f"time to first token: {self.config.stream_jobs} streamed jobs at once")
        firsts = first_token_ms(client, self.items[: self.config.stream_jobs])
        self.figures["p50_ttft_ms"] = percentile(firsts, 50)
        self.figures["p95_ttft_ms"] = percentile(firsts, 95)

    def behind_backlog(self, client: CompletionClient) -> None:
        """Time to first token of short jobs on the idle worker, then behind a batch backlog.

        Both runs submit :data:`PROBE_JOBS` streamed jobs of :data:`PROBE_NEW_TOKENS` at
        once (interactive, the default lane); the second once ``backlog_jobs`` batch lines
        generate. ``backlog_ttft_steps`` is what the backlog adds, in the engine's steps
        then: (behind - idle) ÷ step, the idle run's time being the queue's own and a prefill.
        """
        config = self.config
        if not config.backlog_jobs:
            return
        probes = uniform(self.tokenizer, PROBE_JOBS, PROBE_NEW_TOKENS, seed=7)
        self.progress(
            f"time to first token behind a backlog: {PROBE_JOBS} jobs x {PROBE_NEW_TOKENS} "
            f"tokens idle, then behind {config.backlog_jobs} batch jobs x "
            f"{config.backlog_new_tokens} tokens"
        )
        idle = first_token_ms(client, probes)
        backlog = uniform(self.tokenizer, config.backlog_jobs, config.backlog_new_tokens, seed=3)
        behind = first_tokens_behind_backlog(client, backlog, probes)
        figures = self.figures
        figures["idle_p50_ttft_ms"] = percentile(idle, 50)
        figures["backlog_p50_ttft_ms"] = percentile(behind.ttft_ms, 50)
        figures["backlog_step_ms"] = behind.step_ms
        figures["backlog_ttft_steps"] = (
            figures["backlog_p50_ttft_ms"] - figures["idle_p50_ttft_ms"]
        ) / behind.step_ms
        figures["backlog_running"] = behind.backlog_running

    def structured(self, client: CompletionClient) -> None:
        """The same jobs plain, then with every second one constrained to a JSON schema."""
        count = self.config.schema_jobs
        self.progress(f"structured output: {count} jobs, then half constrained")
        tokens, seconds, _ = run_jobs(client, self.items[:count])
        self.figures["schema_none_tokens_per_s"] = tokens / seconds
        tokens, seconds, _ = run_jobs(client, self.items[:count], with_schema=2)
        self.figures["schema_half_tokens_per_s"] = tokens / seconds

    def sampled(self, client: CompletionClient) -> None:
        """The structured workload's plain jobs sampled at the API's default temperature."""
        count = self.config.schema_jobs
        self.progress(f"sampled: {count} jobs at the API's default temperature, 1")
        tokens, seconds, _ = run_jobs(client, self.items[:count], sampled=True)
        self.figures["sampled_tokens_per_s"] = tokens / seconds

    def celery_noop(self, cluster: Cluster) -> None:
        """The per-job cost's baseline: a bare Celery no-op task on the same Redis."""
        self.progress(f"celery no-op baseline: {self.config.queue_jobs} tasks")
        self.figures["celery_noop_jobs_per_s"] = celery_noop_rate(cluster, self.config.queue_jobs)

    def prefix_items(self) -> list[Item]:
        """The shared-prefix workload's items: ``shared_prefix_jobs`` jobs, one header."""
        config = self.config
        return shared_prefix(
            self.tokenizer,
            config.shared_prefix_jobs,
            config.shared_prefix_tokens,
            config.new_tokens,
        )

    def vllm_shared_prefix(self, client: CompletionClient) -> None:
        """With the vLLM engine: the shared prefix through the worker at hand, caching on.

        Its prefix caching is on at the default ``CQ_PREFIX_MIN_TOKENS``, as a fresh
        worker's would be; this saves one start of vLLM (20 to 60 s here).
        """
        config = self.config
        if config.engine != "vllm" or not config.shared_prefix_tokens:
            return
        items = self.prefix_items()
        self.progress(
            f"shared prefix: {len(items)} jobs, a {config.shared_prefix_tokens}-token header, "
            f"CQ_PREFIX_MIN_TOKENS={PREFIX_MIN_TOKENS} (vLLM's prefix caching on), "
            "the same worker"
        )
        tokens, seconds, _ = run_jobs(client, items)
        self.figures["prefix_pipeline_tokens_per_s"] = tokens / seconds

    def shared_prefix(self, cluster: Cluster) -> None:
        """With ``shared_prefix_tokens``: one worker with prefix reuse at its default, then off.

        With the vLLM engine the first was measured on the run's worker already.
        """
        config = self.config
        if not config.shared_prefix_tokens:
            return
        items = self.prefix_items()
        found: dict[str, float] = {}
        for key, min_tokens in (("prefix", PREFIX_MIN_TOKENS), ("prefix_off", 0)):
            if f"{key}_pipeline_tokens_per_s" in self.figures:
                found[f"{key}_pipeline_tokens_per_s"] = self.figures[f"{key}_pipeline_tokens_per_s"]
                continue
            self.progress(
                f"shared prefix: {len(items)} jobs, a {config.shared_prefix_tokens}-token header, "
                f"CQ_PREFIX_MIN_TOKENS={min_tokens}"
            )
            workers = cluster.start_workers(1, prefix_min_tokens=min_tokens)
            with CompletionClient(settings=cluster.settings(1)) as client:
                tokens, seconds, _ = run_jobs(client, items)
            stop_workers(workers)
            found[f"{key}_pipeline_tokens_per_s"] = tokens / seconds
        found["prefix_reuse_speedup"] = (
            found["prefix_pipeline_tokens_per_s"] / found["prefix_off_pipeline_tokens_per_s"]
        )
        self.figures.update(found)

    def more_workers(self, cluster: Cluster) -> None:
        """With ``workers`` > 1: the uniform workload through that many, against one worker."""
        config = self.config
        if config.workers <= 1:
            return
        self.progress(f"pipeline: {config.jobs} jobs, {config.workers} workers")
        workers = cluster.start_workers(config.workers)
        with CompletionClient(settings=cluster.settings(config.workers)) as client:
            tokens, seconds, _ = run_jobs(client, self.items)
        stop_workers(workers)
        self.figures["workers_pipeline_tokens_per_s"] = tokens / seconds
        self.figures["workers_over_one"] = tokens / seconds / self.figures["pipeline_tokens_per_s"]

    def against_hardware(self) -> None:
        """The pipeline's share of the matmul peak, and the decode step's memory roofline."""
        figures = self.figures
        figures["pipeline_mfu"] = mfu(
            figures["params"], figures["pipeline_tokens_per_s"], figures["matmul_peak_gflops"]
        )
        figures["decode_roofline_tokens_per_s"] = roofline_tokens_per_s(
            figures["weight_bytes"], self.config.batch_size, figures["memory_gbps"]
        )

    def ratios(self) -> None:
        """Each ratio of :data:`RATIOS` (the vLLM run's: :data:`VLLM_RATIOS`), from this run."""
        figures = self.figures
        ratios = VLLM_RATIOS if self.config.engine == "vllm" else RATIOS
        for name, (numerator, denominator) in ratios.items():
            if numerator in figures and denominator in figures:
                figures[name] = figures[numerator] / figures[denominator]

    def describe(self) -> None:
        """The machine, the GPU, torch's version and the config the figures come from."""
        import torch

        settings = asdict(self.config)
        self.figures.update(
            machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            torch=torch.__version__,
            transformers=importlib.import_module("transformers").__version__,
            # ``dtype`` is the worker's resolved dtype; the option asked for (auto...) is this one.
            dtype_option=settings.pop("dtype"),
            **settings,
        )

    def finish(self) -> dict[str, Any]:
        """Close the last phase; return the figures with every phase's seconds."""
        self.figures.update(self.progress.seconds())
        return self.figures


def _threads(device: Any) -> str:
    """The progress lines' note of the CPU threads a worker's model process uses."""
    from engine.devices import model_threads

    return f", {model_threads()} threads" if device.type == "cpu" else ""


#: Each ratio of the report: its numerator and denominator figures.
RATIOS = {
    "pipeline_over_raw": ("pipeline_tokens_per_s", "raw_tokens_per_s"),
    "pipeline_over_naive": ("pipeline_tokens_per_s", "naive_tokens_per_s"),
    "mixed_pipeline_over_raw": ("mixed_pipeline_tokens_per_s", "mixed_raw_tokens_per_s"),
    "queue_over_celery": ("queue_jobs_per_s", "celery_noop_jobs_per_s"),
    "schema_half_over_none": ("schema_half_tokens_per_s", "schema_none_tokens_per_s"),
    "sampled_over_greedy": ("sampled_tokens_per_s", "schema_none_tokens_per_s"),
    "pipeline_over_fp32_raw": ("pipeline_tokens_per_s", "fp32_raw_tokens_per_s"),
    "pipeline_over_roofline": ("pipeline_tokens_per_s", "decode_roofline_tokens_per_s"),
}

#: The vLLM run's ratios: those of :data:`RATIOS` it has figures for (no direct
#: ``generate`` there), and the pipeline against vLLM's own offline ``LLM.generate``.
VLLM_RATIOS = {
    **RATIOS,
    "pipeline_over_vllm_offline": ("pipeline_tokens_per_s", "vllm_offline_tokens_per_s"),
    "mixed_pipeline_over_vllm_offline": (
        "mixed_pipeline_tokens_per_s",
        "mixed_vllm_offline_tokens_per_s",
    ),
    "prefix_pipeline_over_vllm_offline": (
        "prefix_pipeline_tokens_per_s",
        "prefix_vllm_offline_tokens_per_s",
    ),
    "prefix_off_pipeline_over_vllm_offline": (
        "prefix_off_pipeline_tokens_per_s",
        "prefix_off_vllm_offline_tokens_per_s",
    ),
    "vllm_offline_prefix_reuse_speedup": (
        "prefix_vllm_offline_tokens_per_s",
        "prefix_off_vllm_offline_tokens_per_s",
    ),
}

#: Why the vLLM run has no direct ``generate`` baselines (raw, naive, mixed raw, fp32 raw).
DIRECT_SKIPPED = (
    "not run with --engine vllm: vLLM's venv pins transformers below the release the static "
    "engine and its baselines are measured on (cq bench in the default venv measures them); "
    "the baseline here is vLLM's own offline LLM.generate"
)
