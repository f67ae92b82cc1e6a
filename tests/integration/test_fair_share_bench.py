"""`python -m benchmarks.fair_share` runs end to end at a small size (figures not judged)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import fair_share


def test_the_fair_share_bench_reports_a_with_b_against_a_alone(user_data_dir: Path) -> None:
    # Given the tiny model where the bench looks for it (the user's CQ_DATA_DIR)
    out = user_data_dir / "fair.json"
    # When it runs A alone, then A with B, at a small size
    small = ["--a-jobs", "3000", "--b-jobs", "4", "--new-tokens", "32", "--b-after-s", "1"]
    figures = fair_share.main([*small, "--window-s", "2", "--json", str(out)])
    # Then A generated tokens in both windows, B's jobs all finished, and the ratio is theirs
    assert figures["a_alone_tokens_per_s"] > 0 and figures["a_with_b_tokens_per_s"] > 0
    assert figures["a_with_b_over_alone"] == pytest.approx(
        figures["a_with_b_tokens_per_s"] / figures["a_alone_tokens_per_s"]
    )
    assert 0 < figures["b_slowest_s"] < 120 and math.isfinite(figures["b_slowest_s"])
    assert out.exists() and '"a_with_b_over_alone"' in out.read_text()
