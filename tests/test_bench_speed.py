"""bench/speed.py and its sections: the pipeline timing (speed_gpu.py) can be split over two calls (device limits
shorter than the pipeline); the evaluation section (speed_eval.py) runs through the driver."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_pipeline_timing_split_over_two_calls(tiny_model_dir, shared_data, tmp_path):
    import speed
    import speed_gpu

    def args(stages):
        return speed.parse_args(["--data_dir", str(shared_data), "--pipeline_sample", "8", "--pipeline_stages", stages])

    work = tmp_path / "work"
    first = speed_gpu.pipeline_wall_time(args("split,sft"), str(tiny_model_dir), work)
    assert set(first["stage_seconds"]) == {"split", "sft"} and "total_s" not in first  # no compare yet
    with pytest.raises(SystemExit, match="leaves out 'dpo'"):
        speed_gpu.pipeline_wall_time(args("compare"), str(tiny_model_dir), work)

    second = speed_gpu.pipeline_wall_time(args("dpo,compare"), str(tiny_model_dir), work)
    assert second["stages_timed_in_earlier_calls"] == ["split", "sft"]
    assert second["stage_seconds"]["sft"] == first["stage_seconds"]["sft"] > 0
    assert second["total_s"] == pytest.approx(sum(second["stage_seconds"].values()), abs=0.02)
    assert second["evaluations"] and second["test_items"] == 8
    record = json.loads((work / "pipeline" / "stage_seconds.json").read_text())
    assert set(record) == {"split", "sft", "dpo", "compare"}

    # Other settings for a stage left out: its earlier time does not count.
    changed = speed.parse_args(["--data_dir", str(shared_data), "--pipeline_sample", "6", "--pipeline_stages", "compare"])
    with pytest.raises(SystemExit, match="leaves out .sft., .* no complete sft output timed with these settings"):
        speed_gpu.pipeline_wall_time(changed, str(tiny_model_dir), work)
    with pytest.raises(SystemExit, match="unknown \\['eval'\\]"):
        speed_gpu.pipeline_wall_time(args("eval"), str(tiny_model_dir), work)


def test_eval_section_runs_every_method_on_the_same_texts(tiny_model_dir, shared_data, tmp_path):
    """A crash here would otherwise first show on a lent GPU, where device time is scarce."""
    import speed

    out = tmp_path / "speed.json"
    assert speed.main(["--sections", "eval,gpu", "--model", str(tiny_model_dir), "--data_dir", str(shared_data),
                       "--device", "cpu", "--eval_texts", "12", "--eval_batch_size", "4", "--eval_repeats", "1",
                       "--work_dir", str(tmp_path / "work"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    e = result["evaluation"]
    assert e["texts"] == 12 and len(e["per_batch"]) == 3 and e["shared_prefix_tokens"] >= 10
    # the prefix cache changes the work, not the answers
    assert e["max_probability_difference_prefix_cache_vs_not"] < 1e-5
    assert e["bare_forward"]["padded_tokens"] < e["bare_forward_full_prompts"]["padded_tokens"]
    assert all(b["width_after_prefix"] == b["width"] - e["shared_prefix_tokens"] for b in e["per_batch"])
    for key in ("ratio_scorer_vs_generate", "scorer_overhead_vs_bare", "ratio_prefix_cache"):
        assert isinstance(e[key], float)
    assert e["generate_and_parse"]["new_tokens_mean"] > 0
    assert result["gpu"] == "skipped: no CUDA device"
    assert set(result["verdicts"]) == {"scorer_vs_generate", "scorer_vs_bare"}
    assert "scorer vs the same without its shared-prefix cache" in out.with_suffix(".md").read_text()
    w = e["whole_calls"]
    assert w["default_scorer"] == {**w["default_scorer"], "prefix_cache": True, "against": "bare"}  # a CPU's default
    assert len(w["scorer_s"]) == len(w["bare_s"]) == len(w["bare_full_s"]) == 1 and "scorer_default_s" not in w


def test_eval_section_times_the_scorer_the_stages_use_off_a_cpu(tiny_model_dir, shared_data, tmp_path, monkeypatch,
                                                                fine_rounding):
    """On a GPU the stages' scorer runs full prompts: the section times it against the bare passes it makes."""
    import speed
    import speed_eval
    from sarcasm_dpo.scoring import Scorer

    monkeypatch.setattr(Scorer, "uses_prefix_cache", lambda self: bool(self.prefix_cache))  # as on a GPU
    fine_rounding(speed_eval)  # times of a few ms to 9 digits, not 3, so the overheads below are recomputed exactly
    out = tmp_path / "speed.json"
    assert speed.main(["--sections", "eval", "--model", str(tiny_model_dir), "--data_dir", str(shared_data),
                       "--device", "cpu", "--eval_texts", "8", "--eval_batch_size", "4", "--eval_repeats", "2",
                       "--generate_texts", "1", "--work_dir", str(tmp_path / "work"), "--output", str(out)]) == 0
    w = json.loads(out.read_text())["evaluation"]["whole_calls"]
    assert w["default_scorer"]["prefix_cache"] is False and w["default_scorer"]["against"] == "bare_full"
    assert len(w["scorer_default_s"]) == len(w["bare_full_s"]) == 2
    # the overheads from the whole-call times kept beside them: the stages' scorer against the full-prompt passes
    default, full = w["scorer_default_s"], w["bare_full_s"]
    # (as ratios: times of 1e-4 s kept to 1e-9 s leave 1e-5 of a ratio uncertain at most)
    assert 1 + w["default_scorer"]["overhead_best"] == pytest.approx(min(default) / min(full), rel=1e-5)
    assert 1 + w["default_scorer"]["overhead_median"] == pytest.approx(
        statistics.median(default) / statistics.median(full), rel=1e-5)
    assert "the stages' scorer (full prompts)" in out.with_suffix(".md").read_text()


