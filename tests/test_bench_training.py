"""bench/training.py runs end to end on a small model and writes its figures (timings are not checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_training_bench_writes_step_times_and_ratios(tmp_path, shared_data):
    sys.path.insert(0, str(ROOT / "bench"))
    import training

    out = tmp_path / "training.json"
    training.main(["--layers", "2", "--steps", "3", "--rounds", "1", "--stages", "sft", "--variants", "lean",
                   "--data_dir", str(shared_data), "--output", str(out)])
    result = json.loads(out.read_text())
    rows = result["stages"]["sft"]["setups"]
    assert set(rows) == {"lean", "bare"} and rows["bare"]["ratio_to_bare_median"] == 1.0
    assert rows["lean"]["steps_timed"] == 2 and rows["lean"]["median_ms"] > 0
    losses = result["stages"]["sft"]["first_step_loss"]
    assert abs(losses["lean"] - losses["bare"]) < 1e-5  # the same model, batches and algorithm
