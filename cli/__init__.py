"""``cq``, the command line: it composes every package below it, and nothing imports it."""

from __future__ import annotations

import os

from cli import jobs, keys, ops, run  # noqa: F401  (each registers its commands on the group)
from cli.group import cli

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cq`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.main(args=argv, prog_name="cq")
