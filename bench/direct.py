"""The model loaded plainly in the bench's process: the engine's ceiling and the naive baseline."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from bench.workloads import Item


class Direct:
    """A model and tokenizer loaded with ``from_pretrained``, run with batched ``generate``."""

    def __init__(self, path: str, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.devices import model_threads, resolve_device, resolve_dtype

        self.torch = torch
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":
            # The same threads as a worker's model process.
            torch.set_num_threads(model_threads())
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model.to(self.device).eval()

    @property
    def params(self) -> int:
        """The model's parameter count (tied weights counted once)."""
        return int(sum(p.numel() for p in self.model.parameters()))

    @property
    def weight_bytes(self) -> int:
        """The bytes a step reads to use every weight once (tied weights counted once)."""
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()))

    def run(self, items: Sequence[Item], batch_size: int) -> tuple[int, float]:
        """Generate ``items`` in arrival order, ``batch_size`` at a time; return tokens, seconds."""
        eos = self.tokenizer.eos_token_id
        tokens = 0
        started = time.perf_counter()
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            encoded = self.tokenizer(
                [i.prompt for i in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(self.device)
            with self.torch.inference_mode():
                out = self.model.generate(
                    **encoded,
                    max_new_tokens=max(i.max_new_tokens for i in chunk),
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            for item, row in zip(
                chunk, out[:, encoded["input_ids"].shape[1] :].tolist(), strict=True
            ):
                row = row[: item.max_new_tokens]
                tokens += row.index(eos) if eos in row else len(row)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return tokens, time.perf_counter() - started

    def close(self) -> None:
        """Free the model now (before another one loads), not when the object goes."""
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
