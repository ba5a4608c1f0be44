"""DPO stage on the tiny model: reference = SFT at step 0, learning on a toy set, outputs, early
stopping, the beta sweep, the script door, and the preference-pair rules.

The "SFT adapter" here is made without sft.py: a fresh LoRA (r=8 on q_proj, v_proj) whose lora_B
gets a random init, so it differs from the base model. On the toy set a marker phrase decides the
label; the random SFT start ranks the two classes the wrong way round (ROC-AUC 0), so learning
shows as margins going up and validation ROC-AUC going to 1.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
SARCASTIC = "oh great i just love waiting thanks for nothing what a surprise {i}"
LITERAL = "the meeting was useful and we agreed on the plan {i}"


def toy_frame(n: int, start: int) -> pd.DataFrame:
    """Alternating labels; the marker phrase alone decides the label."""
    return pd.DataFrame([{"text": (SARCASTIC if i % 2 else LITERAL).format(i=i), "label": i % 2}
                         for i in range(start, start + n)])


def write_toy_splits(folder: Path) -> SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    paths = SimpleNamespace(train=folder / "isarcasm_train.csv", gen_val=folder / "gen_val.csv",
                            is_val=folder / "isarcasm_val.csv")
    toy_frame(32, 0).to_csv(paths.train, index=False)
    toy_frame(32, 1000).to_csv(paths.gen_val, index=False)
    toy_frame(16, 2000).to_csv(paths.is_val, index=False)
    return paths


def make_sft_adapter(model_dir: Path, folder: Path) -> Path:
    """A LoRA adapter saved the way sft.py saves one: adapter files + training_summary.json (config.model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would make the adapter a no-op
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps({"config": {"model": str(model_dir),
                                                                          "max_text_tokens": 256}}))
    return folder


