"""Per-token logprobs recorded inside the real batched ``generate`` of the tiny model.

Every recorded value is checked against a direct forward pass of the model on
the prompt and the generated tokens, unpadded, in float32.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from db import Choice
from engine import GenerationRequest
from engine.continuous import continuous_row
from engine.static import StaticEngine

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runtime(tiny_model: Path) -> StaticEngine:
    return StaticEngine(str(tiny_model), device="cpu", dtype="float32")


def run(
    runtime: StaticEngine, requests: Sequence[GenerationRequest], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[list[Choice]], list[list[int]]]:
    """Generate ``requests`` in one call; return each request's choices and each row's ids."""
    outputs: list[torch.Tensor] = []
    original = runtime._run_model

    def keep_output(**kwargs: Any) -> Any:
        output = original(**kwargs)
        outputs.append(output)
        return output

    monkeypatch.setattr(runtime, "_run_model", keep_output)
    results = runtime.generate(requests)
    monkeypatch.undo()
    choices = []
    for result in results:
        assert not isinstance(result, Exception), result
        choices.append(result.choices)
    prompt_len = max(len(r.prompt_ids) for r in requests)
    return choices, outputs[0][:, prompt_len:].tolist()


def direct_logprobs(runtime: StaticEngine, prompt: Sequence[int], tokens: Sequence[int]) -> Any:
    """The log-softmax that predicted each of ``tokens``, from one unpadded float32 pass."""
    ids = torch.tensor([[*prompt, *tokens]], dtype=torch.long)
    with torch.inference_mode():
        logits = runtime.model(ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(dim=-1)


def assert_matches_direct_pass(
    runtime: StaticEngine, request: GenerationRequest, choice: Choice, ids: list[int]
) -> None:
    assert request.logprobs is not None and choice.logprobs is not None
    tokens = ids[: choice.completion_tokens]
    assert len(choice.logprobs) == choice.completion_tokens
    direct = direct_logprobs(runtime, request.prompt_ids, tokens)
    k = request.logprobs
    for step, (entry, token) in enumerate(zip(choice.logprobs, tokens, strict=True)):
        assert entry["token"] == runtime.tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(direct[step, token].item(), abs=TOLERANCE)
        alternatives = entry["top_logprobs"]
        values = [a["logprob"] for a in alternatives]
        assert len(alternatives) == k
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(direct[step].topk(k).values.tolist(), abs=TOLERANCE)
        # Each alternative names a token whose direct logprob it reports (ties may swap order).
        near = direct[step].topk(k + 5).indices.tolist()
        for alternative in alternatives:
            assert any(
                runtime.tokenizer.decode([i]) == alternative["token"]
                and abs(direct[step, i].item() - alternative["logprob"]) < TOLERANCE
                for i in near
            ), alternative


def pick_stop(text: str) -> str:
    """Two printable ASCII characters first seen from the text's third character on."""
    for i in range(2, len(text) - 4):
        stop = text[i : i + 2]
        if stop.isascii() and stop.isprintable() and stop.strip() == stop and text.find(stop) == i:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def test_logprobs_equal_a_direct_forward_pass_and_change_nothing(
    runtime: StaticEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def request(key: str, prompt: str, **kwargs: Any) -> GenerationRequest:
        ids = tuple(runtime.encode([prompt])[0])
        kwargs.setdefault("max_new_tokens", 12)
        return GenerationRequest(key=key, prompt_ids=ids, **kwargs)

    # Given a seeded sampled row's text, and a stop string from its middle
    stopped = request(
        "stopped", "Question: what is the capital of France?", temperature=1.0, seed=5, logprobs=5
    )
    [[alone]], _ = run(runtime, [stopped], monkeypatch)
    stop = pick_stop(alone.text)
    stopped = replace(stopped, stop=(stop,))
    # And a batch mixing prompt lengths, greedy and sampled rows, k=5, k=0, k=2 (n=2) and none
    asking = [
        request("greedy-5", "The queue takes a job", temperature=0.0, logprobs=5),
        request("sampled-5", "Hello", temperature=1.0, seed=11, logprobs=5),
        request(
            "greedy-0",
            "Numbers: zero one two three four five",
            temperature=0.0,
            logprobs=0,
            max_new_tokens=8,
        ),
        request(
            "sampled-2-n2",
            "Redis is an in-memory",
            temperature=1.0,
            seed=7,
            n=2,
            logprobs=2,
            top_k=50,
        ),
        stopped,
    ]
    plain = [
        request("greedy", "Once upon a time", temperature=0.0),
        request("sampled", "def add(a, b):", temperature=1.0, seed=3),
    ]
    batch = asking[:2] + plain[:1] + asking[2:] + plain[1:]
    without = [replace(r, logprobs=None) for r in batch]

    # When the batch runs with logprobs, and the same batch without any
    recorded, ids = run(runtime, batch, monkeypatch)
    unrecorded, _ = run(runtime, without, monkeypatch)

    # Then recording changed no text, finish reason or token count
    strip = [[(c.text, c.finish_reason, c.completion_tokens) for c in cs] for cs in recorded]
    assert strip == [
        [(c.text, c.finish_reason, c.completion_tokens) for c in cs] for cs in unrecorded
    ]
    assert all(c.logprobs is None for cs in unrecorded for c in cs)
    # And the row cut at its stop string has one entry per kept token
    stop_choice = recorded[batch.index(stopped)][0]
    assert stop_choice.finish_reason == "stop"
    assert stop_choice.text == alone.text[: alone.text.index(stop)]
    assert 0 < stop_choice.completion_tokens < stopped.max_new_tokens
    # And every recorded token matches the direct pass; rows that did not ask have None
    row = 0
    for request_, choices in zip(batch, recorded, strict=True):
        for choice in choices:
            if request_.logprobs is None:
                assert choice.logprobs is None
            else:
                assert_matches_direct_pass(runtime, request_, choice, ids[row])
                if request_.stop == ():
                    joined = b"".join(bytes(e["bytes"]) for e in choice.logprobs or [])
                    assert joined.decode("utf-8", errors="replace") == choice.text
            row += 1
    assert row == len(ids)


def test_a_row_ends_at_any_eos_of_the_generation_config_with_its_logprobs_cut_alike(
    runtime: StaticEngine, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a seeded sampled row's tokens, and one token first drawn at step j >= 2
    ids = tuple(runtime.encode(["Once upon a time"])[0])
    row = GenerationRequest(
        key="eos", prompt_ids=ids, max_new_tokens=16, temperature=1.0, seed=21, logprobs=3
    )
    [[full]], [tokens] = run(runtime, [row], monkeypatch)
    j = next(j for j in range(2, len(tokens)) if tokens[j] not in tokens[:j])
    # And the same model whose generation config lists that token as a second EOS
    listed = tmp_path / "two-eos"
    shutil.copytree(tiny_model, listed)
    config_path = listed / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [runtime.tokenizer.eos_token_id, tokens[j]]
    config_path.write_text(json.dumps(config))
    two_eos = StaticEngine(str(listed), device="cpu", dtype="float32")
    assert two_eos.eos_ids == [runtime.tokenizer.eos_token_id, tokens[j]]

    # When the row runs on it
    [[cut]], [cut_ids] = run(two_eos, [row], monkeypatch)

    # Then generate itself ends the row at that token, and the choice stops before it
    assert cut_ids == tokens[: j + 1]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens == j
    assert cut.text == runtime.tokenizer.decode(tokens[:j], skip_special_tokens=True)
    # And it keeps exactly one logprobs entry per kept token, as recorded without the cut
    assert cut.logprobs is not None and len(cut.logprobs) == j
    assert full.logprobs is not None
    assert [e["token"] for e in cut.logprobs] == [e["token"] for e in full.logprobs[:j]]
    assert [e["logprob"] for e in cut.logprobs] == pytest.approx(
        [e["logprob"] for e in full.logprobs[:j]], abs=TOLERANCE
    )


def test_rows_with_logprobs_or_a_response_format_leave_the_continuous_engine() -> None:
    greedy = GenerationRequest(key="g", prompt_ids=(1,), max_new_tokens=4, temperature=0.0)
    assert continuous_row(greedy)
    assert not continuous_row(replace(greedy, logprobs=0))
    assert not continuous_row(replace(greedy, response_format='{"type":"json_object"}'))
    assert not continuous_row(replace(greedy, temperature=1.0))
