"""bench/device_check.py, the script a lent GPU runs, end to end on a CPU first (tiny Qwen2, real tokenizer).

A crash in it would otherwise first show on the GPU machine, where device time is scarce.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def one_thread():
    """One torch thread: on two cores shared with other jobs, two threads spin-wait on each other and this
    test took twice as long (202 s against 109 s, load average 7). Nothing here checks speed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_part_runs_on_a_tiny_model(qwen_tokenizer_dir, shared_data, tmp_path, one_thread):
    import device_check

    out = tmp_path / "out"
    # --set makes the batches small (CPU time) and checks that stage settings reach every part.
    assert device_check.main([
        "--out", str(out), "--tiny", "--data_dir", str(shared_data), "--tokenizer", str(qwen_tokenizer_dir),
        "--work_dir", str(tmp_path / "work"), "--sft_steps", "2", "--dpo_steps", "2", "--score_texts", "6",
        "--generate_texts", "1", "--score_repeats", "1", "--val_texts", "4", "--pipeline_sample", "4",
        "--set", "sft.batch_size=2", "--set", "dpo.batch_size=1", "--set", "sft.epochs=1", "--set", "dpo.epochs=1",
        "--set", "compare.batch_size=4", "--time_budget", "3600"]) == 0
    result = json.loads((out / "device_check.json").read_text())
    assert result["finished"] and result["done"] == ["sft", "dpo", "score", "pipeline"]
    assert result["tokenizer"]["is_qwen2.5"] and result["model"]["vocab_size"] == 151_936
    assert result["set"] == {"sft": {"batch_size": "2", "epochs": "1"}, "dpo": {"batch_size": "1", "epochs": "1"},
                             "compare": {"batch_size": "4"}}

    runs = result["sft"]["runs"]
    assert {(r["batch_size"], r["grad_accum"]) for r in runs.values()} == {(2, 2), (2, 1)}  # config's grad_accum 2, and 1
    for run in list(runs.values()) + [result["dpo"]]:
        assert run["timed_steps"] == 1
        for key in ("seconds_per_step", "seconds_per_micro_batch", "padded_tokens_per_s", "model_tflops"):
            assert _positive(run[key]), key
        assert run["mfu"] is None  # no GPU peak on a CPU
    assert _positive(result["sft"]["grad_accum_2_vs_1"]["ratio_step_time"])
    assert result["dpo"]["batch_size_pairs"] == 1
    # the reference is precomputed (the default), so every counted token trains
    assert result["dpo"]["training_share_of_counted_tokens"] == 1.0
    # micro-batches are counted (the Trainer's substeps): config grad_accum 2, the comparison run 1, DPO 2
    assert sorted(r["micro_batches_per_step"] for r in runs.values()) == [1, 2]
    assert result["dpo"]["micro_batches_per_step"] == 2
    # The GPU config's reasoning pairs are not packed (label pairs are, checked per device: test_fast_dpo.py)
    assert result["dpo"]["pairs"] == "reasoning" and result["dpo"]["packing_verdicts"] == {}

    score = result["score"]
    assert score["texts"] == 6 and score["batch_size"] == 4
    for key in ("scorer_texts_per_s", "bare_forward_texts_per_s", "scorer_time_over_bare", "scorer_model_tflops"):
        assert _positive(score[key]), key

    pipe = result["pipeline"]
    assert set(pipe["stages"]) == {"split", "sft", "dpo", "compare"}
    assert all(_positive(s) for s in pipe["stages"].values())
    assert pipe["total_s"] == pytest.approx(sum(pipe["stages"].values()), abs=0.05)
    assert pipe["settings"]["sft"]["batch_size"] == 2 and pipe["settings"]["dpo"]["patience"] == 10_000
    assert pipe["test_items"] == 4
    log = (out / "device_check.log").read_text()
    assert "[device_check] part pipeline" in log and "[device_check] done" in log
    head = result["summary"]  # the headline, also printed last
    assert head["tokenizer_is_qwen2.5"] and head["pipeline_total_s"] == pipe["total_s"]
    assert set(head) >= {"sft_config", "sft_grad_accum_1", "dpo", "score", "pipeline_stage_s"}

    # A pipeline longer than one device call: a second call runs the last stage, the others' times carried over.
    again = tmp_path / "again"
    assert device_check.main([
        "--out", str(again), "--tiny", "--data_dir", str(shared_data), "--tokenizer", str(qwen_tokenizer_dir),
        "--work_dir", str(tmp_path / "work"), "--parts", "pipeline", "--pipeline_stages", "compare",
        "--pipeline_sample", "4", "--set", "sft.batch_size=2", "--set", "dpo.batch_size=1", "--set", "sft.epochs=1",
        "--set", "dpo.epochs=1", "--set", "compare.batch_size=4"]) == 0
    second = json.loads((again / "device_check.json").read_text())["pipeline"]
    assert second["stages_timed_in_earlier_calls"] == ["split", "sft", "dpo"]
    assert {k: second["stages"][k] for k in ("split", "sft", "dpo")} == {k: pipe["stages"][k] for k in ("split", "sft", "dpo")}
    assert _positive(second["stages"]["compare"]) and _positive(second["total_s"])


def test_time_budget_skips_and_records_without_loading_anything(tmp_path):
    import device_check

    out = tmp_path / "out"
    assert device_check.main(["--out", str(out), "--time_budget", "5", "--work_dir", str(tmp_path / "w")]) == 0
    result = json.loads((out / "device_check.json").read_text())
    for part in ("sft", "dpo", "score", "pipeline"):
        assert result[part].startswith("skipped: expected"), part
    assert result["done"] == [] and result["finished"]
    assert not (tmp_path / "w").exists()  # no model was built


def test_set_is_checked_against_the_stage_settings(tmp_path):
    import device_check

    with pytest.raises(SystemExit, match="sft.*batch_sise|Unknown setting 'batch_sise'"):
        device_check.parse_sets(["sft.batch_sise=16"])
    with pytest.raises(SystemExit, match="expects int"):
        device_check.parse_sets(["dpo.grad_accum=two"])
    with pytest.raises(SystemExit, match="STAGE.SETTING=VALUE"):
        device_check.parse_sets(["train.batch_size=16"])
    assert device_check.parse_sets(["sft.batch_size=16", "sft.grad_accum=1"]) == {
        "sft": {"batch_size": "16", "grad_accum": "1"}}
    with pytest.raises(SystemExit, match="--expect"):
        device_check.parse_expect(["warmup=3"])


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """On a lent GPU one crash must not cost the remaining parts their device time."""
    import device_check

    monkeypatch.setattr(device_check, "build_model", lambda args, work: ("model", {"model": {"flop_counts": {}}}))
    monkeypatch.setattr(device_check.common, "make_splits", lambda data_dir, out: out)

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(device_check, "sft_part", broken)
    monkeypatch.setattr(device_check, "score_part", lambda *a, **k: {"scorer_texts_per_s": 1.0})
    out = tmp_path / "out"
    assert device_check.main(["--out", str(out), "--parts", "sft,dpo,score", "--work_dir", str(tmp_path / "w")]) == 1
    result = json.loads((out / "device_check.json").read_text())
    assert result["sft"] == "error: RuntimeError: CUDA error: an illegal memory access"
    assert result["dpo"].startswith("skipped: the sft part did not finish")
    assert result["score"]["scorer_texts_per_s"] == 1.0 and result["done"] == ["score"] and result["failed"] == ["sft"]
    assert "FAILED: sft" in (out / "device_check.log").read_text()
