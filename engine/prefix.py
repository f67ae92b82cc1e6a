"""Shared prefixes computed once: the rows of one ``generate`` call that start alike.

When every row of a group starts with the same ``P`` tokens (a system prompt,
few-shot examples, an instruction header; or one job's ``n`` choices),
:func:`shared_prefix_len` says so, :func:`prefix_cache` runs the model once on
those ``P`` tokens with batch 1 and repeats its KV cache to every row, and
``generate``, handed that cache with the full ``input_ids``, computes only the
tokens after it.

The layout (:func:`pad_rows`): each row is ``[prefix, gap, suffix]``, the gap
filling the row to the width of the longest suffix, with attention mask 0 on
the gap. Why not left padding: the cache holds the prefix's keys at cache
indices ``0..P-1`` in every row, so the prefix must start every row; the
padding can only go after it. Why not one call per suffix length: a group of
distinct questions would split into many calls, each decoding a small batch.
What transformers 5.x does with this layout (read in ``generation/utils.py``,
``_prefill`` and ``_prepare_position_ids_for_generation``): position ids are the
attention mask's cumulative sum minus one, so the prefix sits at ``0..P-1`` and
each row's suffix right after it, at ``P..``, whatever its gap, as in a direct
pass; the prefill, seeing a cache of ``P`` tokens, feeds the model only
``input_ids[:, P:]``; the mask (causal and 2D padding together) keeps every
token from attending to a gap. A gap token's own query attends to the prefix,
so no mask row is empty (no NaN). The gap holds the prefix's last token rather
than the pad token: its id is never attended to, and a repetition penalty, which
treats every id of ``input_ids`` as seen text (the rows' ``prompt_starts`` are
all 0 here), then sees only a token the row's prompt has anyway.

The cache handed to ``generate`` is a :class:`~transformers.StaticCache`, sized
for the prompt width and the new tokens, not the growing ``DynamicCache``:
that one concatenates every layer's keys and values at each step, a copy of
the whole batch's cache per token, which once the prefix is shared is most of
what is left. Measured on a 6-layer, 512-wide GPT-2 (one thread, float32; 32
rows, a 512-token prefix, 8-token questions, 16 new tokens): 12.2 s without
reuse, 3.9 s with a dynamic cache, 1.6 s with the static one, the same tokens.
Without a shared prefix the static cache gains nothing there (the prefill of
every row's full prompt dominates), so the other path keeps a dynamic one
(:mod:`engine.kvcache`, grown in place by chunks rather than concatenated).

While the rows decode, attention reads the prefix once per step, not once per
row (:func:`shared_prefix_attention`): the cache still holds a copy of the
prefix in every row (written once, by :func:`prefix_cache`, and read once by
the prefill through SDPA), but while :func:`sharing` is on, a decoding step
takes the prefix's keys and values from the first row only and multiplies
every row's queries by them in one product, then each row's queries by its
own keys after the prefix, with one softmax over both (cascade attention, as
vLLM and FlashInfer call it). Reading 32 copies of a 512-token prefix at every
step was most of a reused step's time: 1.34 times as fast as with the copies
on the GPT-2-small shape (bfloat16, one thread, 32 rows, 32 new tokens; see
docs/benchmarks.md, "Shared prefixes"). It is installed as transformers' ``sdpa``
attention function (``AttentionInterface.register``), and hands to
:func:`engine.attention.decode_attention` (SDPA, or a faster decoding step on
CPU in half precision) every call outside :func:`sharing`, or where the mask
does not let every query see the whole prefix, or on options it does not know
(a softcap, attention sinks, a position bias); the model's config is not touched.

Each row keeps at least one token after the prefix, so the prefill has a real
last token from which every row's first new token is predicted. Reuse is
decided for the whole group (every row shares the prefix) or not at all; a
group where some rows start otherwise computes everything, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache, StaticCache

from engine.attention import UNSUPPORTED, decode_attention


@dataclass(slots=True)
class _Shared:
    """The prefix being shared in this ``generate`` call, and its keys and values per layer."""

    length: int
    #: Per attention module: the prefix's keys transposed and its values, contiguous.
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


#: What the group now in ``generate`` shares; None outside :func:`sharing`.
_SHARED: contextvars.ContextVar[_Shared | None] = contextvars.ContextVar(
    "cq_shared_prefix", default=None
)


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Return the length of the longest token prefix that all ``prompts`` share."""
    if not prompts:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    for i in range(shortest):
        token = first[i]
        if any(p[i] != token for p in prompts):
            return i
    return shortest


def shared_prefix_len(prompts: Sequence[Sequence[int]], min_tokens: int) -> int:
    """Return how many leading tokens to compute once for all ``prompts``; 0 for none.

    The prefix pays when ``min_tokens`` is on (not 0), at least two rows share it,
    and it is at least ``min_tokens`` long once one token of the shortest prompt is
    left after it.
    """
    if min_tokens <= 0 or len(prompts) < 2:
        return 0
    shared = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    return shared if shared >= min_tokens else 0


