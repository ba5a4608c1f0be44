"""DPO study: which preference source and beta teach the SFT model something, chosen on validation only.

    python bench/dpo_study.py select --sft_model models/smollm2/sft     # ~1 h on 2 cores (12 runs)
    python bench/dpo_study.py report --compare_dir results/smollm2      # after the test split is scored once

`select` trains DPO from one SFT adapter for every source x beta (default: label, rephrase,
reasoning, rephrase+label x 0.05, 0.1, 0.5) on the same class-balanced subset size of
iSarcasmEval training pairs, one epoch each, and scores every run on the same stratified subsets
of GEN validation and iSarcasmEval validation, before training (the SFT start) and after.
Each finished run is appended to the result file at once, and a run whose folder is complete
for its settings is reused, so a stop loses nothing already measured. The choice: the highest
GEN-validation balanced accuracy at the run's own validation threshold (the way a saved model is
used, thresholds.py), provided it beats the SFT start on the same texts; ROC-AUC and iSarcasmEval
F1 are reported beside it. Nothing here reads the test split.

The chosen configuration is then trained on all its pairs by the CPU config
(configs/smollm2-135m-cpu.yaml: `sarcasm-dpo dpo` then `sarcasm-dpo compare`), which scores
the test split once; `report` reads that comparison (Base, SFT, chosen DPO, TF-IDF, each at 0.5
and at its validation threshold, intervals and McNemar tests from compare) and writes the study's
table and plot beside the selection grid: bench/results/dpo_study_<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG = common.REPO / "configs" / "smollm2-135m-cpu.yaml"
SOURCES = ["label", "rephrase", "reasoning", "rephrase+label"]
BETAS = [0.05, 0.1, 0.5]
PRIMARY, SECONDARY = "gen_val", "isarcasm_val"
SELECT_BY = "balanced_accuracy"
OWN = "at_validation_threshold"  # compare's block of each model at its own recorded threshold


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="phase", required=True)
    sel = sub.add_parser("select", help="Train every source x beta and choose on validation.")
    sel.add_argument("--sft_model", required=True, help="The SFT adapter every run starts from (and its reference).")
    sel.add_argument("--config", default=str(CONFIG), help="Config whose dpo section gives the other settings.")
    sel.add_argument("--splits", default="data/splits", help="Folder from `sarcasm-dpo split`.")
    sel.add_argument("--sources", type=common.comma_list(), default=",".join(SOURCES),
                     help="Comma-separated --pairs specs.")
    sel.add_argument("--betas", type=common.comma_list(item=common.positive_float), default=",".join(map(str, BETAS)),
                     help="Comma-separated betas.")
    sel.add_argument("--lrs", type=common.comma_list(item=common.positive_float), default=None,
                     help="Comma-separated learning rates (default: the config's).")
    sel.add_argument("--pairs", type=common.positive_int, default=256,
                     help="Class-balanced pairs per run (same for every source).")
    sel.add_argument("--val_samples", type=common.positive_int, default=300,
                     help="Stratified GEN and iSarcasmEval validation texts scored per evaluation.")
    sel.add_argument("--preference_data", default=None, help="Mined pairs (from `sarcasm-dpo mine`) for the source 'mined'.")
    sel.add_argument("--work_dir", default=str(common.DEFAULT_WORK / "dpo_study"), help="Where the run folders go.")
    rep = sub.add_parser("report", help="Add the test-split comparison of the chosen configuration.")
    rep.add_argument("--compare_dir", required=True, help="compare's output folder for Base, SFT and the chosen DPO.")
    for q in (sel, rep):
        q.add_argument("--output", default=str(common.RESULTS / "dpo_study_smollm2-135m.json"), help="Result file.")
    return p.parse_args(argv)


# -- select -----------------------------------------------------------------------------------------------


def run_settings(args, source: str, beta: float, lr: float | None = None):
    from sarcasm_dpo.settings import DPOSettings

    splits = Path(args.splits)
    # The config's lr is implied; another lr is named in the tag (and the folder).
    tag = f"{source.replace('+', '_')}_beta{beta:g}" + ("" if lr is None else f"_lr{lr:g}")
    extra = {"preference_data": args.preference_data} if "mined" in source else {}
    if lr is not None:
        extra["lr"] = lr
    return tag, common.stage_settings(
        args.config, DPOSettings, "dpo", no_wandb=True, sft_model=args.sft_model,
        output_dir=str(Path(args.work_dir) / tag), train_csv=str(splits / "isarcasm_train.csv"),
        val_csv=str(splits / "gen_val.csv"), isarcasm_val_csv=str(splits / "isarcasm_val.csv"),
        pairs=source, beta=beta, balance=True, sample_size=args.pairs, epochs=1, eval_steps=0,
        val_sample_size=args.val_samples, select_by=SELECT_BY, overwrite=True, **extra)


def run_row(tag: str, source: str, beta: float, folder: Path, seconds) -> dict:
    """One run's validation record: the SFT start and the end of training on the same texts."""
    from sarcasm_dpo.stages import dpo

    summary = json.loads((folder / dpo.SUMMARY_FILE).read_text())
    evals = json.loads((folder / dpo.EPOCH_FILE).read_text())["evaluations"]
    start, end = evals[0], evals[-1]

    def view(e):
        return {"step": e["step"], "selection_score": e.get("selection_score"),
                **{f"{split}_{k}": (e.get(split) or {}).get(k) for split in (PRIMARY, SECONDARY)
                   for k in ("accuracy", "f1", "roc_auc")}}

    return {"tag": tag, "source": source, "beta": beta, "pairs": summary["pairs"], "start": view(start),
            "end": view(end), "gain": _gain(start, end), "kept_step": summary["best_step"],
            "kl_end": summary["health"]["kl"]["value"], "kl_verdict": summary["health"]["kl"]["verdict"],
            "train_s": summary["timings"].get("train_s"), "seconds": seconds, "output_dir": str(folder)}


