"""The ``generate`` variants of ``python -m benchmarks.decode``: how each loads and runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import CompileConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine.attention import decode_attention
from engine.layers import conv1d_to_linear, pack_linears


@dataclass(frozen=True, slots=True)
class Variant:
    """One way to run ``generate``: attention kernel, KV cache, compilation."""

    attn: str = "sdpa"
    cache: str | None = None  # None: generate's default, a DynamicCache
    compiled: bool = False
    freezing: bool = False
    linear: bool = False  # GPT-2's Conv1D swapped for nn.Linear (weights stored out x in)
    packed: bool = False  # nn.Linear weights prepacked for oneDNN, as the worker does in bf16
    growing: bool = False  # the worker's KV cache, grown in place by chunks (engine.kvcache)
    decode: bool = False  # the worker's attention function (engine.attention)
    help: str = ""


VARIANTS: dict[str, Variant] = {
    "default": Variant(help="plain generate: SDPA attention, dynamic cache, layers as loaded"),
    "packed": Variant(packed=True, help="prepacked linear layers, the default cache"),
    "growing": Variant(growing=True, help="the KV cache grown in place by chunks"),
    "worker": Variant(
        packed=True,
        growing=True,
        decode=True,
        help="as the worker runs bf16 on CPU: packed + growing + its decode attention",
    ),
    "worker-sdpa": Variant(
        packed=True, growing=True, help="packed + growing, with SDPA at every step"
    ),
    "packed-static": Variant(cache="static", packed=True, help="prepacked + static cache"),
    "eager": Variant(attn="eager", help="attn_implementation='eager'"),
    "static": Variant(cache="static", help="cache_implementation='static', not compiled"),
    "compile": Variant(cache="static", compiled=True, help="static cache + torch.compile"),
    "freeze": Variant(
        cache="static", compiled=True, freezing=True, help="compile with inductor freezing"
    ),
    "eager-compile": Variant(
        attn="eager", cache="static", compiled=True, help="eager attention + static + compile"
    ),
    "linear-freeze": Variant(
        cache="static", compiled=True, freezing=True, linear=True, help="nn.Linear + freeze"
    ),
    "linear": Variant(linear=True, help="Conv1D -> nn.Linear, else default"),
    "linear-compile": Variant(
        cache="static", compiled=True, linear=True, help="nn.Linear + static + compile"
    ),
}


def load(path: str, dtype: torch.dtype, variant: Variant) -> Any:
    """Load the model as ``variant`` wants it, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=variant.attn
    )
    if variant.packed:
        pack_linears(model)
    elif variant.linear:
        conv1d_to_linear(model)
    return model.eval()


def generation_config(variant: Variant, new_tokens: int, pad: int) -> GenerationConfig:
    """Greedy, ``new_tokens`` each (no EOS, so every row does the same work)."""
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=None,
        use_cache=True,
    )
    if variant.cache is not None:
        config.cache_implementation = variant.cache
    if variant.compiled:
        # generate compiles the decode step only (prefill stays eager); on CPU it must be asked.
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True
        config.compile_config = compile_config
    else:
        config.disable_compile = True
    return config


@contextlib.contextmanager
def inductor(variant: Variant) -> Iterator[None]:
    """Inductor settings around each call: freezing prepacks weights (oneDNN) into constants."""
    if variant.freezing:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            yield
    else:
        yield


@contextlib.contextmanager
def attention(variant: Variant) -> Iterator[None]:
    """transformers' ``sdpa`` function is the worker's :func:`decode_attention` within."""
    if not variant.decode:
        yield
        return
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", decode_attention)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", previous)
