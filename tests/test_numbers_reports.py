"""What the reports lead with: each model as it is used (at its own validation threshold), the 0.5 figures
labelled as such; undefined figures (macro-F1 with one class) shown as n/a, never as a number.

The real run's comparison (bench/results/cpu_main_job) is the case that matters: at 0.5 DPO is worse than SFT
(p=2.9e-18), at the thresholds the models are used at it is not (0.771, p=0.15 against SFT).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sarcasm_dpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
REAL_RESULTS = ROOT / "bench" / "results" / "cpu_main_job" / "model_comparison_results.json"


@pytest.fixture(scope="module")
def real_results() -> dict:
    from sarcasm_dpo.stages.compare import check_results_record

    return check_results_record(json.loads(REAL_RESULTS.read_text()), REAL_RESULTS)


def test_the_pipeline_headline_leads_with_each_models_own_threshold(real_results):
    from sarcasm_dpo.stages.pipeline import headline

    text = headline(real_results)
    own, _, half = text.partition("At threshold 0.5 for every model instead")
    assert half, text  # the 0.5 figures are there, and labelled
    assert "each model at its own validation threshold" in own and "SFT 0.788 (gen_val), DPO 0.799 (gen_val)" in own
    assert re.search(r"^DPO +0\.771 ", own, re.M) and re.search(r"^SFT +0\.752 ", own, re.M), own
    assert "no significant difference between DPO and SFT (p=0.15)" in own
    assert "DPO is worse than SFT" not in own
    assert "DPO acc 0.646" in half and "DPO is worse than SFT at p<0.05 (p=2.9e-18)" in half
    assert text.rstrip().endswith(f"Results: {real_results['outputs']['results']}")


def test_a_headline_without_recorded_thresholds_says_it_is_at_one_half(real_results):
    from sarcasm_dpo.stages.pipeline import headline

    older = {k: v for k, v in real_results.items() if k != "at_validation_threshold"}
    text = headline(older)
    assert "every model at threshold 0.5 (none records a validation threshold)" in text
    assert re.search(r"^DPO +0\.646 ", text, re.M) and "DPO is worse than SFT" in text


def _drawn(monkeypatch):
    """plot_comparison's figure, caught before it is saved."""
    from sarcasm_dpo import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda path, fig: figures.append(fig) or path)
    return figures


def _texts(fig) -> str:
    out = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        out.append(ax.get_title())
        legend = ax.get_legend()
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
    return "\n".join(out)


def test_the_plot_says_the_threshold_its_bars_are_at(real_results, monkeypatch, tmp_path):
    from sarcasm_dpo.plots import plot_comparison
    from sarcasm_dpo.stages.compare import NAMES

    figures = _drawn(monkeypatch)
    own = real_results["at_validation_threshold"]
    plot_comparison(own["models"], tmp_path / "p.png", names=NAMES, at_half=real_results["models"])
    text = _texts(figures[-1])
    assert "SFT @ 0.788" in text and "DPO @ 0.799" in text and "Base @ 0.5" in text
    assert "same model at 0.5" in text and "DPO @ 0.799 (acc 0.771)" in text
    plot_comparison(real_results["models"], tmp_path / "q.png", names=NAMES)
    assert "DPO @ 0.5 (acc 0.646)" in _texts(figures[-1])


def test_compare_plots_the_models_at_their_own_thresholds(tiny_model_dir, tmp_path, monkeypatch):
    from test_compare import gen_like, make_adapter

    from sarcasm_dpo import plots
    from sarcasm_dpo.thresholds import write_threshold

    calls = []
    real = plots.plot_comparison
    monkeypatch.setattr(plots, "plot_comparison", lambda models, path, **kw: calls.append((models, kw)) or
                        real(models, path, **kw))
    sft = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    write_threshold(sft, {"threshold": 0.6, "criterion": "balanced_accuracy", "split": "gen_val"})
    gen_like(20, 0, "train").to_csv(tmp_path / "train.csv", index=False)
    gen_like(10, 1, "test").to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "results"
    assert main(["compare", "--no_wandb", "--test_csv", str(tmp_path / "test.csv"), "--train_csv",
                 str(tmp_path / "train.csv"), "--sft_model", str(sft), "--dpo_model", "none", "--model",
                 str(tiny_model_dir), "--output_dir", str(out), "--n_bootstrap", "20", "--device", "cpu"]) == 0
    results = json.loads((out / "model_comparison_results.json").read_text())
    models, kw = calls[-1]
    assert models == results["at_validation_threshold"]["models"] and models["sft"]["threshold"] == 0.6
    assert kw["at_half"] == results["models"] and "each model at its own validation threshold" in kw["title"]


def test_a_test_set_with_one_class_has_no_macro_f1(monkeypatch, tmp_path):
    """Macro-F1 averages in the absent class's F1 (0/0) as 0: a perfect model would show 0.500. It is None, like
    ROC-AUC, and every reader shows n/a (tables, plot, the results check, the card, W&B)."""
    from sarcasm_dpo.metrics import classification_metrics, improvement_pp, with_intervals
    from sarcasm_dpo.plots import plot_comparison
    from sarcasm_dpo.stages.compare import _scalars, check_results_record, format_table
    from sarcasm_dpo.stages.export import _test_lines

    perfect = with_intervals([1, 1, 1], [0.9, 0.8, 0.7], n_resamples=20)
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] is None and perfect["roc_auc"] is None
    assert classification_metrics([0, 0], [0.1, 0.2])["macro_f1"] is None
    assert classification_metrics([0, 1], [0.1, 0.9])["macro_f1"] == 1.0
    results = {"test_set": {"n": 3}, "models": {"sft": perfect, "base": perfect},
               "improvements_pp": {"sft_vs_base": improvement_pp(perfect, perfect)},
               "significance": {"sft_vs_base": {"verdict": "no significant difference", "n_discordant": 0}}}
    check_results_record(json.loads(json.dumps(results)), tmp_path / "r.json")
    row = format_table(results["models"]).splitlines()[2]
    assert row.split()[-2:] == ["n/a", "n/a"], row
    assert "macro_f1" not in _scalars(perfect)
    _drawn(monkeypatch)
    plot_comparison(results["models"], tmp_path / "p.png")
    block = {"n": 3, "n_total": 3, "at": "0.5", "threshold": 0.5, "rows": {"SFT": perfect}, "key": "SFT",
             "verdicts": {}, "source": "r.json"}
    assert "| 1.000 [1.000, 1.000] | n/a | n/a |" in "\n".join(_test_lines(block, 0.5))


