"""Speed section 3, memory: peak resident memory of the DPO stage against the SFT stage.

    python bench/speed_memory.py                            # = python bench/speed.py --sections sft,memory
    python bench/speed_memory.py --sft_batch_size 8 --dpo_pairs 16

The DPO stage starts from the SFT adapter that section 2 (bench/speed_sft.py, run first) just
trained, the frozen reference being a second LoRA adapter on the same weights; each stage runs in
its own process. Reported for the whole process (model loading included) and for the training
phase alone (the peak is reset when training starts). Flags and the result file:
`python bench/speed.py --help`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(ctx) -> None:
    """The section as bench/speed.py runs it, after the SFT section (its runs are in ctx.sft_runs)."""
    print("[speed] 3. memory: DPO stage vs SFT stage", flush=True)
    dpo_result = ctx.run_worker("dpo", {"dpo": dpo_spec(ctx)})
    runs = ctx.sft_runs
    ctx.result["memory"] = memory_section(runs["ours"], dpo_result, runs["usual"])
    ctx.result["memory"]["dpo_pairs"] = ctx.args.dpo_pairs
    ctx.result["memory"]["dpo_meter"] = dpo_result["meter"]
    ctx.save_partial("memory")


def dpo_spec(ctx) -> dict:
    """The DPO stage's settings, from the SFT section's adapter, with as many sequences per step as SFT's."""
    from sarcasm_dpo.settings import DPOSettings

    args, splits, work = ctx.args, ctx.splits, ctx.work
    return dataclasses.asdict(common.stage_settings(
        ctx.config, DPOSettings, "dpo", sft_model=str(work / "sft"), output_dir=str(work / "dpo"),
        train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
        isarcasm_val_csv=str(splits / "isarcasm_val.csv"), epochs=1, sample_size=args.dpo_pairs, grad_accum=1,
        # A pair is two sequences (chosen, rejected): half the SFT batch keeps the sequences per step equal,
        # as the configs do (SFT 8 examples, DPO 4 pairs).
        batch_size=max(1, args.sft_batch_size // 2),
        val_sample_size=args.val_texts, probe_size=min(8, args.val_texts), eval_steps=0, logging_steps=1000,
        max_text_tokens=ctx.max_text_tokens, device=ctx.device, seed=args.seed, no_wandb=True, overwrite=True))


def worker_dpo(spec: dict) -> dict:
    """The DPO stage as `sarcasm-dpo dpo` runs it, metered (and stopped) by one more callback."""
    from sarcasm_dpo.settings import DPOSettings
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.stages.pipeline import run_stage

    meter = common.make_step_meter(stop_after=spec.get("steps"))
    build = dpo.build_trainer

    def build_with_meter(*a, **k):  # instrument the stage without changing it: one more callback
        trainer, validation, diagnostics = build(*a, **k)
        trainer.add_callback(meter)
        return trainer, validation, diagnostics

    dpo.build_trainer = build_with_meter
    try:
        summary = run_stage("dpo", DPOSettings(**spec["dpo"]))
    finally:  # a later stage in this process (bench/device_check.py) gets the stage as it was
        dpo.build_trainer = build
    return {"meter": meter.report(), "stage_timings": summary.get("timings")}


def memory_section(ours: dict, dpo_result: dict, usual: dict | None) -> dict:
    sft_peak, dpo_peak = ours["process_peak_rss_mib"], dpo_result["process_peak_rss_mib"]
    sft_train, dpo_train = ours["meter"]["train_peak_rss_mib"], dpo_result["meter"]["train_peak_rss_mib"]
    out = {
        "sft_process_peak_rss_mib": sft_peak, "dpo_process_peak_rss_mib": dpo_peak,
        "ratio_process_peak": round(dpo_peak / sft_peak, 3),
        "sft_training_phase_peak_rss_mib": sft_train, "dpo_training_phase_peak_rss_mib": dpo_train,
        "ratio_training_phase_peak": round(dpo_train / sft_train, 3) if sft_train and dpo_train else None,
        "training_phase_is_exact": bool(ours["meter"]["train_peak_is_training_phase_only"]),
        "usual_sft_process_peak_rss_mib": usual["process_peak_rss_mib"] if usual else None,
        "note": "process peak = ru_maxrss of the stage's own process (model loading, which de-quantizes the .gguf, "
                "included); training phase = VmHWM reset when training begins and read when it ends.",
    }
    g_sft, g_dpo = ours["meter"].get("gpu_peak_allocated_gib"), dpo_result["meter"].get("gpu_peak_allocated_gib")
    if g_sft and g_dpo:
        out.update({"sft_gpu_peak_allocated_gib": g_sft, "dpo_gpu_peak_allocated_gib": g_dpo,
                    "ratio_gpu_peak": round(g_dpo / g_sft, 3)})
    return out


if __name__ == "__main__":
    common.run_section("memory")
