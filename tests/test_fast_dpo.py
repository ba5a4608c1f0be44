"""The training fast paths give today's loss and gradients: reference log-probs computed once and
one prompt pass per label pair (fast_dpo.py), shared-prefix SFT and DPO (training/shared_prefix.py).

Each test builds two trainers on two copies of the same start, TRL's plain path and a fast path,
moves both policies by the same seeded step (at step 0 DPO's policy and reference agree, and the
reference's values would cancel out of the loss; a fresh LoRA's B is zero), and compares one
step's loss, TRL's metrics and every LoRA gradient on the same batch, in float32.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from test_dpo import dpo_settings, make_sft_adapter, write_toy_splits

TOL = dict(atol=1e-5, rtol=1e-5)
PLAIN = dict(precompute_ref=False, one_pass=False, shared_prefix=False)  # TRL's own computation


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fast-dpo-toy")
    return SimpleNamespace(root=root, paths=write_toy_splits(root / "splits"),
                           sft=make_sft_adapter(tiny_model_dir, root / "sft"), model_dir=tiny_model_dir)


def build(toy, folder, **overrides):
    import torch

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.models import attach_adapter, load_base_model, load_tokenizer
    from sarcasm_dpo.training.distributed import quiet

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

    from sarcasm_dpo.training.fast_dpo import REF_COLUMNS, InMemoryReference

    slow = build(toy, tmp_path / "slow", pair_style=pair_style, **PLAIN)
    fast = build(toy, tmp_path / "fast", pair_style=pair_style, **{**PLAIN, "precompute_ref": True})
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
    fast = build(toy, tmp_path / "a", **{**PLAIN, "precompute_ref": True})
    stored = {c: fast.train_dataset[c] for c in ("ref_chosen_logps", "ref_rejected_logps")}
    move_policy(fast.model)  # what training (or loading a checkpoint) does to the policy; "ref" stays the SFT copy
    again = fast._precompute_ref_logps(fast.train_dataset, "train", fast.args.per_device_train_batch_size)
    for column, values in stored.items():
        assert again[column] == pytest.approx(values, abs=1e-6)


# -- one pass per label pair ----------------------------------------------------------------------------


@pytest.mark.parametrize("precompute_ref,shared_prefix", [(False, False), (True, False), (True, True)])
def test_one_pass_label_pairs_give_trls_step(toy, tmp_path, precompute_ref, shared_prefix):
    from sarcasm_dpo.training.fast_dpo import OnePassPairs

    trl = build(toy, tmp_path / "trl", pair_style="label", **PLAIN)
    fast = build(toy, tmp_path / "fast", pair_style="label", one_pass=True, precompute_ref=precompute_ref,
                 shared_prefix=shared_prefix)
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

    from sarcasm_dpo.training.shared_prefix import prompt_once_forward

    trainer = build(toy, tmp_path / "t", pair_style=pair_style, **PLAIN)
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

    from sarcasm_dpo.stages import dpo

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


# -- shared-prefix training ---------------------------------------------------------------------------------


def test_shared_prefix_dpo_gives_trls_step(toy, tmp_path):
    """Reasoning pairs, full rows (with the reference precomputed): the prompts' shared prefix runs once."""
    from sarcasm_dpo.training.shared_prefix import SharedPrefixTraining

    trl = build(toy, tmp_path / "trl", **PLAIN)
    fast = build(toy, tmp_path / "fast", **{**PLAIN, "shared_prefix": True, "precompute_ref": True})
    assert isinstance(fast, SharedPrefixTraining)
    batch = next(iter(fast.get_train_dataloader()))
    move_policy(trl.model)
    move_policy(fast.model)
    assert_same_step(step(trl, batch), step(fast, batch))
    assert fast._prefix_verdict is True  # the scorer's check passed: the prefix path did run


def sft_pair(model_dir, folder, tokenizer, model_class=None, config=None):
    """Two SFT trainers (full rows, shared prefix) on the same start, and a batch of toy examples."""
    import torch
    from transformers import AutoModelForCausalLM

    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.config import build as build_settings
    from sarcasm_dpo.settings import SFTSettings
    from test_dpo import toy_frame

    frame = toy_frame(8, 0)
    trainers = []
    for shared_prefix in (False, True):
        s = build_settings(SFTSettings, dict(model=str(model_dir), output_dir=str(folder / "out"), batch_size=4,
                                             lora_dropout=0.0, shared_prefix=shared_prefix, no_wandb=True))
        if config is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
        else:
            torch.manual_seed(0)
            model = model_class(config)
        train_ds = sft.build_dataset(tokenizer, frame, s.max_text_tokens, s.max_length)
        trainer = sft.build_trainer(s, model, tokenizer, train_ds, folder / f"ckpt{shared_prefix}")
        move_policy(trainer.model)  # a fresh LoRA's B is zero: A would get no gradient
        trainers.append(trainer)
    return trainers, next(iter(trainers[0].get_train_dataloader()))


