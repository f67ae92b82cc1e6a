"""The KV cache that grows in place by chunks, in real ``generate`` calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from engine import GenerationRequest
from engine.kvcache import ROOM, GrowingLayer, growing_cache
from engine.static import StaticEngine

PROMPTS = ["Once upon a time", "The river", "What does the old man carry at night, and why?"]


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def run(model: Any, tokenizer: Any, cache: Any, **options: Any) -> Any:
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        return model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=ROOM + 20,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )


@pytest.mark.parametrize("room", [ROOM, 3])
@pytest.mark.parametrize("sampled", [False, True])
def test_generate_gives_the_default_caches_tokens_and_scores_exactly(
    tiny: tuple[Any, Any], room: int, sampled: bool
) -> None:
    # Given left-padded prompts of different lengths, and more new tokens than a buffer's room
    model, tokenizer = tiny
    options = {"do_sample": True, "top_k": 20} if sampled else {"do_sample": False}
    # When they run with transformers' default cache and with the growing one
    torch.manual_seed(7)
    default = run(model, tokenizer, None, **options)
    cache = growing_cache(model, room=room)
    torch.manual_seed(7)
    growing = run(model, tokenizer, cache, **options)
    # Then every token and every step's scores are the same, bit for bit
    assert torch.equal(default.sequences, growing.sequences)
    assert all(torch.equal(a, b) for a, b in zip(default.scores, growing.scores, strict=True))
    # And the cache grew in place: a buffer holds at most `room` tokens past the last one
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    length = default.sequences.shape[1] - 1
    assert layer.keys.shape[-2] == length
    assert length <= layer._key_buffer.shape[-2] <= length + room


def states(batch: int, tokens: int, start: float) -> torch.Tensor:
    """Keys (or values) of shape (batch, 2 heads, tokens, 4) numbered from ``start``."""
    return (
        torch.arange(batch * 2 * tokens * 4, dtype=torch.float32).reshape(batch, 2, tokens, 4)
        + start
    )


def test_a_step_writes_in_place_until_the_buffer_is_full() -> None:
    # Given a layer that holds a 5-token prompt
    layer = GrowingLayer(room=4)
    prompt = states(2, 5, 0)
    layer.update(prompt, -prompt)
    buffer = layer._key_buffer
    assert buffer is not None and buffer.shape[-2] == 9
    # When four single tokens follow
    steps = [states(2, 1, 1000 * (i + 1)) for i in range(4)]
    for step in steps:
        keys, values = layer.update(step, -step)
    # Then the same buffer holds them all, and what it returns is the concatenation
    assert layer._key_buffer is buffer
    assert torch.equal(keys, torch.cat([prompt, *steps], dim=-2))
    assert torch.equal(values, -keys)
    # And the next token moves everything to a new buffer with room again
    last = states(2, 1, 9000)
    keys, _ = layer.update(last, -last)
    assert layer._key_buffer is not buffer and layer._key_buffer.shape[-2] == 10 + 4
    assert torch.equal(keys, torch.cat([prompt, *steps, last], dim=-2))
    assert layer.get_seq_length() == 10


def test_cropping_and_batch_selection_keep_what_the_cache_holds() -> None:
    # Given a layer holding 6 tokens of 2 rows
    layer = GrowingLayer(room=8)
    first = states(2, 6, 0)
    layer.update(first, first)
    # When 2 tokens are cropped and one more comes
    layer.crop(-2)
    new = states(2, 1, 500)
    keys, _ = layer.update(new, new)
    # Then it follows the 4 kept tokens
    assert torch.equal(keys, torch.cat([first[..., :4, :], new], dim=-2))
    # When the rows are reordered (a new tensor, outside the buffer) and another token comes
    layer.batch_select_indices(torch.tensor([1, 0]))
    more = states(2, 1, 700)
    keys, values = layer.update(more, more)
    # Then the reordered rows are kept, in a new buffer
    expected = torch.cat([first[..., :4, :], new], dim=-2)[[1, 0]]
    assert torch.equal(keys, torch.cat([expected, more], dim=-2))
    assert torch.equal(values, keys)
    assert keys.data_ptr() == layer._key_buffer.data_ptr()
    # And a reset drops the buffers
    layer.reset()
    assert layer._key_buffer is None and layer.get_seq_length() == 0


def test_only_plain_layers_grow_and_a_named_cache_is_left_to_generate() -> None:
    # Given a model with a sliding-window layer and a full-attention one (random weights)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    # Then its sliding layer keeps its own kind, the full one grows
    cache = growing_cache(model)
    assert cache is not None
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DynamicSlidingWindowLayer",
        "GrowingLayer",
    ]
    # And generate gives the same tokens with it, past the sliding window
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    options: dict[str, Any] = {
        "max_new_tokens": 20,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    with torch.inference_mode():
        default = model.generate(ids, **options)
        growing = model.generate(ids, cache=cache, **options)
    assert torch.equal(default, growing)
    # When the model's generation config names a cache, generate makes that one
    model.generation_config.cache_implementation = "static"
    assert growing_cache(model) is None


def test_the_runtime_hands_generate_a_growing_cache(tiny_model: Path) -> None:
    # Given the worker's runtime (no shared prefix) and a spy on its generate call
    runtime = StaticEngine(str(tiny_model), device="cpu", dtype="float32")
    seen: list[Any] = []
    run_model = runtime._run_model

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["cache"])
        return run_model(**kwargs)

    runtime._run_model = spy  # type: ignore[method-assign]
    requests = [
        GenerationRequest(
            key=p, prompt_ids=tuple(runtime.encode([p])[0]), max_new_tokens=8, temperature=0.0
        )
        for p in PROMPTS
    ]
    # When a group runs with the growing cache, then with transformers' own
    grown = runtime.generate(requests)
    runtime.growing_kv_cache = False
    default = runtime.generate(requests)
    # Then the first call's cache grew in place, the second was generate's own
    assert all(isinstance(layer, GrowingLayer) for layer in seen[0].layers)
    assert seen[1] is None
    # And the texts are the same
    assert [r.choices[0].text for r in grown] == [r.choices[0].text for r in default]  # type: ignore[union-attr]
