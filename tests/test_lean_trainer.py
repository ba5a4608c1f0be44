"""The lean training step (training/lean_step.py): the same numbers as the plain TRL trainers, less work per step.

Each comparison trains the tiny model twice from the same seed, once with the stage's trainer and
once with `lean` replaced by the identity (TRL's trainer as it comes), and compares the logged
losses and metrics and the trained LoRA weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dpo import dpo_settings, make_sft_adapter, write_toy_splits
from test_sft import settings as sft_settings
from test_sft import toy_frame

from sarcasm_dpo.stages import dpo, sft
from sarcasm_dpo.training.resilience import TrainingDiverged

TOL = 1e-5
METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen",
           "logits/rejected")


def _lora(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and ".ref." not in n}


def _root_train_calls(trainer) -> int:
    """Runs `trainer.train()`, counting `train()` calls on its root model (nn.Module.train recurses into
    every submodule, so only the root's calls are counted)."""
    calls = [0]
    original = torch.nn.Module.train

    def train(module, mode=True):
        if module is trainer.model:
            calls[0] += 1
        return original(module, mode)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "train", train)
        trainer.train()
    return calls[0]


def _sft_trainer(tiny_model_dir, tmp_path, plain: bool, monkeypatch, **overrides):
    from sarcasm_dpo.models import load_base_model, load_tokenizer

    import transformers

    if plain:
        monkeypatch.setattr(sft, "lean", lambda cls: cls)
    train = toy_frame(32, 1)
    s = sft_settings(tiny_model_dir, "unused.csv", "unused.csv", tmp_path / "out",
                     **{"epochs": 1, "batch_size": 4, "grad_accum": 2, "logging_steps": 1, **overrides})
    transformers.set_seed(s.seed)
    tokenizer = load_tokenizer(s.model)
    model = load_base_model(s.model, torch.device("cpu"))
    ds = sft.build_dataset(tokenizer, train, s.max_text_tokens, s.max_length)
    trainer = sft.build_trainer(s, model, tokenizer, ds, tmp_path / "ckpt")
    monkeypatch.undo() if plain else None
    return trainer


def _logged(trainer) -> list[dict]:
    return [{k: e[k] for k in METRICS if k in e} | {"step": e["step"]} for e in trainer.state.log_history
            if "loss" in e]


def _assert_same_run(lean_trainer, plain_trainer) -> None:
    lean_log, plain_log = _logged(lean_trainer), _logged(plain_trainer)
    assert [e["step"] for e in lean_log] == [e["step"] for e in plain_log] and lean_log
    for a, b in zip(lean_log, plain_log):
        assert set(a) == set(b), (a, b)
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=TOL, rel=TOL), (a["step"], key)
    lean_w, plain_w = _lora(lean_trainer.model), _lora(plain_trainer.model)
    assert lean_w.keys() == plain_w.keys() and lean_w
    assert max(float((lean_w[k] - plain_w[k]).abs().max()) for k in lean_w) <= TOL


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_sft_lean_step_matches_the_plain_trainer(tiny_model_dir, tmp_path, monkeypatch, shared_prefix):
    plain = _sft_trainer(tiny_model_dir, tmp_path / "plain", True, monkeypatch, shared_prefix=shared_prefix)
    plain_calls = _root_train_calls(plain)
    lean = _sft_trainer(tiny_model_dir, tmp_path / "lean", False, monkeypatch, shared_prefix=shared_prefix)
    lean_calls = _root_train_calls(lean)
    # With the shared prefix and LoRA dropout on, equal runs also prove that the prefix check's eval()/train()
    # inside the first step gives the model its training mode (and dropout) back under the lean trainer.
    _assert_same_run(lean, plain)
    assert lean.state.global_step == 4
    # TRL's trainer calls model.train() at each of the 8 micro-batches; the lean one only when the model is
    # not in training mode (PEFT hands it over in training mode already: no call at all here). The shared-prefix
    # check, once in the first step, adds its own eval() and train() to both.
    check = 2 if shared_prefix else 0
    assert plain_calls == 8 + check and lean_calls - check == lean.model_train_calls <= 1
    assert lean.state.total_flos == pytest.approx(plain.state.total_flos, rel=1e-9) and lean.state.total_flos > 0