def _gain(start: dict, end: dict) -> float | None:
    a, b = start.get("selection_score"), end.get("selection_score")
    return None if a is None or b is None else round(b - a, 6)


def select(args) -> int:
    from sarcasm_dpo.atomic import write_json
    from sarcasm_dpo.stages.pipeline import finished_here, run_stage

    out = Path(args.output)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"study": "dpo sources x beta", "machine": common.machine_info(),
                   "sft_model": args.sft_model, "selection": f"{PRIMARY} {SELECT_BY} at the run's own validation "
                   "threshold, end of training, must beat the SFT start on the same texts",
                   "pairs_per_run": args.pairs, "val_samples": args.val_samples})
    # Every invocation adds its runs (and its command) to the same file; a run it repeats is reused.
    result.setdefault("commands", []).append(common.command_line())
    config_lr = run_settings(args, "label", 0.1)[1].lr
    runs = {r["tag"]: {"lr": config_lr, **r} for r in result.get("runs", [])}
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [None]
    grid = [(source, float(beta), lr) for source in args.sources.split(",") for beta in args.betas.split(",")
            for lr in lrs]
    # Every run's settings are built (and so checked: a misspelt source is a UserError) before the first trains.
    planned = [(source, beta, *run_settings(args, source, beta, lr)) for source, beta, lr in grid]
    for source, beta, tag, settings in planned:
        folder = Path(settings.output_dir)
        if finished_here("dpo", settings)[0]:  # the pipeline's rule: same settings, SFT adapter and splits, whole
            print(f"[study] {tag}: complete for these settings, reused", flush=True)
            seconds = (runs.get(tag) or {}).get("seconds")
        else:
            print(f"[study] {tag} -> {folder}", flush=True)
            t0 = time.perf_counter()
            run_stage("dpo", settings)
            seconds = round(time.perf_counter() - t0, 1)
        runs[tag] = {**run_row(tag, source, beta, folder, seconds), "lr": settings.lr}
        result["runs"] = list(runs.values())
        result["chosen"] = choose(result["runs"])
        write_json(out, result)  # after every run: a stop keeps what is measured
    common.write_results(out, result, markdown(result), f"{len(runs)} runs")
    plot_grid(result["runs"], out.with_suffix(".png"))
    return 0


def choose(runs: list[dict]) -> dict:
    """The best end-of-training validation score among the runs that beat their SFT start; None if none did."""
    better = [r for r in runs if r["gain"] is not None and r["gain"] > 0]
    if not better:
        return {"tag": None, "why": f"no source and beta raised {PRIMARY} {SELECT_BY} over the SFT start"}
    best = max(better, key=lambda r: (r["end"]["selection_score"], r["end"][f"{PRIMARY}_roc_auc"] or 0))
    return {"tag": best["tag"], "source": best["source"], "beta": best["beta"], "lr": best.get("lr"),
            "why": f"highest {PRIMARY} {SELECT_BY} ({best['end']['selection_score']:.3f}, SFT start "
                   f"{best['start']['selection_score']:.3f}) of the {len(better)} run(s) that beat the SFT start"}


