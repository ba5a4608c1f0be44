"""Compare stage: Base vs SFT vs DPO (and a TF-IDF reference) on the held-out GEN test split.

The base model is loaded once; the SFT and DPO adapters sit on it side by side (PEFT adapters
"sft" and "dpo") and are switched between, and the base model is scored with the adapters turned
off, so memory holds one model, not three. Every model is scored by the shared `Scorer` (one
forward pass per batch, P(sarcastic) from the Yes/No logits), and every number in the report is
computed from those probabilities at threshold 0.5, which `predictions.csv` holds per item so
anyone can recompute them. When an adapter folder records a threshold chosen on GEN validation
(threshold.json, see thresholds.py), the report adds the block `at_validation_threshold`: every
model again, each at its own recorded threshold (0.5 for a model that records none), with its
intervals, improvements and McNemar tests; the plot then shows that block (the models as predict and
an export use them), the 0.5 figures marked beside it. No threshold is ever chosen on the test split.

Beside the three language models sits a TF-IDF + logistic regression model trained on the GEN
train split (`--no_baseline` skips it): if the fine-tuned model does not beat it, the report says
so. Paired models are compared with the exact McNemar test on the same items.

    sarcasm-dpo compare --test_csv data/splits/gen_test.csv --sft_model models/sft \
        --dpo_model models/dpo_enhanced --sample_size 1000 --no_wandb
    python scripts/compare_all_models.py --skip_base --extra_test isarcasm=data/splits/isarcasm_val.csv

Skipping a model: `--skip_base` skips the base model; `--dpo_model none` (or an empty value)
compares without DPO, `--sft_model none` without SFT (then `--model` names the base model). A
path that is given but not there is an error naming it, so a typo never silently drops a row.

Outputs (in `--output_dir`, default results/): model_comparison_results.json,
model_comparison_plot.png, predictions.csv, one predictions_NAME.csv per `--extra_test`, and
COMPLETE.json last. They are written into a staging folder beside it and swapped in whole at the
end, so a comparison that fails leaves the previous one as it was. The output folder follows every
stage's rule: empty, or holding a finished comparison of the same settings and inputs (test and
train files, adapters, by checksum), is (re)written; anything else only with --overwrite.

Whoever reads model_comparison_results.json back (the pipeline's closing lines, export's model card)
checks it with `check_results_record` first: valid JSON of the wrong shape is named field by field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import baseline, data, metrics, models
from .. import rundir
from ..atomic import check_output_dir, finish_output_dir, marker_missing, read_complete, write_csv, write_json
from ..detector import note_text_lengths
from ..metrics import fmt
from ..sampling import stratified_sample
from ..errors import UserError
from ..settings import CompareSettings, default_of

RESULTS_FILE = "model_comparison_results.json"
PLOT_FILE = "model_comparison_plot.png"
PREDICTIONS_FILE = "predictions.csv"
BASELINE = "tfidf_logreg"
NAMES = {"base": "Base", "sft": "SFT", "dpo": "DPO", BASELINE: "TF-IDF+LR"}
# (newer, older) pairs reported as improvements in percentage points and tested with McNemar.
PAIRS = [("sft", "base"), ("dpo", "base"), ("dpo", "sft"), ("sft", BASELINE), ("dpo", BASELINE)]
IMPROVEMENT_KEYS = ("accuracy", "precision", "recall", "f1", "macro_f1", "roc_auc")
ALPHA = 0.05
EXTRA_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def run(settings: CompareSettings) -> dict:
    s = settings
    started = time.perf_counter()
    config = dataclasses.asdict(s)

    # --- setup: every check on the user's input happens here, before a model is loaded ---
    adapters = resolve_adapters(s)
    recorded = recorded_thresholds(adapters)
    note_text_lengths(adapters, s.max_text_tokens, "comparison")
    base_ref = resolve_base_model(s, adapters)
    for folder in adapters.values():
        # Reads shapes only; refusing here keeps a previous comparison in --output_dir as it was.
        models.check_adapter_fits(folder, base_ref)
    test_full = data.load_split(s.test_csv, "test")
    train = load_train(s, test_full)
    check_not_seen(test_full, s.test_csv, adapters)
    test = stratified_sample(test_full, s.sample_size, s.seed)
    extras = load_extra_tests(s, train)
    inputs = inputs_of(s)
    final = check_results_dir(Path(s.output_dir), s, s.overwrite, inputs)
    counts = data.class_counts(test)
    print(f"Test set: {s.test_csv}: {len(test)} of {len(test_full)} items ({counts['sarcastic']} sarcastic, "
          f"{counts['not_sarcastic']} not)")

    from ..tracking import Tracker, adapter_artifact

    with Tracker(enabled=not s.no_wandb, project=s.wandb_project, job_type="compare", config=config,
                 group=s.wandb_group) as tracker:
        for key, folder in adapters.items():
            tracker.use_artifact(folder, type="model", name=adapter_artifact(key))
        tracker.use_artifact(s.test_csv, type="dataset", name=Path(s.test_csv).stem)

        # --- score: each model once over every test set's texts ---
        sets = {"main": test, **{name: frame for name, (_, _, frame) in extras.items()}}
        texts = [t for frame in sets.values() for t in frame["text"]]
        timings: dict[str, float] = {}
        probs = score_language_models(s, base_ref, adapters, texts, timings)
        if not s.no_baseline:
            t0 = time.perf_counter()
            pipe = baseline.tfidf_logreg(train, seed=s.seed)
            probs[BASELINE] = baseline.predict_proba(pipe, texts)
            timings[f"{BASELINE}_s"] = round(time.perf_counter() - t0, 3)
        by_set = split_probs(probs, sets)

        # --- evaluate and save ---
        results = {
            "config": config,
            "test_set": describe_test_set(s.test_csv, test_full, test, s.sample_size),
            "train_set": None if train is None else {
                "path": s.train_csv, "sha256": data.file_sha256(s.train_csv), "n": len(train),
                "overlap_with_test": data.overlap_count(test, train)},  # measured (load_train refuses any)
            **evaluate(test, by_set["main"], s),
            "extra_tests": {},
            "model_paths": {"base": base_ref, **{k: str(v) for k, v in adapters.items()},
                            **({BASELINE: f"trained on {s.train_csv}"} if not s.no_baseline else {})},
            "timings": timings,
            # DPO's rows equal SFT's by construction then; the plot and the table say so rather than let
            # identical bars read as "DPO changed nothing".
            "dpo_kept_sft": "dpo" in adapters and dpo_kept_sft(adapters["dpo"]),
        }
        for name, (path, full, frame) in extras.items():
            info = describe_test_set(path, full, frame, s.sample_size)
            info["overlap_with_train"] = 0 if train is None else data.overlap_count(frame, train)
            results["extra_tests"][name] = {"test_set": info, **evaluate(frame, by_set[name], s)}
        if recorded:  # only then: a comparison of models that record none stays as it was
            own = {key: r["threshold"] for key, r in recorded.items()}
            results[OWN] = {"thresholds": recorded, **evaluate(test, by_set["main"], s, own)}
            for name, (_, _, frame) in extras.items():
                results["extra_tests"][name][OWN] = evaluate(frame, by_set[name], s, own)

        predictions = {"main": predictions_frame(test, by_set["main"])}
        files = {"main": PREDICTIONS_FILE, **{name: f"predictions_{name}.csv" for name in extras}}
        for name in extras:
            predictions[name] = predictions_frame(sets[name], by_set[name])
        from ..plots import plot_comparison

        # The plot shows the models as they are used (each at its own validation threshold, as predict and an
        # export label texts) when they record one, with the 0.5 figures marked beside; its titles say which.
        at_own = results.get(OWN)
        plotted = ("each model at its own validation threshold (in its legend label); x: the same model at 0.5"
                   if at_own else "every model at threshold 0.5 (none records a validation threshold)")
        # Every file is written into a staging folder beside --output_dir and swapped in at the end: a
        # comparison that fails half-way (out of memory, a full disk) leaves the previous one whole.
        with rundir.staged(final) as stage:
            for name, frame in predictions.items():
                write_csv(stage / files[name], frame)
            plot_comparison((at_own or results)["models"], stage / PLOT_FILE, names=NAMES,
                            title=f"{Path(s.test_csv).name}: {len(test)} items\n{plotted}"
                            + (f"\n{KEPT_SFT_NOTE}" if results["dpo_kept_sft"] else ""),
                            at_half=results["models"] if at_own else None)
            timings["total_s"] = round(time.perf_counter() - started, 3)
            results["outputs"] = {"results": str(final / RESULTS_FILE), "plot": str(final / PLOT_FILE),
                                  "predictions": {k: str(final / v) for k, v in files.items()}}
            write_json(stage / RESULTS_FILE, results)
            finish_output_dir(stage, config, extra={"stage": "compare", "n": len(test), "inputs": inputs,
                                                    "accuracy": {k: m["accuracy"] for k, m in results["models"].items()}})
        out = Path(os.path.realpath(final))
        print(format_report(results))
        log_to_tracker(tracker, results, predictions["main"], out / PLOT_FILE, out / RESULTS_FILE)
    return results


# --------------------------------------------------------------------------------------------
# setup


def _skipped(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("", "none", "skip")


def resolve_adapters(s: CompareSettings) -> dict[str, Path]:
    """{"sft": folder, "dpo": folder} for the adapters to evaluate; a given path must exist."""
    adapters = {}
    for key, value in (("sft", s.sft_model), ("dpo", s.dpo_model)):
        if _skipped(value):
            continue
        folder = Path(value).expanduser()
        if not folder.exists():
            raise UserError(
                f"The {NAMES[key]} adapter folder {folder} does not exist. Train it first, fix --{key}_model, "
                f"or pass --{key}_model none to compare without it.")
        adapters[key] = models.check_adapter_dir(folder)
        if read_complete(folder) is None:
            print(f"Note: {folder} has {marker_missing(folder)}; its training run may not have finished.")
    if not adapters and s.skip_base:
        raise UserError("Nothing to evaluate: --skip_base is set and neither an SFT nor a DPO adapter was given.")
    if "sft" in adapters and "dpo" in adapters:
        warn_if_dpo_from_other_sft(adapters["dpo"], adapters["sft"])
    return adapters


def warn_if_dpo_from_other_sft(dpo_dir: Path, sft_dir: Path) -> None:
    """DPO starts from an SFT adapter; comparing it against a different SFT run would mislead: one in another
    folder, or the one in the same folder retrained since (the DPO run recorded the checksum of what it started
    from, `rundir.input_identity`, in its COMPLETE.json)."""
    from ..atomic import _same_path, read_complete
    from ..rundir import input_identity

    trained_from = models.run_settings(dpo_dir).get("sft_model")
    if trained_from and not _same_path(str(trained_from), str(sft_dir)):
        print(f"Warning: the DPO adapter in {dpo_dir} was trained from {trained_from}, not from {sft_dir}; "
              "the DPO-vs-SFT numbers compare two unrelated runs.")
        return
    inputs = (read_complete(dpo_dir) or {}).get("inputs")
    recorded = inputs.get("sft_model") if isinstance(inputs, dict) else None
    if recorded and recorded != input_identity({"sft_model": sft_dir}).get("sft_model"):
        print(f"Warning: the SFT adapter in {sft_dir} has changed (its weights or config) since the DPO adapter in "
              f"{dpo_dir} was trained from it (retrained at the same path?); the DPO-vs-SFT numbers compare two "
              "unrelated runs.")


OWN = "at_validation_threshold"  # the results block that decides each model at its own recorded threshold


def recorded_thresholds(adapters: dict[str, Path]) -> dict[str, dict]:
    """{key: {"threshold", "criterion", "split", "source"}} for every adapter whose folder records a threshold
    chosen on validation (threshold.json); never a threshold from the test split, which compare only scores."""
    from ..thresholds import THRESHOLD_FILE, read_threshold

    out = {}
    for key, folder in adapters.items():
        record = read_threshold(folder)
        if record is not None:
            out[key] = {"threshold": float(record["threshold"]), "criterion": record.get("criterion"),
                        "split": record.get("split"), "source": str(Path(folder) / THRESHOLD_FILE)}
    return out


KEPT_SFT_NOTE = "DPO = SFT: early stopping kept the SFT adapter (DPO never beat it on validation)"


def dpo_kept_sft(dpo_dir: Path) -> bool:
    """Whether the DPO run saved its SFT start unchanged (its summary: improved_over_sft is false)."""
    found = models.recorded_run(dpo_dir)  # none (an adapter from elsewhere): nothing to say
    return found is not None and found[1].get("improved_over_sft") is False


def resolve_base_model(s: CompareSettings, adapters: dict[str, Path]) -> str:
    if s.model:
        from ..detector import check_model_folder, refuse_adapter_on_export

        check_model_folder(s.model)
        refuse_adapter_on_export(s.model, next(iter(adapters.values()), None))
        return s.model
    if adapters:
        from ..detector import refuse_adapter_on_export

        for adapter in adapters.values():  # a recorded base since replaced by an export would score that
            refuse_adapter_on_export(None, adapter)
        return models.adapter_base_model(next(iter(adapters.values())))
    raise UserError("No base model: pass --model, or an SFT/DPO adapter folder whose training record names it.")


def load_train(s: CompareSettings, test: pd.DataFrame) -> pd.DataFrame | None:
    """The GEN train split, after checking no test text is in it (a leak would inflate every score)."""
    if not Path(s.train_csv).exists():
        if s.train_csv != default_of(CompareSettings, "train_csv"):  # a path the user typed: not a note
            raise UserError(f"The training split {s.train_csv} does not exist; pass the file the models were trained "
                            "on (the TF-IDF baseline and the leakage check read it).")
        if not s.no_baseline:
            raise UserError(f"The training split {s.train_csv} does not exist; the TF-IDF baseline trains on it. "
                            "Pass --train_csv, or --no_baseline to skip the baseline (and the leakage check).")
        print(f"Note: {s.train_csv} not found; the train/test leakage check is skipped.")
        return None
    train = data.load_split(s.train_csv, "training")
    overlap = data.overlap_count(test, train)
    if overlap:
        raise UserError(
            f"Leakage: {overlap} text(s) of the test split {s.test_csv} also appear in the training split "
            f"{s.train_csv}, so the test scores would be inflated. Re-create the splits with `sarcasm-dpo split`.")
    if not s.no_baseline:  # now, not after every model was scored: a baseline that cannot train fails the run
        from ..baseline import check_baseline_train

        check_baseline_train(train["text"], train["label"], s.train_csv)
    return train


def check_not_seen(test: pd.DataFrame, test_csv: str, adapters: dict[str, Path]) -> None:
    """Refuse a test split that shares texts with what an adapter was trained on or selected on (the files its
    run recorded), whatever --train_csv says: its scores there would be inflated, and the threshold chosen on it."""
    for key, folder in adapters.items():
        # models.run_settings: a finished folder without its record, or a record of the wrong shape, is an error
        # here, not a check skipped in silence; an adapter from elsewhere records nothing to check.
        recorded = models.run_settings(folder)
        for setting in ("train_csv", "val_csv"):
            path = recorded.get(setting)
            if not path or not Path(path).is_file():
                continue  # moved or from another machine: the --train_csv check is what remains
            overlap = data.overlap_count(test, data.load_split(path, setting))
            if overlap:
                use = "trained on" if setting == "train_csv" else "selected on (checkpoint and threshold)"
                raise UserError(f"Leakage: {overlap} text(s) of the test split {test_csv} are in {path}, which the "
                                f"{NAMES[key]} adapter was {use}; its test scores would be inflated. Score it on "
                                "the held-out test split.")


def load_extra_tests(s: CompareSettings, train: pd.DataFrame | None) -> dict[str, tuple[str, pd.DataFrame, pd.DataFrame]]:
    """{NAME: (path, full table, evaluated sample)} for every --extra_test NAME=PATH."""
    extras = {}
    for item in s.extra_test:
        name, _, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not path:
            raise UserError(f"--extra_test {item!r} names no file: write NAME=PATH, e.g. --extra_test "
                            "headlines=Sarcasm_Headlines_Dataset.json.")
        if not EXTRA_NAME.match(name) or name == "main":
            raise UserError(f"--extra_test name {name!r} must be letters, digits, '.', '_' or '-' (and not 'main').")
        if name in extras:
            raise UserError(f"--extra_test name {name!r} is given twice.")
        full = data.load_table(path)
        if train is not None and (overlap := data.overlap_count(full, train)):
            print(f"Warning: {overlap} text(s) of extra test set {name} ({path}) are in the training split.")
        extras[name] = (path, full, stratified_sample(full, s.sample_size, s.seed))
    return extras


def inputs_of(s: CompareSettings) -> dict[str, str]:
    """The checksums of everything a comparison reads (splits, extra test sets, adapters): recorded in its
    COMPLETE.json, so a finished comparison of other data or other adapters is never taken for this one's."""
    extras = {f"extra_test {name.strip()}": path.strip() for name, _, path in (e.partition("=") for e in s.extra_test)}
    adapters = {f"{key}_model": value for key, value in (("sft", s.sft_model), ("dpo", s.dpo_model))
                if not _skipped(value)}
    return rundir.input_identity({"test_csv": s.test_csv, "train_csv": s.train_csv, **extras, **adapters})