def dpo_settings(toy, output_dir: Path, **overrides):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import DPOSettings

    values = dict(sft_model=str(toy.sft), output_dir=str(output_dir), train_csv=str(toy.paths.train),
                  val_csv=str(toy.paths.gen_val), isarcasm_val_csv=str(toy.paths.is_val), beta=0.5, lr=2e-2,
                  epochs=2, batch_size=4, grad_accum=1, logging_steps=1, diagnostics_steps=1, eval_batch_size=16,
                  probe_size=16,
                  patience=3, no_wandb=True, seed=42)
    values.update(overrides)
    return build(DPOSettings, values)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo-toy")
    paths = write_toy_splits(root / "splits")
    sft = make_sft_adapter(tiny_model_dir, root / "sft")
    return SimpleNamespace(root=root, paths=paths, sft=sft, model_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def trained(toy):
    """One full DPO run shared by the tests below: 32 pairs, batch 4, 2 epochs, a log every step."""
    from sarcasm_dpo.stages import dpo

    out = toy.root / "dpo_enhanced"
    settings = dpo_settings(toy, out, val_sample_size=16)
    summary = dpo.run(settings)
    return SimpleNamespace(settings=settings, summary=summary, out=out,
                           batch=json.loads((out / "dpo_batch_metrics.json").read_text()),
                           epochs=json.loads((out / "dpo_epoch_metrics.json").read_text()))


# -- the reference is the frozen SFT model ------------------------------------------------------------


def _sequence_logps(model, batch):
    """Sum of the completion tokens' log-probs, computed by hand with an ordinary forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


@pytest.fixture(scope="module")
def untrained(toy, tmp_path_factory):
    """DPOTrainer built on the SFT adapter, before any step."""
    import torch

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.models import attach_adapter, load_base_model, load_tokenizer

    folder = tmp_path_factory.mktemp("untrained")
    s = dpo_settings(toy, folder / "out")
    tokenizer = load_tokenizer(str(toy.model_dir))
    data = dpo.load_data(s, tokenizer)
    model = attach_adapter(load_base_model(str(toy.model_dir), torch.device("cpu")), toy.sft, trainable=True)
    trainer, _, diagnostics = dpo.build_trainer(s, model, tokenizer, data, folder / "ckpt")
    return SimpleNamespace(tokenizer=tokenizer, data=data, model=model, trainer=trainer, diagnostics=diagnostics)


def test_reference_is_the_sft_model_at_step_zero(untrained, toy):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, trainer = untrained.model, untrained.trainer
    assert set(model.peft_config) == {"default", "ref"}  # the reference is an adapter, not a model copy
    reference = [p for n, p in model.named_parameters() if ".ref." in n]
    assert reference and not any(p.requires_grad for p in reference)  # frozen (and found: not vacuously true)
    batch = next(iter(trainer.get_train_dataloader()))

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.model_dir), str(toy.sft)).eval()
    sft_chosen, sft_rejected = _sequence_logps(sft, batch)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(ref_chosen, sft_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_rejected, sft_rejected, atol=1e-5, rtol=1e-5)

    model.eval()  # TRL files metrics under "eval" in eval mode
    loss = trainer.compute_loss(model, batch)
    metrics = trainer._metrics["eval"]
    # 0 up to float rounding: the reference's log-probs were computed once before training (fast_dpo.py), in
    # batches padded differently from this one.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key][-1] == pytest.approx(0.0, abs=1e-5), key
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    start = untrained.diagnostics.measure(model)
    assert start["dpo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert start["dpo/flip_rate"] == 0.0 and start["dpo/drift"] == 0.0 and start["dpo/drift_delta_w"] == 0.0


def test_kl_and_flips_match_a_direct_computation(untrained):
    """The diagnostics' KL (batched, shared-prefix cache) against one plain forward pass per probe prompt."""
    import torch
    from trl.trainer.utils import use_adapter

    model, diagnostics = untrained.model, untrained.diagnostics
    policy_params = {n: p for n, p in model.named_parameters() if "lora_B" in n and ".default." in n}
    saved = {n: p.detach().clone() for n, p in policy_params.items()}
    fresh = type(diagnostics)(model, untrained.tokenizer, untrained.data.probe_texts, beta=0.1,
                              batch_size=3, max_text_tokens=diagnostics.scorer.max_text_tokens)
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy_params.values():  # move the policy away from the reference
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        got = fresh.measure(model)

        def last_logprobs():
            model.eval()
            with torch.no_grad():
                return torch.stack([torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                                    for ids in fresh.encoded])

        policy = last_logprobs()
        with use_adapter(model, "ref"):
            ref = last_logprobs()
    finally:
        with torch.no_grad():
            for n, p in policy_params.items():
                p.copy_(saved[n])
    kl = (policy.exp() * (policy - ref)).sum(-1)
    assert float(kl.mean()) > 1e-3  # the perturbation did move the policy
    assert got["dpo/kl"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
    assert got["dpo/kl_max"] == pytest.approx(float(kl.max()), rel=1e-4, abs=1e-6)
    no_id, yes_id = fresh.scorer.no_id, fresh.scorer.yes_id
    flips = ((policy[:, yes_id] >= policy[:, no_id]) != (ref[:, yes_id] >= ref[:, no_id])).float().mean()
    assert got["dpo/flip_rate"] == pytest.approx(float(flips))


def test_checkpointing_only_when_asked(untrained, toy, tmp_path):
    import warnings

    from sarcasm_dpo.stages import dpo

    assert not untrained.trainer.args.activation_checkpointing  # TRL's default is on; ours is off
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would warn on every run
        args = dpo.dpo_args(dpo_settings(toy, tmp_path / "out", gradient_checkpointing=True), untrained.model, tmp_path)
    assert args.activation_checkpointing and args.gradient_checkpointing


def test_prompt_tokens_are_the_scorers(untrained):
    from sarcasm_dpo.prompts import label_token_ids
    from sarcasm_dpo.scoring import Scorer

    tokenizer, data, trainer = untrained.tokenizer, untrained.data, untrained.trainer
    expected = Scorer(untrained.model, tokenizer).encode(data.pairs["text"].tolist())
    no_id, yes_id = label_token_ids(tokenizer)
    for row, want, label in zip(trainer.train_dataset, expected, data.pairs["label"]):
        assert row["prompt_ids"] == want
        assert row["chosen_ids"][0] == (yes_id if label == 1 else no_id)
        assert row["rejected_ids"][0] == (no_id if label == 1 else yes_id)
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id  # TRL appends EOS to each answer


# -- learning on the toy set ----------------------------------------------------------------------------


def test_training_raises_margins_and_kl(trained):
    steps = trained.batch["steps"]
    assert steps[0]["step"] == 0 and steps[0]["dpo/kl"] == 0.0
    first = steps[1]  # step 1's batch is scored before any update: policy == reference
    assert first["step"] == 1
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # up to rounding: reference precomputed
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert first["dpo/reward_ratio"] == pytest.approx(1.0, abs=1e-5)
    last = steps[-1]
    assert last["dpo/kl"] > 1e-4 and last["dpo/drift"] > 0
    margins = [r["rewards/margins"] for r in steps[1:]]
    half = len(margins) // 2
    assert np.mean(margins[half:]) > max(0.05, np.mean(margins[:half]))
    assert np.mean([r["rewards/accuracies"] for r in steps[1:]][half:]) > 0.5
    assert math.exp(np.mean(margins[half:]) / 0.5) > 1.0
    for record in steps[1:]:  # every logging step carries the full set of diagnostics
        for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "dpo/reward_ratio", "dpo/kl", "dpo/drift", "dpo/flip_rate", "dpo/logratio_chosen"):
            assert key in record, key
        assert record["dpo/reward_ratio"] == pytest.approx(math.exp(record["rewards/margins"] / 0.5), rel=1e-9)
    # The marker was learned: the SFT start ranks the classes backwards, the end of training ranks them right.
    evaluations = trained.epochs["evaluations"]
    assert evaluations[0]["gen_val"]["roc_auc"] < 0.5 < 0.9 < evaluations[-1]["gen_val"]["roc_auc"]


def test_summary_and_health_verdicts(trained, toy):
    summary = trained.summary
    assert summary["config"]["model"] == summary["base_model"] == str(toy.model_dir)
    assert summary["config"]["beta"] == 0.5 and summary["reference"].startswith("frozen copy of the SFT adapter")
    assert summary["pairs"]["capped"] and summary["pairs"]["used"] == 32 and summary["pairs"]["requested"] == 4000
    kl = summary["health"]["kl"]
    assert kl["verdict"] in ("too_low", "healthy", "too_high") and kl["range"] == [0.5, 2.0]
    assert (kl["advice"] is None) == (kl["verdict"] == "healthy")
    ratio = summary["health"]["reward_ratio"]
    assert ratio["threshold"] == 1.2
    # The printed ratio is the last evaluation window's mean; the curves' last point is kept beside it.
    window = trained.epochs["evaluations"][-1]["train"]
    assert ratio["logged_steps"] == window["logged_steps"] and ratio["value"] == window["dpo/reward_ratio"]
    last = [r for r in trained.batch["steps"] if "train/loss" in r][-1]
    assert ratio["last_logged"] == {"step": last["step"], "value": last["dpo/reward_ratio"]}
    assert set(summary["timings"]) >= {"load_s", "train_s", "eval_s", "save_s", "total_s"}
    assert summary["best_val"]["gen_val"]["f1"] == summary["best_f1"]
    assert "isarcasm_val" in summary["best_val"]


def test_outputs_and_the_saved_adapter_reloads(trained, toy):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.sampling import stratified_sample
    from sarcasm_dpo.metrics import classification_metrics
    from sarcasm_dpo.models import adapter_base_model
    from sarcasm_dpo.scoring import Scorer

    out = trained.out
    for name in ("adapter_model.safetensors", "adapter_config.json", "dpo_epoch_metrics.json", "dpo_batch_metrics.json",
                 "dpo_training_curves.png", "dpo_training_summary.json", "COMPLETE.json"):
        assert (out / name).is_file(), name
    assert not (out / "ref").exists() and not (out / "checkpoints").exists()
    assert not [p for p in out.iterdir() if p.is_dir()]
    umask = os.umask(0)
    os.umask(umask)
    # As readable as any file written here (safetensors alone would make the weights owner-only).
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == \
        {p.name: oct(0o666 & ~umask) for p in out.iterdir()}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any(".ref." in k for k in weights)
    assert adapter_base_model(out) == str(toy.model_dir)

    tokenizer = AutoTokenizer.from_pretrained(toy.model_dir)
    dpo_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.model_dir), str(out)).eval()
    val = stratified_sample(load_split(toy.paths.gen_val), 16, 42)
    probs = Scorer(dpo_model, tokenizer, batch_size=16).predict_proba(val["text"].tolist())
    saved = trained.summary["best_val"]["gen_val"]
    again = classification_metrics(val["label"].to_numpy(), probs)
    assert again["f1"] == pytest.approx(saved["f1"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(saved["accuracy"], abs=1e-9)
    assert again["roc_auc"] == pytest.approx(saved["roc_auc"], abs=1e-6)
    probe = load_split(toy.paths.gen_val).sample(frac=1.0, random_state=42).head(16)["text"].tolist()
    mean_p = Scorer(dpo_model, tokenizer).predict_proba(probe).mean()
    assert mean_p == pytest.approx(trained.summary["diagnostics"]["saved_model"]["dpo/probe_p_sarcastic"], abs=1e-5)

    # What was saved is the best checkpoint as it was in memory at its step, not the last weights.
    best = next(e for e in trained.epochs["evaluations"] if e["step"] == trained.summary["best_step"])
    for key in ("dpo/kl", "dpo/probe_p_sarcastic", "dpo/drift"):
        assert trained.summary["diagnostics"]["saved_model"][key] == pytest.approx(best["diagnostics"][key], abs=1e-5)
    sft_weights = load_file(str(toy.sft / "adapter_model.safetensors"))
    same = all(np.allclose(weights[k].numpy(), sft_weights[k].numpy()) for k in sft_weights)
    assert same == (trained.summary["best_step"] == 0)  # step 0 is the SFT start itself


def test_epoch_metrics_pair_f1_with_diagnostics(trained):
    evaluations = trained.epochs["evaluations"]
    assert [e["step"] for e in evaluations][0] == 0
    assert evaluations[0]["diagnostics"]["dpo/kl"] == 0.0
    selected = [e for e in evaluations if e["selected"]]
    assert len(selected) == 1 and selected[0]["step"] == trained.summary["best_step"]
    for e in evaluations:
        assert {"gen_val", "isarcasm_val", "diagnostics"} <= set(e)


# -- early stopping, sweep, doors ----------------------------------------------------------------------------


def test_early_stopping_fires_on_a_plateau(toy):
    from sarcasm_dpo.stages import dpo

    # The first step is lr warm-up (lr 0), so F1 cannot move: a plateau by construction.
    out = toy.root / "plateau"
    summary = dpo.run(dpo_settings(toy, out, lr=1e-9, epochs=1, eval_steps=1, patience=1, sample_size=16,
                                   probe_size=8, val_sample_size=8))
    assert summary["stopped_early"] and summary["global_steps"] == 1
    assert summary["best_step"] == 0 and not summary["improved_over_sft"]
    epochs = json.loads((out / "dpo_epoch_metrics.json").read_text())
    assert [e["step"] for e in epochs["evaluations"]] == [0, 1]
    assert (out / "COMPLETE.json").is_file() and not (out / "checkpoints").exists()


def test_a_run_that_keeps_its_sft_start_keeps_the_sft_threshold(toy, tmp_path):
    """The saved adapter is then the SFT adapter: it decides at SFT's threshold, not at one chosen again on this
    run's (here smaller) validation sample, so compare cannot show a gain between two copies of one model."""
    import shutil

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.thresholds import read_threshold, write_threshold

    sft = tmp_path / "sft"
    shutil.copytree(toy.sft, sft)
    write_threshold(sft, {"threshold": 0.4321, "criterion": "balanced_accuracy", "split": "gen_val", "n": 32})
    out = tmp_path / "dpo"
    summary = dpo.run(dpo_settings(toy, out, sft_model=str(sft), lr=1e-9, epochs=1, eval_steps=1, patience=1,
                                   sample_size=16, probe_size=8, val_sample_size=8))
    assert summary["best_step"] == 0
    record = read_threshold(out)
    assert record["threshold"] == 0.4321 and record["inherited_from"] == str(sft.resolve())


def test_divergence_stops_with_the_step_the_fix_and_the_metrics_so_far(toy):
    """DPO's divergence is the same TrainingDiverged as SFT's (resilience.py): a UserError naming the step,
    the update, the checkpoint kept and the settings to change, with the batch metrics up to it on disk."""
    import re

    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.training.resilience import TrainingDiverged

    out = toy.root / "diverged"
    with pytest.warns(UserWarning, match="--lr"), pytest.raises(TrainingDiverged) as info:
        dpo.run(dpo_settings(toy, out, lr=1e9, warmup_ratio=0.0, epochs=1, sample_size=16, probe_size=8,
                             val_sample_size=8))
    message = str(info.value)
    assert isinstance(info.value, UserError) and message.startswith("DPO training diverged: the ")
    assert re.search(r"at optimizer step \d+; ", message) and info.value.step >= 1
    assert "No checkpoint was written before the fault" in message and "--lr (now 1e+09)" in message
    batches = json.loads((out / dpo.BATCH_FILE).read_text())
    assert str(out / dpo.BATCH_FILE) in message and batches
    assert not (out / "COMPLETE.json").exists()


def test_beta_sweep_writes_every_output(toy):
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.models import adapter_base_model

    out = toy.root / "sweep"
    settings = dpo_settings(toy, out, beta_sweep=True, betas=[0.1, 0.5], epochs=1, sample_size=16, batch_size=8,
                            probe_size=8, val_sample_size=8)
    results = dpo.run(settings)
    on_disk = json.loads((out / "beta_sweep_results.json").read_text())
    assert on_disk["best_beta"] == results["best_beta"] and on_disk["best_beta"] in (0.1, 0.5)
    assert [r["beta"] for r in on_disk["runs"]] == [0.1, 0.5]
    best_row = max(on_disk["runs"], key=lambda r: r["val_f1"])
    assert on_disk["best_val_f1"] == best_row["val_f1"]
    for beta in (0.1, 0.5):
        folder = toy.root / f"sweep_beta_{beta:g}"
        for name in ("adapter_model.safetensors", "dpo_training_summary.json", "dpo_batch_metrics.json",
                     "dpo_epoch_metrics.json", "dpo_training_curves.png", "COMPLETE.json"):
            assert (folder / name).is_file(), (beta, name)
        assert json.loads((folder / "dpo_training_summary.json").read_text())["config"]["beta"] == beta
    best_dir = Path(on_disk["best_output_dir"])
    assert best_dir == toy.root / f"sweep_beta_{on_disk['best_beta']:g}"
    assert (out / "beta_sweep.png").is_file() and (out / "COMPLETE.json").is_file()
    assert (out / "adapter_model.safetensors").read_bytes() == (best_dir / "adapter_model.safetensors").read_bytes()
    assert adapter_base_model(out) == str(toy.model_dir)

    # Run again (as after an interruption): finished betas are reused, not trained again.
    stamp = (best_dir / "dpo_training_summary.json").stat().st_mtime_ns
    again = dpo.run(settings)
    assert again["runs"] == results["runs"] and again["best_beta"] == results["best_beta"]
    assert (best_dir / "dpo_training_summary.json").stat().st_mtime_ns == stamp


def _script(capsys, *args) -> tuple[int, str, str]:
    """scripts/dpo_train_v2.py ARGS in this process: (exit code, stdout, stderr)."""
    code = run_script("dpo_train_v2.py", *args)
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_command_runs_with_no_wandb(toy, capsys):
    out = toy.root / "cli_out"
    code, stdout, stderr = _script(
        capsys, "--no_wandb", "--beta", "0.1", "--epochs", "1",
        "--sft_model", str(toy.sft), "--output_dir", str(out), "--train_csv", str(toy.paths.train),
        "--val_csv", str(toy.paths.gen_val), "--isarcasm_val_csv", str(toy.paths.is_val),
        "--sample_size", "8", "--batch_size", "8", "--probe_size", "8", "--val_sample_size", "8")
    assert code == 0, stderr[-3000:]
    assert (out / "COMPLETE.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "--sample_size 8" not in stdout  # 8 <= 32 pairs: no cap note
    assert json.loads((out / "dpo_training_summary.json").read_text())["config"]["beta"] == 0.1


def test_bad_sft_folder_exits_2_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the second run writes to the default --output_dir, as it did from the checkout
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    code, _, stderr = _script(capsys, "--no_wandb", "--sft_model", str(empty), "--output_dir", str(tmp_path / "out"))
    assert code == 2
    assert "holds no LoRA adapter" in stderr and "Traceback" not in stderr
    code, _, stderr = _script(capsys, "--no_wandb", "--sft_model", str(tmp_path / "missing"))
    assert code == 2 and "Adapter folder not found" in stderr


def test_unknown_loss_type_is_a_user_error(toy, tmp_path):
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.errors import UserError

    with pytest.raises(UserError, match="loss_type"):
        dpo.run(dpo_settings(toy, tmp_path / "out", loss_type="bogus"))


# -- preference pairs -------------------------------------------------------------------------------------


def test_reasoning_pairs_start_with_the_label_and_match_in_length(tiny_model_dir):
    from transformers import AutoTokenizer

    from sarcasm_dpo.pairs import LITERAL_REASONS, SARCASTIC_REASONS, build_pairs, check_pair_tokens

    assert len(SARCASTIC_REASONS) == len(LITERAL_REASONS) >= 4
    for a, b in zip(SARCASTIC_REASONS, LITERAL_REASONS):  # length cannot tell chosen from rejected
        assert abs(len(a) - len(b)) <= 4 and abs(len(a.split()) - len(b.split())) <= 1, (a, b)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    frame = toy_frame(20, 0).assign(id=[str(i) for i in range(20)])
    pairs = build_pairs(frame, tokenizer, "reasoning", seed=7)
    again = build_pairs(frame, tokenizer, "reasoning", seed=7)
    assert pairs.equals(again)  # seeded
    assert not pairs.equals(build_pairs(frame, tokenizer, "reasoning", seed=8))
    for row in pairs.itertuples():
        word, other = ("Yes", "No") if row.label == 1 else ("No", "Yes")
        assert row.chosen.startswith(word + ". ") and row.rejected.startswith(other + ". ")
        assert abs(len(row.chosen) - len(row.rejected)) <= 5  # "Yes. " vs "No. " adds one
        check_pair_tokens(tokenizer, row.prompt, row.chosen, row.rejected, row.label)
    labels = build_pairs(frame, tokenizer, "label")
    assert set(labels["chosen"]) == {"Yes", "No"}
    assert (labels["chosen"] != labels["rejected"]).all()


def test_preference_file_errors_are_clear(tmp_path):
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.pairs import load_pairs_file

    cases = {"missing.json": None, "bad.json": "{not json", "empty.json": "[]", "dict.json": '{"a": 1}',
             "keys.json": json.dumps([{"prompt": "p", "chosen": "Yes"}])}
    messages = {"missing.json": "not found", "bad.json": "not valid JSON", "empty.json": "holds no pairs",
                "dict.json": "must hold a list", "keys.json": "lack a non-empty string"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(UserError, match=messages[name]):
            load_pairs_file(path)


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(toy, monkeypatch):
    """Kill a run after step 5 (checkpoints every 2 steps), then --resume: it continues from step 4 and
    ends like an uninterrupted run, with the diagnostics history of the killed part kept."""
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.training import diagnostics

    out = toy.root / "resumed"
    original = diagnostics.DPODiagnosticsCallback.on_log

    def dying_on_log(self, args, state, control, logs=None, model=None, **kwargs):
        original(self, args, state, control, logs=logs, model=model, **kwargs)
        if state.global_step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(diagnostics.DPODiagnosticsCallback, "on_log", dying_on_log)
    settings = dpo_settings(toy, out, epochs=1, save_steps=2, val_sample_size=8, probe_size=8)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(settings)
    assert (out / "checkpoints" / "checkpoint-4" / dpo.STATE_FILE).is_file()
    assert not (out / "COMPLETE.json").exists()
    monkeypatch.setattr(diagnostics.DPODiagnosticsCallback, "on_log", original)
    import dataclasses

    summary = dpo.run(dataclasses.replace(settings, resume=True))
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_steps"] == 8
    steps = [r["step"] for r in json.loads((out / "dpo_batch_metrics.json").read_text())["steps"]]
    assert steps[0] == 0 and steps[-1] == 8 and 3 in steps  # the killed part's records came back with the checkpoint
    assert (out / "COMPLETE.json").is_file() and not (out / "checkpoints").exists()


def test_dpo_saves_the_threshold_of_its_saved_adapter(trained):
    """threshold.json from GEN validation scores of the adapter DPO saved (its best step)."""
    from sarcasm_dpo.thresholds import read_threshold

    record = read_threshold(trained.out)
    best = trained.summary["best_val"]["gen_val"]
    assert record["split"] == "gen_val" and record["n"] == best["n"]
    assert record["val_metrics_at_0.5"]["f1"] == best["f1"] and record["val_metrics_at_0.5"]["accuracy"] == best["accuracy"]
    assert trained.summary["outputs"]["threshold"] == "threshold.json"
    assert not (trained.out / "checkpoints").exists() and not list(trained.out.parent.glob(".staging-*"))


def test_window_means_count_each_step_once_whatever_the_logs_split():
    """A stop forced a log at step 7 (loss only: the lean trainer computes TRL's rewards only on steps it
    knows will log), and the resumed run's log at step 10 covers steps 8-10: the window's per-step means
    are the uninterrupted run's, and the rewards are the mean over the steps that measured them."""
    from sarcasm_dpo.stages.dpo import _window_means

    losses = [0.70, 0.69, 0.68, 0.66, 0.65, 0.64, 0.62, 0.61, 0.60, 0.58]  # steps 1..10

    def row(step, since, rewards=True):
        window = losses[since:step]
        r = {"step": step, "train/loss": sum(window) / len(window)}
        if rewards:
            r.update({"rewards/margins": 0.1 * step, "rewards/chosen": 0.0, "rewards/rejected": -0.1 * step,
                      "rewards/accuracies": 0.5})
        return r

    plain = _window_means([row(5, 0), row(10, 5)], 5, 10, beta=0.1)
    stopped = _window_means([row(5, 0), row(7, 5, rewards=False), row(10, 7)], 5, 10, beta=0.1)
    assert plain["train/loss"] == pytest.approx(sum(losses[5:]) / 5)
    assert stopped["train/loss"] == pytest.approx(plain["train/loss"])
    assert stopped["rewards/margins"] == pytest.approx(1.0)  # only step 10's row measured it
    assert stopped["dpo/reward_ratio"] is not None and stopped["logged_steps"] == 2


def test_beta_sweep_ties_go_to_the_saved_adapter_closest_to_sft(toy, tmp_path, monkeypatch, capsys):
    """Two betas whose saved adapters score the same: the sweep keeps the one whose SAVED adapter has the smaller
    KL to SFT (the model it copies), not the one whose end-of-training weights did (it used the latter)."""
    from sarcasm_dpo.stages import dpo

    kls = {0.1: {"final": 0.01, "saved": 0.30}, 0.5: {"final": 0.20, "saved": 0.05}}

    def fake_train(sub, run_name=None):
        folder = Path(sub.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(f"weights of beta {sub.beta}".encode())
        summary = {"best_f1": 0.8, "best_score": 0.8, "best_val": {}, "best_step": 4, "improved_over_sft": True,
                   "stopped_early": False, "timings": {"train_s": 1.0},
                   "diagnostics": {"end_of_training": {"dpo/kl": kls[sub.beta]["final"], "dpo/drift": 0.1},
                                   "saved_model": {"dpo/kl": kls[sub.beta]["saved"]}},
                   "health": {"kl": {"verdict": "ok"}, "reward_ratio": {"value": 1.5, "verdict": "ok"}}}
        (folder / dpo.SUMMARY_FILE).write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(dpo, "train", fake_train)
    out = tmp_path / "sweep"
    results = dpo.run(dpo_settings(toy, out, beta_sweep=True, betas=[0.1, 0.5]))
    assert results["best_beta"] == 0.5 and "smaller KL of the saved adapter" in results["selection"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights of beta 0.5"
    assert "KL of the saved adapter 0.050" in capsys.readouterr().out
