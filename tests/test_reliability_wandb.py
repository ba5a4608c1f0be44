"""W&B faults never stop training, and the JSON/PNG outputs are complete either way.

Fast: the disk fills up under W&B mid-run (its log call raises ENOSPC): one warning, W&B off, the
run finishes with the same adapter and metrics as the reference run without W&B. Slow: a real
wandb with a bad API key and an unreachable server: online init fails after its timeout, the run
goes on logging offline (files on disk, to `wandb sync` later), the results again identical.
"""

from __future__ import annotations

import json
import warnings

import pytest
from reliability_common import ATOL, assert_close, max_adapter_difference, metrics_json, reference_run, sft_settings
from test_tracking import FakeRun

from sarcasm_dpo.stages import sft
from sarcasm_dpo.tracking import TrackingWarning

OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "sft_metrics.json", "sft_training_curves.png",
           "training_summary.json", "COMPLETE.json")


def _assert_complete_and_same_as_reference(out, ref):
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for name in ("sft_metrics.json", "training_summary.json", "COMPLETE.json"):
        json.loads((out / name).read_text())  # whole, parseable
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))


def test_disk_full_under_wandb_does_not_stop_training(tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    import wandb

    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    runs = []

    def init(mode=None, settings=None, **kwargs):
        runs.append(FakeRun(fail_on="log"))  # every log call: OSError(28, "No space left on device")
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "sft"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft.run(sft_settings(tiny_model_dir, train, val, out, no_wandb=False))
    tracking = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1 and "No space left on device" in tracking[0]
    assert len(runs) == 1 and runs[0].calls[0][0] == "log" and runs[0].calls[-1] == ("finish", 1)
    _assert_complete_and_same_as_reference(out, ref)


@pytest.mark.slow
def test_bad_key_and_unreachable_server_fall_back_to_offline(tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # well-formed, unknown to any server
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    (tmp_path / "wandb-files").mkdir()
    out = tmp_path / "sft"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft.run(sft_settings(tiny_model_dir, train, val, out, no_wandb=False))
    tracking = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert any("online init failed" in m for m in tracking), tracking
    assert list((tmp_path / "wandb-files").glob("wandb/offline-run-*")), "no offline run was written"
    _assert_complete_and_same_as_reference(out, ref)