def check_results_dir(folder: Path, config, overwrite: bool, inputs: dict) -> Path:
    """Read-only: the rule every stage follows. An empty folder, or one holding a finished comparison of
    these settings and inputs, may be (re)written; another comparison or files compare did not write
    only with --overwrite."""
    return check_output_dir(folder, config, overwrite=overwrite, inputs=inputs)


# --------------------------------------------------------------------------------------------
# scoring


def score_language_models(s: CompareSettings, base_ref: str, adapters: dict[str, Path], texts: list[str],
                          timings: dict) -> dict[str, np.ndarray]:
    """P(sarcastic) per model, from one base model with the adapters switched in and out."""
    from ..scoring import Scorer

    t0 = time.perf_counter()
    device = models.pick_device(s.device)
    tokenizer = models.load_tokenizer(base_ref)
    model = models.load_base_model(base_ref, device)
    for key, folder in adapters.items():
        model = models.attach_adapter(model, folder, adapter_name=key)
    model.eval()
    timings["load_models_s"] = round(time.perf_counter() - t0, 3)
    print(f"Loaded {base_ref} on {device} with adapters: {', '.join(adapters) or 'none'}")

    # A model whose scores are not finite stops the comparison as it is scored, before anything is written, and
    # the error names it (scorer.name, set with each model's progress label).
    scorer = Scorer(model, tokenizer, batch_size=s.batch_size, max_text_tokens=s.max_text_tokens, progress=True)

    probs = {}
    if not s.skip_base:
        t0 = time.perf_counter()
        # With adapters attached, disable_adapter() gives the untouched base weights.
        with model.disable_adapter() if adapters else contextlib.nullcontext():
            scorer.progress, scorer.name = "scoring base", f"The base model {base_ref}"
            probs["base"] = scorer.predict_proba(texts)
        timings["score_base_s"] = round(time.perf_counter() - t0, 3)
    for key, folder in adapters.items():
        t0 = time.perf_counter()
        model.set_adapter(key)
        scorer.progress = f"scoring {key}"  # one bar per model, each saying which
        scorer.name = f"The {NAMES[key]} adapter {folder} (on {base_ref})"
        probs[key] = scorer.predict_proba(texts)
        timings[f"score_{key}_s"] = round(time.perf_counter() - t0, 3)
    return probs


