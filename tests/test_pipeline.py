"""The whole pipeline end to end with the tiny model, through the CLI and through the original scripts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from conftest import GEN_CSV, ISARCASM_CSV, ROOT, run_script

from sarcasm_dpo.cli import main
from sarcasm_dpo.metrics import classification_metrics


class Done(NamedTuple):
    """What a finished command left: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, shared_data):
    """Real rows in the real formats, few enough to train on in seconds."""
    folder = tmp_path_factory.mktemp("data")
    gen = pd.read_csv(GEN_CSV)
    gen = pd.concat([gen[gen["class"] == "sarc"].head(100), gen[gen["class"] == "notsarc"].head(100)])
    (folder / "sarcasm_v2").mkdir()
    gen.to_csv(folder / "sarcasm_v2" / "GEN-sarc-notsarc.csv", index=False)
    isarcasm = pd.read_csv(ISARCASM_CSV)
    isarcasm = pd.concat([isarcasm[isarcasm.sarcastic == 1].head(60), isarcasm[isarcasm.sarcastic == 0].head(90)])
    (folder / "isarcasmeval").mkdir()
    isarcasm.to_csv(folder / "isarcasmeval" / "train.En.csv", index=False)
    return folder


def write_config(path, model_dir, work):
    path.write_text(f"""# test config
#   sarcasm-dpo pipeline --config {path}
model: {model_dir}
seed: 1
max_text_tokens: 48
split:
  output_dir: {work}/splits
sft:
  output_dir: {work}/sft
  epochs: 1
  sample_size: 48
  lr: 1.0e-3
  batch_size: 8
  grad_accum: 1
  lora_r: 4
  lora_alpha: 8
  lora_targets: [q_proj, v_proj]
dpo:
  output_dir: {work}/dpo
  epochs: 1
  sample_size: 24
  batch_size: 8
  grad_accum: 1
  probe_size: 8
  logging_steps: 1
  val_sample_size: 24
compare:
  output_dir: {work}/results
  n_bootstrap: 200
""")
    return path