def test_the_training_log_leaves_out_an_undefined_macro_f1(monkeypatch):
    import numpy as np
    import pandas as pd

    import sarcasm_dpo.training.callbacks as callbacks

    class FakeScorer:
        def __init__(self, *args, **kwargs):
            pass

        def predict_proba(self, texts):
            return np.linspace(0.1, 0.9, len(texts))

    monkeypatch.setattr(callbacks, "Scorer", FakeScorer)
    monkeypatch.setattr(callbacks, "adapter_state", lambda model: {})
    logged = []
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 1, 1]})
    cb = callbacks.ValidationCallback(None, {"gen_val": frame}, printer=lambda s: None,
                                      log=lambda values, step: logged.append(values))
    cb.evaluate(None, 1, 1.0)
    assert "eval/macro_f1" not in logged[0] and logged[0]["eval/accuracy"] == pytest.approx(2 / 3)


# -- the exported model card ----------------------------------------------------------------------------------


from test_export import adapter_dir  # noqa: E402,F401 - the fixture: a LoRA adapter recorded like an SFT run's


def _export_with(results: dict, adapter: Path, tmp_path: Path, *extra: str) -> tuple[dict, str, str]:
    path = tmp_path / "model_comparison_results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter), "--output_dir", str(out), "--results", str(path), *extra]) == 0
    import yaml

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    return json.loads((out / "sarcasm_dpo.json").read_text()), card, meta


def test_the_card_leads_with_the_figures_at_the_models_own_threshold(real_results, adapter_dir, tmp_path):
    """The real comparison, as if its DPO were this adapter: the model-index, the first table and the verdicts are
    at DPO's validation threshold (the one it labels at), the 0.5 figures follow, labelled."""
    from sarcasm_dpo.thresholds import write_threshold

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    own = real_results["at_validation_threshold"]
    threshold = own["thresholds"]["dpo"]["threshold"]
    write_threshold(adapter, {"threshold": threshold, "criterion": "balanced_accuracy", "split": "gen_val"})
    results = {**real_results, "model_paths": {**real_results["model_paths"], "dpo": str(adapter)}}
    info, card, meta = _export_with(results, adapter, tmp_path)
    index = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    dpo = own["models"]["dpo"]
    assert index["accuracy"]["value"] == round(dpo["accuracy"], 4) == 0.7707
    assert index["accuracy"]["name"].startswith(f"Accuracy at threshold {threshold:.3f} (95% CI")
    assert index["f1"]["value"] == round(dpo["f1"], 4)
    assert info["test"]["at"] == "validation threshold" and info["test"]["threshold"] == threshold
    first, _, rest = card.partition("The same items with every model at P(sarcastic) >= 0.5 instead")
    assert rest, card
    assert f"| DPO (this model) | {threshold:.3f} | 0.771 [" in first
    assert "no significant difference between DPO and SFT (p=0.15) (exact McNemar test, each model at its own" in first
    assert "DPO is worse than SFT" not in first
    assert "| DPO (this model) | 0.646 [" in rest and "at 0.5: DPO is worse than SFT at p<0.05 (p=2.9e-18)" in rest


def test_an_older_comparison_is_quoted_at_one_half_and_said_to_be(real_results, adapter_dir, tmp_path):
    from sarcasm_dpo.thresholds import write_threshold

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    write_threshold(adapter, {"threshold": 0.8, "criterion": "balanced_accuracy", "split": "gen_val"})
    older = {k: v for k, v in real_results.items() if k != "at_validation_threshold"}
    older["model_paths"] = {**older["model_paths"], "dpo": str(adapter)}
    info, card, meta = _export_with(older, adapter, tmp_path)
    index = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert index["accuracy"]["value"] == 0.6465 and index["accuracy"]["name"].startswith("Accuracy at threshold 0.500")
    assert info["test"]["at"] == "0.5"
    assert "every model labelled at P(sarcastic) >= 0.5" in card and "This model labels at 0.800" in card
    assert "- at 0.5: DPO is worse than SFT at p<0.05" in card


def test_the_cards_snippet_takes_the_softmax_in_float32_like_the_scorer(adapter_dir, tmp_path, capsys):
    """A bfloat16 export: the snippet's P(sarcastic) is the scorer's (label logits cast to float32 first), not a
    softmax rounded to bfloat16's three digits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarcasm_dpo.scoring import Scorer

    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", "",
                 "--dtype", "bfloat16"]) == 0
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("THIS_FOLDER", str(out))
    assert len(code.strip().splitlines()) == 8
    capsys.readouterr()
    exec(compile(code, "card", "exec"), {})
    p_card = float(capsys.readouterr().out.strip().split()[-2])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(plain.parameters()).dtype == torch.bfloat16
    expected = Scorer(plain, AutoTokenizer.from_pretrained(out), max_text_tokens=64).predict_proba(
        ["Oh great, another Monday."])[0]
    assert p_card == pytest.approx(float(expected), abs=1e-6)
