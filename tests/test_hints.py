"""The 'Next:' hints name the folders the run actually used, read from its record, not the defaults."""

from __future__ import annotations

from pathlib import Path

from sarcasm_dpo.stages import dpo, mine as mining


def test_dpo_next_hint_names_the_sft_adapter_it_trained_from():
    health = {"kl": {"value": 0.01, "verdict": "small"}, "reward_ratio": {"value": 1.2, "verdict": "ok"}}
    summary = {"timings": {"total_s": 61}, "best_val": {}, "sft_start_val": {}, "health": health, "global_steps": 3,
               "stopped_early": False, "improved_over_sft": False, "sft_model": "runs/x/sft"}
    text = dpo.describe_result(summary, Path("runs/x/dpo"))
    assert text.endswith("Next: sarcasm-dpo compare --sft_model runs/x/sft --dpo_model runs/x/dpo")


def test_mining_next_hint_names_the_sft_adapter_it_mined():
    counts = {"scored": {"total": 10}, "mistakes": {"total": 4}, "confident_mistakes": {"total": 1},
              "kept": {"sarcastic": 2, "not_sarcastic": 2}}
    summary = {"counts": counts, "sft_on_input": {"accuracy": 0.6}, "input_csv": "a.csv", "confidence": 0.7,
               "filter_strategy": "mistakes_only", "output_file": "runs/x/pairs.json", "sft_model": "runs/x/sft"}
    text = mining.describe(summary, 4)
    assert text.endswith("Next: sarcasm-dpo dpo --sft_model runs/x/sft --preference_data runs/x/pairs.json")


def test_dpo_reward_ratio_line_says_what_window_it_covers():
    """The printed ratio (a mean since the last evaluation) names its window and the curves' last point."""
    ratio = {"value": 1.06, "verdict": "weak", "logged_steps": 4, "last_logged": {"step": 40, "value": 1.117}}
    health = {"kl": {"value": 0.01, "verdict": "small"}, "reward_ratio": ratio}
    summary = {"timings": {"total_s": 61}, "best_val": {}, "sft_start_val": {}, "health": health, "global_steps": 40,
               "stopped_early": False, "improved_over_sft": False, "sft_model": "runs/x/sft"}
    text = dpo.describe_result(summary, Path("runs/x/dpo"))
    assert ("reward ratio 1.06 (weak; mean of the 4 logged steps since the last evaluation; "
            "the curves' last point, step 40, is 1.12)") in text
    ratio.update(logged_steps=None, value=1.117)  # no evaluation window: the figure is the last point itself
    assert "reward ratio 1.12 (weak; at step 40, the curves' last point)" in dpo.describe_result(summary, Path("x"))
