"""The public names of bench: the stub lazy_loader reads, and type checkers."""

from .run import BenchConfig, run_bench

__all__ = [
    # the run
    "BenchConfig",
    "run_bench",
]