def split_probs(probs: dict[str, np.ndarray], sets: dict[str, pd.DataFrame]) -> dict[str, dict[str, np.ndarray]]:
    """Cut the concatenated scores back into one block per test set."""
    out, start = {}, 0
    for name, frame in sets.items():
        out[name] = {key: p[start:start + len(frame)] for key, p in probs.items()}
        start += len(frame)
    return out


# --------------------------------------------------------------------------------------------
# evaluation


MCNEMAR = "exact McNemar test (two-sided binomial on the items where the two models disagree)"


def evaluate(frame: pd.DataFrame, probs: dict[str, np.ndarray], s: CompareSettings,
             thresholds: dict[str, float] | None = None) -> dict:
    """Metrics with intervals per model, improvements in points, and McNemar tests for each pair, each model
    decided at its threshold in `thresholds` (0.5 for a model not in it, and for all when it is None)."""
    labels = frame["label"].to_numpy(dtype=int)
    cut = {key: (thresholds or {}).get(key, 0.5) for key in probs}
    scored = {key: metrics.with_intervals(labels, p, threshold=cut[key], n_resamples=s.n_bootstrap, seed=s.seed)
              for key, p in probs.items()}
    improvements, significance = {}, {}
    for new, old in PAIRS:
        if new not in scored or old not in scored:
            continue
        pair = f"{new}_vs_{old}"
        improvements[pair] = metrics.improvement_pp(scored[new], scored[old], keys=IMPROVEMENT_KEYS)
        test = metrics.mcnemar_exact(labels, metrics.decide(probs[new], cut[new]), metrics.decide(probs[old], cut[old]))
        test["verdict"] = metrics.significance_verdict(NAMES[new], NAMES[old], scored[new]["accuracy"],
                                                       scored[old]["accuracy"], test["p_value"], ALPHA)
        test["alpha"] = ALPHA
        test["test"] = MCNEMAR  # named in the results, so a reader need not guess which test gave p_value
        significance[pair] = test
    return {"models": scored, "improvements_pp": improvements, "significance": significance}


