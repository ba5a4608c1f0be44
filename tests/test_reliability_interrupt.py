"""Ctrl-C and SIGTERM: the current step finishes, a checkpoint is written, the W&B run is closed as
interrupted, and the process exits non-zero (130 / 143) with the command that resumes.

The fast test sends a real SIGINT to this very process mid-epoch (the handler is the stage's own);
the slow ones send SIGINT and SIGTERM to a `sarcasm-dpo sft` subprocess and resume it with the
printed command. Every resumed run must end with the adapter and metrics of the uninterrupted
reference run (same seed), within ATOL = 1e-6 (on CPU they are in fact identical).
"""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
from reliability_common import (ATOL, assert_close, cli_running_past_a_checkpoint, complete_checkpoints,
                                max_adapter_difference, metrics_json, reference_run, run_cli, sft_argv, sft_settings,
                                toy_csvs)
from transformers import TrainerCallback

from sarcasm_dpo import cli
from sarcasm_dpo.stages import sft
from sarcasm_dpo.config import build
from sarcasm_dpo.training.checkpoints import latest_checkpoint
from sarcasm_dpo.training.resilience import StopRequested
from sarcasm_dpo.settings import SFTSettings
from sarcasm_dpo.tracking import Tracker


class _SignalAtStep(TrainerCallback):
    """Send a real signal to this process while optimizer step `step` is running."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class _RecordingTracker(Tracker):
    finished: list = []

    def finish(self, exit_code: int = 0, interrupted: bool = False) -> None:
        _RecordingTracker.finished.append((exit_code, interrupted))
        super().finish(exit_code, interrupted)


# 6 steps per epoch, periodic saves at 4, 8: step 5 is mid-epoch; step 6 ends the epoch, whose validation
# runs after the step and must be in the checkpoint, or the resumed run never validates epoch 1.
@pytest.mark.parametrize("step", [5, 6])
def test_signal_writes_a_checkpoint_and_resume_matches_the_uninterrupted_run(
        step, tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch, capfd):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    s = sft_settings(tiny_model_dir, train, val, out)
    monkeypatch.setattr(sft, "Tracker", _RecordingTracker)
    _RecordingTracker.finished = []
    previous_handler = signal.getsignal(signal.SIGINT)

    with pytest.raises(StopRequested) as stop:
        sft.run(s, extra_callbacks=[_SignalAtStep(step)])
    assert stop.value.signum == signal.SIGINT and stop.value.step == step
    # Acknowledged at once with the step being finished, then each wait is named as it starts.
    err = capfd.readouterr().err
    assert f"SIGINT received: stopping after the current step: finishing step {step}, then writing a checkpoint" in err
    assert ("Step 6 ends epoch 1: validating it first" in err) == (step == 6)
    assert f"Writing checkpoint-{step}, then stopping." in err
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert stop.value.checkpoint == checkpoint
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 sft.STATE_FILE):
        assert (checkpoint / name).is_file(), name
    assert latest_checkpoint(out / "checkpoints", sft.STATE_FILE) == checkpoint
    validated = [record["step"] for record in json.loads((checkpoint / sft.STATE_FILE).read_text())["history"]]
    assert validated == ([6] if step == 6 else [])
    assert not (out / "COMPLETE.json").exists()
    assert _RecordingTracker.finished == [(1, True)]  # closed as interrupted (a no-op here: --no_wandb)
    assert signal.getsignal(signal.SIGINT) == previous_handler  # the stage put the old handler back

    summary = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"] == str(checkpoint) and summary["global_steps"] == 12
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))


def test_a_second_signal_is_acknowledged_never_dropped_silently(capfd):
    import time

    from sarcasm_dpo.training.resilience import stop_on_signal

    with stop_on_signal() as flag:
        flag.step = 3
        os.kill(os.getpid(), signal.SIGINT)
        assert "SIGINT received: stopping after the current step: finishing step 3" in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # within 1 s: taken as the same request (a launcher forwarding it)
        assert "SIGINT received again within 1 s: taken as the same stop request" in capfd.readouterr().err
        time.sleep(1.1)
        with pytest.raises(StopRequested):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; this is never reached in full
        assert "SIGINT received again: stopping now, without a new checkpoint" in capfd.readouterr().err


def test_training_losses_of_a_resumed_run_cover_every_step(tiny_model_dir, tmp_path, monkeypatch):
    """Loss windows longer than a step: a stop mid-window still gives the uninterrupted run's epoch losses."""
    train, val = toy_csvs(tmp_path / "data")
    ref = sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "ref", logging_steps=4))
    s = sft_settings(tiny_model_dir, train, val, tmp_path / "sft", logging_steps=4)
    with pytest.raises(StopRequested):
        sft.run(s, extra_callbacks=[_SignalAtStep(5)])  # mid-way through the window of steps 5-8
    resumed = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    got, want = metrics_json(tmp_path / "sft"), metrics_json(tmp_path / "ref")
    # The checkpoint closed the window at step 5; afterwards windows restart, so every record is exact.
    assert [r["step"] for r in got["steps"]] == [1, 4, 5, 6, 8, 12]  # 1: the Trainer logs the first step
    assert [r["step"] for r in want["steps"]] == [1, 4, 6, 8, 12]
    for a, b in zip(got["epochs"], want["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=ATOL)
    assert got["train_loss_mean"] == pytest.approx(want["train_loss_mean"], abs=ATOL)
    assert resumed["best_val"] == ref["best_val"]


def test_cli_prints_the_resume_command_and_exits_128_plus_signal(tmp_path, monkeypatch, capsys):
    argv = ["sft", "--no_wandb", "--output_dir", str(tmp_path / "o"), "--epochs", "3"]
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def stopped(args, signum=signum):
            raise StopRequested(signum, tmp_path / "o" / "checkpoints" / "checkpoint-7", 7)

        monkeypatch.setattr(cli, "run_command", stopped)
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert f"Stopped by {signal.Signals(signum).name} at step 7" in err and "checkpoint-7" in err
        assert err.strip().endswith("sarcasm-dpo " + shlex.join(argv + ["--resume"]))
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigterm_outside_training_is_an_interrupt_too(tmp_path, monkeypatch, capsys):
    def killed_while_loading(args):
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into an exception here
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(cli, "run_command", killed_while_loading)
    assert cli.main(["compare", "--no_wandb", "--output_dir", str(tmp_path / "r")]) == 143
    err = capsys.readouterr().err
    assert err.strip().startswith("Interrupted by SIGTERM") and "re-run: sarcasm-dpo compare" in err
    assert signal.getsignal(signal.SIGTERM) is not cli._raise_terminated  # restored


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signalled_subprocess_checkpoints_and_the_printed_command_resumes(
        signum, tiny_model_dir, tmp_path_factory, tmp_path):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    argv = sft_argv(tiny_model_dir, train, val, out)
    with cli_running_past_a_checkpoint(argv, out, tmp_path / "log.txt") as proc:
        proc.send_signal(signum)
        code = proc.wait(timeout=300)
    log = (tmp_path / "log.txt").read_text()
    assert code == 128 + signum, log[-3000:]
    assert f"{signal.Signals(signum).name} received" in log and "Traceback" not in log
    resume_line = next(line for line in log.splitlines() if line.startswith("Stopped by"))
    checkpoint = resume_line.split("checkpoint ", 1)[1].split(" ", 1)[0]
    assert checkpoint.startswith(str(out / "checkpoints")) and checkpoint.rsplit("/", 1)[1] in complete_checkpoints(out)
    assert not (out / "COMPLETE.json").exists()

    command = shlex.split(resume_line.split("Continue with: ", 1)[1])
    assert command[0] == "sarcasm-dpo" and command[-1] == "--resume"
    done = run_cli(command[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from" in done.stdout and (out / "COMPLETE.json").is_file()
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(metrics_json(out), metrics_json(ref))


@pytest.mark.slow
def test_dpo_signal_writes_a_checkpoint_and_resume_matches(tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    from reliability_common import dpo_records, dpo_reference_run, dpo_settings

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.settings import DPOSettings

    ref, (sft_dir, train, val) = dpo_reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "dpo"
    s = dpo_settings(sft_dir, train, val, out)
    original = dpo.build_trainer

    def build_signalling(*args, **kwargs):
        trainer, validation, diagnostics = original(*args, **kwargs)
        trainer.add_callback(_SignalAtStep(5, signal.SIGTERM))
        return trainer, validation, diagnostics

    monkeypatch.setattr(dpo, "build_trainer", build_signalling)
    with pytest.raises(StopRequested) as stop:
        dpo.run(s)
    assert stop.value.signum == signal.SIGTERM and stop.value.step == 5
    checkpoint = out / "checkpoints" / "checkpoint-5"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", dpo.STATE_FILE):
        assert (checkpoint / name).is_file(), name
    monkeypatch.setattr(dpo, "build_trainer", original)
    summary = dpo.run(build(DPOSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"] == str(checkpoint) and summary["global_steps"] == 16
    assert max_adapter_difference(ref, out) <= ATOL
    assert_close(dpo_records(out), dpo_records(ref))
