"""A job as the engine sees it: its parameters as a :class:`engine.GenerationRequest`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from db import Job
from engine import GenerationRequest


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
        priority=job.priority,
        lane=job.lane,
        stream=bool(params.get("stream")),
    )
