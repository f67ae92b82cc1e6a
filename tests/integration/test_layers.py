"""Prepacked linear layers (bfloat16 on CPU): the same products as plain ones, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import GenerationRequest
from engine.layers import PackedLinear, conv1d_to_linear, pack_linears, packing_applies
from engine.static import StaticEngine

PROMPTS = torch.tensor([[5, 17, 99, 3, 250, 41], [8, 8, 8, 1000, 12, 7]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=PROMPTS).logits  # type: ignore[no-any-return]


def load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # type: ignore[no-any-return]


def packing_unavailable() -> str | None:
    """Why prepacked bf16 products cannot run here, or None where they can.

    oneDNN's bf16 reorder needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: elsewhere it
    raises, and the worker keeps its layers as loaded (bf16 is emulated there and auto
    picks float32). Any other outcome of the probe, a wrong product included, is tested.
    """
    if not packing_applies(torch.nn.Linear(1, 1), torch.bfloat16, torch.device("cpu")):
        return "this torch has no oneDNN prepacked linear op"
    try:
        PackedLinear(torch.nn.Linear(8, 4, dtype=torch.bfloat16))
    except RuntimeError as exc:
        return f"this CPU cannot run it: {exc}"
    return None


def test_conv1d_becomes_the_same_product_as_an_nn_linear(tiny_model: Path) -> None:
    # Given the tiny GPT-2 in float32, as loaded and with its Conv1D layers made nn.Linear
    plain, swapped = load(tiny_model, torch.float32), load(tiny_model, torch.float32)
    layers = swapped.config.n_layer
    # When the layers are swapped
    assert conv1d_to_linear(swapped) == 4 * layers
    # Then every logit is the same up to float32 rounding
    torch.testing.assert_close(logits(swapped), logits(plain), rtol=0, atol=1e-5)


def test_packed_layers_give_bit_equal_logits_in_bfloat16(tiny_model: Path) -> None:
    if reason := packing_unavailable():
        pytest.skip(reason)
    # Given the tiny model in bfloat16 with plain nn.Linear layers, and one packed
    plain, packed = load(tiny_model, torch.bfloat16), load(tiny_model, torch.bfloat16)
    conv1d_to_linear(plain)
    # When every linear layer, the output projection too, is packed
    count = pack_linears(packed)
    assert count == 4 * packed.config.n_layer + 1
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    # Then the logits are bit for bit those of the plain layers
    assert torch.equal(logits(packed), logits(plain))


def test_the_worker_runtime_packs_only_bfloat16_on_cpu(tiny_model: Path) -> None:
    # Given the runtime loaded in float32 and in bfloat16
    fp32 = StaticEngine(str(tiny_model), device="cpu", dtype="float32")
    bf16 = StaticEngine(str(tiny_model), device="cpu", dtype="bfloat16")
    # Then float32 keeps its layers (the suite compares its texts with a direct generate)
    assert fp32.packed_layers == 0
    # And bfloat16 packs them all where the CPU can run the packed product (none elsewhere),
    # and still generates
    packed = 0 if packing_unavailable() else 4 * bf16.model.config.n_layer + 1
    assert bf16.packed_layers == packed
    ids = tuple(bf16.encode(["Once upon a time"])[0])
    [result] = bf16.generate(
        [GenerationRequest(key="k", prompt_ids=ids, max_new_tokens=5, temperature=0.0)]
    )
    assert not isinstance(result, Exception) and result.choices[0].completion_tokens > 0