def describe_test_set(path: str, full: pd.DataFrame, frame: pd.DataFrame, sample_size: int | None) -> dict:
    return {"path": str(path), "sha256": data.file_sha256(path), "items_sha256": data.frame_checksum(frame),
            "n": len(frame), "n_total": len(full), "class_counts": data.class_counts(frame),
            "sample_size": sample_size or None}


def predictions_frame(frame: pd.DataFrame, probs: dict[str, np.ndarray]) -> pd.DataFrame:
    out = frame[["id", "text", "label"]].reset_index(drop=True).copy()
    for key, p in probs.items():
        out[f"p_{key}"] = p
    return out


# --------------------------------------------------------------------------------------------
# the results record, read back


RESULTS_FIX = ("It is the record `sarcasm-dpo compare` wrote; run the comparison again to write it anew (with "
               "--overwrite where it refuses the folder).")
METRIC_KEYS = ("accuracy", "precision", "recall", "f1")  # numbers in every model's row
OPTIONAL_KEYS = ("macro_f1", "roc_auc")  # numbers, or null where a class is absent from the test set
INTERVAL_KEYS = ("accuracy_ci", "f1_ci")  # [low, high]


def check_results_record(record, path: str | os.PathLike, fix: str = RESULTS_FIX) -> dict:
    """`record` (a comparison's results, as read back from `path`) if it has the shape every reader of it relies
    on (format_table, format_verdicts, the pipeline's closing lines, export's model card), else DamagedRecord
    naming the first field that is wrong, e.g. `models.dpo.accuracy is "high" where a number belongs`.

    Valid JSON of the wrong shape (a hand edit, another program's file) would otherwise fail later with a
    TypeError half-way through writing something, or be printed as if it were a measurement. Required: test_set
    (with n) and models (each with its metrics and intervals); the other blocks are checked where present."""
    from ..atomic import DamagedRecord

    path = Path(path)

    def wrong(where: str, value, want: str):
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DamagedRecord(path, f"{where} is {shown} where {want} belongs" if where else
                                  f"it holds {shown} where the object a comparison writes belongs", fix)

    def obj(value, where: str) -> dict:
        if not isinstance(value, dict):
            wrong(where, value, "an object")
        return value

    def number(value, where: str, low: float | None = None, high: float | None = None, none_ok: bool = False):
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            wrong(where, value, "a number" + (" or null" if none_ok else ""))
        if (low is not None and value < low) or (high is not None and value > high):
            wrong(where, value, f"a number in [{low}, {high}]")

    def whole(value, where: str):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            wrong(where, value, "a whole number")

    def text(value, where: str):
        if not isinstance(value, str):
            wrong(where, value, "text")

    def test_set(value, where: str):
        info = obj(value, where)
        if "n" not in info:
            wrong(f"{where}.n", None, "the number of items scored")
        whole(info["n"], f"{where}.n")
        if "n_total" in info:
            whole(info["n_total"], f"{where}.n_total")
        if "path" in info:
            text(info["path"], f"{where}.path")

    def block(value, where: str):
        """models, improvements_pp and significance: the 0.5 block, the own-threshold block, an extra test set."""
        scored = obj(value.get("models"), f"{where}models")
        if not scored:
            wrong(f"{where}models", scored, "at least one model's metrics")
        for key, m in scored.items():
            m = obj(m, f"{where}models.{key}")
            for name in METRIC_KEYS:
                number(m.get(name), f"{where}models.{key}.{name}", 0, 1)
            for name in OPTIONAL_KEYS:
                number(m.get(name), f"{where}models.{key}.{name}", 0, 1, none_ok=True)
            for name in INTERVAL_KEYS:
                ci = m.get(name)
                if not isinstance(ci, list) or len(ci) != 2:
                    wrong(f"{where}models.{key}.{name}", ci, "a [low, high] pair")
                for i, bound in enumerate(ci):
                    number(bound, f"{where}models.{key}.{name}[{i}]", 0, 1)
            if "threshold" in m:
                number(m["threshold"], f"{where}models.{key}.threshold", 0, 1)
        improvements = obj(value.get("improvements_pp", {}), f"{where}improvements_pp")
        for pair, test in obj(value.get("significance", {}), f"{where}significance").items():
            new, _, old = pair.partition("_vs_")
            if new not in NAMES or old not in NAMES:
                wrong(f"{where}significance", pair, f"a pair of {', '.join(NAMES)} written NEW_vs_OLD")
            test = obj(test, f"{where}significance.{pair}")
            text(test.get("verdict"), f"{where}significance.{pair}.verdict")
            whole(test.get("n_discordant"), f"{where}significance.{pair}.n_discordant")
            delta = obj(improvements.get(pair), f"{where}improvements_pp.{pair}")
            for name in ("accuracy", "f1"):
                number(delta.get(name), f"{where}improvements_pp.{pair}.{name}")

    obj(record, "")
    absent = [key for key in ("test_set", "models") if key not in record]
    if absent:
        raise DamagedRecord(path, f"it has no {' and no '.join(absent)}: it is not the results of a comparison", fix)
    test_set(record["test_set"], "test_set")
    block(record, "")
    if record.get(OWN) is not None:
        own = obj(record[OWN], OWN)
        block(own, f"{OWN}.")
        for key, chosen in obj(own.get("thresholds", {}), f"{OWN}.thresholds").items():
            number(obj(chosen, f"{OWN}.thresholds.{key}").get("threshold"), f"{OWN}.thresholds.{key}.threshold", 0, 1)
    for name, extra in obj(record.get("extra_tests", {}), "extra_tests").items():
        extra = obj(extra, f"extra_tests.{name}")
        test_set(extra.get("test_set"), f"extra_tests.{name}.test_set")
        block(extra, f"extra_tests.{name}.")
        if extra.get(OWN) is not None:
            block(obj(extra[OWN], f"extra_tests.{name}.{OWN}"), f"extra_tests.{name}.{OWN}.")
    for key, folder in obj(record.get("model_paths", {}), "model_paths").items():
        text(folder, f"model_paths.{key}")
    return record


