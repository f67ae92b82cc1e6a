"""A KV cache that grows by chunks: each step writes one token's keys in place.

transformers' default ``DynamicCache`` keeps each layer's keys and values as one
tensor and, at every step, concatenates the new token to it (``torch.cat``): a
copy of the whole batch's cache, every layer, every token. On the GPT-2-small
shape (bfloat16, one thread, 32 rows of 16-token prompts, 32 new tokens) that
copy is about 8 ms of a 55 ms step.

:class:`GrowingLayer` is that ``DynamicLayer`` with its tensors held as views of
a larger buffer: a step copies only the new token into the next free place,
and the buffer is reallocated (one copy) only when it is full, with room for
:data:`ROOM` more tokens. Everything else (the mask sizes, ``get_seq_length``,
cropping, batch selection) is ``DynamicLayer``'s, reading those views; a layer
whose tensors were replaced by such an operation starts a new buffer from
them. The attention reads the same numbers with other strides, so the tokens
are the same (tested bit for bit against the default cache).

Why not transformers' ``StaticCache``: it is sized for the longest call up
front, and every step attends over all of it, masked; it lost to the dynamic
cache at 128 rows of short prompts (docs/benchmarks.md, "The decode step").
Here a step attends over the tokens so far, as with the dynamic cache, and the
memory held beyond them is at most :data:`ROOM` tokens a row.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Tokens of room a buffer gets past what it holds when it is (re)allocated.
ROOM = 64


class GrowingLayer(DynamicLayer):  # type: ignore[misc]
    """A ``DynamicLayer`` whose keys and values are views of buffers with room to grow."""

    def __init__(self, room: int = ROOM) -> None:
        super().__init__()
        self.room = room
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens after the cached ones; return all of them (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._fits(length, end, key_states):
            self._reallocate(length, end, key_states, value_states)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., length:end, :].copy_(key_states)
        self._value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        """Drop the buffers with the tensors."""
        self._key_buffer = self._value_buffer = None
        super().reset()

    def _fits(self, length: int, end: int, key_states: torch.Tensor) -> bool:
        """True when the cached tokens are still the buffers' first ``length`` and ``end`` fits."""
        buffer = self._key_buffer
        if buffer is None or end > buffer.shape[-2]:
            return False
        if buffer.shape[:-2] != key_states.shape[:-2]:
            return False
        if length == 0:
            return True
        # Cropping keeps a view of the buffer; batch selection or beam reordering
        # replaces the tensors, which the buffer then no longer holds.
        keys = self.keys
        assert keys is not None
        return keys.data_ptr() == buffer.data_ptr() and keys.stride() == buffer.stride()

    def _reallocate(
        self, length: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        capacity = end + self.room
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty(
            (*value_states.shape[:-2], capacity, value_states.shape[-1])
        )
        if length:
            assert self.keys is not None and self.values is not None
            keys[..., :length, :].copy_(self.keys)
            values[..., :length, :].copy_(self.values)
        self._key_buffer, self._value_buffer = keys, values


def growing_cache(model: Any, room: int = ROOM) -> DynamicCache | None:
    """Return a cache for one ``generate`` call of ``model``, its plain layers growing.

    The cache is what ``generate`` would make itself (``DynamicCache`` from the
    model's text config), with each plain ``DynamicLayer`` a :class:`GrowingLayer`
    (``room`` tokens of room); sliding-window and other special layers stay as
    they are. None where ``generate`` would make another kind of cache (an
    encoder-decoder model, a model without the default cache, a generation
    config that names a cache): then ``generate`` makes its own.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(model.generation_config, "cache_implementation", None) is not None:
        return None
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return None
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = functools.partial(GrowingLayer, room)
    cache.layers = [GrowingLayer(room) if type(x) is DynamicLayer else x for x in cache.layers]
    return cache
