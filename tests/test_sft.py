"""SFT stage on the tiny random Qwen2: masking, outputs, learning, reload, resume, errors, the script door.

One 2-epoch run is shared by most tests (module fixture); the rest train for a few steps only.
The tiny model's logits are bounded (64-dim RMS-normed states against frozen, small tied
embeddings), so its loss on the answer tokens starts near ln(vocab) and falls by about 0.6 in
two epochs; the slow test trains longer and checks that the toy rule itself is learned.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_script
from transformers import TrainerCallback

from sarcasm_dpo.stages import sft
from sarcasm_dpo.cli import main
from sarcasm_dpo.config import build
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import SFTSettings
from sarcasm_dpo.training.checkpoints import latest_checkpoint
from sarcasm_dpo.training.resilience import TrainingDiverged

PLAIN = ("the meeting was useful and we agreed on the plan gun control debate evidence argument religion "
         "science evolution people government law because").split()
SARCASTIC = "oh great another monday i just love waiting in line for hours what a surprise thanks for nothing".split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def toy_frame(n: int, seed: int) -> pd.DataFrame:
    """A learnable rule: sarcastic texts are drawn from one word list, the others from another."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = SARCASTIC if label else PLAIN
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))), "label": label,
                     "source": "toy", "id": f"{seed}-{i}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def toy_csvs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("toy")
    toy_frame(48, 1).to_csv(folder / "train.csv", index=False)
    toy_frame(16, 2).to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def settings(model_dir, train_csv, val_csv, output_dir, **overrides) -> SFTSettings:
    values = dict(model=str(model_dir), train_csv=str(train_csv), val_csv=str(val_csv), output_dir=str(output_dir),
                  epochs=2, lr=5e-2, batch_size=8, grad_accum=1, logging_steps=1, lora_targets=TARGETS,
                  no_wandb=True, seed=0)
    values.update(overrides)
    return build(SFTSettings, values)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, toy_csvs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-run") / "sft"
    s = settings(tiny_model_dir, *toy_csvs, out)
    summary = sft.run(s)
    return s, out, summary


# -- data and masking ----------------------------------------------------------------------------------


def test_completion_mask_covers_exactly_the_answer(tiny_model_dir, toy_csvs, tmp_path):
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.models import load_base_model, load_tokenizer, pick_device
    from sarcasm_dpo.scoring import Scorer

    s = settings(tiny_model_dir, *toy_csvs, tmp_path / "out")
    tok = load_tokenizer(s.model)
    model = load_base_model(s.model, pick_device("cpu"))
    frame = load_split(s.train_csv).head(6)
    trainer = sft.build_trainer(s, model, tok, sft.build_dataset(tok, frame, s.max_text_tokens, s.max_length),
                                tmp_path / "ckpt")
    examples = [trainer.train_dataset[i] for i in range(len(frame))]
    batch = trainer.data_collator(examples)
    prompts_as_scored = Scorer(model, tok).encode(frame["text"].tolist())

    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape[1] == max(lengths)  # dynamic padding, not a fixed length
    for row, (label, prompt_ids) in enumerate(zip(frame["label"], prompts_as_scored)):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        trained_on = ids[labels != -100]
        assert tok.decode(trained_on) == ("Yes" if label else "No") + tok.eos_token
        # Everything before the answer is the very prompt the scorer reads, token for token.
        assert ids[: len(prompt_ids)].tolist() == prompt_ids
        assert (labels[: len(prompt_ids)] == -100).all()
        assert (labels[mask == 0] == -100).all()  # padding never counts
    args = trainer.args
    assert args.completion_only_loss and not args.packing and not args.padding_free
    assert args.train_sampling_strategy == "group_by_length" and args.lr_scheduler_type == "cosine"
    assert not args.activation_checkpointing and not args.bf16  # CPU: fp32, no checkpointing unless asked