# --------------------------------------------------------------------------------------------
# reporting


def _ci(values) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def format_table(scored: dict) -> str:
    header = f"{'Model':<10} {'Accuracy [95% CI]':<24} {'Prec':>6} {'Rec':>6}  {'F1 [95% CI]':<24} {'MacroF1':>7} {'AUC':>6}"
    lines = [header, "-" * len(header)]
    for key, m in scored.items():
        lines.append(f"{NAMES.get(key, key):<10} {m['accuracy']:.3f} {_ci(m['accuracy_ci']):<18} "
                     f"{m['precision']:>6.3f} {m['recall']:>6.3f}  {m['f1']:.3f} {_ci(m['f1_ci']):<18} "
                     f"{fmt(m.get('macro_f1'), width=7)} {fmt(m.get('roc_auc'), width=6)}")
    return "\n".join(lines)


def format_brief(scored: dict) -> str:
    """One line for a block of models: "Base acc 0.502, F1 0.009; SFT acc 0.757, F1 0.777"."""
    return "; ".join(f"{NAMES.get(key, key)} acc {m['accuracy']:.3f}, F1 {m['f1']:.3f}" for key, m in scored.items())


def format_summary(results: dict) -> list[str]:
    """The findings as the models are used, for the pipeline's closing lines: each model at its own validation
    threshold first (the threshold predict and an export label texts at), in full with its verdicts; then the
    same items at 0.5 for every model, one line and its verdicts, labelled as such. Where no model records a
    threshold, the 0.5 table is the whole story and says so."""
    info = results["test_set"]
    where = f"Test set {info.get('path', '?')} ({info['n']} items)"
    kept = [f"  {KEPT_SFT_NOTE}."] if results.get("dpo_kept_sft") else []
    own = results.get(OWN)
    if not own:
        return [f"\n{where}, every model at threshold 0.5 (none records a validation threshold):",
                format_table(results["models"]), *format_verdicts(results), *kept]
    return [f"\n{where}, each model at its own validation threshold, as predict labels with it "
            f"({own_thresholds(own)}):", format_table(own["models"]), *format_verdicts(own), *kept,
            "At threshold 0.5 for every model instead (not the thresholds the models are used at):",
            f"  {format_brief(results['models'])}", *format_verdicts(results)]


