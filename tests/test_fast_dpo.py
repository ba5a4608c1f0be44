"""The DPO fast paths give today's loss and gradients: reference log-probs computed once (fast_dpo.py).

Each test builds two trainers on two copies of the same SFT start, the on-the-fly path and a fast
path, moves both policies away from the reference by the same seeded step (at step 0 policy and
reference agree, and the reference's values would cancel out of the loss), and compares one
step's loss, TRL's metrics and every LoRA gradient on the same batch, in float32.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from test_dpo import dpo_settings, make_sft_adapter, write_toy_splits

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fast-dpo-toy")
    return SimpleNamespace(root=root, paths=write_toy_splits(root / "splits"),
                           sft=make_sft_adapter(tiny_model_dir, root / "sft"), model_dir=tiny_model_dir)


def build(toy, folder, **overrides):
    import torch

    from sarcasm_dpo import dpo
    from sarcasm_dpo.models import attach_adapter, load_base_model, load_tokenizer
    from sarcasm_dpo.runtime import quiet

    s = dpo_settings(toy, folder / "out", sample_size=12, **overrides)
    tokenizer = load_tokenizer(str(toy.model_dir))
    data = dpo.load_data(s, tokenizer)
    model = attach_adapter(load_base_model(str(toy.model_dir), torch.device("cpu")), toy.sft, trainable=True)
    trainer, _, _ = dpo.build_trainer(s, model, tokenizer, data, folder / "ckpt", printer=quiet)
    return trainer


def move_policy(model, seed: int = 0) -> None:
    """The same seeded step away from the reference for every copy."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".default." in name and "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def step(trainer, batch):
    """(loss, TRL's metrics of the step, LoRA gradients) of one training step's loss on `batch`."""
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads


def assert_same_step(reference, other) -> None:
    import torch

    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = reference, other
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert set(grads_a) == set(grads_b) and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        if key != "num_tokens":  # a running count: the one-pass path feeds the same batch, so it matches too
            assert metrics_b[key] == pytest.approx(metrics_a[key], abs=1e-5, rel=1e-5), key


@pytest.mark.parametrize("pair_style", ["reasoning", "label"])
def test_precomputed_reference_gives_the_same_step(toy, tmp_path, pair_style):
    import torch

    from sarcasm_dpo.fast_dpo import REF_COLUMNS, InMemoryReference

    slow = build(toy, tmp_path / "slow", pair_style=pair_style, precompute_ref=False)
    fast = build(toy, tmp_path / "fast", pair_style=pair_style, precompute_ref=True)
    assert not isinstance(slow, InMemoryReference) and isinstance(fast, InMemoryReference)
    assert fast.precompute_ref_logps and set(REF_COLUMNS) <= set(fast.train_dataset.column_names)
    assert "ref" in fast.model.peft_config  # the diagnostics' KL still reads the reference adapter

    batch = next(iter(fast.get_train_dataloader()))
    assert set(REF_COLUMNS) <= set(batch)
    # The stored values are the reference's, computed on the fly now (before any policy move).
    ref_chosen, ref_rejected = slow.compute_ref_log_probs(slow.model, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], ref_chosen, **TOL)
    torch.testing.assert_close(batch["ref_rejected_logps"], ref_rejected, **TOL)

    move_policy(slow.model)
    move_policy(fast.model)
    before = step(slow, batch)
    assert abs(float(before[0]) - 0.6931) > 1e-3  # the policy moved: the reference's values matter
    assert_same_step(before, step(fast, batch))


def test_reference_values_come_from_the_frozen_adapter(toy, tmp_path):
    """A resumed run computes them again, with the policy at its checkpoint: they must not depend on the policy."""
    fast = build(toy, tmp_path / "a", precompute_ref=True)
    stored = {c: fast.train_dataset[c] for c in ("ref_chosen_logps", "ref_rejected_logps")}
    move_policy(fast.model)  # what training (or loading a checkpoint) does to the policy; "ref" stays the SFT copy
    again = fast._precompute_ref_logps(fast.train_dataset, "train", fast.args.per_device_train_batch_size)
    for column, values in stored.items():
        assert again[column] == pytest.approx(values, abs=1e-6)


# -- one pass per label pair ----------------------------------------------------------------------------


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_one_pass_label_pairs_give_trls_step(toy, tmp_path, precompute_ref):
    from sarcasm_dpo.fast_dpo import OnePassPairs

    trl = build(toy, tmp_path / "trl", pair_style="label", one_pass=False, precompute_ref=False)
    fast = build(toy, tmp_path / "fast", pair_style="label", one_pass=True, precompute_ref=precompute_ref)
    assert not isinstance(trl, OnePassPairs) and isinstance(fast, OnePassPairs)
    batch = next(iter(fast.get_train_dataloader()))
    # TRL appended EOS to each label word, and its loss counts it: the one-pass path must score it too.
    assert (batch["completion_mask"].sum(-1) == 2).all()
    move_policy(trl.model)
    move_policy(fast.model)
    assert_same_step(step(trl, batch), step(fast, batch))


@pytest.mark.parametrize("pair_style", ["label", "reasoning"])
def test_prompt_once_forward_gives_the_fused_heads_outputs(toy, tmp_path, pair_style):
    """Per token (log-prob, entropy, mean logit, top-1 hit) at exactly TRL's answer positions, ragged answers too."""
    import torch

    from sarcasm_dpo.fast_dpo import prompt_once_forward

    trainer = build(toy, tmp_path / "t", pair_style=pair_style, one_pass=False, precompute_ref=False)
    move_policy(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = trainer.model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     fused_lm_head=True, use_cache=False)
        got = prompt_once_forward(model, batch["input_ids"], batch["attention_mask"], labels)
    assert got.log_probs.shape == want.log_probs.shape
    assert torch.equal(got.label_mask, want.label_mask)
    for field in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), **TOL, msg=field)
    assert torch.equal(got.is_top1, want.is_top1)


def test_label_pairs_train_end_to_end_on_the_fast_path(toy, tmp_path, capsys):
    import json

    from sarcasm_dpo import dpo

    out = tmp_path / "run"
    summary = dpo.run(dpo_settings(toy, out, pair_style="label", epochs=1, sample_size=8, probe_size=8,
                                   val_sample_size=8))
    printed = capsys.readouterr().out
    assert "DPO step: policy log-probs from one pass over each prompt" in printed
    assert "reference log-probs computed once before training" in printed
    steps = json.loads((out / "dpo_batch_metrics.json").read_text())["steps"]
    assert summary["global_steps"] == 2 and (out / "COMPLETE.json").is_file()
    assert steps[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy == reference
    assert steps[-1]["dpo/kl"] > 0 and all("train/loss" in r for r in steps[1:])
