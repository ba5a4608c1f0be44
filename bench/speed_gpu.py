"""Speed section 4, GPU only: the achieved share of the GPU's peak, and the whole pipeline's wall time.

    python bench/speed_gpu.py --random_init                 # = python bench/speed.py --sections gpu --random_init
    python bench/speed_gpu.py --random_init --pipeline_stages split,sft   # the pipeline over two calls

Skipped with a message where there is no CUDA device. With the SFT (and evaluation) section's
figures in the same run, the model FLOPs per second they achieved over the GPU's dense bf16 peak;
with `--random_init` (the Qwen2.5-0.5B architecture, random weights), the wall time of the whole
pipeline with the original settings (configs/qwen2.5-0.5b.yaml: SFT 2 epochs on the GEN train
split, DPO 3 epochs, three evaluations of the 1,304-text test split), its stages built and run by
the pipeline's own code (`stages.pipeline.stage_settings`, `run_stage`). Flags and the result
file: `python bench/speed.py --help`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import GPU_CONFIG  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity); --gpu_peak_tflops overrides.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                        "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def run(ctx) -> None:
    """The section as bench/speed.py runs it, after the others: their figures are in ctx.result."""
    import torch

    args, result = ctx.args, ctx.result
    if not ctx.on_gpu:
        print("[speed] 4. GPU figures skipped: no CUDA device on this machine.")
        result["gpu"] = "skipped: no CUDA device"
        return
    peak, source = gpu_peak_tflops(args)
    gpu = {"device": torch.cuda.get_device_name(0), "peak_source": source}
    if result.get("sft_training"):
        gpu["throughput_share"] = throughput_share(result["sft_training"], result.get("evaluation"),
                                                   model_flops(ctx.model_ref), peak)
    result["gpu"] = gpu
    ctx.save_partial("gpu_throughput")
    if args.random_init:
        print("[speed] 4. GPU: the whole pipeline with the original settings", flush=True)

        def stage_done(seconds: dict) -> None:
            gpu["pipeline"] = {"stage_seconds_so_far": seconds}
            ctx.save_partial("pipeline:" + list(seconds)[-1])

        gpu["pipeline"] = pipeline_wall_time(args, ctx.model_ref, ctx.work, on_stage=stage_done)
    else:
        gpu["pipeline"] = "not run: pass --random_init for the Qwen2.5-0.5B-shaped pipeline timing"
    result["gpu"] = gpu


def gpu_peak_tflops(args) -> tuple[float | None, str]:
    import torch

    name = torch.cuda.get_device_name(0)
    if args.gpu_peak_tflops:
        return args.gpu_peak_tflops, f"--gpu_peak_tflops for {name}"
    for key, value in GPU_PEAK_BF16_TFLOPS.items():  # most specific names first
        if key.lower() in name.lower():
            return value, f"data-sheet dense bf16 peak for {key} ({name})"
    return None, f"unknown GPU {name!r}: pass --gpu_peak_tflops"


def model_flops(model_ref: str) -> dict:
    """Parameter counts for FLOP estimates (matmul weights of the blocks; embedding/LM head apart)."""
    from transformers import AutoConfig

    from sarcasm_dpo.models import resolve_source

    source, extra = resolve_source(model_ref)
    c = AutoConfig.from_pretrained(source, **extra)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (c.hidden_size + 2 * kv) + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return {"block_params": per_layer * c.num_hidden_layers, "head_params": c.hidden_size * c.vocab_size,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size}


def lora_flops_per_token(flops: dict, seq: float, backward: bool = True) -> float:
    """Model FLOPs per token of a LoRA training pass (forward + backward for activations: 4 x params,
    plus attention scores 8 x layers x hidden x sequence), or of a forward pass alone (half)."""
    per_token = 4 * (flops["block_params"] + flops["head_params"]) + 8 * flops["layers"] * flops["hidden"] * seq
    return per_token if backward else per_token / 2


def throughput_share(sft: dict, evaluation: dict | None, flops: dict, peak: float | None) -> dict:
    """Model FLOPs actually done per second over the GPU's peak (MFU), for LoRA training and scoring.

    LoRA training: forward (2 FLOPs per weight per token) plus the backward pass for activations
    (2 more); frozen weights get no weight gradients, so 4 x params per token, not the usual 6.
    Attention scores add 4 x layers x hidden x sequence per token forward (x2 with backward).
    Scoring: 2 x block params per token plus the LM head once per text (logits_to_keep=1).
    """
    out = {"peak_bf16_tflops": peak, "formula": throughput_share.__doc__.split("\n\n", 1)[1].strip()}
    m = sft["ours"]
    if m.get("padded_tokens_per_s") and peak:
        achieved = lora_flops_per_token(flops, m["mean_padded_length"]) * m["padded_tokens_per_s"] / 1e12
        out["sft_tflops"] = round(achieved, 2)
        out["sft_share_of_peak"] = round(achieved / peak, 4)
    if evaluation and peak:
        b = evaluation["bare_forward"]
        seconds = evaluation["scorer"]["best_seconds"]
        work = 2 * flops["block_params"] * b["padded_tokens"] + 2 * flops["head_params"] * evaluation["texts"]
        out["scorer_tflops"] = round(work / seconds / 1e12, 2)
        out["scorer_share_of_peak"] = round(work / seconds / 1e12 / peak, 4)
    return out


# The pipeline's stages in its order, without mining (off by default): what --pipeline_stages chooses from.
PIPELINE_STAGES = ("split", "sft", "dpo", "compare")


def stages_asked(text: str | None) -> list[str]:
    """--pipeline_stages as a list (None: every stage); BadInput when it names no stage or another one."""
    wanted = [x.strip() for x in (",".join(PIPELINE_STAGES) if text is None else text).split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(PIPELINE_STAGES))
    if unknown:
        raise common.BadInput(f"--pipeline_stages: unknown {unknown}; choose from {','.join(PIPELINE_STAGES)}.")
    if not wanted:
        raise common.BadInput(f"--pipeline_stages {text!r} names no stage; choose from {','.join(PIPELINE_STAGES)}.")
    return wanted


def dpo_caps(sample: int | None, pairs: int | None) -> dict:
    """The DPO stage's sample settings under --pipeline_sample and --pipeline_dpo_pairs: both caps, the smaller wins."""
    caps = {"sample_size": sample, "val_sample_size": sample} if sample else {}
    if pairs:
        caps["sample_size"] = min(pairs, sample) if sample else pairs
    return caps


