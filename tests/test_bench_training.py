"""bench/training.py runs end to end on a small model and writes its figures (timings are not checked)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_training_bench_writes_step_times_and_ratios(tmp_path, shared_data, fine_rounding):
    sys.path.insert(0, str(ROOT / "bench"))
    import training

    fine_rounding(training)  # figures to 9 digits, so the ratios below are recomputed exactly
    out = tmp_path / "training.json"
    training.main(["--layers", "2", "--steps", "3", "--rounds", "2", "--stages", "sft", "--variants", "lean",
                   "--data_dir", str(shared_data), "--output", str(out)])
    result = json.loads(out.read_text())
    rows = result["stages"]["sft"]["setups"]
    assert set(rows) == {"lean", "bare"}
    lean, bare = rows["lean"], rows["bare"]
    for row in (lean, bare):
        assert row["steps_timed"] == 4 and len(row["round_medians_ms"]) == 2  # 2 rounds of 3 steps, warm-up left out
        # the pooled median of two rounds' equally many steps lies between the two rounds' medians
        assert min(row["round_medians_ms"]) <= row["median_ms"] <= max(row["round_medians_ms"])
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / (row["median_ms"] / 1000), rel=1e-6)
    # each ratio from the figures kept beside it: pooled medians, and the median of the per-round ratios
    assert lean["ratio_to_bare_median"] == pytest.approx(lean["median_ms"] / bare["median_ms"], rel=1e-6)
    paired = statistics.median(a / b for a, b in zip(lean["round_medians_ms"], bare["round_medians_ms"]))
    assert lean["ratio_to_bare_paired"] == pytest.approx(paired, rel=1e-6)
    losses = result["stages"]["sft"]["first_step_loss"]
    assert abs(losses["lean"] - losses["bare"]) < 1e-5  # the same model, batches and algorithm
