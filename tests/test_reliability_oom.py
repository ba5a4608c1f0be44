"""Out of memory: --auto_find_batch_size halves the per-device batch and doubles gradient accumulation
(the effective batch stays the same) on a CUDA/MPS out-of-memory error; without it the error names
the flags to change. The errors are raised by hand here (this machine has no GPU): a callback raises
torch.OutOfMemoryError, the exception type and message CUDA gives, while the batch is too big.
"""

from __future__ import annotations

import pytest
import torch
from reliability_common import error_paragraph, max_adapter_difference, sft_settings, toy_csvs
from transformers import TrainerCallback

from sarcasm_dpo import cli
from sarcasm_dpo.stages import sft
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.training.resilience import (OutOfMemory, ValidationOutOfMemory, is_out_of_memory, train_within_memory,
                                             validation_scoring)

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.75 GiB"
MPS_OOM = "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.40 GB, max allowed: 18.13 GB)."


class _FitsUpTo(TrainerCallback):
    """Raise CUDA's out-of-memory error at the first step of any attempt with a bigger per-device batch."""

    def __init__(self, largest: int):
        self.largest = largest
        self.tried: list[tuple[int, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.tried.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

    def on_step_begin(self, args, state, control, **kwargs):
        if args.per_device_train_batch_size > self.largest:
            raise torch.OutOfMemoryError(CUDA_OOM)


def test_the_errors_cuda_and_mps_raise_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    assert is_out_of_memory(RuntimeError(MPS_OOM))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory."))


def test_auto_batch_halves_the_batch_and_doubles_accumulation(tiny_model_dir, tmp_path, capsys):
    train, val = toy_csvs(tmp_path / "data", n_train=32, n_val=8)
    guard = _FitsUpTo(2)
    summary = sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "auto", epochs=1, auto_find_batch_size=True),
                      extra_callbacks=[guard])
    assert guard.tried == [(8, 1), (4, 2), (2, 4)]  # batch x accumulation = 8 every time
    assert summary["batch"] == {"batch_size": 2, "grad_accum": 4, "eval_batch_size": 16, "processes": 1}
    assert summary["global_steps"] == 4  # 32 examples / effective batch 8: the schedule did not change
    out = capsys.readouterr().out
    assert "retrying from the start with --batch_size 4 --grad_accum 2" in out
    assert "--batch_size 2 --grad_accum 4" in out
    assert (tmp_path / "auto" / "COMPLETE.json").is_file()


@pytest.mark.slow
def test_a_retry_is_a_clean_restart(tiny_model_dir, tmp_path):
    """Each retry starts over from the seed: the result is the run that used batch 2 x 4 from the start."""
    train, val = toy_csvs(tmp_path / "data", n_train=32, n_val=8)
    sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "auto", epochs=1, auto_find_batch_size=True),
            extra_callbacks=[_FitsUpTo(2)])
    sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "direct", epochs=1, batch_size=2, grad_accum=4))
    assert max_adapter_difference(tmp_path / "auto", tmp_path / "direct") <= 1e-6


def test_without_auto_batch_the_error_names_the_flags(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory)
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    code = cli.main(["sft", "--no_wandb", "--model", str(tiny_model_dir), "--train_csv", str(train), "--val_csv",
                     str(val), "--output_dir", str(tmp_path / "o"), "--lora_targets", "q_proj,v_proj"])
    stderr = capsys.readouterr().err
    err = error_paragraph(stderr)
    assert code == 2 and err.startswith("error: sft: the device ran out of memory while training (8 examples")
    for flag in ("--batch_size", "--grad_accum", "--auto_find_batch_size", "--max_text_tokens", "--max_length",
                 "--gradient_checkpointing"):
        assert flag in err, flag
    assert "Traceback" not in stderr and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "COMPLETE.json").exists()


def _raise_in_scoring():
    """An out-of-memory error inside a validation scoring pass, as the validation callback runs it."""
    with validation_scoring():
        raise torch.OutOfMemoryError(CUDA_OOM)


