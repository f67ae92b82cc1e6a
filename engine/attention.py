"""A decoding step's attention on CPU in half precision: two matmuls, not SDPA.

At a decoding step each row has one query against its cached keys. On CPU,
``torch.nn.functional.scaled_dot_product_attention`` in bfloat16 (and float16)
takes its flash-attention kernel, built for long queries: on the GPT-2-small
shape (32 rows, 12 heads of 64, one thread, an AMD EPYC with AVX512-BF16) it
took 3.6 ms a layer with 48 cached tokens and 33 ms with 600, a quarter of a
decode step by py-spy. The same attention written out, ``softmax(q·Kᵀ) · V``,
with the keys and values copied contiguous first (a bfloat16 product over the
KV cache's strided views is 3-4 times slower than over a contiguous copy) and
the softmax in float32, took 0.74 and 14 ms, copies included (one run, best
of 3 runs of 100 calls; docs/benchmarks.md). In float32 the two are about even,
and SDPA stays: the float32 greedy tests compare tokens with plain ``generate``
bit for bit.

:func:`decode_attention` takes that path only for one query per row, on CPU,
in bfloat16 or float16, with a plain mask (or none) and none of the options it
does not implement (dropout, a softcap, attention sinks, a position bias);
everything else goes to transformers' ``sdpa_attention_forward`` unchanged.
It is what :func:`engine.prefix.shared_prefix_attention` hands a call that
reads no shared prefix. Its outputs are within two steps of the dtype (at the
largest output) of float32 SDPA's: its weights are rounded to the dtype before
they multiply the values, as transformers' eager attention does
(``tests/integration/test_attention.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

#: The dtypes whose CPU SDPA is slower than the written-out product.
HALF = (torch.bfloat16, torch.float16)
#: Options of transformers' attention functions that the written-out products (here and
#: in :mod:`engine.prefix`) do not implement.
UNSUPPORTED = ("softcap", "s_aux", "position_bias", "sinks")


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention as transformers' ``sdpa`` function computes it: ``(B, q, H, D)``, None."""
    if not written_out(query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    # Query heads k*group .. k*group+group-1 share key head k (transformers' repeat_kv).
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.contiguous().transpose(2, 3)).float() * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[2]]  # (B, 1, 1, L): every head, every query
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(weights, value.contiguous()).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


def written_out(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    options: dict[str, Any],
) -> bool:
    """True when :func:`decode_attention` computes this call itself rather than SDPA."""
    return (
        query.device.type == "cpu"
        and query.dtype in HALF
        and query.shape[2] == 1
        and query.shape[1] % key.shape[1] == 0
        and not dropout
        and (
            attention_mask is None
            or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1))
        )
        and not any(options.get(name) for name in (*UNSUPPORTED, "output_attentions"))
    )
