"""The vLLM engine's pure parts, without vLLM: each request field mapped to what vLLM takes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import llguidance
import pytest

from completion_queue import UnsupportedResponseFormat
from engine.grammar import JSON_OPTIONS
from engine.types import GenerationRequest
from engine.vllm import (
    BLOCK_TOKENS,
    MAX_OUTPUT_INTERVAL,
    guidance_schema,
    kv_bytes_per_token,
    kv_cache_bytes,
    output_interval,
    row_seed,
    sampling_kwargs,
    vllm_priority,
)
from tests.factories import make_job
from workers.prompts import to_request


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(key="k", prompt_ids=(1, 2, 3), max_new_tokens=7, **fields)  # type: ignore[arg-type]


def test_every_field_maps_to_its_sampling_parameter() -> None:
    kwargs = sampling_kwargs(
        request(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            repetition_penalty=1.3,
            stop=("\n", "END"),
            seed=11,
            logprobs=3,
        ),
        0,
        stop_token_ids=[0, 2],
    )
    assert kwargs == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.3,
        "seed": 11 * 1_000_003,
        "stop": ["\n", "END"],
        "stop_token_ids": [0, 2],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "logprobs": 3,
        # vLLM detokenizes as it goes only to find the stop strings: the text is ours.
        "detokenize": True,
    }


def test_greedy_and_unseeded_rows_keep_vllms_meaning_of_zero_and_none() -> None:
    kwargs = sampling_kwargs(request(temperature=0.0), 3, stop_token_ids=[])
    # temperature 0 is vLLM's greedy; top_k 0 is off in both; no seed: the engine's generator.
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["seed"], kwargs["logprobs"]) == (
        0.0,
        0,
        None,
        None,
    )
    # and with no stop string, vLLM need not detokenize the row at all
    assert kwargs["detokenize"] is False


def test_each_choice_of_a_seeded_request_gets_its_own_stream_as_in_the_static_engine() -> None:
    seeds = [row_seed(5, choice) for choice in range(4)]
    assert len(set(seeds)) == 4
    assert seeds[0] == 5 * 1_000_003
    assert all(0 <= s < 2**63 for s in seeds if s is not None)
    assert row_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**63


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def stored(value: object) -> str:
    """A response_format as a job's request carries it (workers.prompts.format_key)."""
    return json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}},
    ],
    ids=["json_object", "json_schema"],
)
def test_vllms_guidance_backend_builds_the_static_engines_very_grammar(
    response_format: dict[str, object],
) -> None:
    # Given the schema the static engine compiles, and what the vLLM engine hands vLLM
    inner = response_format.get("json_schema")
    schema = inner["schema"] if isinstance(inner, dict) else {"type": "object"}
    ours = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    handed = guidance_schema(stored(response_format))
    assert handed is not None
    # When vLLM's guidance backend compiles it, with free whitespace on or off
    # (vllm/v1/structured_output/backend_guidance.py: serialize_guidance_grammar)
    for flexible in (True, False):
        built = llguidance.LLMatcher.grammar_from_json_schema(
            handed, defaults={"whitespace_flexible": flexible}
        )
        # Then it is the grammar the static engine builds, byte for byte: the same language
        assert built == ours
    assert json.loads(handed)["x-guidance"] == {**JSON_OPTIONS}


def test_text_needs_no_grammar_and_a_bad_format_is_refused_naming_it() -> None:
    assert guidance_schema(stored({"type": "text"})) is None
    with pytest.raises(UnsupportedResponseFormat, match="response_format type must be"):
        guidance_schema(stored({"type": "yaml"}))


def test_a_more_urgent_job_gets_a_lower_vllm_priority_which_vllm_runs_first() -> None:
    # Ours: 0 normal .. 9 most urgent. vLLM's priority scheduler runs the lowest value first.
    mapped = [vllm_priority(p) for p in range(10)]
    assert mapped == sorted(mapped, reverse=True) and len(set(mapped)) == 10
    # A normal job keeps vLLM's default priority (0)
    assert vllm_priority(0) == 0


def test_every_interactive_row_runs_before_every_batch_line_in_vllm() -> None:
    interactive = [vllm_priority(p, "interactive") for p in range(10)]
    batch = [vllm_priority(p, "batch") for p in range(10)]
    # the least urgent interactive job still comes before the most urgent batch line
    assert max(interactive) < min(batch)
    # and within the batch lane the more urgent line comes first
    assert batch == sorted(batch, reverse=True) and len(set(batch)) == 10


def test_a_jobs_priority_reaches_its_generation_request() -> None:
    assert to_request(make_job(priority=7), [1, 2]).priority == 7
    assert to_request(make_job(lane="batch"), [1, 2]).lane == "batch"
    assert GenerationRequest(key="k", prompt_ids=(1,), max_new_tokens=1).priority == 0


def test_a_streamed_job_says_so_to_the_engine() -> None:
    assert to_request(make_job(params={"stream": True}), [1, 2]).stream is True
    assert to_request(make_job(), [1, 2]).stream is False


def test_rows_nobody_streams_are_reported_about_twice_per_progress_interval() -> None:
    # Steps of 50 ms and partial output every 500 ms: a report every 5 tokens
    assert output_interval(0.5, 0.05) == 5
    # Steps longer than half the interval: every token, as before steps were measured
    assert output_interval(0.5, 0.4) == output_interval(0.5, None) == 1
    # Very short steps (a GPU, the tiny model): at most MAX_OUTPUT_INTERVAL tokens apart
    assert output_interval(0.5, 0.0001) == MAX_OUTPUT_INTERVAL
    # Partial output off: rows are only needed at their first token and their end
    assert output_interval(0.0, 0.4) == MAX_OUTPUT_INTERVAL


def test_the_kv_cache_is_sized_from_the_models_config() -> None:
    gpt2_small = SimpleNamespace(num_hidden_layers=12, num_attention_heads=12, hidden_size=768)
    assert kv_bytes_per_token(gpt2_small, 2) == 2 * 12 * 768 * 2
    grouped = SimpleNamespace(
        num_hidden_layers=2, num_attention_heads=8, hidden_size=256, num_key_value_heads=2
    )
    assert kv_bytes_per_token(grouped, 4) == 2 * 2 * 2 * 32 * 4


def test_the_kv_cache_holds_a_block_for_every_row_and_full_context_for_kv_rows() -> None:
    gpt2_small = SimpleNamespace(num_hidden_layers=12, num_attention_heads=12, hidden_size=768)
    per_token = kv_bytes_per_token(gpt2_small, 2)
    # 32 rows at 1,024 tokens of context hold more than a block for each of 256 rows
    assert kv_cache_bytes(gpt2_small, 2, context=1024, max_rows=256, kv_rows=32) == (
        32 * 1024 * per_token
    )
    # 512 short rows would not all fit in 32 rows at 512 tokens: each gets a block
    assert kv_cache_bytes(gpt2_small, 2, context=512, max_rows=512, kv_rows=32) == (
        512 * BLOCK_TOKENS * per_token
    )
    # and a model this small still gets vLLM's floor of 16 MiB
    tiny = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, hidden_size=8)
    assert kv_cache_bytes(tiny, 2, context=64, max_rows=4) == 16 << 20
