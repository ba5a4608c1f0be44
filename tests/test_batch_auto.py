"""--batch_size auto: the largest per-device batch that fits, the effective batch kept (a fake memory limit on CPU)."""

from __future__ import annotations

import pytest
import torch

from sarcasm_dpo.training import resilience
from sarcasm_dpo.config import build
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import DPOSettings, SFTSettings


def _fit(s, device, limit: int):
    """Run the stage's batch logic with an attempt that runs out of memory above `limit` examples."""
    tried = []

    def attempt(batch_size, grad_accum, eval_batch_size):
        tried.append((batch_size, grad_accum))
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake limit of {limit} examples)")
        return batch_size, grad_accum

    batch, accum, auto = resilience.auto_batch(s, "sft", device, printer=lambda *_: None)
    used = resilience.train_within_memory(attempt, batch_size=batch, grad_accum=accum, eval_batch_size=16, auto=auto,
                                       stage="sft", printer=lambda *_: None)
    return used, tried


def test_auto_picks_the_largest_batch_that_fits_and_keeps_the_effective_batch():
    s = build(SFTSettings, {"batch_size": "auto", "grad_accum": 4})  # the recipe: 8 x 4 = 32
    used, tried = _fit(s, torch.device("cuda"), limit=12)
    assert tried == [(32, 1), (16, 2), (8, 4)] and used == (8, 4)
    used, _ = _fit(s, torch.device("cuda"), limit=64)
    assert used == (32, 1)  # capped at the recipe's effective batch, accumulation 1
    odd = build(DPOSettings, {"batch_size": "auto", "grad_accum": 3})  # 4 x 3 = 12: tries 12, 6, 3
    used, tried = _fit(odd, torch.device("cuda"), limit=5)
    assert tried == [(12, 1), (6, 2), (3, 4)] and used == (3, 4)
    for b, g in tried:
        assert b * g == 12


def test_auto_keeps_the_recipe_batch_on_cpu():
    s = build(SFTSettings, {"batch_size": "auto", "grad_accum": 2})
    assert resilience.auto_batch(s, "sft", torch.device("cpu"), printer=lambda *_: None) == (8, 2, False)


def test_smaller_batch_divides_the_effective_batch():
    assert resilience.smaller_batch(8, 2) == (4, 4)  # the old halving where it was exact
    assert resilience.smaller_batch(3, 4) == (1, 12)  # halving would have given 1 x 8


def test_batch_size_setting_reads_numbers_and_auto():
    assert build(SFTSettings, {"batch_size": "16"}).batch_size == 16
    assert build(SFTSettings, {"batch_size": "auto"}).batch_size == "auto"
    for bad in ("big", 0):
        with pytest.raises(UserError, match="batch_size"):
            build(SFTSettings, {"batch_size": bad}).validate()


def test_the_run_record_says_auto_was_asked(monkeypatch):
    s = build(SFTSettings, {"batch_size": "auto", "grad_accum": 2})
    seen = []

    def attempt(batch_size, grad_accum, eval_batch_size, flag):
        seen.append((batch_size, grad_accum))
        return "trained"

    result, used = resilience.fit_within_memory(attempt, s, "sft", torch.device("cpu"))
    assert result == "trained" and seen == [(8, 2)]
    assert used["batch_size"] == 8 and used["grad_accum"] == 2 and used["batch_size_setting"] == "auto"
