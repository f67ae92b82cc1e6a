"""Direct, unbatched transformers calls: what a job's result must equal."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class Reference:
    """The model and tokenizer loaded plainly, one prompt at a time."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def encode(self, prompt: str) -> list[int]:
        """Return the token ids of ``prompt``, as the worker tokenizes it."""
        return list(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    def greedy(self, prompt: str, max_new_tokens: int) -> tuple[str, int]:
        """Return the greedy completion of ``prompt`` and how many tokens it has."""
        return self.greedy_ids(self.encode(prompt), max_new_tokens)

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        """Return the greedy completion of the prompt ``prompt_ids`` and how many tokens it has."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos)]
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)