def test_out_of_memory_while_scoring_shrinks_the_eval_batch_instead():
    calls = []

    def attempt(batch, accum, eval_batch):
        calls.append((batch, accum, eval_batch))
        if eval_batch > 4:
            _raise_in_scoring()
        return "done"

    assert train_within_memory(attempt, batch_size=8, grad_accum=1, eval_batch_size=16, auto=True, stage="dpo",
                               printer=lambda m: None) == "done"
    assert calls == [(8, 1, 16), (8, 1, 8), (8, 1, 4)]
    with pytest.raises(OutOfMemory, match="--eval_batch_size") as info:
        train_within_memory(attempt, batch_size=8, grad_accum=1, eval_batch_size=16, auto=False, stage="dpo")
    assert isinstance(info.value, UserError) and "scoring the validation set (16 texts per pass)" in str(info.value)


def test_the_validation_callback_marks_its_out_of_memory_errors(monkeypatch):
    """ValidationCallback.evaluate scores inside validation_scoring(), wherever the scorer's code lives; an
    out-of-memory error elsewhere (training) stays what it was, and other errors pass through untouched."""
    import pandas as pd

    from sarcasm_dpo.training import callbacks

    class OutOfMemoryScorer:
        def __init__(self, *args, **kwargs):
            pass

        def predict_proba(self, texts):
            raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(callbacks, "Scorer", OutOfMemoryScorer)
    validation = callbacks.ValidationCallback(None, {"gen_val": pd.DataFrame({"text": ["a"], "label": [1]})},
                                              printer=lambda m: None)
    with pytest.raises(ValidationOutOfMemory, match="CUDA out of memory") as info:
        validation.evaluate(None, 0, 0.0)
    assert is_out_of_memory(info.value) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(ValueError), validation_scoring():
        raise ValueError("not memory")


def test_where_the_code_lives_does_not_decide():
    """An out-of-memory error outside a scoring pass is training's, even from a file named scoring.py (the old
    rule read the traceback's file names)."""
    def attempt(batch, accum, eval_batch):
        namespace = {"torch": torch, "MESSAGE": CUDA_OOM}
        exec(compile("def forward():\n    raise torch.OutOfMemoryError(MESSAGE)\n", "/x/sarcasm_dpo/scoring.py",
                     "exec"), namespace)
        namespace["forward"]()

    with pytest.raises(OutOfMemory, match="while training") as info:
        train_within_memory(attempt, batch_size=8, grad_accum=1, eval_batch_size=16, auto=False, stage="sft")
    assert "--eval_batch_size (lower)" not in str(info.value)


def test_batch_one_still_too_big_is_explained():
    def attempt(batch, accum, eval_batch):
        raise RuntimeError(MPS_OOM)

    with pytest.raises(OutOfMemory, match="even at the smallest batch") as info:
        train_within_memory(attempt, batch_size=4, grad_accum=3, eval_batch_size=16, auto=True, stage="sft",
                            printer=lambda m: None)
    assert "(1 examples per device per step, gradient accumulation 12)" in str(info.value)
    assert "--gradient_checkpointing" in str(info.value)


@pytest.mark.slow
def test_dpo_auto_batch_keeps_the_effective_batch(tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    from reliability_common import dpo_reference_run, dpo_settings

    from sarcasm_dpo.stages import dpo

    _, (sft_dir, train, val) = dpo_reference_run(tiny_model_dir, tmp_path_factory)
    guard = _FitsUpTo(1)
    original = dpo.build_trainer

    def build_guarded(*args, **kwargs):
        trainer, validation, diagnostics = original(*args, **kwargs)
        trainer.add_callback(guard)
        return trainer, validation, diagnostics

    monkeypatch.setattr(dpo, "build_trainer", build_guarded)
    summary = dpo.run(dpo_settings(sft_dir, train, val, tmp_path / "dpo", epochs=1, auto_find_batch_size=True))
    assert guard.tried == [(2, 1), (1, 2)]
    assert summary["batch"]["batch_size"] == 1 and summary["batch"]["grad_accum"] == 2
    assert summary["global_steps"] == 8 and (tmp_path / "dpo" / "COMPLETE.json").is_file()