def pipeline_settings(args, model_ref: str, out: Path) -> dict:
    """Every stage's settings as `sarcasm-dpo pipeline --config configs/qwen2.5-0.5b.yaml` builds them (its
    own `stage_settings`, which chains each stage's inputs to the outputs before it), with this benchmark's
    folders under `out`, sample caps and seed, and `args.stage_overrides` ({stage: {setting: value}},
    bench/device_check.py's --set) on top. In the pipeline's order, without mining (off by default)."""
    from types import SimpleNamespace

    from sarcasm_dpo.config import load_yaml
    from sarcasm_dpo.stages.pipeline import stage_settings

    cap = args.pipeline_sample
    data = load_yaml(GPU_CONFIG)
    ours = {
        "split": dict(output_dir=str(out / "splits"), overwrite=True),
        "sft": dict(model=model_ref, seed=args.seed, output_dir=str(out / "sft"), sample_size=cap,
                    val_sample_size=cap, overwrite=True),
        # random weights make early stopping arbitrary: time all 3 epochs, as a run that keeps improving would
        "dpo": dict(seed=args.seed, output_dir=str(out / "dpo"), **dpo_caps(cap, args.pipeline_dpo_pairs),
                    patience=10_000, overwrite=True),
        "compare": dict(model=model_ref, seed=args.seed, output_dir=str(out / "results"), sample_size=cap),
    }
    extra = getattr(args, "stage_overrides", None) or {}
    for name, values in ours.items():
        data[name] = {**(data.get(name) or {}), **values, **extra.get(name, {})}
    pipe = SimpleNamespace(data_dir=args.data_dir, wandb_project=data.get("wandb_project"), no_wandb=True, mine=False)
    stages = stage_settings(data, pipe, None, str(GPU_CONFIG))
    return {name: settings for name, settings in stages.items() if name != "mine"}