def pad_rows(
    prompts: Sequence[Sequence[int]], pad_id: int, prefix_len: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the rows out for one ``generate`` call: input ids, attention mask, prompt starts.

    Without a prefix the rows are left-padded with ``pad_id``, and a row's start is
    its first real position. With one (``prefix_len`` tokens that every prompt
    starts with) each row is ``[prefix, gap, suffix]`` as the module docstring says,
    and every start is 0.
    """
    width = max(len(p) for p in prompts)
    # A gap holds the prefix's last token (see the module docstring), left padding pad_id.
    fill = prompts[0][prefix_len - 1] if prefix_len else pad_id
    ids = torch.full((len(prompts), width), fill, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    if prefix_len:
        ids[:, :prefix_len] = torch.tensor(prompts[0][:prefix_len], dtype=torch.long)
        mask[:, :prefix_len] = 1
    for i, prompt in enumerate(prompts):
        suffix = prompt[prefix_len:]
        ids[i, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
        mask[i, width - len(suffix) :] = 1
    starts = torch.zeros(len(prompts), dtype=torch.long) if prefix_len else width - mask.sum(dim=1)
    return ids, mask, starts


def prefix_cache(model: Any, prefix_ids: torch.Tensor, rows: int, max_len: int) -> StaticCache:
    """Run ``model`` once on ``prefix_ids`` (shape ``(1, P)``); return its KV cache for ``rows``.

    The cache is static, room for ``max_len`` tokens per row (the prompt width plus
    the new tokens), holding the prefix in its first ``P`` places. Call it under
    ``torch.inference_mode()``. Only the last position's logits are computed: the
    prefix's own predictions are not needed.
    """
    first = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, cache=first, use_cache=True, logits_to_keep=1)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for layer, (keys, values, *_) in zip(cache.layers, first, strict=True):
        layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
    return cache


@contextlib.contextmanager
def sharing(prefix_len: int) -> Iterator[_Shared | None]:
    """Within: attention reads the first ``prefix_len`` cached tokens once for all rows.

    Yields the state it keeps (None when ``prefix_len`` is 0): its ``layers`` holds
    one entry per attention layer that read the prefix so.
    """
    install()
    state = _Shared(prefix_len) if prefix_len else None
    token = _SHARED.set(state)
    try:
        yield state
    finally:
        _SHARED.reset(token)


def install() -> None:
    """Make :func:`shared_prefix_attention` transformers' ``sdpa`` function (idempotent)."""
    AttentionInterface.register("sdpa", shared_prefix_attention)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with the rows' common cached prefix read once (see the module docstring).

    ``query`` is ``(B, H, q, D)``; ``key`` and ``value`` are ``(B, Hkv, L, D)``, the
    first ``P`` places the same in every row; the mask is SDPA's ``(B, 1, q, L)``,
    boolean (True: attend) or additive. Returns ``(B, q, H, D)`` as SDPA does.
    """
    shared = _SHARED.get()
    prefix = shared.length if shared is not None else 0
    heads, kv_heads = query.shape[1], key.shape[1]
    usable = (
        shared is not None
        and query.shape[2] == 1  # decoding; the prefill reads each row's copy once, in SDPA
        and key.shape[2] > prefix
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and not dropout
        and heads % kv_heads == 0
        and all(kwargs.get(k) is None for k in UNSUPPORTED)
    )
    if usable:
        assert attention_mask is not None
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        usable = bool(allowed[..., :prefix].all())
    if not usable or shared is None:
        return decode_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, _, q_len, dim = query.shape
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # Query heads k*group .. k*group+group-1 share key head k (transformers' repeat_kv).
    grouped = query.reshape(rows, kv_heads, group * q_len, dim)
    # The prefix's part, laid out once per call (it does not change while rows decode).
    if id(module) not in shared.layers:
        shared.layers[id(module)] = (
            key[0, :, :prefix].transpose(1, 2).contiguous(),
            value[0, :, :prefix].contiguous(),
        )
    prefix_kt, prefix_v = shared.layers[id(module)]
    # Every row's queries against the one prefix: rows folded into the product's M.
    by_head = grouped.transpose(0, 1).reshape(kv_heads, rows * group * q_len, dim)
    on_prefix = torch.bmm(by_head, prefix_kt).float()
    on_prefix = on_prefix.view(kv_heads, rows, group * q_len, prefix).transpose(0, 1)
    # Each row's own few keys: many tiny products, quicker in float32 than in bfloat16.
    own_v = value[:, :, prefix:].float()
    on_own = torch.matmul(grouped.float(), key[:, :, prefix:].float().transpose(2, 3))
    mask = allowed[..., prefix:]
    if group > 1:
        mask = mask.unsqueeze(2).expand(rows, 1, group, q_len, mask.shape[-1]).flatten(2, 3)
    on_own = on_own.masked_fill(~mask, float("-inf"))
    weights = (torch.cat([on_prefix, on_own], dim=-1) * scale).softmax(dim=-1)
    w_prefix = weights[..., :prefix].to(value.dtype).transpose(0, 1).reshape(kv_heads, -1, prefix)
    out = torch.bmm(w_prefix, prefix_v).view(kv_heads, rows, group * q_len, dim).transpose(0, 1)
    out = out + torch.matmul(weights[..., prefix:], own_v)
    out = out.to(value.dtype).reshape(rows, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None
