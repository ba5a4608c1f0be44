"""Figures for every stage, written as PNG files (atomically) so nothing depends on W&B.

Matplotlib runs headless (Agg); each function takes plain data and a path and returns the path.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

from .atomic import save_figure  # noqa: E402

__all__ = ["plt", "save_figure"]

# Stage-specific plot functions follow (SFT curves, DPO curves, beta sweep, model comparison).


# --- model comparison (compare.py) ------------------------------------------------------------

_OVERALL = [("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"),
            ("macro_f1", "Macro-F1"), ("roc_auc", "ROC-AUC")]


def plot_comparison(models: dict, path, names: dict | None = None, title: str | None = None,
                    at_half: dict | None = None):
    """Grouped bars of the overall metrics (95% bootstrap error bars on accuracy and F1), per-class
    precision/recall/F1 bars, and one confusion matrix per model, in one PNG.

    `models` maps a key (base, sft, ...) to the dict of `metrics.with_intervals`; `names` gives
    the display name of each key. Every label says the threshold its figures are at (each dict's
    "threshold"): models may be decided at different ones, and the same scores read very
    differently at 0.5 and at a model's validation threshold. `at_half`: the same models at 0.5,
    drawn as an x on the overall bars of each model whose threshold is not 0.5. Returns the path.
    """
    import numpy as np
    from matplotlib.gridspec import GridSpec

    names = names or {}
    keys = list(models)
    label = [f"{names.get(k, k)} @ {models[k].get('threshold', 0.5):.3g}" for k in keys]
    colours = plt.get_cmap("tab10")(np.arange(len(keys)) % 10)
    ncols = max(2, len(keys))
    fig = plt.figure(figsize=(max(12, 3.4 * ncols), 8.5))
    grid = GridSpec(2, 2 * ncols, figure=fig, height_ratios=[1.1, 1], hspace=0.45, wspace=0.9)
    width = 0.8 / max(1, len(keys))

    # Overall metrics; a metric that is undefined (ROC-AUC with one class) is drawn as no bar.
    ax = fig.add_subplot(grid[0, :ncols])
    x = np.arange(len(_OVERALL))
    marked = False  # one legend entry for the x marks at 0.5
    for i, key in enumerate(keys):
        m = models[key]
        values = [m.get(metric) if m.get(metric) is not None else np.nan for metric, _ in _OVERALL]
        pos = x + (i - (len(keys) - 1) / 2) * width
        ax.bar(pos, values, width, color=colours[i], label=label[i])
        # Error bars only where an interval exists (accuracy, F1); no empty caps on the others.
        for j, (metric, _) in enumerate(_OVERALL):
            ci = m.get(f"{metric}_ci")
            if ci and m.get(metric) is not None:
                err = [[max(0.0, m[metric] - ci[0])], [max(0.0, ci[1] - m[metric])]]
                ax.errorbar(pos[j], m[metric], yerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
        half = (at_half or {}).get(key)
        if half is not None and half.get("threshold", 0.5) != m.get("threshold", 0.5):
            ax.scatter(pos, [half.get(metric) if half.get(metric) is not None else np.nan for metric, _ in _OVERALL],
                       marker="x", color="black", s=22, zorder=3, label="same model at 0.5" if not marked else None)
            marked = True
    ax.set_xticks(x, [t for _, t in _OVERALL], rotation=20)
    handles, texts = ax.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda i: texts[i] == "same model at 0.5")  # the x marks' entry last
    columns = min(len(texts), 3)  # labels carry thresholds now: at most three a row, so the legend fits the panel
    rows = -(-len(texts) // columns)
    ax.set_ylim(0, 1.1 + 0.12 * rows)  # headroom for the legend rows above the bars
    ax.set_title("Overall at the threshold in each label (error bars: 95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend([handles[i] for i in order], [texts[i] for i in order], fontsize=8, loc="upper center", ncol=columns,
              frameon=False)

    # Per-class precision / recall / F1.
    ax = fig.add_subplot(grid[0, ncols:])
    groups = [(cls, metric) for cls in ("sarcastic", "not_sarcastic") for metric in ("precision", "recall", "f1")]
    x = np.arange(len(groups))
    for i, key in enumerate(keys):
        per_class = models[key]["per_class"]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [per_class[c][metric] for c, metric in groups], width,
               color=colours[i], label=label[i])
    short = {"sarcastic": "sarc", "not_sarcastic": "not", "precision": "P", "recall": "R", "f1": "F1"}
    ax.set_xticks(x, [f"{short[c]} {short[metric]}" for c, metric in groups], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("Per class, at the threshold in each label")
    ax.grid(axis="y", alpha=0.3)

    # Confusion matrices: rows = true class, columns = predicted, [[tn, fp], [fn, tp]].
    for i, key in enumerate(keys):
        ax = fig.add_subplot(grid[1, 2 * i: 2 * i + 2])
        cm = np.asarray(models[key]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([0, 1], ["not", "sarc"])
        ax.set_yticks([0, 1], ["not", "sarc"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{label[i]} (acc {models[key]['accuracy']:.3f})", fontsize=10)  # "SFT @ 0.788 (acc ...)"

    if title:
        fig.suptitle(title)
    return save_figure(path, fig)


# --- SFT training curves (sft.py) ---------------------------------------------------------------


def plot_sft_curves(steps: list[dict], epochs: list[dict], path, best_epoch: float | None = None,
                    split_name: str = "gen_val"):
    """Two panels: training loss per logged step, and validation accuracy / F1 per epoch.

    `steps` holds {"step", "loss"} records (the Trainer's log history); `epochs` holds
    {"epoch", "accuracy", "f1"} records from the validation callback. The best epoch (the one
    whose adapter was saved) is marked. Returns the path.
    """
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker="." if len(steps) < 50 else None,
                     color="tab:blue")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (answer tokens only)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)

    xs = [r["epoch"] for r in epochs]
    ax_val.plot(xs, [r["accuracy"] for r in epochs], marker="o", label="accuracy", color="tab:green")
    ax_val.plot(xs, [r["f1"] for r in epochs], marker="s", label="F1 (sarcastic)", color="tab:orange")
    if best_epoch is not None:
        ax_val.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"saved (epoch {best_epoch:g})")
    ax_val.set_ylim(0, 1.02)
    ax_val.set_xlabel("epoch")
    ax_val.set_title(f"Validation ({split_name})")
    ax_val.grid(alpha=0.3)
    ax_val.legend(fontsize=8, loc="lower right")
    return save_figure(path, fig)


# --- DPO training curves and beta sweep (dpo.py) -------------------------------------------------


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _healthy_band(ax, values: list, kl_range: tuple[float, float]) -> None:
    """Shade the healthy KL range when the curve comes near it; otherwise say where it is, so a
    KL of 0.01 is not squashed flat by a band drawn up to 2."""
    low, high = kl_range
    top = max(values) if values else 0.0
    ax.ticklabel_format(axis="y", useOffset=False)
    if top >= low / 2:
        ax.axhspan(low, high, color="tab:green", alpha=0.12, label=f"healthy {low:g}-{high:g}")
        ax.set_ylim(0, max(high, top) * 1.08)  # KL is never negative
    else:
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.text(0.98, 0.04, f"healthy range {low:g}-{high:g} lies above this plot", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="tab:green")


def plot_dpo_curves(batch: list[dict], evals: list[dict], path, *, best_step: int | None = None,
                    primary: str = "gen_val", kl_range: tuple[float, float] = (0.5, 2.0),
                    ratio_threshold: float = 1.2):
    """Four panels over optimizer steps: DPO loss; KL to the reference (healthy band shaded) with
    drift; rewards (chosen, rejected, margin) with the reward ratio; validation F1 per evaluation.

    `batch` holds the flat records of dpo_batch_metrics.json (keys train/loss, dpo/kl, rewards/...);
    `evals` the evaluation records ({"step", "<split>": {"f1", ...}}). Returns the path.
    """
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_loss, ax_kl), (ax_rw, ax_f1) = axes
    marker = "." if len(batch) < 60 else None

    ax_loss.plot(*_series(batch, "train/loss"), marker=marker, color="tab:blue")
    ax_loss.set_title("DPO loss")
    ax_loss.set_ylabel("loss")

    kl_steps, kls = _series(batch, "dpo/kl")
    ax_kl.plot(kl_steps, kls, marker=marker, color="tab:red", label="KL(policy || SFT), answer position")
    _healthy_band(ax_kl, kls, kl_range)
    ax_kl.set_title("KL to the reference (probe set)")
    ax_kl.set_ylabel("nats")
    ax_drift = ax_kl.twinx()
    ax_drift.plot(*_series(batch, "dpo/drift"), linestyle="--", color="tab:grey", label="drift ||dW||/||W_sft||")
    ax_drift.set_ylabel("relative drift")
    lines = ax_kl.get_legend_handles_labels()
    more = ax_drift.get_legend_handles_labels()
    ax_kl.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")

    for key, colour in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"),
                        ("rewards/margins", "tab:purple")):
        ax_rw.plot(*_series(batch, key), marker=marker, color=colour, label=key)
    ax_rw.axhline(0, color="black", linewidth=0.6)
    ax_rw.set_title("Implicit rewards and reward ratio")
    ax_rw.set_ylabel("beta * log-ratio")
    ax_ratio = ax_rw.twinx()
    steps, ratios = _series(batch, "dpo/reward_ratio")
    ax_ratio.plot(steps, ratios, linestyle="--", color="tab:orange", label="reward ratio exp(margin/beta)")
    ax_ratio.axhline(ratio_threshold, color="tab:orange", linewidth=0.8, linestyle=":",
                     label=f"healthy > {ratio_threshold:g}")
    if ratios and max(ratios) / max(min(ratios), 1e-12) > 50:
        ax_ratio.set_yscale("log")
    ax_ratio.set_ylabel("ratio")
    lines = ax_rw.get_legend_handles_labels()
    more = ax_ratio.get_legend_handles_labels()
    ax_rw.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")

    splits = [k for k in (evals[0] if evals else {}) if isinstance(evals[0].get(k), dict) and "f1" in evals[0][k]]
    for name in splits:
        style = {"marker": "o"} if name == primary else {"marker": "s", "linestyle": "--"}
        ax_f1.plot([e["step"] for e in evals], [e[name]["f1"] for e in evals], label=f"{name} F1", **style)
    if best_step is not None:
        ax_f1.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"saved (step {best_step})")
    ax_f1.set_ylim(0, 1.02)
    ax_f1.set_ylabel("F1")
    ax_f1.set_title("Validation F1 (sarcastic class)")
    ax_f1.legend(fontsize=8, loc="lower right")

    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig)


def plot_beta_sweep(rows: list[dict], path, best_beta: float | None = None,
                    kl_range: tuple[float, float] = (0.5, 2.0)):
    """Validation F1 (left axis) and final KL to the reference (right axis) against beta (log scale).

    `rows` hold {"beta", "val_f1", "final_kl"} and optionally "isarcasm_val_f1". Returns the path.
    """
    rows = sorted(rows, key=lambda r: r["beta"])
    betas = [r["beta"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(betas, [r.get("val_f1") for r in rows], marker="o", color="tab:blue", label="GEN val F1 (saved model)")
    if any(r.get("isarcasm_val_f1") is not None for r in rows):
        ax.plot(betas, [r.get("isarcasm_val_f1") for r in rows], marker="s", linestyle="--", color="tab:cyan",
                label="iSarcasmEval val F1")
    ax.set_xscale("log")
    ax.set_xticks(betas, [f"{b:g}" for b in betas])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("beta")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1.02)
    ax_kl = ax.twinx()
    kls = [r.get("final_kl") for r in rows]
    ax_kl.plot(betas, kls, marker="^", color="tab:red", label="final KL (end of training)")
    _healthy_band(ax_kl, [k for k in kls if k is not None], kl_range)
    ax_kl.set_ylabel("KL to SFT (nats)")
    if best_beta is not None:
        ax.axvline(best_beta, color="grey", linestyle="--", linewidth=1, label=f"best beta {best_beta:g}")
    lines = ax.get_legend_handles_labels()
    more = ax_kl.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    ax.set_title("Beta sweep: validation F1 and KL against beta")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig)
