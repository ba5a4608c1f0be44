"""Resume: a run killed mid-way continues from its newest complete checkpoint and ends exactly where the
uninterrupted run with the same seed ends (adapter tensors and sft_metrics.json within ATOL = 1e-6;
on CPU they are identical).

Checkpoints come every --save_steps steps and at each epoch end; each holds the Trainer's model,
optimizer, scheduler, RNG states and trainer state, and our validation history, best adapter and
early-stopping counters (validation_state.json, written last: it marks the checkpoint complete).
The fast test stops the run by an exception between two steps; the slow one SIGKILLs a real
`sarcasm-dpo sft` process as soon as its first checkpoint is complete.
"""

from __future__ import annotations

import json

import pytest
from reliability_common import (ATOL, assert_close, cli_running_past_a_checkpoint, complete_checkpoints,
                                max_adapter_difference, metrics_json, reference_run, run_cli, sft_argv, sft_settings)
from test_pipeline import small_data_dir  # noqa: F401 - the fixture, for the pipeline test
from transformers import TrainerCallback

from sarcasm_dpo.training import checkpoints
from sarcasm_dpo.stages import sft
from sarcasm_dpo.config import build
from sarcasm_dpo.settings import SFTSettings


class _DieAtStep(TrainerCallback):
    """Leave the run abruptly, without a checkpoint of its own (like a kill, minus the process exit)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SystemExit("killed")


def test_resume_from_a_periodic_checkpoint_matches_the_uninterrupted_run(tiny_model_dir, tmp_path_factory, tmp_path):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    s = sft_settings(tiny_model_dir, train, val, out)
    with pytest.raises(SystemExit):
        sft.run(s, extra_callbacks=[_DieAtStep(9)])
    # Step 8 is a --save_steps checkpoint in the second epoch, two steps after the epoch-1 one.
    assert complete_checkpoints(out) == ["checkpoint-6", "checkpoint-8"]
    checkpoint = out / "checkpoints" / "checkpoint-8"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / sft.STATE_FILE).read_text())  # validation + early-stopping state
    assert [h["step"] for h in state["history"]] == [6] and state["best_step"] == 6 and state["bad_evals"] == 0
    assert (checkpoint / checkpoints.BEST_FILE).is_file()

    summary = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"] == str(checkpoint) and summary["global_steps"] == 12
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))
    assert (out / "COMPLETE.json").is_file() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_sigkilled_subprocess_resumes_to_the_same_adapter_and_metrics(tiny_model_dir, tmp_path_factory, tmp_path):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    argv = sft_argv(tiny_model_dir, train, val, out)
    with cli_running_past_a_checkpoint(argv, out, tmp_path / "log.txt") as proc:
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        assert proc.wait(timeout=60) == -9
    survived = complete_checkpoints(out)
    assert survived and not (out / "COMPLETE.json").exists()

    done = run_cli(argv + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoints' / survived[-1]}" in done.stdout
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith(survived[-1]) and summary["global_steps"] == 12


@pytest.mark.slow
def test_dpo_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path_factory, tmp_path):
    """The same for DPO: killed (an exception between steps) after its step-6 checkpoint, resumed."""
    from reliability_common import dpo_records, dpo_reference_run, dpo_settings

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.settings import DPOSettings

    ref, (sft_dir, train, val) = dpo_reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "dpo"
    s = dpo_settings(sft_dir, train, val, out)
    with pytest.raises(SystemExit):
        _run_dpo_dying(dpo, s, at_step=7)
    assert (out / "checkpoints" / "checkpoint-6" / dpo.STATE_FILE).is_file()
    summary = dpo.run(build(DPOSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"].endswith("checkpoint-6") and summary["global_steps"] == 16
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(dpo_records(out), dpo_records(ref))


def _run_dpo_dying(dpo, s, at_step: int):
    original = dpo.build_trainer

    def build_dying(*args, **kwargs):
        trainer, validation, diagnostics = original(*args, **kwargs)
        trainer.add_callback(_DieAtStep(at_step))
        return trainer, validation, diagnostics

    dpo.build_trainer = build_dying
    try:
        dpo.run(s)
    finally:
        dpo.build_trainer = original


@pytest.mark.slow
def test_pipeline_rerun_resumes_the_interrupted_stage(tiny_model_dir, small_data_dir, tmp_path):
    """`sarcasm-dpo pipeline` stopped during SFT: the same command again resumes SFT from its newest
    checkpoint (no --resume needed), then runs the later stages."""
    import signal

    from test_pipeline import write_config

    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    config.write_text(config.read_text().replace("  epochs: 1\n  sample_size: 48",
                                                 "  epochs: 3\n  save_steps: 2\n  sample_size: 48"))
    argv = ["pipeline", "--config", str(config), "--data_dir", str(small_data_dir), "--no_wandb"]
    with cli_running_past_a_checkpoint(argv, work / "sft", tmp_path / "first.log") as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    first = (tmp_path / "first.log").read_text()
    assert "Re-run the same command" in first and not (work / "sft" / "COMPLETE.json").exists()
    kept = complete_checkpoints(work / "sft")[-1]

    done = run_cli(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[pipeline] sft: resuming" in done.stdout and f"Resuming from {work / 'sft' / 'checkpoints' / kept}" in done.stdout
    for stage in ("sft", "dpo", "results"):
        assert (work / stage / "COMPLETE.json").is_file(), stage
    summary = json.loads((work / "sft" / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith(kept) and summary["global_steps"] == 18


def test_checkpoints_of_other_data_are_not_resumed(tiny_model_dir, tmp_path_factory, tmp_path):
    """The checkpoints record the checksums of the splits they were trained from: after the training file
    changed (same path, e.g. the split made again), --resume is refused with what differs, and a pipeline
    starts the stage over instead of continuing on other data."""
    import shutil

    from sarcasm_dpo.errors import UserError

    _, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    mine = tmp_path / "train.csv"
    shutil.copy(train, mine)
    out = tmp_path / "sft"
    s = sft_settings(tiny_model_dir, mine, val, out)
    with pytest.raises(SystemExit):
        sft.run(s, extra_callbacks=[_DieAtStep(9)])
    assert json.loads((out / "checkpoints" / checkpoints.RUN_INPUTS).read_text()) == sft.inputs_of(s)
    mine.write_text("".join(mine.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    assert checkpoints.checkpoint_input_differences(out, sft.inputs_of(s)) == ["input train_csv"]
    with pytest.raises(UserError, match=r"other settings or data \(differ in: input train_csv\)"):
        sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert complete_checkpoints(out) == ["checkpoint-6", "checkpoint-8"]  # refused: nothing was changed


def test_a_data_folder_reached_through_a_link_is_the_same_setting(tmp_path):
    """The checkpoints were made from d1/train.csv; --resume names it through d3, a link to d1: the same
    files, so the same settings (their contents are compared by checksum apart)."""
    import os

    from sarcasm_dpo.atomic import settings_and_defaults, settings_differences

    (tmp_path / "d1").mkdir()
    os.symlink(tmp_path / "d1", tmp_path / "d3")
    made = SFTSettings(train_csv=str(tmp_path / "d1" / "train.csv"), output_dir=str(tmp_path / "o"))
    record = {"config": settings_and_defaults(made)[0]}
    linked = SFTSettings(train_csv=str(tmp_path / "d3" / "train.csv"), output_dir=str(tmp_path / "o"))
    assert settings_differences(record, linked) == []
    other = SFTSettings(train_csv=str(tmp_path / "d2" / "train.csv"), output_dir=str(tmp_path / "o"))
    assert settings_differences(record, other) == ["train_csv"]


# -- a run that had decided to stop when it was killed -------------------------------------------------------
# DPO from the reference SFT adapter on 8 pairs: 4 steps per epoch, a checkpoint every 2 steps; at so small a
# learning rate the step-4 evaluation is no better than the SFT start, so --patience 1 stops the run there, at
# epoch 1 of 3.
_EARLY = dict(epochs=3, patience=1, lr=1e-6, save_steps=2, sample_size=8)
_early_cache: dict = {}


def _early_stopping_dpo(tiny_model_dir, tmp_path_factory, epochs: int = 3):
    """(output folder, settings-maker) of the uninterrupted early-stopped DPO run; trained once per session."""
    from reliability_common import dpo_settings

    from sarcasm_dpo.stages import dpo

    if epochs not in _early_cache:
        sft_dir, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
        out = tmp_path_factory.mktemp("dpo-early") / "dpo"
        early = {**_EARLY, "epochs": epochs}
        summary = dpo.run(dpo_settings(sft_dir, train, val, out, **early))
        assert summary["stopped_early"] and summary["global_steps"] == 4 and summary["epochs_run"] == 1.0
        assert [e["step"] for e in json.loads((out / "dpo_epoch_metrics.json").read_text())["evaluations"]] == [0, 4]
        _early_cache[epochs] = (out, lambda folder, **o: dpo_settings(sft_dir, train, val, folder, **{**early, **o}))
    return _early_cache[epochs]


def _dpo_checkpoints(out) -> list[str]:
    from sarcasm_dpo.stages import dpo

    return [p.name for p in checkpoints.complete_checkpoints(out / "checkpoints", dpo.STATE_FILE)]


def _assert_same_dpo_run(out, ref):
    from reliability_common import dpo_records

    got, want = (json.loads((folder / "dpo_training_summary.json").read_text()) for folder in (out, ref))
    for key in ("stopped_early", "global_steps", "epochs_run", "best_step", "best_val", "improved_over_sft"):
        assert got[key] == want[key], key
    assert_close(dpo_records(out), dpo_records(ref))
    assert max_adapter_difference(ref, out) <= ATOL
    assert json.loads((out / "threshold.json").read_text()) == json.loads((ref / "threshold.json").read_text())


def run_killed_while_saving(stage, settings, monkeypatch) -> None:
    """Run `stage` (the sft or dpo module) and kill it as it starts writing its results: after training, with its
    checkpoints on disk and no results yet."""
    real_save = stage.save_outputs

    def killed_while_saving(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(stage, "save_outputs", killed_while_saving)
    with pytest.raises(SystemExit):
        stage.run(settings)
    monkeypatch.setattr(stage, "save_outputs", real_save)


@pytest.mark.parametrize("epochs", [3, 1])
def test_dpo_stopped_early_and_killed_while_saving_resumes_straight_to_the_save(
        epochs, tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch, capsys):
    """Killed after training had stopped early, while the results were being written: --resume keeps that
    decision (no second epoch, no third evaluation) and saves what the uninterrupted run saved. With one epoch
    the stop falls on the last step: nothing is left to train, and the record still says it stopped early."""
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.settings import DPOSettings

    ref, settings = _early_stopping_dpo(tiny_model_dir, tmp_path_factory, epochs)
    out = tmp_path / "dpo"
    s = settings(out)
    run_killed_while_saving(dpo, s, monkeypatch)
    assert _dpo_checkpoints(out)[-1] == "checkpoint-4" and not (out / "COMPLETE.json").exists()
    state = json.loads((out / "checkpoints" / "checkpoint-4" / dpo.STATE_FILE).read_text())["validation"]
    assert state["stopped_early"] is True and state["bad_evals"] == 1

    capsys.readouterr()
    summary = dpo.run(build(DPOSettings, {**vars(s), "resume": True}))
    printed = capsys.readouterr().out
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert ("Training had stopped at step 4 when that checkpoint was written" in printed) == (epochs > 1)
    assert "[eval]" not in printed
    _assert_same_dpo_run(out, ref)


def test_dpo_killed_while_validating_the_epoch_that_stops_it_resumes_from_before_that_epoch_end(
        tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    """--save_steps falls on the epoch's last step (4): that checkpoint waits for the epoch's validation. Killed
    during that validation, the run resumes from checkpoint-2, validates epoch 1, stops early as the uninterrupted
    run did (a checkpoint written before the validation would resume into epoch 2 and never validate epoch 1)."""
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.settings import DPOSettings
    from sarcasm_dpo.training.diagnostics import DPOValidationCallback

    ref, settings = _early_stopping_dpo(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "dpo"
    s = settings(out)
    real_evaluate = DPOValidationCallback.evaluate

    def killed_at_step_4(self, model, step, epoch):
        if step == 4:
            raise SystemExit("killed")
        return real_evaluate(self, model, step, epoch)

    monkeypatch.setattr(DPOValidationCallback, "evaluate", killed_at_step_4)
    with pytest.raises(SystemExit):
        dpo.run(s)
    monkeypatch.setattr(DPOValidationCallback, "evaluate", real_evaluate)
    assert _dpo_checkpoints(out)[-1] == "checkpoint-2"

    summary = dpo.run(build(DPOSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"].endswith("checkpoint-2")
    _assert_same_dpo_run(out, ref)


def test_sft_killed_while_saving_after_its_last_step_inside_an_epoch_trains_no_further(
        tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    """--epochs 1.5: training ends at step 9, in the middle of epoch 2. Killed while saving, --resume
    continues from checkpoint-9 and saves, instead of training a tenth step and validating it."""
    _, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    ref = tmp_path / "ref"
    want = sft.run(sft_settings(tiny_model_dir, train, val, ref, epochs=1.5))
    assert want["global_steps"] == 9 and [e["step"] for e in metrics_json(ref)["epochs"]] == [6, 9]

    out = tmp_path / "sft"
    s = sft_settings(tiny_model_dir, train, val, out, epochs=1.5)
    run_killed_while_saving(sft, s, monkeypatch)
    assert complete_checkpoints(out)[-1] == "checkpoint-9"

    summary = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"].endswith("checkpoint-9")
    assert (summary["global_steps"], summary["epochs_run"]) == (want["global_steps"], want["epochs_run"])
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))
