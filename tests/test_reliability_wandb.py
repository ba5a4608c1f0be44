"""W&B faults never stop training, and the JSON/PNG outputs are complete either way.

Fast: the disk fills up under W&B mid-run (its log call raises ENOSPC): one warning, W&B off, the
run finishes with the same adapter and metrics as the reference run without W&B. Slow: a real
wandb with a bad API key and an unreachable server: online init fails after its timeout, the run
goes on logging offline (files on disk, to `wandb sync` later), the results again identical.
A W&B project name W&B would refuse is refused first, by every route, before any work (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
from reliability_common import ATOL, assert_close, max_adapter_difference, metrics_json, reference_run, sft_settings
from test_tracking import FakeRun

from sarcasm_dpo import cli
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import CompareSettings, PipelineSettings, SFTSettings, SplitSettings, check_wandb_project
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


# -- a project name W&B refuses: refused before any work, not a warning and an untracked run ----------------

PROJECT_NAMES = ["sarcasm-detection", "My project 2", "a.b_c", "x" * 128, "x" * 129, "x" * 200, "team/sarcasm",
                 "a\\b", "a#b", "a?b", "a%b", "a:b", "ünïcode"]


@pytest.mark.parametrize("name", PROJECT_NAMES, ids=range(len(PROJECT_NAMES)))
def test_project_name_rule_is_wandbs_own(name):
    import wandb

    try:
        wandb.Settings(project=name)
        wandb_accepts = True
    except Exception:  # noqa: BLE001 - wandb's UsageError / pydantic's ValidationError
        wandb_accepts = False
    try:
        check_wandb_project(name)
        we_accept = True
    except UserError:
        we_accept = False
    assert we_accept == wandb_accepts


def _refused(capsys, argv, *says):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb_project ") and err.count("\n") == 1, err  # one paragraph
    assert "is not a W&B project name" in err and all(s in err for s in says), err
    assert "Traceback" not in err


def test_invalid_project_is_refused_by_every_route_before_any_work(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "splits"
    split = ["split", "--data_dir", str(shared_data), "--output_dir", str(out)]
    _refused(capsys, [*split, "--wandb_project", "team/sarcasm"], "'team/sarcasm'", "holds /", "ENTITY/PROJECT")
    _refused(capsys, [*split, "--wandb_project", "p" * 200], "200 characters", "at most 128")
    config = tmp_path / "c.yaml"
    config.write_text("wandb_project: 'a:b'\n")
    _refused(capsys, ["compare", "--config", str(config), "--output_dir", str(tmp_path / "results")], "holds :")
    _refused(capsys, ["pipeline", "--wandb_project", "a?b"], "holds ?")
    _refused(capsys, ["pipeline", "--set", "dpo.wandb_project=a%b"], "holds %")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written, no W&B folder either
    with pytest.raises(UserError, match="is not a W&B project name"):  # the Python API
        CompareSettings(wandb_project="a#b")
    with pytest.raises(UserError, match="is not a W&B project name"):
        dataclasses.replace(SFTSettings(), wandb_project="x" * 129)
    # With W&B off the name is never used, so it is not checked; the limit itself is W&B's: 128 is fine.
    assert SplitSettings(wandb_project="a/b", no_wandb=True).wandb_project == "a/b"
    assert PipelineSettings(wandb_project="p" * 128).wandb_project == "p" * 128
