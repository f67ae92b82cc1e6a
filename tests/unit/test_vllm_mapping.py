"""The vLLM engine's pure parts, without vLLM: each request field mapped to SamplingParams."""

from __future__ import annotations

from types import SimpleNamespace

from engine.types import GenerationRequest
from engine.vllm import kv_bytes_per_token, row_seed, sampling_kwargs, unsupported_field


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


def test_each_choice_of_a_seeded_request_gets_its_own_stream_as_in_the_static_engine() -> None:
    seeds = [row_seed(5, choice) for choice in range(4)]
    assert len(set(seeds)) == 4
    assert seeds[0] == 5 * 1_000_003
    assert all(0 <= s < 2**63 for s in seeds if s is not None)
    assert row_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**63


def test_a_response_format_is_refused_naming_the_field() -> None:
    assert unsupported_field(request(response_format='{"type":"json_object"}')) == "response_format"
    assert unsupported_field(request(n=3, logprobs=2, stop=("x",), seed=1)) is None


def test_the_kv_cache_is_sized_from_the_models_config() -> None:
    gpt2_small = SimpleNamespace(num_hidden_layers=12, num_attention_heads=12, hidden_size=768)
    assert kv_bytes_per_token(gpt2_small, 2) == 2 * 12 * 768 * 2
    grouped = SimpleNamespace(
        num_hidden_layers=2, num_attention_heads=8, hidden_size=256, num_key_value_heads=2
    )
    assert kv_bytes_per_token(grouped, 4) == 2 * 2 * 2 * 32 * 4
