"""bench/dpo_study.py: the choice is made on validation only, and what it writes reads back (the runs are real in the bench)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import dpo_study  # noqa: E402


def row(source, beta, start, end, auc_end=0.8):
    view = lambda score, auc: {"step": 0, "selection_score": score, "gen_val_accuracy": score, "gen_val_f1": 0.7,
                               "gen_val_roc_auc": auc, "isarcasm_val_accuracy": 0.6, "isarcasm_val_f1": 0.4,
                               "isarcasm_val_roc_auc": 0.6}
    return {"tag": f"{source}_beta{beta:g}", "source": source, "beta": beta, "pairs": {}, "start": view(start, 0.8),
            "end": view(end, auc_end), "gain": None if end is None else round(end - start, 6), "kept_step": 32,
            "kl_end": 0.01, "kl_verdict": "healthy", "train_s": 60.0, "seconds": 90.0, "output_dir": "x"}


def test_the_choice_is_the_best_run_that_beats_the_sft_start():
    runs = [row("label", 0.1, 0.70, 0.72), row("rephrase", 0.1, 0.70, 0.75), row("reasoning", 0.5, 0.70, 0.69)]
    chosen = dpo_study.choose(runs)
    assert chosen["tag"] == "rephrase_beta0.1" and chosen["beta"] == 0.1
    assert "2 run(s) that beat the SFT start" in chosen["why"]


def test_no_run_beating_the_sft_start_chooses_none_and_says_so():
    chosen = dpo_study.choose([row("label", 0.1, 0.70, 0.70), row("rephrase", 0.05, 0.70, 0.60)])
    assert chosen["tag"] is None and "no source and beta raised" in chosen["why"]


def test_the_table_and_plot_show_every_run(tmp_path):
    runs = [row(s, b, 0.70, 0.70 + i / 100) for i, (s, b) in enumerate(
        (s, b) for s in ("label", "rephrase+label") for b in (0.05, 0.5))]
    result = {"sft_model": "m", "pairs_per_run": 256, "val_samples": 300, "selection": "x", "runs": runs,
              "chosen": dpo_study.choose(runs)}
    table = dpo_study.markdown(result)
    assert table.count("\n| label |") == 2 and table.count("\n| rephrase+label |") == 2
    assert "Chosen: rephrase+label_beta0.5" in table
    dpo_study.plot_grid(runs, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_the_test_table_reads_compares_record():
    m = {"accuracy": 0.75, "accuracy_ci": [0.7, 0.8], "f1": 0.74, "f1_ci": [0.7, 0.78], "roc_auc": 0.82}
    sig = {"dpo_vs_sft": {"p_value": 0.03, "n_discordant": 40}}
    record = {"models": {"sft": m, "dpo": m}, "significance": sig,
              "at_validation_threshold": {"thresholds": {"dpo": {"threshold": 0.42}}, "models": {"sft": m, "dpo": m},
                                          "significance": sig},
              "extra_tests": {"isarcasm_val": {"models": {"dpo": m}, "significance": {}}}}
    table = dpo_study.test_markdown({"compare_dir": "results/x", "record": record})
    assert "| dpo | 0.420 (validation) | 0.750 [0.700, 0.800]" in table
    assert "| sft | 0.500 (none recorded) |" in table  # a model without a record is decided at 0.5
    assert "McNemar at own thresholds: dpo vs sft p=0.03 (40 discordant)" in table
    assert "**isarcasm_val**" in table


def test_runs_at_two_learning_rates_are_told_apart_in_the_choice_and_the_plot(tmp_path, monkeypatch):
    slow, fast = row("label", 0.5, 0.70, 0.72), row("label", 0.5, 0.70, 0.75)
    slow["lr"], fast["lr"] = 5e-5, 5e-4
    fast["tag"] = "label_beta0.5_lr0.0005"
    chosen = dpo_study.choose([slow, fast])
    assert chosen["tag"] == "label_beta0.5_lr0.0005" and chosen["lr"] == 5e-4
    bars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, *a, **k: bars.append((k.get("label"), list(h))) or original(self, x, h, *a, **k))
    dpo_study.plot_grid([slow, fast], tmp_path / "grid.png")
    # Two series per panel, one per lr, each with its own run's value (not the first match twice).
    assert bars[:2] == [("beta 0.5, lr 5e-05", [0.72]), ("beta 0.5, lr 0.0005", [0.75])]
