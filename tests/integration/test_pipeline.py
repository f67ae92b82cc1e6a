"""The whole path for real: client → redis-server → worker process → SQLite / PostgreSQL."""

from __future__ import annotations

import re
import time

import pytest

from completion_queue import (
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    QueueFull,
    ValidationError,
    create_app,
    queue_name,
)
from db import JobStatus
from producer.client import CompletionClient
from tests.conftest import Stack, purge_queue
from tests.reference import Reference

PROMPTS = [
    "The queue takes a job and",
    "Once upon a time",
    "Question: what is the capital of France? Answer:",
    "def add(a, b):",
    "x",
    "Numbers: zero one two three four five six seven eight nine ten eleven twelve",
    "Dear team, thank you for your message.",
    "Redis is an in-memory data store used as a database, cache and message broker.",
    "The weather",
    "She opened the door, looked at the sky,",
]


def test_greedy_jobs_equal_direct_generate(client: CompletionClient, reference: Reference) -> None:
    # Given 50 greedy jobs of different prompts and lengths, submitted at once
    requests = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // 10),
            "max_new_tokens": 4 + i % 13,
            "temperature": 0,
        }
        for i in range(50)
    ]
    jobs = client.submit_many(requests)
    # When they run through the queue in micro-batches
    done = client.wait(jobs, timeout=120)
    # Then each text is, token for token, what a direct generate gives
    for request, job in zip(requests, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED, job.error
        text, n_tokens = reference.greedy(request["prompt"], request["max_new_tokens"])
        assert job.text == text
        assert job.completion_tokens == n_tokens
        assert job.choices[0].finish_reason == (
            "length" if n_tokens == request["max_new_tokens"] else "stop"
        )
        assert job.attempts == 1
        assert job.prompt_tokens and job.prompt_tokens > 0
        assert (
            job.started_at
            and job.finished_at
            and job.created_at <= job.started_at <= job.finished_at
        )


def test_seeded_sampling_repeats_whatever_the_batch(client: CompletionClient) -> None:
    seeded = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.9, "seed": 1234}
    alone = client.wait(client.submit(**seeded), timeout=60)
    # The same request again, in a batch with 20 other sampled and greedy jobs
    mates = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 30, "temperature": i % 2}
        for i in range(20)
    ]
    crowd = client.wait(client.submit_many([*mates[:10], seeded, *mates[10:]]), timeout=60)
    other_seed = client.wait(client.submit(**{**seeded, "seed": 99}), timeout=60)
    assert alone.status is JobStatus.SUCCEEDED
    assert crowd[10].text == alone.text
    assert crowd[10].completion_tokens == alone.completion_tokens
    assert other_seed.text != alone.text


def test_stop_sequence_cuts_text_and_length_sets_finish_reason(
    client: CompletionClient, reference: Reference
) -> None:
    prompt = "The queue takes a job and"
    full, _ = reference.greedy(prompt, 20)
    stop = full[6:9]
    assert stop.strip(), f"greedy text too uniform for this test: {full!r}"
    stopped = client.wait(
        client.submit(prompt, max_new_tokens=20, temperature=0, stop=[stop, "never-seen-zzz"]),
        timeout=60,
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]
    assert stop not in stopped.text
    long = client.wait(client.submit(prompt, max_new_tokens=7, temperature=0), timeout=60)
    assert long.choices[0].finish_reason == "length"
    assert long.completion_tokens == 7


def test_n_gives_n_choices(client: CompletionClient) -> None:
    job = client.wait(client.submit("Once upon a time", n=3, max_new_tokens=10, seed=7), timeout=60)
    assert job.status is JobStatus.SUCCEEDED
    assert len(job.choices) == 3
    assert len({c.text for c in job.choices}) == 3
    assert job.completion_tokens == sum(c.completion_tokens for c in job.choices)


