"""A job as the model runtime sees it: its prompt (a chat rendered with the model's own
template) and its parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from completion_queue import NoChatTemplate
from db import Job
from workers.planner import GenerationRequest


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


def format_key(response_format: Mapping[str, Any] | None) -> str | None:
    """Return a job's ``response_format`` as compact JSON (the grammar cache's key).

    Keys keep their order: a schema's properties are generated in the order it lists them.
    """
    if response_format is None:
        return None
    return json.dumps(response_format, separators=(",", ":"))


def to_request(job: Job, prompt_ids: Sequence[int]) -> GenerationRequest:
    """Return the runtime's view of ``job``."""
    params = job.params
    return GenerationRequest(
        key=str(job.id),
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=int(params.get("max_new_tokens", 16)),
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=int(params.get("top_k", 0)),
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
        n=int(params.get("n", 1)),
        stop=tuple(params.get("stop") or ()),
        seed=params.get("seed"),
        logprobs=params.get("logprobs"),
        response_format=format_key(params.get("response_format")),
    )