def test_pipeline_sample_and_dpo_pairs_together(tmp_path):
    """Both caps at once used to give the DPO settings `sample_size` twice (TypeError); now the smaller cap wins."""
    import speed
    import speed_gpu

    assert speed_gpu.dpo_caps(8, 100) == {"sample_size": 8, "val_sample_size": 8}
    assert speed_gpu.dpo_caps(500, 100) == {"sample_size": 100, "val_sample_size": 500}
    assert speed_gpu.dpo_caps(None, 100) == {"sample_size": 100}
    assert speed_gpu.dpo_caps(8, None) == {"sample_size": 8, "val_sample_size": 8}
    assert speed_gpu.dpo_caps(None, None) == {}
    args = speed.parse_args(["--pipeline_sample", "8", "--pipeline_dpo_pairs", "6", "--pipeline_stages", "compare"])
    # The settings of every stage are built before anything runs; with nothing run before, it stops there.
    with pytest.raises(SystemExit, match="leaves out 'split'"):
        speed_gpu.pipeline_wall_time(args, "unused-model", tmp_path / "work")


def test_pipeline_timing_builds_its_stages_as_the_pipeline_does(tmp_path):
    """The GPU pipeline timing takes its settings from the pipeline's own stage_settings: each stage reads the
    outputs of the one before, in the pipeline's order, with the bench's caps and --set values on top."""
    import speed
    import speed_gpu

    args = speed.parse_args(["--data_dir", "DATA", "--pipeline_sample", "8", "--pipeline_dpo_pairs", "6", "--seed", "7"])
    args.stage_overrides = {"dpo": {"batch_size": "1"}, "compare": {"batch_size": "4"}}
    out = tmp_path / "pipeline"
    stages = speed_gpu.pipeline_settings(args, "MODEL", out)
    assert list(stages) == ["split", "sft", "dpo", "compare"]  # no mining, as the pipeline without --mine
    split, sft, dpo, compare = stages.values()
    assert split.data_dir == "DATA" and split.output_dir == str(out / "splits")
    assert sft.train_csv == f"{split.output_dir}/gen_train.csv" and sft.model == compare.model == "MODEL"
    assert dpo.sft_model == compare.sft_model == sft.output_dir and compare.dpo_model == dpo.output_dir
    assert compare.test_csv == f"{split.output_dir}/gen_test.csv" and compare.output_dir == str(out / "results")
    assert (sft.sample_size, dpo.sample_size, dpo.val_sample_size, compare.sample_size) == (8, 6, 8, 8)
    assert (dpo.batch_size, compare.batch_size, dpo.patience) == (1, 4, 10_000)
    assert sft.seed == dpo.seed == compare.seed == 7 and all(s.no_wandb for s in stages.values())
    assert sft.epochs == 2 and dpo.epochs == 3  # the rest is configs/qwen2.5-0.5b.yaml's