def format_verdicts(block: dict) -> list[str]:
    lines = []
    for pair, test in block.get("significance", {}).items():  # none: no two models were compared
        delta = block["improvements_pp"][pair]
        new, old = pair.split("_vs_")
        lines.append(f"  {NAMES[new]} vs {NAMES[old]}: accuracy {delta['accuracy']:+.1f} pp, F1 {delta['f1']:+.1f} pp; "
                     f"{test['verdict']} ({test['n_discordant']} items where they disagree)")
    return lines


def format_report(results: dict) -> str:
    info = results["test_set"]
    parts = [f"\n{info['path']} ({info['n']} items; threshold 0.5)", format_table(results["models"]),
             *format_verdicts(results)]
    if results.get("dpo_kept_sft"):
        parts.append(f"  {KEPT_SFT_NOTE}.")
    own = results.get(OWN)
    if own:
        parts += [f"\nThe same items, each model at its own validation threshold ({own_thresholds(own)})",
                  format_table(own["models"]), *format_verdicts(own)]
        if results.get("dpo_kept_sft"):
            parts.append(f"  {KEPT_SFT_NOTE}.")
    for name, block in results["extra_tests"].items():
        parts += [f"\nExtra test set {name}: {block['test_set']['path']} ({block['test_set']['n']} items)",
                  format_table(block["models"]), *format_verdicts(block)]
        if block.get(OWN):
            parts += ["  at each model's own validation threshold:", format_table(block[OWN]["models"]),
                      *format_verdicts(block[OWN])]
    parts.append(f"\nResults: {results['outputs']['results']}")
    return "\n".join(parts)