def test_sft_metrics_only_on_logging_steps(tiny_model_dir, tmp_path, monkeypatch):
    plain = _sft_trainer(tiny_model_dir, tmp_path / "plain", True, monkeypatch, logging_steps=3, epochs=2)
    plain.train()
    lean = _sft_trainer(tiny_model_dir, tmp_path / "lean", False, monkeypatch, logging_steps=3, epochs=2)
    lean.train()
    # 4 steps per epoch: logs at 1 (first step), 3, 6; the stage also logs at each epoch end (4, 8),
    # so the metrics are computed there too (and dropped when, as in this bare trainer, no log comes)
    assert lean.metric_steps == [1, 3, 4, 6, 8], (lean.metric_steps, lean.state.max_steps)
    lean_log, plain_log = _logged(lean), _logged(plain)
    assert [e["step"] for e in lean_log] == [e["step"] for e in plain_log] == [1, 3, 6]
    for a, b in zip(lean_log, plain_log):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL)  # the loss still covers every step
        assert a["num_tokens"] == b["num_tokens"]  # every batch is counted, on the device between logs
        assert "entropy" in a and "mean_token_accuracy" in a
    # logged at every step of its window, the value is the mean of the logging step's micro-batches only
    assert lean_log[0]["entropy"] == pytest.approx(plain_log[0]["entropy"], abs=TOL)
    w_lean, w_plain = _lora(lean.model), _lora(plain.model)
    assert max(float((w_lean[k] - w_plain[k]).abs().max()) for k in w_lean) <= TOL


def _dpo_trainer(tiny_model_dir, tmp_path, plain: bool, monkeypatch, **overrides):
    from sarcasm_dpo.models import adapter_base_model, load_tokenizer

    import transformers

    paths = write_toy_splits(tmp_path / "splits")
    sft_dir = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    s = dpo_settings(type("Toy", (), {"sft": sft_dir, "paths": paths}), tmp_path / "out",
                     **{"epochs": 1, "batch_size": 2, "grad_accum": 2, "sample_size": 16, "val_sample_size": 8,
                        "probe_size": 4, **overrides})
    if plain:
        import sarcasm_dpo.training.lean_step as lean_module

        monkeypatch.setattr(lean_module, "lean", lambda cls: cls)
    base = adapter_base_model(sft_dir)
    tokenizer = load_tokenizer(base)
    data = dpo.load_data(s, tokenizer)
    transformers.set_seed(s.seed)
    model = dpo.load_policy(base, sft_dir, torch.device("cpu"))
    trainer, validation, diagnostics = dpo.build_trainer(s, model, tokenizer, data, tmp_path / "ckpt",
                                                         printer=lambda *a: None)
    if plain:
        monkeypatch.undo()
    return trainer, diagnostics


def _count_adapter_switches(monkeypatch) -> list:
    from peft import PeftModel

    calls = []
    original = PeftModel.set_adapter

    def set_adapter(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "set_adapter", set_adapter)
    return calls


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_dpo_lean_step_matches_the_plain_trainer(tiny_model_dir, tmp_path, monkeypatch, precompute_ref):
    plain, _ = _dpo_trainer(tiny_model_dir, tmp_path / "plain", True, monkeypatch, precompute_ref=precompute_ref)
    plain_switches = _count_adapter_switches(monkeypatch)
    plain.train()
    plain_count = len(plain_switches)
    monkeypatch.undo()
    lean, _ = _dpo_trainer(tiny_model_dir, tmp_path / "lean", False, monkeypatch, precompute_ref=precompute_ref)
    lean_switches = _count_adapter_switches(monkeypatch)
    lean.train()
    monkeypatch.undo()
    _assert_same_run(lean, plain)
    steps = lean.state.global_step
    assert steps == 4 and lean.model_train_calls <= 1
    # TRL: to "ref" and back at each of the 2 micro-batches of a step; lean: one visit per step. (The probe's
    # reference pass of the diagnostics adds its own visits in both runs alike.)
    # With the reference precomputed (fast_dpo.py) no step visits "ref" at all, in either trainer.
    assert plain_count - len(lean_switches) == (0 if precompute_ref else 2 * steps)


def test_dpo_diagnostics_cadence(tiny_model_dir, tmp_path, monkeypatch):
    trainer, diagnostics = _dpo_trainer(tiny_model_dir, tmp_path, False, monkeypatch, diagnostics_steps=3,
                                        sample_size=24, grad_accum=1, batch_size=2)
    trainer.train()  # 12 steps, a log at each
    with_kl = [r["step"] for r in diagnostics.records if "dpo/kl" in r]
    logged = [r["step"] for r in diagnostics.records]
    assert logged == list(range(13))
    assert with_kl == [0, 3, 6, 9, 12]  # step 0, every 3rd logged step; 12 is also the last (and evaluated)
    for record in diagnostics.records[1:]:
        assert "rewards/margins" in record and "dpo/reward_ratio" in record
    # default: about four times per epoch
    default, default_diag = _dpo_trainer(tiny_model_dir, tmp_path / "default", False, monkeypatch,
                                         sample_size=24, grad_accum=1, batch_size=2, diagnostics_steps=0)
    default_diag.on_train_begin(default.args, default.state, default.control, model=default.model,
                                train_dataloader=default.get_train_dataloader())
    assert default_diag._every == 3


