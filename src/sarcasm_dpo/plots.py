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


def plot_comparison(models: dict, path, names: dict | None = None, title: str | None = None):
    """Grouped bars of the overall metrics (95% bootstrap error bars on accuracy and F1), per-class
    precision/recall/F1 bars, and one confusion matrix per model, in one PNG.

    `models` maps a key (base, sft, ...) to the dict of `metrics.with_intervals`; `names` gives
    the display name of each key. Returns the path.
    """
    import numpy as np
    from matplotlib.gridspec import GridSpec

    names = names or {}
    keys = list(models)
    label = [names.get(k, k) for k in keys]
    colours = plt.get_cmap("tab10")(np.arange(len(keys)) % 10)
    ncols = max(2, len(keys))
    fig = plt.figure(figsize=(max(12, 3.4 * ncols), 8.5))
    grid = GridSpec(2, 2 * ncols, figure=fig, height_ratios=[1.1, 1], hspace=0.45, wspace=0.9)
    width = 0.8 / max(1, len(keys))

    # Overall metrics; a metric that is undefined (ROC-AUC with one class) is drawn as no bar.
    ax = fig.add_subplot(grid[0, :ncols])
    x = np.arange(len(_OVERALL))
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
    ax.set_xticks(x, [t for _, t in _OVERALL], rotation=20)
    ax.set_ylim(0, 1.22)  # headroom for the legend row above the bars
    ax.set_title("Overall (error bars: 95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(keys), frameon=False)

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
    ax.set_title("Per class")
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
        ax.set_title(f"{label[i]} (acc {models[key]['accuracy']:.3f})", fontsize=10)

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
