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
