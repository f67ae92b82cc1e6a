"""The worker's decoding attention on CPU: SDPA's numbers, in its own products where it pays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine.attention import decode_attention, written_out

MODULE = torch.nn.Module()  # transformers passes the attention module; neither path reads it
ROWS, HEADS, DIM, ROOM = 6, 8, 32, 16


def inputs(dtype: torch.dtype, kv_heads: int, length: int, q_len: int = 1) -> dict[str, Any]:
    """A step as the worker's growing cache hands it: keys and values are views with room."""
    generator = torch.Generator().manual_seed(length * 31 + kv_heads)
    query = torch.randn(ROWS, HEADS, q_len, DIM, generator=generator).to(dtype)
    keys = torch.randn(ROWS, kv_heads, length + ROOM, DIM, generator=generator).to(dtype)
    values = torch.randn(ROWS, kv_heads, length + ROOM, DIM, generator=generator).to(dtype)
    allowed = torch.ones(ROWS, 1, q_len, length, dtype=torch.bool)
    allowed[: ROWS // 2, ..., :5] = False  # left padding in half of the rows
    return {
        "query": query,
        "key": keys[:, :, :length],
        "value": values[:, :, :length],
        "allowed": allowed,
    }


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: Any) -> Any:
    """SDPA in float32, as (B, q, H, D)."""
    out = F.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=allowed, enable_gqa=True
    )
    return out.transpose(1, 2)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same mask as transformers builds it additive: 0 where allowed, the dtype's min."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [HEADS, 2])
@pytest.mark.parametrize("mask", ["bool", "additive", "none"])
def test_a_decoding_step_in_half_precision_matches_sdpa(
    dtype: torch.dtype, kv_heads: int, mask: str
) -> None:
    # Given one query per row against 40 cached tokens, in half precision
    x = inputs(dtype, kv_heads, 40)
    allowed = x["allowed"] if mask != "none" else torch.ones_like(x["allowed"])
    attention_mask = {"bool": allowed, "additive": additive(allowed, dtype), "none": None}[mask]
    assert written_out(x["query"], x["key"], attention_mask, 0.0, {})
    # When the worker's attention computes it, and SDPA in the same dtype
    ours, none = decode_attention(MODULE, x["query"], x["key"], x["value"], attention_mask)
    theirs = F.scaled_dot_product_attention(
        x["query"], x["key"], x["value"], attn_mask=allowed, enable_gqa=True
    ).transpose(1, 2)
    # Then it has SDPA's layout and dtype, and is within two of the dtype's steps (at the
    # largest output) of the float32 result: its weights are rounded to the dtype before
    # they multiply the values, as transformers' eager attention does, where SDPA's kernel
    # keeps them in float32
    expected = reference(x["query"], x["key"], x["value"], allowed)
    assert none is None and ours.shape == (ROWS, 1, HEADS, DIM) and ours.dtype == dtype
    assert ours.is_contiguous()
    ours_error = (ours.float() - expected).abs().max().item()
    sdpa_error = (theirs.float() - expected).abs().max().item()
    step = torch.finfo(dtype).eps * expected.abs().max().item()
    assert 0 < ours_error <= max(2 * step, 2 * sdpa_error), (ours_error, sdpa_error, step)


@pytest.mark.parametrize(
    "dtype, q_len, dropout, options",
    [
        (torch.float32, 1, 0.0, {}),  # float32: SDPA, so greedy tokens equal plain generate's
        (torch.bfloat16, 7, 0.0, {}),  # a prefill
        (torch.bfloat16, 1, 0.1, {}),  # dropout (training)
        (torch.bfloat16, 1, 0.0, {"softcap": 30.0}),
    ],
)
def test_what_it_does_not_write_out_goes_to_sdpa_unchanged(
    dtype: torch.dtype, q_len: int, dropout: float, options: dict[str, Any]
) -> None:
    x = inputs(dtype, HEADS, 40, q_len)
    mask = x["allowed"] if q_len == 1 else None
    assert not written_out(x["query"], x["key"], mask, dropout, options)
    if options or dropout:
        return  # SDPA refuses a softcap; dropout is random: the check above is the point
    ours, _ = decode_attention(MODULE, x["query"], x["key"], x["value"], mask)
    theirs, _ = sdpa_attention_forward(MODULE, x["query"], x["key"], x["value"], mask)
    assert torch.equal(ours, theirs)


def test_the_tiny_model_in_bfloat16_decodes_the_same_next_tokens(tiny_model: Path) -> None:
    # Given the tiny model in bfloat16 and a left-padded batch with its cache filled
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[0, 0, 5, 17, 99, 3], [8, 8, 8, 1000, 12, 7]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    step = torch.tensor([[42], [43]])
    full = torch.cat([attention, torch.ones(2, 1, dtype=attention.dtype)], dim=1)

    def next_logits() -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=attention, use_cache=True)
            return (
                model(  # type: ignore[no-any-return]
                    input_ids=step, attention_mask=full, cache=out.cache
                )
                .logits[:, -1]
                .float()
            )

    # When one decoding step runs with SDPA and with the worker's attention
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", sdpa_attention_forward)
    try:
        plain = next_logits()
        AttentionInterface.register("sdpa", decode_attention)
        ours = next_logits()
    finally:
        AttentionInterface.register("sdpa", previous)
    # Then the logits agree to bfloat16's rounding, and so do the next tokens
    torch.testing.assert_close(ours, plain, rtol=0.05, atol=0.05)
    assert torch.equal(ours.argmax(-1), plain.argmax(-1))