def _f(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    lines = [f"DPO study from {result['sft_model']}: {result['pairs_per_run']} class-balanced pairs per run, "
             f"one epoch; {result['val_samples']} stratified texts of each validation split. Selection: "
             f"{result['selection']}.", "",
             "| Source | beta | lr | GEN val bal. acc (own threshold) start -> end | GEN val AUC start -> end | "
             "GEN val F1@0.5 end | iSarcasmEval val F1@0.5 start -> end | KL end | kept step | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("runs", []):
        s, e = r["start"], r["end"]
        lines.append(f"| {r['source']} | {r['beta']:g} | {_f(r.get('lr'), 'g')} | {_f(s['selection_score'])} -> {_f(e['selection_score'])} | "
                     f"{_f(s[f'{PRIMARY}_roc_auc'])} -> {_f(e[f'{PRIMARY}_roc_auc'])} | {_f(e[f'{PRIMARY}_f1'])} | "
                     f"{_f(s[f'{SECONDARY}_f1'])} -> {_f(e[f'{SECONDARY}_f1'])} | {_f(r['kl_end'], '.3g')} | "
                     f"{r['kept_step']} | {_f(r['train_s'], '.0f')} |")
    chosen = result.get("chosen") or {}
    lines += ["", f"Chosen: {chosen.get('tag') or 'none'} ({chosen.get('why', '')})."]
    if result.get("test"):
        lines += ["", test_markdown(result["test"])]
    return "\n".join(lines)


def plot_grid(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in runs))
    # One bar series per (beta, lr): runs of the same source and beta at another lr are other bars.
    series = sorted({(r["beta"], r.get("lr")) for r in runs}, key=lambda k: (k[0], k[1] or 0))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "selection_score", f"{PRIMARY} balanced accuracy (own threshold)"),
                           (axes[1], f"{SECONDARY}_f1", f"{SECONDARY} F1 at 0.5")):
        width = 0.8 / max(len(series), 1)
        for j, (beta, lr) in enumerate(series):
            vals = [next((r["end"][key] or 0 for r in runs
                          if r["source"] == s and r["beta"] == beta and r.get("lr") == lr), 0) for s in sources]
            ax.bar([i + j * width for i in range(len(sources))], vals, width,
                   label=f"beta {beta:g}" + ("" if lr is None else f", lr {lr:g}"))
        start = next((r["start"][key] for r in runs if r["start"][key] is not None), None)
        if start is not None:
            ax.axhline(start, color="black", linestyle="--", linewidth=1, label="SFT start")
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(sources))], sources, rotation=15)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report --------------------------------------------------------------------------------------------


def test_summary(compare_dir: Path) -> dict:
    """What compare measured on the test split (and the extra sets), at 0.5 and at each model's own threshold."""
    from sarcasm_dpo.stages import STAGES

    record = json.loads((compare_dir / STAGES["compare"].record).read_text())
    return {"compare_dir": str(compare_dir), "record": record}


def test_markdown(test: dict) -> str:
    record = test["record"]
    lines = [f"Test split scored once by `sarcasm-dpo compare` ({test['compare_dir']}); 95% bootstrap intervals.", ""]
    sets = [("GEN test", record)] + [(name, block) for name, block in (record.get("extra_tests") or {}).items()]
    for set_name, block in sets:
        own = block.get(OWN) or {}
        cuts = {k: r["threshold"] for k, r in ((record.get(OWN) or {}).get("thresholds") or {}).items()}
        lines += [f"**{set_name}**", "", "| Model | threshold | Accuracy | F1 (sarcastic) | ROC-AUC |", "|---|---|---|---|---|"]
        for decided, models in (("0.5", block.get("models") or {}), ("own", own.get("models") or {})):
            for name, m in models.items():
                cut = 0.5 if decided == "0.5" else cuts.get(name, 0.5)
                where = "" if decided == "0.5" else (" (validation)" if name in cuts else " (none recorded)")
                lines.append(f"| {name} | {cut:.3f}{where} | "
                             f"{common.fmt_ci(m, 'accuracy')} | {common.fmt_ci(m, 'f1')} | {common.fmt_ci(m, 'roc_auc')} |")
        for decided, sig in (("at 0.5", block.get("significance") or {}), ("at own thresholds", own.get("significance") or {})):
            if sig:
                lines += ["", f"McNemar {decided}: " + "; ".join(
                    f"{k.replace('_vs_', ' vs ')} p={v['p_value']:.3g} ({v['n_discordant']} discordant)"
                    for k, v in sig.items())]
        lines.append("")
    return "\n".join(lines)


def report(args) -> int:
    from sarcasm_dpo.atomic import write_json

    out = Path(args.output)
    result = json.loads(out.read_text())
    result["test"] = test_summary(Path(args.compare_dir))
    write_json(out, result)
    common.write_results(out, result, markdown(result), "report")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return select(args) if args.phase == "select" else report(args)


if __name__ == "__main__":
    common.run_main(main)