def own_thresholds(own: dict) -> str:
    """"SFT 0.613 (gen_val), Base 0.5 (none recorded)": which threshold decided each model."""
    recorded = own["thresholds"]
    return ", ".join(f"{NAMES.get(k, k)} {recorded[k]['threshold']:.3g} ({recorded[k]['split']})" if k in recorded
                     else f"{NAMES.get(k, k)} 0.5 (none recorded)" for k in own["models"])


def comparison_table(scored: dict) -> pd.DataFrame:
    rows = []
    for key, m in scored.items():
        rows.append({"model": NAMES.get(key, key), "accuracy": m["accuracy"], "accuracy_ci_low": m["accuracy_ci"][0],
                     "accuracy_ci_high": m["accuracy_ci"][1], "precision": m["precision"], "recall": m["recall"],
                     "f1": m["f1"], "f1_ci_low": m["f1_ci"][0], "f1_ci_high": m["f1_ci"][1],
                     "macro_f1": m["macro_f1"], "roc_auc": m["roc_auc"],
                     **{f"{c}_{k}": m["per_class"][c][k] for c in ("sarcastic", "not_sarcastic")
                        for k in ("precision", "recall", "f1")}})
    return pd.DataFrame(rows)


def confusion_table(scored: dict) -> pd.DataFrame:
    rows = []
    for key, m in scored.items():
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        rows.append({"model": NAMES.get(key, key), "tn": tn, "fp": fp, "fn": fn, "tp": tp})
    return pd.DataFrame(rows)


