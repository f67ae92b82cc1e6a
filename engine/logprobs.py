"""Per-token log probabilities, recorded inside the batched ``generate`` from its own forward pass.

:class:`LogprobRecorder` is a logits processor placed first in the list, so it
sees the model's raw scores before any grammar mask or sampling transform (as
OpenAI reports them). It changes nothing: it returns the scores it is given.
Per step it keeps only the top-k ids and values of the rows that ask (k the
largest asked in the batch) and the previous step's log-softmax, from which the
chosen token's log probability is gathered one step later, once ``generate`` has
appended that token; :meth:`LogprobRecorder.finish` gathers the last step's from
the output ids. :func:`stored_logprobs` turns one row's record and its kept
tokens into what :class:`db.Choice` stores: OpenAI's chat shape per token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.types import GenerationRequest

#: What OpenAI reports for a token the model cannot choose (a masked logit): JSON has no -inf.
FLOOR_LOGPROB = -9999.0

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True, slots=True)
class RowLogprobs:
    """One row's record: per step, the chosen token's log probability and the top ``k``."""

    k: int
    chosen: list[float]
    top_ids: list[list[int]]
    top_values: list[list[float]]


class LogprobRecorder(LogitsProcessor):  # type: ignore[misc]
    """Record the log-softmax of the raw scores for the rows that ask for logprobs."""

    def __init__(self, rows: Sequence[GenerationRequest]) -> None:
        self.rows = len(rows)
        self.asked = [i for i, r in enumerate(rows) if r.logprobs is not None]
        self.ks = [rows[i].logprobs or 0 for i in self.asked]
        self.k = max(self.ks, default=0)
        self.every_row = len(self.asked) == len(rows)
        self._index: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._chosen: list[torch.Tensor] = []
        self._top_values: list[torch.Tensor] = []
        self._top_ids: list[torch.Tensor] = []

    def _mine(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.every_row:
            return tensor
        if self._index is None:
            self._index = torch.tensor(self.asked, dtype=torch.long, device=tensor.device)
        return tensor.index_select(0, self._index)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.asked:
            return scores
        if self._previous is not None:
            # The token chosen at the previous step is now the last of input_ids.
            self._gather_previous(input_ids)
        logprobs = self._mine(scores).float().log_softmax(dim=-1)
        if self.k:
            values, ids = logprobs.topk(self.k, dim=-1)
            self._top_values.append(values)
            self._top_ids.append(ids)
        self._previous = logprobs
        return scores

    def _gather_previous(self, ids: torch.Tensor) -> None:
        assert self._previous is not None
        last = self._mine(ids)[:, -1:].to(self._previous.device)
        self._chosen.append(self._previous.gather(1, last).squeeze(1))
        self._previous = None

    def finish(self, output_ids: torch.Tensor) -> list[RowLogprobs | None]:
        """Return each row's record (None where it did not ask), given ``generate``'s output."""
        records: list[RowLogprobs | None] = [None] * self.rows
        if not self.asked:
            return records
        if self._previous is not None:
            self._gather_previous(output_ids)
        if not self._chosen:
            return records
        chosen = torch.stack(self._chosen, dim=1).cpu().tolist()
        steps = len(chosen[0])
        values: list[Any] = [[[]] * steps] * len(self.asked)
        ids: list[Any] = values
        if self.k:
            values = torch.stack(self._top_values, dim=1).cpu().tolist()
            ids = torch.stack(self._top_ids, dim=1).cpu().tolist()
        for j, (row, k) in enumerate(zip(self.asked, self.ks, strict=True)):
            records[row] = RowLogprobs(
                k=k,
                chosen=chosen[j],
                top_ids=[step[:k] for step in ids[j]],
                top_values=[step[:k] for step in values[j]],
            )
        return records


class TokenSpeller:
    """Each token id's text (the tokenizer's decode of that one id) and its bytes, cached.

    For a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen) the bytes are the
    token's own, even when it holds part of a UTF-8 character (whose decoded text
    is U+FFFD); a byte-fallback token ``<0xNN>`` is that byte; otherwise they are
    the UTF-8 encoding of the text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """Return the text and bytes of ``token_id``."""
        spelled = self.cache.get(token_id)
        if spelled is None:
            text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            raw = text.encode("utf-8")
            if isinstance(piece, str):
                byte = _BYTE_TOKEN.fullmatch(piece)
                if self.byte_level and all(c in self.byte_of for c in piece):
                    raw = bytes(self.byte_of[c] for c in piece)
                elif byte is not None:
                    raw = bytes([int(byte.group(1), 16)])
            spelled = self.cache[token_id] = (text, raw)
        return spelled


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    if type(decoder).__name__ == "ByteLevel":
        return True
    try:
        return b'"ByteLevel"' in decoder.__getstate__()
    except (AttributeError, TypeError):
        return False


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR_LOGPROB


def stored_logprobs(
    record: RowLogprobs, tokens: Sequence[int], spell: TokenSpeller
) -> list[dict[str, Any]]:
    """Return the stored entries of a row's kept ``tokens``: one per token, OpenAI's chat shape.

    Each entry is ``{"token", "bytes", "logprob", "top_logprobs"}``, the last a list
    of ``record.k`` ``{"token", "bytes", "logprob"}`` in descending order.
    """
    if len(tokens) > len(record.chosen):
        raise ValueError(f"{len(tokens)} tokens kept but only {len(record.chosen)} steps recorded")
    entries = []
    for step, token in enumerate(tokens):
        text, raw = spell(token)
        top = []
        for alternative, value in zip(record.top_ids[step], record.top_values[step], strict=True):
            alt_text, alt_raw = spell(alternative)
            top.append({"token": alt_text, "bytes": list(alt_raw), "logprob": _finite(value)})
        entries.append(
            {
                "token": text,
                "bytes": list(raw),
                "logprob": _finite(record.chosen[step]),
                "top_logprobs": top,
            }
        )
    return entries
