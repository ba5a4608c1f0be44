"""Determinism: the same seed and settings give the same adapter and the same metrics on CPU.

The data split is covered in test_data.py (`make_splits` twice -> identical frames; the `split`
command twice -> byte-identical CSVs). Here: two SFT runs with one seed, compared tensor by tensor.
On CPU they agree bit for bit. On a GPU they agree only within tolerances (see the sft module
docstring): cuBLAS/cuDNN pick kernels whose float sums run in varying order, bf16 rounds.
"""

from __future__ import annotations

import json

from reliability_common import adapter_tensors, max_adapter_difference, metrics_json, reference_run, sft_settings

from sarcasm_dpo.stages import sft


def test_same_seed_gives_the_same_adapter_and_metrics(tiny_model_dir, tmp_path_factory, tmp_path):
    ref, train, val, ref_summary = reference_run(tiny_model_dir, tmp_path_factory)
    summary = sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "again"))

    # Not vacuous: training moved LoRA B away from its zero init, and the steps' losses differ.
    lora_b = [t for k, t in adapter_tensors(ref).items() if "lora_B" in k]
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b)
    assert len({round(s["loss"], 6) for s in metrics_json(ref)["steps"]}) > 3

    assert max_adapter_difference(ref, tmp_path / "again") == 0.0  # bit for bit on CPU
    assert metrics_json(tmp_path / "again") == metrics_json(ref)
    for key in ("best_epoch", "best_step", "best_val", "global_steps", "data", "trainable_params"):
        assert summary[key] == ref_summary[key], key
    again = json.loads((tmp_path / "again" / "training_summary.json").read_text())["config"]
    assert {k: v for k, v in again.items() if k != "output_dir"} == \
        {k: v for k, v in ref_summary["config"].items() if k != "output_dir"}
