"""The engine: what runs a model and nothing else.

Loading and devices, the engines behind one protocol (static ``generate``,
continuous batching), per-row sampling, logprobs, grammars, prefix reuse, the CPU
kernels, and the request and result types. No Celery, kombu, Redis or SQL: the
queue side (``workers/``) imports the engine, never the reverse, and ``cq bench``
and tests run an engine alone.

This package exports only what needs no torch; import the engines from their
modules (``engine.static``, ``engine.continuous``) in the process that holds the
model, so that the worker's main process never imports torch.
"""

from engine.chat import render_chat
from engine.protocol import Engine, FollowedRows, Follower
from engine.routing import Routed
from engine.types import GeneratedChoice, GenerationRequest, GenerationResult, cut_at_stop

__all__ = [
    # requests and results
    "GeneratedChoice",
    "GenerationRequest",
    "GenerationResult",
    "cut_at_stop",
    # chats
    "render_chat",
    # engines and who follows them
    "Engine",
    "FollowedRows",
    "Follower",
    "Routed",
]
