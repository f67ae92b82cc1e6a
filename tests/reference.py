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
        new = self.greedy_tokens(prompt_ids, max_new_tokens)
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)

    def greedy_tokens(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Return the greedy completion's token ids, cut before the first EOS."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        new: list[int] = out[0, ids.shape[1] :].tolist()
        ends = [i for i, token in enumerate(new) if token in self.eos_ids]
        return new[: ends[0]] if ends else new

    @property
    def eos_ids(self) -> set[int]:
        """The tokens that end a row: the tokenizer's EOS and the generation config's."""
        configured = self.model.generation_config.eos_token_id
        listed = configured if isinstance(configured, list) else [configured]
        return {self.tokenizer.eos_token_id, *(i for i in listed if i is not None)}

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Return the token ids of ``messages`` rendered with the chat template, as the worker does."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode(str(text))

    def log_softmax(self, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
        """Return one unpadded forward pass's log-softmax at each generated token's position."""
        ids = torch.tensor([prompt_ids + generated], dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(ids).logits[0].float()
        start = len(prompt_ids) - 1
        return logits[start : start + len(generated)].log_softmax(dim=-1)