def pipeline_wall_time(args, model_ref: str, work: Path, on_stage=None) -> dict:
    """split -> sft -> dpo -> compare with the original settings (configs/qwen2.5-0.5b.yaml), timed per stage.

    `--pipeline_stages` runs some of the stages and takes the others' times from an earlier call
    with the same settings and work folder, for device limits shorter than the whole pipeline.
    The total is the sum of the stage times.
    """
    from sarcasm_dpo import data
    from sarcasm_dpo.atomic import read_complete, write_json
    from sarcasm_dpo.settings import DPOSettings
    from sarcasm_dpo.stages import STAGES
    from sarcasm_dpo.stages.pipeline import run_stage

    out = work / "pipeline"
    cap = args.pipeline_sample
    stages = pipeline_settings(args, model_ref, out)
    folders = {name: Path(settings.output_dir) for name, settings in stages.items()}
    wanted = stages_asked(args.pipeline_stages)
    # Each stage's time and settings, kept beside its outputs, so a later call (on the same machine,
    # same --work_dir) can run the remaining stages and still report the whole pipeline.
    record_path = out / "stage_seconds.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    seconds, earlier = {}, []
    start = time.perf_counter()
    last = max(list(stages).index(name) for name in wanted)
    for name, settings in list(stages.items())[: last + 1]:  # later stages: not run yet, by this call or before
        as_dict = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
        if name not in wanted:
            kept = record.get(name)
            if not kept or kept["settings"] != as_dict or read_complete(folders[name]) is None:
                raise common.BadInput(f"--pipeline_stages leaves out {name!r}, but {folders[name]} holds no complete "
                                      f"{name} output timed with these settings; run that stage first (same --work_dir).")
            seconds[name] = kept["seconds"]
            earlier.append(name)
            continue
        t0 = time.perf_counter()
        run_stage(name, settings)
        seconds[name] = round(time.perf_counter() - t0, 2)
        record[name] = {"seconds": seconds[name], "settings": as_dict}
        write_json(record_path, record)
        if on_stage:
            on_stage(dict(seconds))
    if not (folders["compare"] / STAGES["compare"].record).is_file():
        return {"stage_seconds": seconds, "stages_timed_in_earlier_calls": earlier,
                "note": "compare has not run yet: no whole-pipeline figure"}
    result = json.loads((folders["compare"] / STAGES["compare"].record).read_text())
    timing = {"stage_seconds": seconds, "stages_timed_in_earlier_calls": earlier,
              "total_s": round(sum(seconds.values()), 2),
              "wall_s_this_call": round(time.perf_counter() - start, 2),
              "settings": {k: dataclasses.asdict(v) for k, v in stages.items()},
              "test_items": result["test_set"]["n"], "evaluations": list(result["models"]),
              "note": "random weights: the accuracy figures are meaningless; this measures time only."}
    summary = json.loads((folders["dpo"] / STAGES["dpo"].record).read_text())
    timing["dpo_summary"] = {k: summary.get(k) for k in ("data", "global_steps", "best_step", "stopped_early")}
    if args.pipeline_dpo_pairs and not cap:
        # What the original 4,000-pair setting would take: the DPO stage's time scaled by the pair count.
        # An estimate, not a measurement (it scales the per-epoch validation too, so it leans high).
        # the config asks for 4,000 pairs; the stage caps that at what the split holds (one pair per text)
        asked = common.stage_settings(GPU_CONFIG, DPOSettings, "dpo", sft_model="x", output_dir="x").sample_size
        original = min(asked, len(data.load_split(folders["split"] / "isarcasm_train.csv")))
        used = min(args.pipeline_dpo_pairs, original)
        dpo_estimate = seconds["dpo"] * original / used
        timing["estimate_with_original_dpo_pairs"] = {
            "dpo_pairs_measured": used, "dpo_pairs_original_setting": original,
            "dpo_s_estimated": round(dpo_estimate, 1),
            "total_s_estimated": round(timing["total_s"] - seconds["dpo"] + dpo_estimate, 1),
            "how": "measured DPO seconds x original pairs / measured pairs; the other stages as measured"}
    return timing


if __name__ == "__main__":
    common.run_section("gpu")
