"""`sarcasm-dpo dpo --beta_sweep`: one DPO run per --betas value, the best named by GEN validation (--select_by).

Each beta trains into OUTPUT_DIR_beta_X exactly as a single `sarcasm-dpo dpo --beta X` would
(dpo.train); a beta whose folder already holds the finished run of these settings is reused, so an
interrupted sweep picks up where it stopped. X is the beta in short form (0.1, 1e-05), or exact where
that would round (0.1000001), so no two betas share a folder; every folder passes the single run's
checks, and is locked, before the first beta trains. The best run is chosen on the validation split only
(never the test split), by the score of the adapter each run saved (its best evaluation); ties go to the run
whose saved adapter is closest to SFT (the smaller KL of that adapter, `saved_kl`, not the end of training's).
Into OUTPUT_DIR go beta_sweep_results.json (every run's row, best_beta, best_output_dir),
beta_sweep.png and a copy of the best run's adapter and records, COMPLETE.json last.

    sarcasm-dpo dpo --beta_sweep --betas 0.01,0.1,0.5 --no_wandb
    python scripts/dpo_train_v2.py --beta_sweep --betas 0.01,0.1,0.5 --no_wandb

dpo.run dispatches here; this module drives dpo.train (the one-run stage) once per beta.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

from ..atomic import COMPLETE_MARKER, atomic_path, finish_output_dir, prepare_output_dir, read_json, write_json
from ..metrics import fmt

SWEEP_FILE = "beta_sweep_results.json"
SWEEP_PLOT = "beta_sweep.png"


def beta_name(beta: float) -> str:
    """How a beta is written in its folder's and run's names: short (0.1, 1e-05) where that reads back as the
    same number, else exact (0.1000001), so two distinct betas never share a folder."""
    short = f"{beta:g}"
    return short if float(short) == beta else repr(beta)


def beta_dir(out: Path, beta: float) -> Path:
    return out.parent / f"{out.name}_beta_{beta_name(beta)}"


def beta_dirs(s) -> list[str]:
    """The folder of each beta of a sweep's settings (every one a run's output folder, beside OUTPUT_DIR)."""
    return [str(beta_dir(Path(s.output_dir), beta)) for beta in dict.fromkeys(s.betas)]


def run_sweep(s, dpo) -> dict:
    """One model per beta into OUTPUT_DIR_beta_X; the best by GEN validation (--select_by) is named (and copied).

    `dpo`: the one-run DPO stage module (stages/dpo.py), handed over by dpo.run, which imports this one.
    """
    from ..atomic import check_output_dir
    from ..models import check_adapter_dir
    from ..rundir import claim_outputs, input_paths, refuse_outputs_over_inputs
    from ..tracking import make_group_name
    from ..training.distributed import is_main_process

    started = time.perf_counter()
    out = Path(s.output_dir)
    check_adapter_dir(s.sft_model)
    check_output_dir(out, s, overwrite=s.overwrite, resume=s.resume)  # claimed once the betas are trained
    group = s.wandb_group or (None if s.no_wandb else make_group_name("dpo-beta-sweep"))
    runs = [dataclasses.replace(s, beta=beta, beta_sweep=False, output_dir=folder, wandb_group=group)
            for beta, folder in zip(dict.fromkeys(s.betas), beta_dirs(s))]
    # Each beta's folder is a run's output folder, held to what the CLI holds a single run's to: none replaces an
    # input, each is locked (and tidied after killed runs) until the sweep's own results are in place, and each
    # passes the single run's checks before the first beta trains (sweep_betas), so a folder that cannot be used
    # is found before any training, not after.
    refuse_outputs_over_inputs([run.output_dir for run in runs], input_paths(s))
    with claim_outputs([run.output_dir for run in runs], "sarcasm-dpo " + " ".join(sys.argv[1:]),
                       main_process=is_main_process()):
        return sweep_betas(s, dpo, runs, group, started)


def sweep_betas(s, dpo, runs: list, group: str | None, started: float) -> dict:
    """Train (or reuse) each beta's run in `runs`, then write the sweep's results, plot and best adapter."""
    from ..tracking import Tracker
    from ..training.distributed import barrier, is_main_process
    from ..training.resilience import free_memory

    config = dataclasses.asdict(s)
    out = Path(s.output_dir)
    main = is_main_process()
    finished = [plan_beta(run, dpo) for run in runs]  # every folder checked before the first beta trains
    rows = []
    for i, (sub, done) in enumerate(zip(runs, finished), 1):
        name = beta_name(sub.beta)
        if done:
            # An interrupted sweep picks up where it stopped: finished betas are not trained again.
            if main:
                print(f"[beta sweep] {i}/{len(runs)}: beta {name} already finished in {sub.output_dir}; reusing it.")
            summary = read_json(Path(sub.output_dir) / dpo.SUMMARY_FILE)
        else:
            if main:
                print(f"[beta sweep] {i}/{len(runs)}: beta {name} -> {sub.output_dir}")
            summary = dpo.train(sub, run_name=f"dpo-beta-{name}")
        rows.append(sweep_row(sub.beta, sub.output_dir, summary, dpo))
        free_memory()
    # Best by the runs' own selection score on GEN validation (--select_by) of the adapter each saved; ties go to
    # the run whose saved adapter is closest to SFT (the smaller KL of that adapter: the model the sweep keeps).
    best = max(rows, key=lambda r: (r["val_score"] if r["val_score"] is not None else -1.0,
                                    -(r["saved_kl"] if r["saved_kl"] is not None else math.inf)))
    results = {"config": config, "selection": f"highest {dpo.PRIMARY} {s.select_by} of the saved checkpoint (never "
                                              "the test split); ties go to the smaller KL of the saved adapter "
                                              "(saved_kl)",
               "best_beta": best["beta"], "best_output_dir": best["output_dir"], "best_val_f1": best["val_f1"],
               "copied_to": str(out), "runs": rows, "seconds": round(time.perf_counter() - started, 2)}
    if not main:
        barrier()  # the main process writes the sweep's files
        return results
    prepare_output_dir(out, config, overwrite=s.overwrite, resume=s.resume)
    write_json(out / SWEEP_FILE, results)
    from ..plots import plot_beta_sweep

    plot_beta_sweep(rows, out / SWEEP_PLOT, best_beta=best["beta"])
    copy_run(Path(best["output_dir"]), out, {"best_beta": best["beta"], "source": best["output_dir"]}, dpo)
    with Tracker(enabled=not s.no_wandb, project=s.wandb_project, job_type="dpo-sweep", config=config, group=group,
                 name="dpo-beta-sweep") as tracker:
        import pandas as pd

        tracker.log_table("beta_sweep/results", pd.DataFrame(rows))
        tracker.log_image("beta_sweep/plot", out / SWEEP_PLOT)
        tracker.log_summary({"best_beta": best["beta"], "best_val_f1": best["val_f1"],
                             "best_output_dir": best["output_dir"]})
    finish_output_dir(out, config, {"stage": "dpo", "best_beta": best["beta"], "best_output_dir": best["output_dir"],
                                    "inputs": dpo.inputs_of(s)})
    print(f"[beta sweep] best beta by {dpo.PRIMARY} {s.select_by}: {beta_name(best['beta'])} "
          f"({fmt(best['val_score'])}; F1 {best['val_f1']:.3f}, KL of the saved adapter "
          f"{fmt(best['saved_kl'])}); model in {best['output_dir']} (adapter also copied to {out}). "
          f"Results: {out / SWEEP_FILE}")
    barrier()
    return results


def plan_beta(sub, dpo) -> bool:
    """Read-only, before any beta trains: True when the beta's folder holds its finished run (reused as it is);
    else the checks dpo.train makes of its output folder before training (checkpoints/plan_run_dir: not a file,
    no other run's results or checkpoints unless --overwrite / --resume, a resumable checkpoint), raising
    UserError where it would refuse."""
    from ..training.checkpoints import plan_run_dir

    if dpo.finished_with(Path(sub.output_dir), sub):
        return True
    plan_run_dir(Path(sub.output_dir), sub, finished=False, state_file=dpo.STATE_FILE, inputs=dpo.inputs_of(sub))
    return False


def sweep_row(beta: float, output_dir: str, summary: dict, dpo) -> dict:
    best_val = summary.get("best_val") or {}
    end = summary["diagnostics"]["end_of_training"]
    return {"beta": beta, "output_dir": output_dir, "val_f1": summary.get("best_f1"),
            # older summaries (before --select_by) selected by F1
            "val_score": summary.get("best_score", summary.get("best_f1")),
            "isarcasm_val_f1": (best_val.get(dpo.SECONDARY) or {}).get("f1"),
            "val_accuracy": (best_val.get(dpo.PRIMARY) or {}).get("accuracy"),
            "best_step": summary.get("best_step"), "improved_over_sft": summary.get("improved_over_sft"),
            "final_kl": end.get("dpo/kl"), "final_reward_ratio": summary["health"]["reward_ratio"]["value"],
            "final_drift": end.get("dpo/drift"), "saved_kl": summary["diagnostics"]["saved_model"].get("dpo/kl"),
            "kl_verdict": summary["health"]["kl"]["verdict"],
            "ratio_verdict": summary["health"]["reward_ratio"]["verdict"],
            "stopped_early": summary.get("stopped_early"), "train_s": summary["timings"].get("train_s")}


def copy_run(src: Path, dst: Path, note: dict, dpo) -> None:
    """Copy the best run's adapter and records into the sweep folder (adapter_config.json last)."""
    names = [p.name for p in src.iterdir() if p.is_file() and p.name not in (COMPLETE_MARKER, dpo.SUMMARY_FILE)]
    names.sort(key=lambda n: n == "adapter_config.json")
    summary = read_json(src / dpo.SUMMARY_FILE)
    summary["selected_by_beta_sweep"] = note
    write_json(dst / dpo.SUMMARY_FILE, summary)
    for name in names:
        with atomic_path(dst / name) as tmp:
            shutil.copyfile(src / name, tmp)
