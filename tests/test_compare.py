"""Compare stage on the tiny model: outputs agree with each other, flags are honoured, errors are clear.

"SFT" and "DPO" are fresh random LoRA adapters (lora_B not zero, so each moves the predictions);
the test sets are small GEN-like CSVs. One full comparison is shared by most tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_script
from sklearn.metrics import f1_score

from sarcasm_dpo import baseline, cli, metrics, models, tracking
from sarcasm_dpo.stages.compare import run
from sarcasm_dpo.config import build
from sarcasm_dpo.settings import CompareSettings

MODEL_KEYS = ["base", "sft", "dpo", "tfidf_logreg"]

SARC = "oh great just what i needed love it wonderful thanks for nothing totally".split()
PLAIN = "the meeting is at three please bring the report we agreed on the plan today".split()


def gen_like(n: int, seed: int, prefix: str) -> pd.DataFrame:
    """n texts, half sarcastic; word choice follows the label so a TF-IDF model can learn it."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choice(SARC if label else PLAIN, size=6)
        rows.append({"text": f"{prefix} {i} " + " ".join(words), "label": label, "source": "gen", "id": f"{prefix}{i}"})
    return pd.DataFrame(rows)


def make_adapter(base_dir: Path, folder: Path, seed: int, summary: dict | None = None) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    if summary is not None:
        (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


class FakeTracker:
    """Records what the compare stage sends to W&B (the real Tracker is tested in test_tracking)."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.tables, self.images, self.inputs, self.outputs = kwargs, {}, {}, {}, [], []
        self.summary = {}
        FakeTracker.instances.append(self)

    active = True

    def log(self, values, step=None):
        self.logged.update(tracking.flatten(values))

    def log_table(self, key, frame, step=None):
        self.tables[key] = frame

    def log_image(self, key, path, step=None):
        self.images[key] = Path(path)

    def log_summary(self, values):
        self.summary.update(values)

    def use_artifact(self, path, type, name=None):
        self.inputs.append((str(path), type, name))

    def log_artifact(self, path, name, type, metadata=None, aliases=None):
        self.outputs.append((str(path), name, type))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train, test, extra = gen_like(60, 0, "train"), gen_like(40, 1, "test"), gen_like(16, 2, "extra")
    paths = {}
    for name, frame in (("train", train), ("test", test), ("extra", extra)):
        paths[name] = root / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    sft = make_adapter(tiny_model_dir, root / "sft", seed=1,
                       summary={"config": {"model": str(tiny_model_dir), "max_text_tokens": 256}})
    dpo = make_adapter(tiny_model_dir, root / "dpo", seed=2)
    return {"root": root, "train": paths["train"], "test": paths["test"], "extra": paths["extra"], "sft": sft,
            "dpo": dpo, "test_frame": test, "model": tiny_model_dir}


def settings(setup, out: Path, **overrides) -> CompareSettings:
    values = dict(test_csv=str(setup["test"]), train_csv=str(setup["train"]), sft_model=str(setup["sft"]),
                  dpo_model=str(setup["dpo"]), output_dir=str(out), no_wandb=True, n_bootstrap=300,
                  batch_size=16, device="cpu")
    values.update(overrides)
    return build(CompareSettings, values)


@pytest.fixture(scope="module")
def full_run(setup):
    """One comparison of all four models plus an extra test set, counting base-model loads."""
    loads = []
    real_load = models.load_base_model
    FakeTracker.instances.clear()

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    out = setup["root"] / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_base_model", counting_load)
        mp.setattr(tracking, "Tracker", FakeTracker)
        results = run(settings(setup, out, no_wandb=False, extra_test=[f"extra={setup['extra']}"]))
    return {"results": results, "out": out, "loads": loads, "tracker": FakeTracker.instances[-1]}


def recomputed(frame: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    labels = frame["label"].to_numpy(int)
    return labels, (frame[f"p_{key}"].to_numpy(float) >= 0.5).astype(int)


def test_every_output_is_written_and_agrees_with_the_predictions(full_run, setup):
    out, results = full_run["out"], full_run["results"]
    for name in ("model_comparison_results.json", "model_comparison_plot.png", "predictions.csv",
                 "predictions_extra.csv", "COMPLETE.json"):
        assert (out / name).is_file(), name
    assert (out / "model_comparison_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "model_comparison_results.json").read_text())
    assert saved["models"].keys() == set(MODEL_KEYS)
    assert saved == json.loads(json.dumps(results))  # what run() returns is what was saved

    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["id", "text", "label", *[f"p_{k}" for k in MODEL_KEYS]]
    assert list(preds["id"]) == list(setup["test_frame"]["id"])
    assert list(preds["label"]) == list(setup["test_frame"]["label"])
    for key in MODEL_KEYS:
        m = saved["models"][key]
        labels, pred = recomputed(preds, key)
        assert m["n"] == 40
        assert m["accuracy"] == pytest.approx((labels == pred).mean(), abs=1e-12)
        assert m["f1"] == pytest.approx(f1_score(labels, pred, zero_division=0), abs=1e-12)
        tn, fp, fn, tp = np.ravel(m["confusion_matrix"])
        assert (tn, fp, fn, tp) == (((labels == 0) & (pred == 0)).sum(), ((labels == 0) & (pred == 1)).sum(),
                                    ((labels == 1) & (pred == 0)).sum(), ((labels == 1) & (pred == 1)).sum())
        for metric in ("accuracy", "f1"):
            low, high = m[f"{metric}_ci"]
            assert low <= m[metric] <= high
            # The interval is the shared bootstrap on these very predictions, same seed and resamples.
            assert [low, high] == list(metrics.bootstrap_ci(labels, pred, metric, n_resamples=300, seed=42))

    test_set = saved["test_set"]
    assert test_set["n"] == test_set["n_total"] == 40
    assert test_set["class_counts"] == {"sarcastic": 20, "not_sarcastic": 20, "total": 40}
    from sarcasm_dpo.data import file_sha256

    assert test_set["sha256"] == file_sha256(setup["test"])
    assert saved["model_paths"]["sft"] == str(setup["sft"]) and saved["model_paths"]["dpo"] == str(setup["dpo"])
    assert saved["model_paths"]["base"] == str(setup["model"])  # read from the SFT training summary
    assert saved["config"]["test_csv"] == str(setup["test"])
    assert json.loads((out / "COMPLETE.json").read_text())["stage"] == "compare"


def test_one_base_model_and_adapters_really_switch(full_run):
    assert len(full_run["loads"]) == 1
    preds = pd.read_csv(full_run["out"] / "predictions.csv")
    # Each random adapter changes the scores; identical columns would mean the switch did nothing.
    assert not np.allclose(preds["p_sft"], preds["p_base"])
    assert not np.allclose(preds["p_dpo"], preds["p_sft"])
    assert not np.allclose(preds["p_dpo"], preds["p_base"])


def test_base_scores_equal_the_plain_base_model(full_run, setup):
    """Base is scored with adapters disabled: it must match a model that never had adapters."""
    from sarcasm_dpo.scoring import Scorer

    model, tokenizer = models.load_model(str(setup["model"]), device=models.pick_device("cpu"))
    probs = Scorer(model, tokenizer, batch_size=16).predict_proba(setup["test_frame"]["text"].tolist())
    preds = pd.read_csv(full_run["out"] / "predictions.csv")
    np.testing.assert_allclose(preds["p_base"], probs, atol=1e-6)


def test_mcnemar_and_improvements_match_hand_computation(full_run):
    saved = json.loads((full_run["out"] / "model_comparison_results.json").read_text())
    preds = pd.read_csv(full_run["out"] / "predictions.csv")
    assert {"sft_vs_base", "dpo_vs_sft"} <= saved["significance"].keys()
    assert {"sft_vs_base", "dpo_vs_base", "dpo_vs_sft"} <= saved["improvements_pp"].keys()
    for pair, test in saved["significance"].items():
        new, old = pair.split("_vs_")
        labels, a = recomputed(preds, new)
        _, b = recomputed(preds, old)
        # Discordant items, then the exact two-sided binomial tail by hand.
        n01 = int(((a == labels) & (b != labels)).sum())
        n10 = int(((a != labels) & (b == labels)).sum())
        n = n01 + n10
        p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2 ** n)
        assert (test["a_right_b_wrong"], test["a_wrong_b_right"]) == (n01, n10)
        assert test["p_value"] == pytest.approx(p, rel=1e-9)
        assert test == {**metrics.mcnemar_exact(labels, a, b), "verdict": test["verdict"], "alpha": 0.05,
                        "test": "exact McNemar test (two-sided binomial on the items where the two models disagree)"}
        if p < 0.05:
            assert " at p<0.05" in test["verdict"]
        else:
            assert test["verdict"].startswith("no significant difference")
        acc_new, acc_old = (labels == a).mean(), (labels == b).mean()
        assert saved["improvements_pp"][pair]["accuracy"] == pytest.approx(round(100 * (acc_new - acc_old), 2))


def test_extra_test_set_has_its_own_predictions(full_run):
    saved = json.loads((full_run["out"] / "model_comparison_results.json").read_text())
    block = saved["extra_tests"]["extra"]
    preds = pd.read_csv(full_run["out"] / "predictions_extra.csv")
    assert block["test_set"]["n"] == len(preds) == 16
    assert block["test_set"]["overlap_with_train"] == 0
    for key in MODEL_KEYS:
        labels, pred = recomputed(preds, key)
        assert block["models"][key]["accuracy"] == pytest.approx((labels == pred).mean(), abs=1e-12)
    assert "dpo_vs_sft" in block["significance"]


def test_tfidf_baseline_learns_the_words(full_run):
    # The toy classes use disjoint vocabularies: a working TF-IDF + logistic regression separates them.
    assert full_run["results"]["models"]["tfidf_logreg"]["accuracy"] >= 0.9


def test_tracker_gets_metrics_tables_plot_and_inputs(full_run, setup):
    tracker = full_run["tracker"]
    assert tracker.kwargs["job_type"] == "compare"
    results = full_run["results"]
    for key in MODEL_KEYS:
        assert tracker.logged[f"compare/{key}/accuracy"] == results["models"][key]["accuracy"]
    assert tracker.logged["compare/mcnemar_p/dpo_vs_sft"] == results["significance"]["dpo_vs_sft"]["p_value"]
    assert "extra_extra/dpo/f1" in tracker.logged
    assert {"compare/table", "compare/confusion_matrices", "compare/predictions"} <= tracker.tables.keys()
    assert len(tracker.tables["compare/table"]) == 4 and len(tracker.tables["compare/predictions"]) == 40
    assert tracker.images["compare/plot"] == full_run["out"] / "model_comparison_plot.png"
    assert (str(setup["sft"]), "model", "sft-adapter") in tracker.inputs
    assert (str(setup["dpo"]), "model", "dpo-adapter") in tracker.inputs
    assert tracker.summary["verdicts"]["dpo_vs_sft"] == results["significance"]["dpo_vs_sft"]["verdict"]


def test_script_with_skip_base_and_sample_size(setup, capsys):
    out = setup["root"] / "results_small"
    code = run_script(
        "compare_all_models.py", "--no_wandb", "--skip_base",
        "--sample_size", "20", "--test_csv", str(setup["test"]), "--train_csv", str(setup["train"]),
        "--sft_model", str(setup["sft"]), "--dpo_model", str(setup["dpo"]), "--output_dir", str(out),
        "--batch_size", "8", "--n_bootstrap", "200", "--device", "cpu")
    proc = capsys.readouterr()
    assert code == 0, proc.err[-3000:]
    saved = json.loads((out / "model_comparison_results.json").read_text())
    assert set(saved["models"]) == {"sft", "dpo", "tfidf_logreg"}
    assert not any("base" in pair.split("_vs_") for pair in saved["improvements_pp"])
    assert "sft_vs_base" not in saved["significance"] and "dpo_vs_sft" in saved["significance"]
    assert saved["test_set"]["n"] == 20 and saved["test_set"]["n_total"] == 40
    assert saved["test_set"]["class_counts"] == {"sarcastic": 10, "not_sarcastic": 10, "total": 20}
    preds = pd.read_csv(out / "predictions.csv")
    assert "p_base" not in preds.columns and len(preds) == 20
    assert set(preds["id"]) <= set(setup["test_frame"]["id"])
    for key in ("sft", "dpo", "tfidf_logreg"):
        labels, pred = recomputed(preds, key)
        assert saved["models"][key]["accuracy"] == pytest.approx((labels == pred).mean(), abs=1e-12)
    # The readable table and verdict lines reach the terminal.
    assert "Accuracy [95% CI]" in proc.out and "DPO" in proc.out and "DPO vs SFT:" in proc.out
    assert "Base " not in proc.out
    # One progress bar per model, each labelled with the model it scores (not three bare "scoring:" bars).
    assert "scoring sft:" in proc.err and "scoring dpo:" in proc.err
    assert "scoring base:" not in proc.err and "scoring:" not in proc.err


def test_without_dpo_and_baseline_and_reusing_the_results_folder(setup):
    out = setup["root"] / "results_reuse"
    first = run(settings(setup, out, dpo_model="none", no_baseline=True, sample_size=10,
                         extra_test=[f"extra={setup['extra']}"]))
    assert set(first["models"]) == {"base", "sft"}
    assert set(first["significance"]) == {"sft_vs_base"}
    assert (out / "predictions_extra.csv").is_file()
    # A second comparison with other settings is refused without --overwrite (the first stays whole); with
    # it, the folder is replaced whole: the first run's extra predictions do not stay behind.
    from sarcasm_dpo.errors import UserError

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="settings differ in: dpo_model"):
        run(settings(setup, out, dpo_model="", no_baseline=True, sample_size=12))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = run(settings(setup, out, dpo_model="", no_baseline=True, sample_size=12, overwrite=True))
    assert second["test_set"]["n"] == 12
    assert not (out / "predictions_extra.csv").exists()
    assert list(pd.read_csv(out / "predictions.csv").columns) == ["id", "text", "label", "p_base", "p_sft"]


def test_dpo_that_kept_the_sft_adapter_is_named_in_plot_and_table(setup, capsys, monkeypatch, tmp_path):
    """A DPO run that never beat its SFT start saves the SFT adapter: compare says why the bars are equal."""
    from sarcasm_dpo import plots

    titles = []
    real_plot = plots.plot_comparison
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **kw: titles.append(kw["title"]) or real_plot(*a, **kw))
    kept = make_adapter(setup["model"], tmp_path / "dpo_kept", seed=1, summary={"improved_over_sft": False})
    (kept / "training_summary.json").rename(kept / "dpo_training_summary.json")
    from sarcasm_dpo.thresholds import write_threshold

    write_threshold(kept, {"threshold": 0.6, "split": "gen_val"})  # so a block at the models' own thresholds follows
    results = run(settings(setup, tmp_path / "out", dpo_model=str(kept), skip_base=True, no_baseline=True,
                           sample_size=10))
    out = capsys.readouterr().out
    assert results["dpo_kept_sft"] is True
    assert out.count("DPO = SFT: early stopping kept the SFT adapter") == 2  # under both blocks
    assert "DPO = SFT: early stopping kept the SFT adapter" in titles[-1]
    # A DPO run that did improve (the shared full run's adapter has no such record) gets no such note.
    assert run(settings(setup, tmp_path / "out2", skip_base=True, no_baseline=True, sample_size=10))["dpo_kept_sft"] is False
    assert "early stopping kept" not in capsys.readouterr().out and "early stopping kept" not in titles[-1]


def test_models_are_also_reported_at_their_own_validation_thresholds(setup, capsys, tmp_path, full_run):
    """An adapter with a threshold.json is scored again at that threshold, beside the 0.5 block; others stay at 0.5."""
    import shutil

    from sarcasm_dpo.thresholds import THRESHOLD_FILE

    assert "at_validation_threshold" not in full_run["results"]  # no model records one: the results are as before
    preds = pd.read_csv(full_run["out"] / "predictions.csv")
    sft = shutil.copytree(setup["sft"], tmp_path / "sft")
    own = float(np.median(preds["p_sft"]))  # as if chosen on validation: it splits the SFT calls differently from 0.5
    (sft / THRESHOLD_FILE).write_text(json.dumps({"threshold": own, "criterion": "balanced_accuracy", "split": "gen_val"}))
    results = run(settings(setup, tmp_path / "out", sft_model=str(sft), extra_test=[f"extra={setup['extra']}"]))
    block = results["at_validation_threshold"]
    assert block["thresholds"] == {"sft": {"threshold": own, "criterion": "balanced_accuracy", "split": "gen_val",
                                           "source": str(sft / THRESHOLD_FILE)}}
    assert results["models"]["sft"]["threshold"] == 0.5  # the 0.5 block is unchanged
    labels = preds["label"].to_numpy(int)
    cuts = {"base": 0.5, "sft": own, "dpo": 0.5, "tfidf_logreg": 0.5}
    for key in MODEL_KEYS:
        m = block["models"][key]
        pred = (preds[f"p_{key}"].to_numpy(float) >= cuts[key]).astype(int)
        assert m["threshold"] == cuts[key] and m["accuracy"] == pytest.approx((pred == labels).mean(), abs=1e-12)
        assert m["roc_auc"] == results["models"][key]["roc_auc"]  # ranking does not depend on the threshold
    at_own = (preds["p_sft"].to_numpy(float) >= own).astype(int)
    assert (at_own != (preds["p_sft"].to_numpy(float) >= 0.5)).any()  # the test below can tell the thresholds apart
    base = (preds["p_base"].to_numpy(float) >= 0.5).astype(int)
    assert block["significance"]["sft_vs_base"]["a_right_b_wrong"] == int(((at_own == labels) & (base != labels)).sum())
    assert "at_validation_threshold" in results["extra_tests"]["extra"]
    assert results["extra_tests"]["extra"]["at_validation_threshold"]["models"]["sft"]["threshold"] == own
    out = capsys.readouterr().out
    assert f"each model at its own validation threshold (Base 0.5 (none recorded), SFT {own:.3g} (gen_val)" in out


def cli_error(setup, capsys, out: Path, *extra: str) -> str:
    argv = ["compare", "--no_wandb", "--test_csv", str(setup["test"]), "--train_csv", str(setup["train"]),
            "--sft_model", str(setup["sft"]), "--dpo_model", str(setup["dpo"]), "--output_dir", str(out), *extra]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_overlapping_train_and_test_is_refused(setup, capsys, tmp_path):
    leaky = pd.concat([pd.read_csv(setup["train"]), setup["test_frame"].iloc[:3]])
    leaky.to_csv(tmp_path / "leaky_train.csv", index=False)
    err = cli_error(setup, capsys, tmp_path / "out", "--train_csv", str(tmp_path / "leaky_train.csv"))
    assert "Leakage" in err and "3 text(s)" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_missing_adapter_folder_is_named(setup, capsys, tmp_path):
    missing = tmp_path / "models" / "dpo_typo"
    err = cli_error(setup, capsys, tmp_path / "out", "--dpo_model", str(missing))
    assert str(missing) in err and "--dpo_model none" in err
    not_adapter = tmp_path / "empty_folder"
    not_adapter.mkdir()
    err = cli_error(setup, capsys, tmp_path / "out", "--sft_model", str(not_adapter))
    assert str(not_adapter) in err and "adapter_config.json" in err


def test_foreign_results_folder_and_bad_extra_test_are_refused(setup, capsys, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = cli_error(setup, capsys, out)
    assert "notes.txt" in err and (out / "notes.txt").read_text() == "mine"
    err = cli_error(setup, capsys, tmp_path / "out", "--extra_test", f"x={tmp_path / 'nope.csv'}")
    assert "nope.csv" in err


def test_baselines_directly():
    train = gen_like(40, 3, "a")
    pipe = baseline.tfidf_logreg(train, seed=0)
    p = baseline.predict_proba(pipe, ["oh great love it wonderful", "the meeting is at three"])
    assert p[0] > 0.5 > p[1]
    constant = baseline.majority_class(train.iloc[:30])  # 15 sarcastic of 30 -> 0.5 everywhere
    np.testing.assert_allclose(baseline.predict_proba(constant, ["x", "y", "z"]), [0.5, 0.5, 0.5])
    skewed = baseline.majority_class(pd.concat([train, train[train.label == 0]]))  # 20 of 60 sarcastic
    np.testing.assert_allclose(baseline.predict_proba(skewed, ["x"]), [1 / 3])
    from sarcasm_dpo.errors import UserError

    with pytest.raises(UserError, match="only label"):
        baseline.tfidf_logreg(train[train.label == 1])


def test_an_adapter_trained_at_another_text_length_is_named(tmp_path):
    from sarcasm_dpo.detector import note_text_lengths

    for name, length in (("sft", 128), ("dpo", 256), ("old", None)):
        (tmp_path / name).mkdir()
        config = {"model": "m"} if length is None else {"model": "m", "max_text_tokens": length}
        (tmp_path / name / "training_summary.json").write_text(json.dumps({"config": config}))
    lines = []
    note_text_lengths({n: tmp_path / n for n in ("sft", "dpo", "old")}, 256, "comparison", printer=lines.append)
    assert len(lines) == 1 and "sft" in lines[0] and "--max_text_tokens 128" in lines[0]


def test_a_test_split_the_model_was_trained_or_selected_on_is_refused(setup, capsys, tmp_path):
    """Whatever --train_csv says: the files the adapter's run recorded are checked against the test split."""
    import shutil

    selected = tmp_path / "sft_selected_on_test"
    shutil.copytree(setup["sft"], selected)
    (selected / "training_summary.json").write_text(json.dumps({"config": {
        "model": str(setup["model"]), "max_text_tokens": 256, "train_csv": str(setup["train"]),
        "val_csv": str(setup["test"])}}))
    err = cli_error(setup, capsys, tmp_path / "out", "--sft_model", str(selected), "--dpo_model", "none")
    assert "Leakage" in err and "selected on (checkpoint and threshold)" in err
    assert not (tmp_path / "out").exists()
    # A --train_csv typed that is not there is an error, not a skipped check.
    err = cli_error(setup, capsys, tmp_path / "out", "--train_csv", str(tmp_path / "nosuch.csv"))
    assert "nosuch.csv does not exist" in err


def test_compare_warns_when_the_sft_adapter_was_retrained_since_dpo_started_from_it(tmp_path, monkeypatch, capsys):
    """DPO records the checksum of the SFT adapter it started from: an SFT retrained in the same folder since (the
    same path, other weights) is named, as an SFT in another folder already was; an unchanged one says nothing."""
    from sarcasm_dpo import models
    from sarcasm_dpo.atomic import finish_output_dir
    from sarcasm_dpo.rundir import input_identity
    from sarcasm_dpo.stages.compare import warn_if_dpo_from_other_sft

    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft_dir.mkdir()
    dpo_dir.mkdir()
    (sft_dir / "adapter_config.json").write_text("{}")
    (sft_dir / "adapter_model.safetensors").write_bytes(b"weights of the first run")
    finish_output_dir(dpo_dir, {"sft_model": str(sft_dir)},
                      {"stage": "dpo", "inputs": input_identity({"sft_model": sft_dir})})
    monkeypatch.setattr(models, "run_settings", lambda folder: {"sft_model": str(sft_dir)})
    warn_if_dpo_from_other_sft(dpo_dir, sft_dir)
    assert capsys.readouterr().out == ""
    (sft_dir / "adapter_model.safetensors").write_bytes(b"weights of a later run")
    warn_if_dpo_from_other_sft(dpo_dir, sft_dir)
    assert "has changed (its weights or config) since the DPO adapter" in capsys.readouterr().out
    monkeypatch.setattr(models, "run_settings", lambda folder: {"sft_model": str(tmp_path / "elsewhere")})
    warn_if_dpo_from_other_sft(dpo_dir, sft_dir)
    assert "was trained from" in capsys.readouterr().out
