"""The 'Next:' hints name the folders the run actually used, read from its record, not the defaults."""

from __future__ import annotations

from pathlib import Path

from sarcasm_dpo import dpo, mining


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
