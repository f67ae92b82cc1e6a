"""A real worker in bfloat16 on a CPU with bf16 instructions: at the default where it pays.

The rest of the suite pins ``CQ_DTYPE=float32`` (tests/conftest.py) to compare texts
with a float32 reference. This worker runs what a user gets without setting it where
``auto`` measures bf16 faster (AMX); where bf16 measures slower (AVX512-BF16 without
AMX), ``auto`` is float32 and the worker is asked for ``bfloat16``, so the bf16 path
is tested on either CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from completion_queue import EmbeddedRedis, Settings, WorkerProcess, create_app, worker_env
from db import JobStatus
from engine.devices import cpu_runs_bf16_faster, resolve_dtype
from producer.client import CompletionClient
from producer.stats import live_workers
from tests.conftest import new_database
from tests.integration.test_prefix import assert_seeded_job_ignores_batch_mates_sharing_its_header
from tests.reference import Reference

BF16_REDIS_DB = 7
#: What /proc/cpuinfo calls the instructions that compute in bfloat16 (x86, and Arm).
NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16"}
#: How far the first token's float32 logit leads the next: bf16 moves this model's logits
#: by under 0.05, so a lead ten times that cannot flip.
LEAD = 0.5


def proc_cpuinfo_flags() -> set[str]:
    """The CPU's flags as the kernel lists them (read apart from the code under test)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell whether this CPU computes in bfloat16")
    keys = ("flags", "Features")
    return {
        f
        for line in text.splitlines()
        for f in line.partition(":")[2].split()
        if line.partition(":")[0].strip() in keys
    }


@pytest.fixture(scope="module", params=["static", "continuous"])
def default_dtype(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker of each engine whose settings leave the dtype at its default."""
    if not NATIVE_BF16 & proc_cpuinfo_flags():
        pytest.skip(
            "this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 flag): "
            "auto keeps float32 here, which the rest of the suite runs"
        )
    # What auto picks in this process: the worker measures the same products at its start.
    auto = resolve_dtype("auto", torch.device("cpu"))
    tmp = tmp_path_factory.mktemp("bf16")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("CQ_DTYPE", raising=False)  # the suite's float32 pin
        settings = Settings(
            broker_url=f"redis://127.0.0.1:{redis_server.port}/{BF16_REDIS_DB}",
            database_url=new_database("sqlite", request, tmp),
            data_dir=tmp,
            model=str(tiny_model),
            engine=request.param,
            batch_size=8,
            batch_wait_ms=20,
            max_new_tokens_limit=64,
            dtype="auto" if auto == torch.bfloat16 else "bfloat16",
        )
        worker = WorkerProcess(worker_env(settings), tmp / "worker.log")
    worker.start().wait_ready(300)
    yield settings, worker
    worker.stop()


def test_a_bf16_worker_holds_the_model_in_bf16_with_packed_layers(
    default_dtype: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = default_dtype
    # Given a worker started without CQ_DTYPE where auto is bf16 here, else with bfloat16
    assert settings.dtype == ("auto" if cpu_runs_bf16_faster() else "bfloat16")
    # When `cq workers` (and Flower: the same Celery stats) asks what it serves
    app = create_app(settings)
    try:
        [found] = live_workers(app, timeout_s=5)
    finally:
        app.close()
    # Then it holds the model in bfloat16
    assert (found.hostname, found.device, found.dtype) == (worker.nodename, "cpu", "bfloat16")
    # And its linear layers are prepacked for oneDNN (every layer of the tiny GPT-2, and lm_head)
    layers = 4 * AutoConfig.from_pretrained(settings.model).n_layer + 1
    assert f"(torch.bfloat16, {layers} prepacked layers)" in worker.log_path.read_text()


def test_a_greedy_job_in_bfloat16_runs_to_its_length(
    default_dtype: tuple[Settings, WorkerProcess], reference: Reference
) -> None:
    settings, _ = default_dtype
    prompt, asked = "The queue takes a job and", 8
    # Given a prompt whose first greedy token leads the next by LEAD in float32
    ids = torch.tensor([reference.encode(prompt)])
    with torch.inference_mode():
        logits = reference.model(ids).logits[0, -1].float()
    top = logits.topk(2)
    assert float(top.values[0] - top.values[1]) > LEAD
    first = reference.tokenizer.decode([int(top.indices[0])])
    expected_logprob = float(logits.log_softmax(-1)[top.indices[0]])
    # When greedy jobs run on the bfloat16 worker, one plain (the continuous engine's own
    # kind) and one asking for logprobs (the static path in either engine)
    asking = [
        {"prompt": prompt, "max_new_tokens": asked, "temperature": 0, "logprobs": k}
        for k in (None, 3)
    ]
    with CompletionClient(settings=settings) as client:
        done = client.wait(client.submit_many(asking), timeout=120)
    # Then each finishes at the length asked, starting with float32's first token
    for job in done:
        assert job.status is JobStatus.SUCCEEDED, job.error
        [choice] = job.choices
        assert (choice.finish_reason, choice.completion_tokens) == ("length", asked)
        assert choice.text.startswith(first), (choice.text, first)
    # And the logprobs bf16 reports are float32's, to bf16's precision; each step took its top
    logprobs = done[1].choices[0].logprobs
    assert logprobs is not None and len(logprobs) == asked
    assert logprobs[0]["logprob"] == pytest.approx(expected_logprob, abs=0.1)
    for entry in logprobs:
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]


def test_a_seeded_job_in_bfloat16_ignores_batch_mates_sharing_its_header(
    default_dtype: tuple[Settings, WorkerProcess],
) -> None:
    settings, _ = default_dtype
    with CompletionClient(settings=settings) as client:
        assert_seeded_job_ignores_batch_mates_sharing_its_header(client)
