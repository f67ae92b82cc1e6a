"""Experiments run from a checkout, outside the wheel: what a design choice was measured on.

``python -m benchmarks.grammar`` compares grammar libraries; ``python -m
benchmarks.decode`` times decode-step variants. ``cq bench`` (the ``bench``
package) is what users run.
"""
