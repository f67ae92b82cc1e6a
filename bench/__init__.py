"""``cq bench``: throughput, latency and memory of the whole path, against baselines measured in
the same run. It drives the producer and the workers from outside, so it may import both."""

from bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