def test_shared_prefix_sft_gives_the_plain_step(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sarcasm_dpo.training.shared_prefix import SharedPrefixTraining

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (plain, fast), batch = sft_pair(tiny_model_dir, tmp_path, tokenizer)
    assert not isinstance(plain, SharedPrefixTraining) and isinstance(fast, SharedPrefixTraining)
    assert_same_step(step(plain, batch), step(fast, batch))
    assert fast._prefix_verdict is True


def test_shared_prefix_with_smollm2s_chat_template(tmp_path, smollm2_gguf):
    """SmolLM2's real template (a system turn before ours: a long shared prefix), on a tiny random Llama."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sarcasm_dpo.scoring import shared_prefix_length

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (plain, fast), batch = sft_pair(smollm2_gguf.parent, tmp_path, tokenizer, LlamaForCausalLM, config)
    prompts = [row[: n] for row, n in zip(batch["input_ids"].tolist(),
                                           (batch["labels"] != -100).int().argmax(-1).tolist())]
    assert shared_prefix_length(prompts) >= 30  # the system turn and the question
    assert_same_step(step(plain, batch), step(fast, batch))
    assert fast._prefix_verdict is True


# -- one packed call per micro-batch (packed_pairs.py) --------------------------------------------------------


def test_pack_lays_out_each_pair_after_the_shared_prefix():
    from sarcasm_dpo.training.packed_pairs import pack

    # Two prompts sharing [1, 2]; answers [label, EOS]. The last prompt token opens each answer branch.
    p = pack([[1, 2, 3, 4], [1, 2, 5, 6, 7]], [([30, 99], [40, 99]), ([31, 99], [41, 99])], prefix=2)
    assert p.ids == [[1, 2, 3, 4, 30, 4, 40, 5, 6, 7, 31, 7, 41]]
    assert p.positions == [[0, 1, 2, 3, 4, 3, 4, 2, 3, 4, 5, 4, 5]]  # each token where it sits in its full row
    assert p.targets == [[-100, -100, -100, 30, 99, 40, 99, -100, -100, 31, 99, 41, 99]]
    assert p.slots == [[(0, 3), (0, 4)], [(0, 9), (0, 10)], [(0, 5), (0, 6)], [(0, 11), (0, 12)]]
    # A row limit starts a new row (with the prefix again) rather than splitting a pair.
    split = pack([[1, 2, 3, 4], [1, 2, 5, 6, 7]], [([30, 99], [40, 99]), ([31, 99], [41, 99])], prefix=2, max_tokens=8)
    assert split.ids == [[1, 2, 3, 4, 30, 4, 40], [1, 2, 5, 6, 7, 31, 7, 41]]
    assert split.slots[1] == [(1, 4), (1, 5)]


def test_the_block_mask_shows_each_token_only_what_its_full_row_shows():
    import torch

    from sarcasm_dpo.training.packed_pairs import attention_mask_4d, pack

    p = pack([[1, 2, 3, 4], [1, 2, 5, 6, 7]], [([30, 99], [40, 99]), ([31, 99], [41, 99])], prefix=2)
    mask = attention_mask_4d(p.groups, 14, "bool", torch.float32, "cpu")[0, 0]  # one padding column
    seen = {i: [j for j in range(14) if mask[i, j]] for i in range(14)}
    assert seen[4] == [0, 1, 2, 3, 4]  # pair 0's chosen label: prefix, its prompt, its branch
    assert seen[6] == [0, 1, 2, 5, 6]  # pair 0's rejected label: not the chosen branch
    assert seen[12] == [0, 1, 7, 8, 11, 12]  # pair 1's rejected label: not pair 0, not its chosen branch
    assert seen[13] == [13]  # padding sees itself only
    additive = attention_mask_4d(p.groups, 14, "float", torch.float32, "cpu")[0, 0]
    assert torch.equal(additive == 0, mask)


@pytest.mark.parametrize("pair_style", ["label", "reasoning"])
@pytest.mark.parametrize("row_tokens", [2048, 40])  # 40: several packed rows, padded
def test_packed_pairs_forward_gives_the_fused_heads_outputs(toy, tmp_path, monkeypatch, pair_style, row_tokens):
    import torch

    from sarcasm_dpo.scoring import shared_prefix_length
    from sarcasm_dpo.training import packed_pairs

    monkeypatch.setattr(packed_pairs, "MAX_ROW_TOKENS", row_tokens)
    trainer = build(toy, tmp_path / "t", pair_style=pair_style, **PLAIN)
    move_policy(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = trainer.model.eval()
    assert packed_pairs.mask_kind(model) is not None
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     fused_lm_head=True, use_cache=False)
        for prefix in (None, shared_prefix_length):
            got = packed_pairs.packed_pairs_forward(model, batch["input_ids"], batch["attention_mask"], labels, prefix)
            assert got is not None and got.log_probs.shape == want.log_probs.shape
            assert torch.equal(got.label_mask, want.label_mask)
            for field in ("log_probs", "entropy", "mean_logits"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), **TOL, msg=field)
            assert torch.equal(got.is_top1, want.is_top1)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_packed_label_pairs_give_trls_step(toy, tmp_path, monkeypatch, shared_prefix):
    from sarcasm_dpo.training import packed_pairs

    monkeypatch.setattr(packed_pairs, "_CHECKED", {})
    calls = []
    original = packed_pairs.packed_pairs_forward

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(packed_pairs, "packed_pairs_forward", counted)
    trl = build(toy, tmp_path / "trl", pair_style="label", **PLAIN)
    fast = build(toy, tmp_path / "fast", pair_style="label", shared_prefix=shared_prefix)  # the defaults: packed
    batch = next(iter(fast.get_train_dataloader()))
    move_policy(trl.model)
    move_policy(fast.model)
    assert calls and all(calls)  # the check, then the reference pass before training: packed
    calls.clear()
    assert_same_step(step(trl, batch), step(fast, batch))
    assert calls == [True]  # the step itself: packed, not the three-call fallback
    assert list(packed_pairs._CHECKED.values()) == [True]
    assert list(packed_pairs.packing_verdicts().values()) == [True]  # what a report (device_check) records
    assert next(iter(packed_pairs.packing_verdicts())).endswith("/cpu")


def test_packing_falls_back_where_it_does_not_hold(toy, tmp_path, monkeypatch, capsys):
    import dataclasses

    from sarcasm_dpo.training import packed_pairs

    monkeypatch.setattr(packed_pairs, "_CHECKED", {})
    original = packed_pairs.packed_pairs_forward

    def wrong(*args, **kwargs):  # as if this architecture ignored the block mask
        out = original(*args, **kwargs)
        return dataclasses.replace(out, log_probs=out.log_probs + 1.0)

    monkeypatch.setattr(packed_pairs, "packed_pairs_forward", wrong)
    trl = build(toy, tmp_path / "trl", pair_style="label", **PLAIN)
    fast = build(toy, tmp_path / "fast", pair_style="label")
    batch = next(iter(fast.get_train_dataloader()))
    move_policy(trl.model)
    move_policy(fast.model)
    assert_same_step(step(trl, batch), step(fast, batch))  # the three-call path, still TRL's step
    assert "gives other log-probs with pairs packed into one call" in capsys.readouterr().out
    assert list(packed_pairs._CHECKED.values()) == [False]


def test_attention_without_block_masks_keeps_three_calls_quietly(toy, tmp_path, monkeypatch, capsys):
    from sarcasm_dpo.training import packed_pairs
    from sarcasm_dpo.training.shared_prefix import prompt_once_forward

    monkeypatch.setattr(packed_pairs, "_CHECKED", {})
    monkeypatch.setattr(packed_pairs, "_MASKS", {})  # as for flash attention: no custom 4D mask
    trainer = build(toy, tmp_path / "t", pair_style="label", **PLAIN)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = trainer.model
    assert packed_pairs.packed_pairs_forward(model, batch["input_ids"], batch["attention_mask"], labels) is None
    capsys.readouterr()
    assert not packed_pairs.packing_works(model, batch["input_ids"], batch["attention_mask"], labels,
                                          prompt_once_forward)
    assert packed_pairs._CHECKED == {} and capsys.readouterr().out == ""  # no verdict cached, nothing said
