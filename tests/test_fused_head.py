"""fused_head: on CPU, TRL's fused LM head projects only labelled positions, with the same log-probs there."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from sarcasm_dpo.training import fused_head


@pytest.fixture
def restore_switch():
    from trl.trainer import utils as trl_utils

    saved = trl_utils._use_triton
    # The sft/dpo stages patch once per process; start each test from TRL's own switch.
    trl_utils._use_triton = getattr(saved, "original", saved)
    yield trl_utils
    trl_utils._use_triton = saved


def _fused_model(tiny_model_dir):
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 200, (3, 24), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]  # the answer word and EOS, as in SFT
    labels[1, -4:] = input_ids[1, -4:]
    return input_ids, torch.ones_like(input_ids), labels


def _projected_rows(monkeypatch, model, input_ids, mask, labels):
    """Run the fused forward, recording how many rows reach the LM-head projection."""
    from trl.trainer import utils as trl_utils

    rows, original_apply = [], trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *rest):
        rows.append(hidden.shape[0])
        return original_apply(hidden, *rest)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", original_apply)
    return out, sum(rows)


def test_cpu_projects_only_labelled_rows_with_the_same_log_probs(tiny_model_dir, restore_switch, monkeypatch):
    model = _fused_model(tiny_model_dir)
    input_ids, mask, labels = _batch()
    labelled = int((labels[:, 1:] != -100).sum())
    all_positions = labels[:, 1:].numel()

    before, rows_before = _projected_rows(monkeypatch, model, input_ids, mask, labels)
    assert rows_before == all_positions  # TRL's default on CPU: every position goes through the head

    assert fused_head.project_labelled_positions_only() is True
    assert fused_head.project_labelled_positions_only() is True  # idempotent: no wrapper around a wrapper
    assert not getattr(restore_switch._use_triton.original, "labelled_positions_only", False)
    after, rows_after = _projected_rows(monkeypatch, model, input_ids, mask, labels)
    assert rows_after == labelled < all_positions

    valid = labels[:, 1:] != -100
    assert torch.allclose(after.log_probs[valid], before.log_probs[valid], atol=1e-5)
    assert torch.allclose(after.entropy[valid], before.entropy[valid], atol=1e-5)
    assert torch.equal(after.is_top1[valid], before.is_top1[valid])
    assert torch.all(after.log_probs[~valid] == 0)
    assert torch.allclose(after.loss, before.loss, atol=1e-5)


def test_gradients_match_the_full_projection(tiny_model_dir, restore_switch):
    model = _fused_model(tiny_model_dir)
    twin = copy.deepcopy(model)
    input_ids, mask, labels = _batch()
    model(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()
    fused_head.project_labelled_positions_only()
    twin(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    for name, p in twin.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], atol=1e-5), name


def test_the_triton_kernel_choice_is_untouched(restore_switch):
    from trl.kernels import chunked_logprob

    fused_head.project_labelled_positions_only()
    assert restore_switch._use_triton(torch.device("cpu")) is True
    assert chunked_logprob._use_triton(torch.device("cpu")) is False  # no Triton kernel is ever tried on a CPU


def test_the_sft_stage_trains_with_the_patch_in_place(tiny_model_dir, restore_switch, tmp_path):
    from reliability_common import sft_settings, toy_csvs

    from sarcasm_dpo.stages import sft

    train, val = toy_csvs(tmp_path / "data", n_train=8, n_val=4)
    sft.run(sft_settings(tiny_model_dir, train, val, tmp_path / "sft", epochs=1))
    assert getattr(restore_switch._use_triton, "labelled_positions_only", False)