def test_cancelled_queued_job_never_runs(stack: Stack, client: CompletionClient) -> None:
    queue = queue_name(stack.settings.model)
    control = create_app(stack.settings).control
    node = [stack.worker.nodename]  # a reply from each named node ends the wait (else: all 5 s)
    # Given a worker that stopped consuming its queue, and a job waiting there
    assert control.cancel_consumer(queue, reply=True, timeout=5, destination=node)
    try:
        job = client.submit("Once upon a time", max_new_tokens=5)
        cancelled = client.cancel(job.id)
    finally:
        assert control.add_consumer(queue, reply=True, timeout=5, destination=node)
    # When the worker consumes again and a later job has run
    sentinel = client.wait(client.submit("after", max_new_tokens=2), timeout=60)
    assert sentinel.status is JobStatus.SUCCEEDED
    # Then the cancelled job never ran
    after = client.get(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert after.status is JobStatus.CANCELLED
    assert after.choices == [] and after.attempts == 0 and after.started_at is None


def test_idempotent_resubmission_returns_the_same_job(client: CompletionClient) -> None:
    first = client.submit("Once upon a time", max_new_tokens=4, idempotency_key="order-17")
    again = client.submit("Once upon a time", max_new_tokens=4, idempotency_key="order-17")
    batch = client.submit_many(
        [
            {"prompt": "Once upon a time", "max_new_tokens": 4, "idempotency_key": "order-17"},
            {"prompt": "new", "max_new_tokens": 2},
        ]
    )
    assert again.id == first.id
    assert batch[0].id == first.id
    # The same key for another request is refused, and nothing of that call is written
    with pytest.raises(
        IdempotencyConflict, match=f"used for a different request \\(job {first.id}\\)"
    ):
        client.submit_many(
            [
                {"prompt": "new too", "max_new_tokens": 2},
                {"prompt": "other", "idempotency_key": "order-17"},
            ]
        )
    client.wait([first, batch[1]], timeout=60)
    assert sorted(job.prompt for job in client.list()) == ["Once upon a time", "new"]


INVALID = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"prompt": "x" * 40_000}, "prompt"),
    ({"prompt": "nul\x00byte"}, "prompt"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**6}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "12"}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "priority": 10}, "priority"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
]


