"""The GPT-2-small shape: built with the tiny model's tokenizer, loaded through `from_pretrained`
by the worker's runtime, and run as a worker runs a group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine import GenerationRequest, GenerationResult
from engine.shapes import make_shaped_model
from engine.static import StaticEngine

PROMPT = "The queue takes a job, the worker takes a batch, and"


@pytest.fixture(scope="module")
def gpt2_small(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "gpt2-small"
    return make_shaped_model(out, shape="gpt2-small", tokenizer_from=tiny_model)


@pytest.fixture(scope="module")
def runtime(gpt2_small: Path) -> StaticEngine:
    return StaticEngine(str(gpt2_small), device="cpu", dtype="float32")


def test_it_has_gpt2_smalls_shape_and_parameters(runtime: StaticEngine) -> None:
    config = runtime.model.config
    assert (config.n_layer, config.n_embd, config.n_head) == (12, 768, 12)
    assert (config.n_positions, config.vocab_size) == (1024, 50_257)
    params = sum(p.numel() for p in runtime.model.parameters())
    assert 123_000_000 < params < 125_000_000  # GPT-2 small: 124M, embeddings tied
    assert runtime.dtype is torch.float32 and runtime.context_length == 1024
    assert runtime.tokenizer.model_max_length == 1024


def test_it_speaks_the_tiny_models_tokens_and_every_id_decodes(
    runtime: StaticEngine, tiny_model: Path
) -> None:
    tiny = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer = runtime.tokenizer
    # The same ids for the same text, the same chat template and the same ends of a row.
    assert tokenizer(PROMPT).input_ids == tiny(PROMPT).input_ids
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == tiny.apply_chat_template(
        messages, tokenize=False
    )
    assert runtime.eos_ids == [tiny.eos_token_id, tiny.convert_tokens_to_ids("<|im_end|>")]
    # The ids past the tiny vocabulary, which random weights emit most, decode to text.
    assert len(tokenizer) == runtime.model.config.vocab_size
    past = [len(tiny), 30_000, 50_256]
    assert tokenizer.decode(past, skip_special_tokens=True) == "".join(f"<|pad_{i}|>" for i in past)
    assert runtime.spell(50_256) == ("<|pad_50256|>", b"<|pad_50256|>")


def test_a_worker_group_returns_choices(runtime: StaticEngine) -> None:
    # Given a group as a worker runs it: greedy, sampled with logprobs, and a JSON row
    ids = tuple(runtime.encode([PROMPT])[0])
    requests = [
        GenerationRequest(key="greedy", prompt_ids=ids, max_new_tokens=6, temperature=0.0),
        GenerationRequest(
            key="sampled", prompt_ids=ids[:4], max_new_tokens=6, seed=7, n=2, logprobs=2
        ),
        GenerationRequest(
            key="json",
            prompt_ids=ids,
            max_new_tokens=6,
            temperature=0.0,
            response_format=json.dumps({"type": "json_object"}),
        ),
    ]
    # When it runs
    results = runtime.generate(requests)
    # Then every job has its choices, none failed
    assert all(isinstance(r, GenerationResult) for r in results), results
    greedy, sampled, constrained = (r for r in results if isinstance(r, GenerationResult))
    assert len(greedy.choices) == 1 and len(sampled.choices) == 2
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason in ("length", "stop")
        assert 0 < choice.completion_tokens <= 6 or choice.finish_reason == "stop"
        assert isinstance(choice.text, str)
    for choice in sampled.choices:
        assert choice.logprobs is not None
        assert len(choice.logprobs) == choice.completion_tokens
        assert all(len(entry["top_logprobs"]) == 2 for entry in choice.logprobs)
    document = constrained.choices[0]
    assert document.text.startswith("{")
    if document.finish_reason == "stop":
        assert isinstance(json.loads(document.text), dict)
    # and greedy decoding is the same on a second run
    again = runtime.generate(requests[:1])[0]
    assert isinstance(again, GenerationResult) and again.choices == greedy.choices
