"""The HTTP API: native jobs, OpenAI-compatible completions and batches, on the producer."""

from api.app import create_api

__all__ = ["create_api"]
