"""Numerical faults: a NaN or infinite loss stops the stage at once, naming the optimizer step and the
last good checkpoint, which stays on disk, complete and finite, and can be resumed from.

The fault is made by hand: after the checkpoint at step 4, the LoRA A weights are set to NaN, so
step 5's loss and gradients are NaN. The check runs on the gradients before the optimizer step,
so the bad update is never applied.
"""

from __future__ import annotations

import math

import pytest
import torch
from reliability_common import (ATOL, adapter_tensors, assert_close, complete_checkpoints, max_adapter_difference, metrics_json,
                                reference_run, sft_settings)
from transformers import TrainerCallback

from sarcasm_dpo.stages import sft
from sarcasm_dpo.config import build
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import SFTSettings
from sarcasm_dpo.training.resilience import TrainingDiverged


class _PoisonAfter(TrainerCallback):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.data.fill_(self.value)


@pytest.mark.parametrize("value", [math.nan, pytest.param(math.inf, marks=pytest.mark.slow)])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        value, tiny_model_dir, tmp_path_factory, tmp_path):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    s = sft_settings(tiny_model_dir, train, val, out)
    with pytest.raises(TrainingDiverged) as info:
        sft.run(s, extra_callbacks=[_PoisonAfter(4, value)])
    message = str(info.value)
    assert isinstance(info.value, UserError)  # the CLI prints it as one paragraph and exits 2
    assert "at optimizer step 5" in message and str(out / "checkpoints" / "checkpoint-4") in message
    assert "--lr" in message
    assert complete_checkpoints(out) == ["checkpoint-4"] and not (out / "COMPLETE.json").exists()
    kept = adapter_tensors(out / "checkpoints" / "checkpoint-4")
    assert kept and all(bool(torch.isfinite(t).all()) for t in kept.values())

    if math.isnan(value):  # the kept checkpoint is a real restart point: resuming reaches the reference run
        sft.run(build(SFTSettings, {**vars(s), "resume": True}))
        assert max_adapter_difference(ref, out) <= ATOL
        assert_close(metrics_json(out), metrics_json(ref))
