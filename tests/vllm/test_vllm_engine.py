"""Jobs through the real pipeline on the vLLM engine mean what vLLM's own offline LLM gives.

client -> redis-server -> worker process (CQ_ENGINE=vllm, one resident vLLM engine)
-> SQLite, against ``vllm.LLM.generate`` on the same tiny model in this process.
"""

from __future__ import annotations

from typing import Any

import pytest

from completion_queue import Settings
from db import JobStatus
from engine.chat import render_chat
from engine.devices import model_threads
from engine.vllm import row_seed
from producer.client import CompletionClient
from producer.stats import live_workers
from tests.vllm.conftest import kept_tokens, offline_choice

PROMPTS = [
    "Once upon a time",
    "The queue takes a job and",
    "x",
    "Dear team, thank you",
    "Question: what is the capital of France? Answer:",
    "def add(a, b):",
]


@pytest.mark.timeout(900)
def test_the_worker_runs_vllm_on_the_static_engines_threads(
    vllm_client: CompletionClient,
) -> None:
    # When `cq workers` (and Flower: the same Celery stats) asks the vLLM worker what it runs
    found = live_workers(vllm_client.app, timeout_s=5)
    # Then it is the vLLM engine, and its step thread reads the torch threads CQ_TORCH_THREADS=0
    # gives the static engine (all cores but one), not torch's default (every core)
    assert [(w.engine, w.threads) for w in found] == [("vllm", model_threads())]


@pytest.mark.timeout(900)
def test_greedy_jobs_equal_vllms_offline_generate(
    vllm_client: CompletionClient, offline: Any
) -> None:
    # Given greedy jobs of different prompts and lengths, submitted at once
    requests = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 3 + 5 * i, "temperature": 0}
        for i in range(12)
    ]
    # When they run through the queue on the vLLM worker
    done = vllm_client.wait(vllm_client.submit_many(requests), timeout=300)
    # Then each text is what vLLM's offline generate gives for that prompt alone
    for request, job in zip(requests, done, strict=True):
        assert job.status is JobStatus.SUCCEEDED, job.error
        expected = offline_choice(
            offline, request["prompt"], request["max_new_tokens"], temperature=0
        )
        assert job.text == expected.text
        assert job.completion_tokens == kept_tokens(expected)
        assert job.choices[0].finish_reason == expected.finish_reason
        assert job.prompt_tokens and job.attempts == 1


@pytest.mark.timeout(600)
def test_a_stop_string_cuts_the_text_as_vllm_does(
    vllm_client: CompletionClient, offline: Any
) -> None:
    # Given a stop string taken from the middle of a prompt's greedy completion
    prompt = "Once upon a time"
    full = offline_choice(offline, prompt, 24, temperature=0).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"no stop string to take from {full!r}"
    # When a job asks for it
    job = vllm_client.wait(
        vllm_client.submit(prompt=prompt, max_new_tokens=24, temperature=0, stop=[stop]),
        timeout=120,
    )
    # Then its text ends before the stop's first occurrence, with finish_reason stop, as vLLM's
    expected = offline_choice(offline, prompt, 24, temperature=0, stop=[stop])
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.text == full[: full.index(stop)] == expected.text
    assert job.choices[0].finish_reason == "stop" == expected.finish_reason


@pytest.mark.timeout(600)
def test_a_seeded_job_with_n_choices_keeps_its_texts_whatever_the_batch(
    vllm_client: CompletionClient, offline: Any
) -> None:
    seeded = {"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0.9, "seed": 5}
    # Given a seeded sampled job with 3 choices, run alone
    alone = vllm_client.wait(vllm_client.submit(**seeded, n=3), timeout=120)
    # When the same job runs again among 10 sampled and greedy batch-mates
    mates = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 20, "temperature": i % 2}
        for i in range(10)
    ]
    crowd = vllm_client.wait(
        vllm_client.submit_many([*mates[:5], {**seeded, "n": 3}, *mates[5:]]), timeout=120
    )
    # Then every choice repeats, the choices differ, and each is vLLM's own draw at its seed
    assert alone.status is JobStatus.SUCCEEDED, alone.error
    texts = [c.text for c in alone.choices]
    assert [c.text for c in crowd[5].choices] == texts
    assert len(set(texts)) == 3
    for choice, text in enumerate(texts):
        expected = offline_choice(
            offline, "Once upon a time", 16, temperature=0.9, seed=row_seed(5, choice)
        )
        assert text == expected.text