def pipeline(capsys, config, data_dir, *extra) -> Done:
    """`sarcasm-dpo pipeline ...` in this process (test_cli starts the CLI's process once for the suite)."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = main(["pipeline", "--config", str(config), "--data_dir", str(data_dir), "--no_wandb", *extra])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    out, err = capsys.readouterr()
    return Done(code, out, err)


def test_pipeline_end_to_end_then_skips(tiny_model_dir, small_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    done = pipeline(capsys, config, small_data_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for path in ["splits/gen_train.csv", "splits/gen_val.csv", "splits/gen_test.csv", "splits/isarcasm_train.csv",
                 "splits/isarcasm_val.csv", "sft/adapter_model.safetensors", "sft/sft_metrics.json",
                 "sft/sft_training_curves.png", "sft/training_summary.json", "dpo/adapter_model.safetensors",
                 "dpo/dpo_epoch_metrics.json", "dpo/dpo_batch_metrics.json", "dpo/dpo_training_curves.png",
                 "dpo/dpo_training_summary.json", "results/model_comparison_results.json",
                 "results/model_comparison_plot.png", "results/predictions.csv"]:
        assert (work / path).is_file(), path
    for stage in ("splits", "sft", "dpo", "results"):
        assert (work / stage / "COMPLETE.json").is_file()
    results = json.loads((work / "results" / "model_comparison_results.json").read_text())
    preds = pd.read_csv(work / "results" / "predictions.csv")
    test = pd.read_csv(work / "splits" / "gen_test.csv")
    assert len(preds) == len(test) == results["test_set"]["n"]
    for name in ("base", "sft", "dpo"):
        recomputed = classification_metrics(preds["label"].to_numpy(), preds[f"p_{name}"].to_numpy())
        assert results["models"][name]["accuracy"] == pytest.approx(recomputed["accuracy"])
        assert results["models"][name]["f1"] == pytest.approx(recomputed["f1"])
    assert not np.allclose(preds["p_sft"], preds["p_base"])  # SFT trained something
    assert "verdict" in results["significance"]["dpo_vs_sft"]
    # DPO's accuracy is on screen: its row in compare's table at 0.5, then at its own validation threshold
    # (threshold.json, chosen on GEN validation), then in the pipeline's closing table, which leads with the
    # figures at each model's own threshold (the way predict and an export use the model).
    dpo_rows = [line.split() for line in done.stdout.splitlines() if line.startswith(f"{'DPO':<10} ")]
    at_half = f"{results['models']['dpo']['accuracy']:.3f}"
    at_own = f"{results['at_validation_threshold']['models']['dpo']['accuracy']:.3f}"
    assert [row[1] for row in dpo_rows] == [at_half, at_own, at_own], dpo_rows
    assert set(results["at_validation_threshold"]["thresholds"]) >= {"sft", "dpo"}
    # It ends with what it found and where: the table, the verdicts, the plot, predictions and results.
    tail = done.stdout.rstrip().splitlines()[-3:]
    assert tail == [f"Plot: {work}/results/model_comparison_plot.png", f"Predictions: {work}/results/predictions.csv",
                    f"Results: {work}/results/model_comparison_results.json"]
    # compare's verdicts at 0.5 and at the validation thresholds, then the pipeline's closing summary's (at the
    # models' own thresholds, then at 0.5, labelled)
    assert done.stdout.count("DPO vs SFT: accuracy") == 4
    assert "At threshold 0.5 for every model instead" in done.stdout

    # Re-run: every stage is complete for the same settings and is skipped.
    again = pipeline(capsys, config, small_data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete for these settings; skipping") == 4  # split, sft, dpo, compare (no mine)
    assert "ran nothing; skipped split, sft, dpo, compare." in again.stdout

    # Records of an older version lack the settings added since. Left at their defaults, those settings
    # are what the older version did, so its finished stages still count: an upgrade redoes nothing.
    for stage, key, default in (("splits", "strict", False), ("sft", "select_by", "f1"),
                                ("dpo", "select_by", "f1"), ("results", "extra_test", [])):
        marker = work / stage / "COMPLETE.json"
        record = json.loads(marker.read_text())
        assert record["config"].pop(key) == default, (stage, key)
        marker.write_text(json.dumps(record))
    upgraded = pipeline(capsys, config, small_data_dir)
    assert "ran nothing; skipped split, sft, dpo, compare." in upgraded.stdout, upgraded.stdout[-2000:]

    # Change one DPO setting: only DPO and compare run again.
    text = config.read_text().replace("  sample_size: 24", "  sample_size: 16")
    config.write_text(text)
    changed = pipeline(capsys, config, small_data_dir)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "ran dpo, compare" in changed.stdout

    # A per-stage override on the command line counts like the same change in the file.
    overridden = pipeline(capsys, config, small_data_dir, "--set", "compare.n_bootstrap=100")
    assert overridden.returncode == 0, overridden.stderr[-2000:]
    assert "ran compare;" in overridden.stdout
    results = json.loads((work / "results" / "model_comparison_results.json").read_text())
    assert results["config"]["n_bootstrap"] == 100
    bad = pipeline(capsys, config, small_data_dir, "--set", "compare.n_bootstrapp=100")
    assert bad.returncode == 2 and "section 'compare' has no setting 'n_bootstrapp'" in bad.stderr


def test_a_stage_trained_from_files_rewritten_since_runs_again(tiny_model_dir, small_data_dir, tmp_path, capsys,
                                                               monkeypatch):
    """Settings name the files by path; a stage's COMPLETE.json also records their checksums. A pipeline
    stopped after the split was made again (other settings), or after SFT was retrained, left SFT (or DPO)
    folders whose settings match but whose inputs do not: they run again instead of being skipped."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(ROOT)
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    assert pipeline(capsys, config, small_data_dir).returncode == 0

    # The split made again with another test share, as a pipeline stopped after its split stage leaves it.
    split = ["split", "--data_dir", str(small_data_dir), "--output_dir", str(work / "splits"), "--seed", "1",
             "--test_size", "0.25", "--overwrite", "--no_wandb"]
    assert main(split) == 0
    capsys.readouterr()
    again = pipeline(capsys, config, small_data_dir, "--set", "split.test_size=0.25")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ran sft, dpo, compare; skipped split." in again.stdout, again.stdout[-2000:]

    # SFT's weights replaced (a retrained SFT): DPO, which starts from them, and compare run again.
    weights = work / "sft" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as handle:  # the same header, so the same size: only the values differ
        metadata = handle.metadata()
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights, metadata=metadata)
    retrained = pipeline(capsys, config, small_data_dir, "--set", "split.test_size=0.25")
    assert retrained.returncode == 0, retrained.stderr[-2000:]
    assert "ran dpo, compare; skipped split, sft." in retrained.stdout, retrained.stdout[-2000:]

    # An SFT run stopped part-way whose checkpoints learnt from another split: started over, not resumed.
    ckpt = work / "sft" / "checkpoints"
    ckpt.mkdir()
    (ckpt / "run_config.json").write_text(json.dumps(json.loads((work / "sft" / "COMPLETE.json").read_text())["config"]))
    (work / "sft" / "COMPLETE.json").unlink()  # stopped before its outputs replaced the finished run's
    (ckpt / "checkpoint-2").mkdir()  # a complete checkpoint by its files: taken up if the run were resumed
    for name in ("trainer_state.json", "validation_state.json"):
        (ckpt / "checkpoint-2" / name).write_text("{}")
    (ckpt / "run_inputs.json").write_text(json.dumps({"train_csv": "0" * 64, "val_csv": "0" * 64}))
    stopped = pipeline(capsys, config, small_data_dir, "--set", "split.test_size=0.25")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "trained from other inputs (differ in: input train_csv, input val_csv); starting it over" in stopped.stdout
    assert "ran sft, dpo, compare; skipped split." in stopped.stdout, stopped.stdout[-2000:]