def _scalars(m: dict) -> dict:
    out = {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "macro_f1", "roc_auc") if m[k] is not None}
    out.update({"accuracy_ci_low": m["accuracy_ci"][0], "accuracy_ci_high": m["accuracy_ci"][1],
                "f1_ci_low": m["f1_ci"][0], "f1_ci_high": m["f1_ci"][1]})
    out.update({c: {k: m["per_class"][c][k] for k in ("precision", "recall", "f1")} for c in m["per_class"]})
    return out


def log_to_tracker(tracker, results: dict, predictions: pd.DataFrame, plot_path: Path, results_path: Path) -> None:
    if not tracker.active:
        return
    logged = {"compare": {key: _scalars(m) for key, m in results["models"].items()}}
    logged["compare"]["improvement_pp"] = results["improvements_pp"]
    logged["compare"]["mcnemar_p"] = {pair: t["p_value"] for pair, t in results["significance"].items()}
    for name, block in results["extra_tests"].items():
        logged[f"extra_{name}"] = {key: _scalars(m) for key, m in block["models"].items()}
    if results.get(OWN):
        logged[f"compare_{OWN}"] = {key: _scalars(m) for key, m in results[OWN]["models"].items()}
    tracker.log(logged)
    tracker.log_table("compare/table", comparison_table(results["models"]))
    tracker.log_table("compare/confusion_matrices", confusion_table(results["models"]))
    tracker.log_image("compare/plot", plot_path)
    tracker.log_table("compare/predictions", predictions)
    tracker.log_summary({"verdicts": {pair: t["verdict"] for pair, t in results["significance"].items()},
                         "test_n": results["test_set"]["n"], "test_sha256": results["test_set"]["sha256"]})
    tracker.log_artifact(results_path, name="model-comparison", type="results")