@pytest.mark.timeout(600)
def test_logprobs_are_vllms_raw_logprobs_in_our_shape(
    vllm_client: CompletionClient, offline: Any
) -> None:
    # Given a greedy job that asks for 3 alternatives per token
    prompt = "The queue takes a job and"
    job = vllm_client.wait(
        vllm_client.submit(prompt=prompt, max_new_tokens=8, temperature=0, logprobs=3),
        timeout=120,
    )
    assert job.status is JobStatus.SUCCEEDED, job.error
    entries = job.choices[0].logprobs
    expected = offline_choice(offline, prompt, 8, temperature=0, logprobs=3)
    # Then one entry per kept token, each with the top 3 in order, the chosen one first
    # (greedy), and the values vLLM's offline run reports
    assert entries is not None and len(entries) == job.completion_tokens
    assert "".join(e["token"] for e in entries) == job.text
    for entry, step, token in zip(entries, expected.logprobs, expected.token_ids, strict=False):
        assert len(entry["top_logprobs"]) == 3
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(step[token].logprob, abs=1e-4)


@pytest.mark.timeout(600)
def test_jobs_sharing_a_long_header_keep_vllms_texts_with_prefix_caching(
    vllm_client: CompletionClient, offline: Any
) -> None:
    # Given greedy jobs whose prompts share a header of two of vLLM's CPU KV blocks (128
    # tokens each) and more: past CQ_PREFIX_MIN_TOKENS, so the worker's engine caches it
    tokenizer = offline.get_tokenizer()
    header = "The queue keeps every job it takes. " * 24
    assert len(tokenizer(header).input_ids) > max(256, Settings().prefix_min_tokens)
    prompts = [f"{header}\nQuestion {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(8)]
    greedy = [{"prompt": p, "max_new_tokens": 16, "temperature": 0} for p in prompts]
    # When they run through the queue in two waves (the second on the blocks the first left
    # in the engine's prefix cache)
    first = vllm_client.wait(vllm_client.submit_many(greedy[:4]), timeout=120)
    second = vllm_client.wait(vllm_client.submit_many(greedy[4:]), timeout=120)
    # Then each text is vLLM's own for that prompt alone, computed with nothing cached
    for prompt, job in zip(prompts, [*first, *second], strict=True):
        assert job.status is JobStatus.SUCCEEDED, job.error
        offline.reset_prefix_cache()
        expected = offline_choice(offline, prompt, 16, temperature=0)
        assert job.text == expected.text
        assert job.prompt_tokens == len(tokenizer(prompt).input_ids)


@pytest.mark.timeout(600)
def test_chat_messages_and_a_truncated_prompt_run_as_vllm_runs_their_tokens(
    vllm_client: CompletionClient, offline: Any
) -> None:
    tokenizer = offline.get_tokenizer()
    messages = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "What does the queue keep?"},
    ]
    long_prompt = "The queue keeps every job it takes. " * 60
    # Given a chat job (the model's chat template) and a prompt past the model's context
    # of 512 tokens that asks to be truncated
    chat, cut = vllm_client.wait(
        vllm_client.submit_many(
            [
                {"messages": messages, "max_new_tokens": 12, "temperature": 0},
                {"prompt": long_prompt, "max_new_tokens": 16, "temperature": 0, "truncate": True},
            ]
        ),
        timeout=120,
    )
    # Then the chat job's text is vLLM's own for the template's prompt
    assert chat.status is JobStatus.SUCCEEDED, chat.error
    rendered = render_chat(tokenizer, messages, model=vllm_client.settings.model)
    assert chat.text == offline_choice(offline, rendered, 12, temperature=0).text
    assert chat.prompt_tokens == len(tokenizer(rendered).input_ids)
    # And the truncated one went on from the prompt's last 512 - 16 tokens, as vLLM does
    # from those tokens
    assert cut.status is JobStatus.SUCCEEDED, cut.error
    ids = tokenizer(long_prompt).input_ids
    assert cut.prompt_tokens == 512 - 16 and cut.truncated_prompt_tokens == len(ids) - 496
    kept = {"prompt_token_ids": ids[-496:]}
    assert cut.text == offline_choice(offline, kept, 16, temperature=0).text
