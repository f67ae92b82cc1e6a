"""A chat's messages as the prompt text a model expects, through its own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from completion_queue import NoChatTemplate


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, model: str) -> str:
    """Return ``messages`` as the prompt text the model expects, ending with its assistant header.

    Raises:
        NoChatTemplate: the model's tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(
            f"model {model!r} has no chat template, so it cannot take messages: "
            "send a prompt instead, or use a chat model"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    return str(text)