def test_long_texts_are_cut_so_the_answer_fits(tiny_model_dir):
    from sarcasm_dpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    frame = pd.DataFrame({"text": [" ".join(["evidence argument"] * 200)], "label": [1]})
    ds = sft.build_dataset(tok, frame, max_text_tokens=256, max_length=80)
    prompt_len = len(tok(ds[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert prompt_len <= 80 - 2 and ds[0]["prompt"].endswith("assistant\n") and ds[0]["completion"] == "Yes"
    with pytest.raises(UserError, match="max_length"):
        sft.build_dataset(tok, frame, max_text_tokens=256, max_length=20)


def test_sample_size_is_class_balanced_and_seeded(tiny_model_dir, tmp_path):
    frame = pd.concat([toy_frame(40, 3).query("label == 0"), toy_frame(12, 4).query("label == 1")])
    frame.to_csv(tmp_path / "train.csv", index=False)
    toy_frame(8, 5).to_csv(tmp_path / "val.csv", index=False)
    s = settings(tiny_model_dir, tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "o", sample_size=10)
    train, _ = sft.load_data(s)
    again, _ = sft.load_data(s)
    assert len(train) == 10 and train["label"].sum() == 5
    assert train["text"].tolist() == again["text"].tolist()


# -- the shared 2-epoch run --------------------------------------------------------------------------


def test_run_writes_every_output(trained):
    s, out, summary = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "sft_metrics.json", "sft_training_curves.png", "training_summary.json", "COMPLETE.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # removed after success
    assert not list(out.glob(".tmp-*"))
    assert (out / "sft_training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((out / "training_summary.json").read_text())
    assert saved["config"]["model"] == str(s.model) and saved["config"]["lora_r"] == 16
    assert saved["config"]["lora_alpha"] == 32 and saved["config"]["lora_dropout"] == 0.05
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["trainable_share"] == pytest.approx(saved["trainable_params"] / saved["total_params"])
    assert saved["global_steps"] == 12 and saved["epochs_run"] == 2
    assert saved["data"]["train"] == {"sarcastic": 24, "not_sarcastic": 24, "total": 48}
    assert {"load_s", "train_s", "eval_s", "save_s", "total_s"} <= set(saved["timings"])
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and set(adapter_cfg["target_modules"]) == set(TARGETS)

    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1.0, 2.0]
    for epoch in metrics["epochs"]:
        assert math.isfinite(epoch["train_loss"])
        assert {"accuracy", "precision", "recall", "f1", "roc_auc"} <= set(epoch["gen_val"])
    # The saved epoch is the best by validation F1 (the first of equals).
    f1s = [e["gen_val"]["f1"] for e in metrics["epochs"]]
    best = metrics["epochs"][f1s.index(max(f1s))]
    assert best["selected"] and summary["best_epoch"] == best["epoch"] == saved["best_epoch"]
    assert saved["best_val"] == best["gen_val"]


def test_training_changes_the_adapter_and_lowers_the_loss(trained):
    from safetensors.torch import load_file

    _, out, _ = trained
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    metrics = json.loads((out / "sft_metrics.json").read_text())
    first = metrics["steps"][0]["loss"]
    last_epoch = metrics["epochs"][-1]["train_loss"]
    assert first > math.log(600) - 1  # a random model: near-uniform over the vocabulary
    assert last_epoch < first - 0.3
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]


def test_saved_adapter_reloads_and_scores_as_in_memory(trained):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.metrics import classification_metrics
    from sarcasm_dpo.models import load_base_model, load_tokenizer, pick_device
    from sarcasm_dpo.scoring import Scorer

    s, out, summary = trained
    saved_tok = AutoTokenizer.from_pretrained(str(out))  # the tokenizer saved beside the adapter
    tok = load_tokenizer(s.model)
    assert saved_tok.chat_template == tok.chat_template and saved_tok.get_vocab() == tok.get_vocab()
    model = PeftModel.from_pretrained(load_base_model(s.model, pick_device("cpu")), str(out))
    val = load_split(s.val_csv)
    scores = classification_metrics(val["label"].to_numpy(), Scorer(model, tok).predict_proba(val["text"]))
    for key in ("accuracy", "f1", "roc_auc"):
        assert scores[key] == pytest.approx(summary["best_val"][key], abs=1e-9), key


def test_a_relative_model_path_is_recorded_absolute(tiny_model_dir, tmp_path, monkeypatch):
    # Later commands read the adapter's base model back, maybe from another folder (the original
    # workflow trains from scripts/): a relative path would point nowhere there.
    monkeypatch.chdir(tiny_model_dir.parent)
    s = build(SFTSettings, {"model": f"./{tiny_model_dir.name}"})
    assert s.model == str(tiny_model_dir.resolve())
    assert build(SFTSettings, {"model": "Some/hub-model"}).model == "Some/hub-model"  # not a local path: unchanged


def test_an_old_adapter_with_a_relative_base_path_says_what_to_do(trained, tmp_path, monkeypatch):
    import shutil

    from sarcasm_dpo.models import adapter_base_model

    _, out, _ = trained
    old = tmp_path / "old_adapter"
    shutil.copytree(out, old)
    summary = json.loads((old / "training_summary.json").read_text())
    summary["config"]["model"] = "../models/base"  # as a run made before paths were kept absolute
    (old / "training_summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"records the base model as '\.\./models/base', a path relative.*--model"):
        adapter_base_model(old)


def test_output_folder_of_another_run_is_refused(trained, tiny_model_dir, toy_csvs, capsys):
    s, out, _ = trained
    code = main(["sft", "--no_wandb", "--model", str(tiny_model_dir), "--train_csv", str(toy_csvs[0]),
                 "--val_csv", str(toy_csvs[1]), "--output_dir", str(out), "--lr", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "another run" in err and "--overwrite" in err
    assert (out / "COMPLETE.json").is_file()  # the refused run touched nothing


def test_resume_on_a_finished_folder_returns_its_summary(trained):
    s, out, summary = trained
    again = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert again["best_val"] == summary["best_val"] and (out / "COMPLETE.json").is_file()


# -- errors, divergence, resume --------------------------------------------------------------------


def test_missing_train_csv_exits_2_with_the_path(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    code = main(["sft", "--no_wandb", "--model", str(tiny_model_dir), "--train_csv", str(missing),
                 "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err


def test_unknown_lora_target_lists_the_real_ones(tiny_model_dir, toy_csvs, tmp_path):
    with pytest.raises(UserError, match="q_proj"):
        sft.run(settings(tiny_model_dir, *toy_csvs, tmp_path / "o", lora_targets=["query"]))


class _PoisonWeights(TrainerCallback):
    """Make the forward pass produce NaN from the second step on."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.data.fill_(float("nan"))


def test_nan_loss_stops_with_the_step_number(tiny_model_dir, toy_csvs, tmp_path):
    with pytest.raises(TrainingDiverged, match="step 2"):
        sft.run(settings(tiny_model_dir, *toy_csvs, tmp_path / "o", epochs=1), extra_callbacks=[_PoisonWeights()])
    assert not (tmp_path / "o" / "COMPLETE.json").exists()


class _Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_from_its_checkpoint(tiny_model_dir, toy_csvs, tmp_path):
    out = tmp_path / "sft"
    s = settings(tiny_model_dir, *toy_csvs, out, batch_size=16, save_steps=2)  # 3 steps per epoch
    with pytest.raises(KeyboardInterrupt):
        sft.run(s, extra_callbacks=[_Interrupt(at_step=5)])
    assert not (out / "COMPLETE.json").exists()
    checkpoint = latest_checkpoint(out / "checkpoints", sft.STATE_FILE)
    assert checkpoint is not None and checkpoint.name == "checkpoint-4"
    state = json.loads((checkpoint / sft.STATE_FILE).read_text())
    half_written = out / "checkpoints" / "checkpoint-5"  # killed before our state file: not resumable
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(out / "checkpoints", sft.STATE_FILE) == checkpoint
    assert [h["epoch"] for h in state["history"]] == [1.0]  # epoch 1 was evaluated before the interrupt

    with pytest.raises(UserError, match="--resume"):  # not silently restarted over the checkpoints
        sft.run(s)
    with pytest.raises(UserError, match="other settings"):
        sft.run(build(SFTSettings, {**vars(s), "resume": True, "lr": 0.1}))

    summary = sft.run(build(SFTSettings, {**vars(s), "resume": True}))
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_steps"] == 6
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1.0, 2.0]
    assert metrics["epochs"][0]["gen_val"] == state["history"][0]["gen_val"]  # restored, not recomputed
    assert (out / "COMPLETE.json").is_file() and not (out / "checkpoints").exists()


def test_tracker_log_callback_forwards_train_keys():
    from transformers import TrainerControl, TrainerState

    from sarcasm_dpo.training.callbacks import TrackerLogCallback

    logged = []
    callback = TrackerLogCallback(lambda values, step: logged.append((step, values)))
    state = TrainerState()
    state.global_step = 7
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.5, "learning_rate": 1e-4, "grad_norm": 0.3,
                                                          "epoch": 0.5, "train_runtime": 9.0})
    assert logged == [(7, {"train/loss": 1.5, "train/learning_rate": 1e-4, "train/grad_norm": 0.3,
                           "train/epoch": 0.5})]
    control = TrainerControl()
    callback.on_epoch_end(None, state, control)
    assert control.should_log


# -- the script door ---------------------------------------------------------------------------------


def test_finetune_script_runs_one_epoch(tiny_model_dir, toy_csvs, tmp_path, capsys):
    out = tmp_path / "script-sft"
    code = run_script(
        "finetune_qwen.py", "--no_wandb", "--epochs", "1",
        "--model", str(tiny_model_dir), "--train_csv", str(toy_csvs[0]), "--val_csv", str(toy_csvs[1]),
        "--output_dir", str(out), "--sample_size", "16", "--batch_size", "8", "--lora_targets", "q_proj,v_proj")
    proc = capsys.readouterr()
    assert code == 0, proc.err[-3000:]
    assert "SFT finished" in proc.out
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"]["epochs"] == 1 and summary["data"]["train"]["total"] == 16
    assert (out / "adapter_model.safetensors").is_file() and (out / "COMPLETE.json").is_file()


@pytest.mark.slow
def test_learns_the_toy_rule(tiny_model_dir, tmp_path):
    """Train until the rule is learned. The stock tiny model's logits are capped near 1 (normed
    64-dim states against tied embeddings of norm ~0.16), too flat to separate the classes in a
    few epochs, so this copy scales the embeddings by 10; nothing else changes."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "tiny-x10"
    shutil.copytree(tiny_model_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(str(model_dir))
    toy_frame(64, 1).to_csv(tmp_path / "train.csv", index=False)
    toy_frame(24, 2).to_csv(tmp_path / "val.csv", index=False)
    summary = sft.run(settings(model_dir, tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "o",
                               epochs=12, lr=1e-2, seed=42))
    assert summary["best_val"]["roc_auc"] >= 0.85 and summary["best_val"]["f1"] >= 0.7


def test_the_saved_threshold_is_chosen_on_validation_scores_of_the_saved_epoch(trained):
    """threshold.json beside the adapter: from the best epoch's GEN validation scores, never the test split."""
    from sarcasm_dpo.metrics import classification_metrics
    from sarcasm_dpo.thresholds import read_threshold, threshold_record_from_validation

    s, out, summary = trained
    record = read_threshold(out)
    assert record["split"] == "gen_val" and record["criterion"] == "balanced_accuracy"
    assert record["n"] == summary["best_val"]["n"] and 0 <= record["threshold"] <= 1
    # Its metrics at 0.5 are the saved epoch's validation metrics: the scores are the saved model's.
    at_half = record["val_metrics_at_0.5"]
    assert at_half["accuracy"] == summary["best_val"]["accuracy"] and at_half["f1"] == summary["best_val"]["f1"]
    assert "contextual_calibration" in record and 0 <= record["contextual_calibration"]["threshold"] <= 1
    # Recomputed independently from the saved adapter's validation scores, the record is the same.
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.sampling import stratified_sample
    from sarcasm_dpo.models import attach_adapter, load_base_model, load_tokenizer
    from sarcasm_dpo.scoring import Scorer

    tok = load_tokenizer(s.model)
    model = attach_adapter(load_base_model(s.model, "cpu"), out)
    val = load_split(s.val_csv)
    val = stratified_sample(val, s.val_sample_size, s.seed) if s.val_sample_size else val
    probs = Scorer(model, tok, max_text_tokens=s.max_text_tokens).predict_proba(val["text"].tolist())
    assert classification_metrics(val["label"].to_numpy(), probs)["f1"] == pytest.approx(summary["best_val"]["f1"])
    again = threshold_record_from_validation(val["label"].to_numpy(), probs)
    assert again["best_cut"] == pytest.approx(record["best_cut"], abs=1e-4)
    assert summary["outputs"]["threshold"] == "threshold.json"
    assert not list(out.parent.glob(".staging-*")) and not list(out.parent.glob(".old-*"))


def test_eval_steps_scores_validation_within_an_epoch_and_keeps_the_best(tiny_model_dir, toy_csvs, tmp_path):
    # 48 examples at batch 8: 6 steps per epoch; --eval_steps 2 scores at steps 2, 4, 6 (epoch end once).
    out = tmp_path / "sft"
    # logging_steps 5 does not divide 2: each evaluation must still close its own loss window.
    summary = sft.run(settings(tiny_model_dir, *toy_csvs, out, epochs=1, eval_steps=2, logging_steps=5))
    metrics = json.loads((out / "sft_metrics.json").read_text())
    evaluated = [(e["step"], e["epoch"]) for e in metrics["epochs"]]
    assert [step for step, _ in evaluated] == [2, 4, 6], evaluated
    assert {2, 4, 6} <= {row["step"] for row in metrics["steps"]}
    # Each evaluation's train_loss is its own two steps' mean, not the epoch's mean copied thrice.
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert len(set(losses)) == 3, losses
    assert sum(losses) / 3 == pytest.approx(metrics["train_loss_mean"])
    selected = [e for e in metrics["epochs"] if e["selected"]]
    assert len(selected) == 1
    best_f1 = max(e["gen_val"]["f1"] for e in metrics["epochs"])
    assert selected[0]["gen_val"]["f1"] == best_f1 and summary["best_val"]["f1"] == best_f1
    assert (out / "COMPLETE.json").is_file() and not (out / "checkpoints").exists()


def test_eval_steps_must_not_be_negative():
    with pytest.raises(UserError, match=r"--eval_steps must be 0 \(each epoch\) or a positive count, got -3"):
        build(SFTSettings, {"eval_steps": -3})