def test_original_scripts_chain(tiny_model_dir, small_data_dir, tmp_path, capsys, monkeypatch):
    """The original README's command sequence, with --no_wandb, through the script names (run in-process)."""
    s = tmp_path
    monkeypatch.chdir(s)
    steps = [
        ["split_gen_dataset.py", "--data_dir", str(small_data_dir), "--output_dir", f"{s}/splits"],
        ["finetune_qwen.py", "--no_wandb", "--epochs", "1", "--model", str(tiny_model_dir), "--train_csv",
         f"{s}/splits/gen_train.csv", "--val_csv", f"{s}/splits/gen_val.csv", "--output_dir", f"{s}/sft",
         "--sample_size", "32", "--lora_targets", "q_proj,v_proj", "--max_text_tokens", "48"],
        ["dpo_train_v2.py", "--no_wandb", "--beta", "0.1", "--epochs", "1", "--sft_model", f"{s}/sft",
         "--output_dir", f"{s}/dpo", "--train_csv", f"{s}/splits/isarcasm_train.csv", "--val_csv",
         f"{s}/splits/gen_val.csv", "--isarcasm_val_csv", f"{s}/splits/isarcasm_val.csv", "--sample_size", "16",
         "--batch_size", "8", "--probe_size", "8", "--max_text_tokens", "48"],
        ["compare_all_models.py", "--no_wandb", "--test_csv", f"{s}/splits/gen_test.csv", "--train_csv",
         f"{s}/splits/gen_train.csv", "--sft_model", f"{s}/sft", "--dpo_model", f"{s}/dpo", "--sample_size", "20",
         "--skip_base", "--output_dir", f"{s}/results", "--max_text_tokens", "48"],
    ]
    for step in steps:
        code = run_script(*step)
        out, err = capsys.readouterr()
        assert code == 0, f"{step[0]}: {out[-2000:]} {err[-2000:]}"
    results = json.loads((s / "results" / "model_comparison_results.json").read_text())
    assert results["test_set"]["n"] == 20 and "base" not in results["models"]
    assert set(results["models"]) >= {"sft", "dpo"}


def test_a_setting_an_older_record_lacks_matches_only_at_its_default(tmp_path):
    from sarcasm_dpo.atomic import finish_output_dir, is_complete_for, settings_differences
    from sarcasm_dpo.settings import CompareSettings

    s = CompareSettings(output_dir=str(tmp_path), n_bootstrap=200)
    finish_output_dir(tmp_path, s)
    assert is_complete_for(tmp_path, s)
    record = json.loads((tmp_path / "COMPLETE.json").read_text())
    del record["config"]["batch_size"], record["config"]["n_bootstrap"]  # as if both were added later
    assert settings_differences(record, s) == ["n_bootstrap"]  # batch_size is at its default, n_bootstrap is not
    import dataclasses

    assert settings_differences(record, dataclasses.asdict(s)) == ["batch_size", "n_bootstrap"]  # a dict has no defaults
    (tmp_path / "COMPLETE.json").write_text(json.dumps(record))
    assert not is_complete_for(tmp_path, s)
    assert is_complete_for(tmp_path, CompareSettings(output_dir=str(tmp_path)))