@pytest.mark.parametrize(("request_", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_request_is_refused_naming_the_field(
    stack: Stack, client: CompletionClient, request_: dict[str, object], field: str
) -> None:
    unserved = {"model": "nobody-serves-this", **request_}
    with pytest.raises(ValidationError) as info:
        client.submit(**unserved)  # type: ignore[arg-type]
    assert info.value.field == field
    assert re.search(rf"\b{field}\b", str(info.value))
    # And in a batch with valid requests, nothing at all is written or queued
    with pytest.raises(ValidationError, match=rf"requests\[1\]: {field}"):
        client.submit_many([{"prompt": "ok", "model": "nobody-serves-this"}, unserved])
    assert client.list() == []
    assert stack.redis.keys(queue_name("nobody-serves-this") + "*") == []


def test_model_is_loaded_once_across_100_jobs(stack: Stack, client: CompletionClient) -> None:
    jobs = client.submit_many(
        [{"prompt": f"job {i}", "max_new_tokens": 3, "temperature": 0} for i in range(100)]
    )
    done = client.wait(jobs, timeout=120)
    assert all(job.status is JobStatus.SUCCEEDED for job in done)
    assert len({job.worker for job in done}) == 1
    loads = re.findall(r"loaded model .* \[load #(\d+) in pid (\d+)\]", stack.worker.log_text())
    # once, in the worker's pool process (the one that generates)
    assert loads == [("1", str(stack.worker.pool_pids()[0]))]
    assert stack.worker.alive()


def test_reading_jobs(client: CompletionClient) -> None:
    jobs = client.submit_many([{"prompt": "a", "max_new_tokens": 2}] * 3, batch_id="batch-7")
    client.wait(jobs, timeout=60)
    listed = client.list(batch_id="batch-7")
    assert {j.id for j in listed} == {j.id for j in jobs}
    assert client.list(status="succeeded", batch_id="batch-7", limit=2).__len__() == 2
    assert client.list(status=JobStatus.FAILED) == []
    with pytest.raises(JobNotFound):
        client.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValidationError, match="status must be one of"):
        client.list(status="done")
    stuck = client.submit("nobody runs me", model="nobody-serves-this")
    with pytest.raises(JobTimeout, match="1 of 1 job"):
        client.wait(stuck, timeout=0.3)


def test_a_full_queue_refuses_more_jobs_and_writes_nothing(
    stack: Stack, client: CompletionClient
) -> None:
    model = "queue-full-test-model"  # no worker serves it: its jobs stay queued
    limited = CompletionClient(settings=stack.settings.model_copy(update={"max_queued_jobs": 3}))
    try:
        limited.submit_many([{"prompt": f"p{i}", "model": model} for i in range(2)])
        with pytest.raises(QueueFull, match="holds 2 jobs and max_queued_jobs is 3"):
            limited.submit_many([{"prompt": f"q{i}", "model": model} for i in range(2)])
        limited.submit("fits", model=model)
        with pytest.raises(QueueFull):
            limited.submit("one too many", model=model)
        assert sorted(j.prompt for j in client.list()) == ["fits", "p0", "p1"]
    finally:
        limited.close()
        for key in stack.redis.keys(queue_name(model) + "*"):
            stack.redis.delete(key)


def test_reaper_resends_a_queued_job_whose_message_was_lost(
    stack: Stack, client: CompletionClient
) -> None:
    from completion_queue import reap
    from db import NewJob, create_jobs, make_engine, make_session_factory

    # Given a queued job whose message never reached Redis (as when a worker dies
    # between Redis's BRPOP and kombu's unacked record)
    sessions = make_session_factory(make_engine(stack.settings.resolved_database_url()))
    job = NewJob(model=stack.settings.model, prompt="lost", params={"max_new_tokens": 3})
    with sessions.begin() as session:
        create_jobs(session, jobs=[job])
    time.sleep(0.05)  # older than the (tiny) threshold below
    # (an earlier test's last ack follows its commit by a moment)
    deadline = time.monotonic() + 10
    while stack.redis.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    # When the reaper runs while the queue is empty and nothing is unacked
    settings = stack.settings.model_copy(update={"reap_queued_after_s": 0.01})
    report = reap(settings, create_app(settings), sessions)
    # Then it sends the job again, and the job runs once
    assert report.resent == 1
    done = client.wait(job.id, timeout=60)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1


def test_a_worker_runs_only_jobs_of_its_own_model(stack: Stack, client: CompletionClient) -> None:
    from completion_queue import TASK_GENERATE, queue_depth
    from db import NewJob, create_jobs, make_engine, make_session_factory

    # Given a job for the served model and one for a model whose name sanitises to the
    # served one's, both sent by hand into the served model's queue
    served, other = stack.settings.model, stack.settings.model.replace("-", " ")
    assert queue_name(other) != queue_name(served)
    sessions = make_session_factory(make_engine(stack.settings.resolved_database_url()))
    jobs = [NewJob(model=m, prompt="routed", params={"max_new_tokens": 3}) for m in (served, other)]
    with sessions.begin() as session:
        create_jobs(session, jobs=jobs)
    app = create_app(stack.settings)
    try:
        for job in jobs:
            app.send_task(TASK_GENERATE, task_id=str(job.id), queue=queue_name(served))
        # When the worker of the served model takes both messages
        done = client.wait(jobs[0].id, timeout=60)
        # Then it runs its own job, and sends the other on to that model's own queue, unrun
        assert done.status is JobStatus.SUCCEEDED
        deadline = time.monotonic() + 10
        while queue_depth(stack.redis, queue_name(other)) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_depth(stack.redis, queue_name(other)) == 1
        stray = client.get(jobs[1].id)
        assert (stray.status, stray.attempts, stray.worker) == (JobStatus.QUEUED, 0, None)
        # And the live models are the models the workers report, not queue names read back
        assert client.served_models() == {served: 1}
    finally:
        app.close()
        purge_queue(stack.redis, other)