def test_exploding_weights_stop_with_the_step(tiny_model_dir, tmp_path):
    """--lr 1e9 keeps every number finite while it wrecks the adapter; the run stops at the first such step."""
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import SFTSettings

    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    toy_frame(32, 1).to_csv(train, index=False)
    toy_frame(8, 2).to_csv(val, index=False)
    s = build(SFTSettings, {**vars(sft_settings(tiny_model_dir, train, val, tmp_path / "out")), "lr": 1e9,
                            "warmup_ratio": 0.0, "epochs": 1, "batch_size": 4})
    with pytest.raises(TrainingDiverged) as info:
        sft.run(s)
    message = str(info.value)
    assert "exploded" in message and "at optimizer step 1" in message and "--lr" in message
    assert not (tmp_path / "out" / "COMPLETE.json").exists()


def test_the_step_check_names_a_nan_loss_before_the_update(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _sft_trainer(tiny_model_dir, tmp_path, False, monkeypatch)
    before = _lora(trainer.model)
    original = type(trainer).compute_loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * math.nan if self.state.global_step == 2 else loss

    monkeypatch.setattr(type(trainer), "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    assert info.value.step == 3 and "NaN or infinite" in str(info.value)
    after = _lora(trainer.model)
    assert all(bool(torch.isfinite(after[k]).all()) for k in after) and any(
        not torch.equal(after[k], before[k]) for k in after)  # steps 1-2 applied, step 3 not


def test_unusual_lr_and_beta_warn(tiny_model_dir, tmp_path):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import DPOSettings, check_training_settings

    with pytest.warns(UserWarning, match=r"--lr 1e\+09 is outside its usual range"):
        check_training_settings(sft_settings(tiny_model_dir, "t.csv", "v.csv", tmp_path, lr=1e9))
    with pytest.warns(UserWarning, match="--beta 50 is outside its usual range"):
        build(DPOSettings, {"beta": 50.0})  # DPOSettings.validate holds the rule
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(DPOSettings, {})  # the defaults are usual
        check_training_settings(sft_settings(tiny_model_dir, "t.csv", "v.csv", tmp_path, lr=2e-4))


def test_sft_epoch_end_log_keeps_its_steps_metrics(tiny_model_dir, tmp_path, monkeypatch):
    """The stage forces a log at each epoch's end (TrackerLogCallback), after the Trainer's in-loop log was
    skipped: that log still carries TRL's metrics of its own step."""
    from sarcasm_dpo.training.callbacks import TrackerLogCallback

    lean = _sft_trainer(tiny_model_dir, tmp_path / "lean", False, monkeypatch, logging_steps=3, epochs=2)
    lean.add_callback(TrackerLogCallback(lambda *_a: None))
    lean.train()
    logged = {e["step"]: e for e in lean.state.log_history if "loss" in e}
    assert {4, 8} <= set(logged), sorted(logged)  # the epoch ends (4 steps per epoch)
    for step in (4, 8):
        assert "entropy" in logged[step] and "mean_token_accuracy" in logged[step], logged[step]


def test_a_resumed_run_keeps_the_blow_up_guards_references(tiny_model_dir, tmp_path, monkeypatch):
    """The loss limit is LOSS_FACTOR x max(first step's loss, 1) and the weight limit WEIGHT_FACTOR x the starting
    norm: a resumed run used to take its own first step and its checkpoint's weights as those references, so it
    stopped (or not) where the uninterrupted run would not. They now travel in the checkpoint's trainer state."""
    import json

    whole = _sft_trainer(tiny_model_dir, tmp_path / "whole", False, monkeypatch, save_steps=2)
    whole.train()
    first_loss, start_norm = whole._lean_first_loss, whole._lean_start_norm
    assert first_loss is not None and start_norm is not None
    checkpoint = tmp_path / "whole" / "ckpt" / "checkpoint-2"

    seen = {}
    resumed = _sft_trainer(tiny_model_dir, tmp_path / "resumed", False, monkeypatch, save_steps=2)
    original = type(resumed)._check_step

    def spy(self, grad_norm=None):  # the references in force at each step the resumed run checks
        original(self, grad_norm)
        seen[self.state.global_step + 1] = (self._lean_first_loss, self._lean_start_norm)

    monkeypatch.setattr(type(resumed), "_check_step", spy)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(seen) == [3, 4]  # steps 3 and 4 ran here, after the checkpoint of step 2
    assert all(refs == (first_loss, start_norm) for refs in seen.values()), (seen, first_loss, start_norm)
    # Where they travel: the trainer state every checkpoint saves.
    from sarcasm_dpo.training.lean_step import GUARD_STATE

    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][GUARD_STATE]
    assert saved == {"first_loss": first_loss, "start_norm": start_norm}
    # A fresh run (no checkpoint) starts without references and takes its own.
    fresh = _sft_trainer(tiny_model_dir, tmp_path / "fresh", False, monkeypatch, save_steps=2)
    fresh.train()
    assert (fresh._lean_first_loss, fresh._lean_start_norm) == (first_loss, start_norm)  # same seed, same figures