def test_pipeline_refuses_an_unreachable_model_before_writing_anything(small_data_dir, tmp_path, capsys):
    config = write_config(tmp_path / "p.yaml", "someone/not-a-cached-model", tmp_path / "work")
    assert main(["pipeline", "--config", str(config), "--data_dir", str(small_data_dir), "--no_wandb"]) == 2
    err = capsys.readouterr().err
    assert "Cannot get the model 'someone/not-a-cached-model'" in err and "nothing was run" in err
    assert "make run-cpu" in err and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_smoke_config_runs_every_stage_then_exports(tiny_model_dir, shared_data, tmp_path):
    """configs/smoke.yaml as `make smoke` runs it, with the tiny model swapped in by --set; then its export: section."""
    config = ROOT / "configs" / "smoke.yaml"
    cmd = [sys.executable, "-m", "sarcasm_dpo.cli", "pipeline", "--config", str(config), "--data_dir", str(shared_data),
           "--no_wandb", "--set", f"model={tiny_model_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "runs/smoke/results/model_comparison_results.json").read_text())
    assert results["test_set"]["n"] == 64 and results["config"]["model"] == str(tiny_model_dir)
    assert json.loads((tmp_path / "runs/smoke/sft/training_summary.json").read_text())["config"]["model"] == str(
        tiny_model_dir)
    export = subprocess.run([sys.executable, "-m", "sarcasm_dpo.cli", "export", "--config", str(config)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    info = json.loads((tmp_path / "runs/smoke/exported/sarcasm_dpo.json").read_text())
    # The decision threshold is the one DPO chose on GEN validation and saved beside its adapter.
    chosen = json.loads((tmp_path / "runs/smoke/dpo/threshold.json").read_text())
    assert info["test"]["n"] == 64 and info["threshold"] == chosen["threshold"]
    assert info["threshold_source"].startswith("threshold.json, chosen on the gen_val split")


def test_later_stages_settings_this_machine_cannot_run_are_refused_before_the_split(tiny_model_dir, small_data_dir,
                                                                                    tmp_path, capsys):
    """A device PyTorch does not see (MPS, off a Mac), or a --max_length with no room for any text, in DPO or compare: refused
    before the split is written and SFT trains (which on the CPU config is most of an hour)."""
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    for setting, words in (("dpo.max_length=4", "Stage dpo: --max_length leaves no room for the text"),
                           ("compare.device=mps", "Stage compare: --device mps was asked for")):
        done = pipeline(capsys, config, small_data_dir, "--set", setting)
        assert done.returncode == 2 and words in done.stderr and "Nothing was run." in done.stderr, done.stderr
        assert not work.exists()


def test_a_launch_makes_its_process_group_for_the_training_device_whatever_the_settings(tmp_path):
    """pipeline.trains_on_cpu, read on every process of a launch before anything else: sft's device, else the one
    found here; settings that are wrong count as none (the main process then says what is wrong, once)."""
    from sarcasm_dpo.config import build
    from sarcasm_dpo.models import pick_device
    from sarcasm_dpo.settings import PipelineSettings
    from sarcasm_dpo.stages.pipeline import trains_on_cpu

    here = pick_device(None).type == "cpu"
    assert trains_on_cpu(build(PipelineSettings, {}), None) == here
    assert trains_on_cpu(build(PipelineSettings, {"set": ["sft.device=cpu"]}), None) is True
    assert trains_on_cpu(build(PipelineSettings, {"set": ["sft.devise=cpu"]}), None) == here
    config = tmp_path / "p.yaml"
    config.write_text("sft: [not, a, section]\n")
    assert trains_on_cpu(build(PipelineSettings, {}), str(config)) == here
    assert trains_on_cpu(build(PipelineSettings, {}), str(tmp_path / "missing.yaml")) == here

