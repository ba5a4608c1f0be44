"""Phase 2: Direct Preference Optimisation on iSarcasmEval, from the SFT adapter, with TRL's DPOTrainer.

The policy is the SFT adapter itself, trained further. The reference is the frozen SFT model: TRL
copies the loaded adapter into a second, frozen adapter named "ref" on the same base weights, so
there is no second copy of the model in memory, and at step 0 policy and reference are identical
(KL exactly 0, rewards 0 up to float rounding: the reference's log-probs of every pair are computed
once before training, in other batches, see fast_dpo.py). Only the trained adapter is saved, so

    PeftModel.from_pretrained(base, "models/dpo_enhanced")

is the DPO model. Preference pairs come from the iSarcasmEval training split (its validation split
is only evaluated), with THE prompt used by SFT and evaluation (see pairs.py), or from a file
mined by `sarcasm-dpo mine` (--preference_data).

    sarcasm-dpo dpo --sft_model models/sft --output_dir models/dpo_enhanced --beta 0.1 --epochs 3 --no_wandb
    python scripts/dpo_train_v2.py --beta_sweep --betas 0.01,0.1,0.5 --no_wandb

Diagnostics (training/diagnostics.py has the exact definitions): at every logging step TRL's rewards/* and a
reward ratio exp(margin/beta); at every evaluation, every --diagnostics_steps (default about four
times per epoch) and the last step, the exact KL of the answer-position distribution to the
reference over a fixed probe set of validation prompts, the drift of the adapter from SFT and the
share of probe predictions that flipped. Validation F1 on the GEN validation split (iSarcasmEval validation
F1 beside it) is measured at step 0 and every epoch (or --eval_steps); the best adapter by GEN F1
is saved, which may be the SFT start itself if DPO never beat it; training stops after --patience
evaluations without improvement.

Outputs in --output_dir, each written atomically, COMPLETE.json last: the adapter,
dpo_epoch_metrics.json, dpo_batch_metrics.json, dpo_training_curves.png, dpo_training_summary.json.
--beta_sweep trains one model per --betas value into OUTPUT_DIR_beta_X, writes
beta_sweep_results.json (best_beta and best_output_dir, chosen by validation F1, never the test
split) and beta_sweep.png into OUTPUT_DIR, and copies the best run's adapter there too.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_path, clear_complete, finish_output_dir, prepare_output_dir, read_json, write_json
from ..errors import UserError
from ..training.checkpoints import CHECKPOINTS
from ..training.fast_dpo import describe_step, dpo_trainer_class, is_label_pairs
from ..training.fused_head import project_labelled_positions_only

# The loss types TRL 1.16's DPOTrainer implements (DPOConfig.loss_type).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
PRIMARY = "gen_val"  # its F1 picks the saved checkpoint and the best beta
SECONDARY = "isarcasm_val"  # reported beside it
STATE_FILE = "dpo_state.json"  # in each checkpoint, written last: the checkpoint is complete
EPOCH_FILE = "dpo_epoch_metrics.json"
BATCH_FILE = "dpo_batch_metrics.json"
CURVES_FILE = "dpo_training_curves.png"
SUMMARY_FILE = "dpo_training_summary.json"
SWEEP_FILE = "beta_sweep_results.json"
SWEEP_PLOT = "beta_sweep.png"
SFT_ARTIFACT = "sft-adapter"  # the SFT stage logs its folder under this name; we declare it as input
DPO_ARTIFACT = "dpo-adapter"

DEFINITIONS = {
    "dpo/kl": "Exact KL(policy || reference) of the next-token distribution at the answer position, over the full "
              "vocabulary, mean over the probe prompts (nats). Reference = frozen SFT adapter.",
    "dpo/kl_max": "Largest per-prompt KL on the probe set.",
    "dpo/logratio_chosen": "Mean log pi(chosen|x) - log pi_ref(chosen|x) over the logged pairs (rewards/chosen / beta).",
    "dpo/logratio_rejected": "Mean log pi(rejected|x) - log pi_ref(rejected|x) (rewards/rejected / beta).",
    "dpo/reward_ratio": "exp(rewards/margins / beta): geometric mean over the logged pairs of "
                        "[pi/pi_ref](chosen) / [pi/pi_ref](rejected); 1 = no preference learned beyond SFT.",
    "dpo/drift": "||theta - theta_sft|| / ||theta_sft|| over the LoRA parameters.",
    "dpo/drift_delta_w": "sqrt(sum ||B A - B0 A0||^2 / sum ||B0 A0||^2) over the LoRA modules: drift of the weight update.",
    "dpo/flip_rate": "Share of probe prompts whose P(sarcastic) >= 0.5 decision differs from the reference's.",
    "dpo/probe_p_sarcastic": "Mean P(sarcastic) of the policy on the probe prompts.",
    "rewards/*": "TRL: beta * log-ratio of chosen / rejected, their margin, and the share of pairs with margin > 0.",
}


def run(settings) -> dict:
    """One DPO run, or a beta sweep with --beta_sweep; returns the summary."""
    check_settings(settings)
    if settings.beta_sweep:
        return run_sweep(settings)
    return train(settings)


# -- one run -------------------------------------------------------------------------------------------


def train(s, run_name: str | None = None) -> dict:
    """Train DPO from the SFT adapter, keep the best adapter by GEN validation F1, save it and its record.

    Under `accelerate launch` / `torchrun` every process trains; only the main one writes files and logs.
    """
    from ..models import adapter_base_model, check_adapter_dir, check_adapter_fits, load_tokenizer, pick_device
    from ..training.checkpoints import finish_run_dir, plan_run_dir, save_adapter
    from ..training.distributed import barrier, is_main_process

    started = time.perf_counter()
    config = dataclasses.asdict(s)
    out = Path(s.output_dir)
    main = is_main_process()
    sft_dir = check_adapter_dir(s.sft_model)  # before the heavy imports: a wrong folder fails at once
    base_ref = adapter_base_model(sft_dir)

    from ..tracking import Tracker

    # Setup. Every check on the input runs before the output folder is touched, so a run refused for
    # any reason leaves a previous result in --output_dir byte for byte as it was.
    finished = _finished_with(out, config, sft_dir)
    if s.resume and finished:
        if main:
            print(f"{out} already holds the finished run of these settings; nothing to resume.")
        return read_json(out / SUMMARY_FILE)
    tokenizer = load_tokenizer(base_ref)
    check_text_budget(sft_dir, s.max_text_tokens)
    data = load_data(s, tokenizer)
    check_adapter_fits(sft_dir, base_ref)
    resume_from = plan_run_dir(out, config, s, finished=finished, state_file=STATE_FILE)

    import transformers

    transformers.set_seed(s.seed)
    device = pick_device(s.device)
    model = load_policy(base_ref, sft_dir, device)
    load_s = time.perf_counter() - started

    with Tracker(enabled=not s.no_wandb and main, project=s.wandb_project, job_type="dpo",
                 config={**config, "model": base_ref}, group=s.wandb_group, name=run_name) as tracker:
        tracker.use_artifact(sft_dir, type="model", name=SFT_ARTIFACT)

        # Train (out of memory: smaller batches or a clear message; Ctrl-C / SIGTERM: a checkpoint first).
        train_start = time.perf_counter()
        trainer, validation, diagnostics, used = fit(s, config, out, model, tokenizer, data, tracker, resume_from,
                                                     base_ref, sft_dir, device)
        train_s = time.perf_counter() - train_start

        # Save: the best adapter by GEN validation F1, then the record of how it was made, the marker last.
        save_start = time.perf_counter()
        validation.restore_best(trainer.model)
        saved_diagnostics = diagnostics.measure(trainer.model)
        epochs = epoch_metrics(s, validation, diagnostics)
        if main:
            save_adapter(trainer.model, tokenizer, out, selected_adapters=["default"])  # never TRL's "ref" copy
            write_json(out / EPOCH_FILE, epochs)
            write_json(out / BATCH_FILE, batch_metrics(s, diagnostics))
            from ..plots import plot_dpo_curves

            plot_dpo_curves(diagnostics.records, validation.history, out / CURVES_FILE,
                            best_step=validation.best_step, primary=PRIMARY)
        timings = {"load_s": load_s, "train_s": train_s, "eval_s": validation.eval_seconds,
                   "diagnostics_s": diagnostics.seconds, "save_s": time.perf_counter() - save_start}
        timings["total_s"] = time.perf_counter() - started
        summary = build_summary(s, base_ref, sft_dir, data, trainer, validation, diagnostics, epochs,
                                saved_diagnostics, device, timings, resume_from, used)
        if main:
            write_json(out / SUMMARY_FILE, summary)
            finish_run_dir(out, config, {"best_step": summary["best_step"], "best_f1": summary["best_f1"],
                                         "beta": s.beta, "sft_adapter_sha256": sft_fingerprint(sft_dir)})
        barrier()  # the other processes end when the outputs are in place

        tracker.log_image("dpo/training_curves", out / CURVES_FILE)
        tracker.log_summary({"best_step": summary["best_step"], "best_f1": summary["best_f1"],
                             "improved_over_sft": summary["improved_over_sft"], "health": summary["health"],
                             "final": summary["diagnostics"]["end_of_training"], "timings": summary["timings"]})
        tracker.log_artifact(out, name=DPO_ARTIFACT, type="model",
                             metadata={"base_model": base_ref, "beta": s.beta, "best_step": summary["best_step"],
                                       "best_val_f1": summary["best_f1"]})
    if main:
        print(describe_result(summary, out))
    return summary


def load_policy(base_ref: str, sft_dir: Path, device):
    """The base model with the SFT adapter on it, trainable (TRL adds the frozen "ref" copy)."""
    from ..models import attach_adapter, load_base_model

    return attach_adapter(load_base_model(base_ref, device), sft_dir, trainable=True)


def fit(s, config, out: Path, model, tokenizer, data, tracker, resume_from, base_ref, sft_dir, device):
    """Build the trainer and train; returns (trainer, validation, diagnostics, batch used).

    Out of memory: with --auto_find_batch_size each retry halves the batch, doubles gradient
    accumulation and starts over from the SFT adapter and the same seed (resilience.train_within_memory).
    Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written, StopRequested ends the run.
    A NaN/inf loss stops it with the step and the last good checkpoint named.
    """
    import transformers

    from ..training.checkpoints import claim_run_dir, latest_checkpoint
    from ..training.distributed import is_main_process, quiet, say
    from ..training.recipe import run_trainer
    from ..training.resilience import TrainingDiverged, fit_within_memory, free_memory

    main = is_main_process()
    holder = {"model": model, "claimed": False}

    def attempt(batch_size: int, grad_accum: int, eval_batch_size: int, flag):
        if holder["claimed"]:  # a retry: a fresh copy of the SFT starting point, the same seed
            holder["model"] = None
            free_memory()
            transformers.set_seed(s.seed)
            holder["model"] = load_policy(base_ref, sft_dir, device)
        sized = dataclasses.replace(s, batch_size=batch_size, grad_accum=grad_accum, eval_batch_size=eval_batch_size)
        trainer, validation, diagnostics = build_trainer(sized, holder["model"], tokenizer, data, out / CHECKPOINTS,
                                                         tracker.log, stop_flag=flag, printer=say if main else quiet)
        if resume_from:
            load_state(resume_from, validation, diagnostics)
        if not holder["claimed"]:
            claim_run_dir(out, config, s, resume_from)
            holder["claimed"] = True
        if main:
            print(describe_start(sized, data, base_ref, device, resume_from))
        try:
            run_trainer(trainer, resume_from)
        except TrainingDiverged as exc:
            if main:
                clear_complete(out)  # the metrics below are this run's: the previous run's marker would lie
                write_json(out / BATCH_FILE, batch_metrics(s, diagnostics))
            raise exc.explained("DPO training", latest_checkpoint(out / CHECKPOINTS, STATE_FILE),
                                f"Lower --lr (now {s.lr:g}) or raise --warmup_ratio, then start over with --overwrite; "
                                f"the metrics up to that step are in {out / BATCH_FILE}.") from None
        return trainer, validation, diagnostics

    (trainer, validation, diagnostics), used = fit_within_memory(attempt, s, "dpo", device)
    return trainer, validation, diagnostics, used


def check_settings(s) -> None:
    """What DPOSettings.validate leaves to the stage."""
    from ..settings import check_training_settings

    if s.loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type {s.loss_type!r} is not one of TRL's DPO losses: {', '.join(LOSS_TYPES)}.")
    check_training_settings(s)
    for name in ("save_steps", "eval_steps", "diagnostics_steps"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} must be 0 or a positive count, got {getattr(s, name)}.")
    if s.beta_sweep and not s.betas:
        raise UserError("--beta_sweep needs at least one value in --betas.")
    from ..settings import USUAL_BETA, warn_if_unusual

    for beta in (s.betas if s.beta_sweep else [s.beta]):
        warn_if_unusual("beta", beta, USUAL_BETA, "DPO uses 0.01 to 0.5; a much larger beta barely moves the model from "
                        "SFT, a much smaller one lets it drift without restraint")


def check_text_budget(sft_dir: Path, max_text_tokens: int) -> None:
    """The prompt cuts texts at --max_text_tokens; SFT and DPO should cut them alike."""
    summary = Path(sft_dir) / "training_summary.json"
    try:
        sft_value = read_json(summary)["config"]["max_text_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if sft_value != max_text_tokens:
        print(f"Note: the SFT adapter was trained with --max_text_tokens {sft_value}, this run uses {max_text_tokens}; "
              "long texts are cut differently in the two stages.")


# -- data ------------------------------------------------------------------------------------------------


@dataclass
class DPOData:
    pairs: object  # DataFrame: prompt, chosen, rejected (+ text, label, id, p_sarcastic)
    val_sets: dict  # name -> DataFrame(text, label); the first is PRIMARY
    probe_texts: list[str]
    info: dict = field(default_factory=dict)


def load_data(s, tokenizer) -> DPOData:
    """Preference pairs (built or read), validation splits and the fixed probe set."""
    from ..data import load_split, overlap_count, stratified_sample
    from ..pairs import build_pairs, check_prompts_match, load_pairs_file

    gen_val = load_split(s.val_csv, "GEN validation split")
    full_val = {PRIMARY: gen_val}
    if s.isarcasm_val_csv:
        full_val[SECONDARY] = load_split(s.isarcasm_val_csv, "iSarcasmEval validation split")
    val_sets = {name: stratified_sample(frame, s.val_sample_size, s.seed) for name, frame in full_val.items()}
    # Fixed probe set for KL and flips: the first --probe_size rows of a seeded shuffle of GEN val.
    probe = gen_val.sample(frac=1.0, random_state=s.seed).head(s.probe_size)["text"].tolist()

    if s.preference_data:
        pairs = load_pairs_file(s.preference_data)
        check_prompts_match(pairs, tokenizer, s.max_text_tokens, s.preference_data)
        source, available = s.preference_data, len(pairs)
        pairs = sample_rows(pairs, s)
    else:
        train = load_split(s.train_csv, "iSarcasmEval training split")
        if train["label"].nunique() < 2:
            raise UserError(f"{s.train_csv} holds only one class; preference pairs need examples of both.")
        source, available = s.train_csv, len(train)
        pairs = build_pairs(sample_rows(train, s), tokenizer, s.pair_style, s.seed, s.max_text_tokens)
    requested = s.sample_size or None
    capped = bool(requested and requested > available)
    if capped:
        print(f"Note: --sample_size {requested} asks for more pairs than {source} holds ({available}); "
              f"using all {available}.")

    if "text" in pairs.columns and pairs["text"].notna().all():
        for name, frame in full_val.items():
            shared = overlap_count(pairs, frame)
            if shared:
                raise UserError(f"{shared} training pair text(s) also appear in the {name} split; validation F1 would "
                                "be inflated. Build the pairs from the training split only (sarcasm-dpo split, mine).")
    check_pairs(pairs, tokenizer)
    info = {"source": "preference_data" if s.preference_data else "built", "file": source,
            "pair_style": s.pair_style if not s.preference_data else "as in the file",
            "requested": requested, "available": available, "used": len(pairs), "capped": capped,
            "balanced": bool(s.balance)}
    if "label" in pairs.columns and pairs["label"].notna().all():
        info["class_counts"] = {"sarcastic": int((pairs["label"] == 1).sum()),
                                "not_sarcastic": int((pairs["label"] == 0).sum())}
    return DPOData(pairs=pairs.reset_index(drop=True), val_sets=val_sets, probe_texts=probe, info=info)


def sample_rows(frame, s):
    """--sample_size rows (all when empty, 0 or more than there are): class-balanced with --balance,
    else stratified; seeded either way."""
    from ..data import balanced_sample, stratified_sample

    has_labels = "label" in frame.columns and frame["label"].notna().all()
    if not has_labels:
        n = min(s.sample_size or len(frame), len(frame))
        return frame.sample(n=n, random_state=s.seed).reset_index(drop=True)
    frame = frame.assign(label=frame["label"].astype(int))
    if s.balance:
        return balanced_sample(frame, s.sample_size, s.seed)
    return stratified_sample(frame, s.sample_size, s.seed)


def check_pairs(pairs, tokenizer) -> None:
    """The chosen answer starts with the scorer's label token (checked once per label seen)."""
    from ..pairs import check_pair_tokens

    seen = set()
    for row in pairs.itertuples(index=False):
        key = row.chosen.split(".")[0]
        if key in seen:
            continue
        seen.add(key)
        label = int(row.label) if hasattr(row, "label") and row.label is not None and not _isnan(row.label) else None
        check_pair_tokens(tokenizer, row.prompt, row.chosen, row.rejected, label)


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def check_trl_tokens(dataset, pairs, tokenizer, max_length: int) -> None:
    """Every tokenized training example must start from exactly the scorer's prompt tokens and fit whole."""
    from ..prompts import label_token_ids

    if len(dataset) != len(pairs):
        raise UserError(f"TRL dropped {len(pairs) - len(dataset)} pair(s) whose prompt alone fills --max_length "
                        f"{max_length}; raise --max_length or lower --max_text_tokens.")
    label_ids = set(label_token_ids(tokenizer))
    expected = tokenizer(list(pairs["prompt"]), add_special_tokens=False)["input_ids"]
    for i, (row, want) in enumerate(zip(dataset, expected)):
        if row["prompt_ids"] != want:
            raise UserError(f"Pair {i}: TRL's prompt tokens differ from the scorer's (the tokenizer merges tokens "
                            "across the prompt/answer boundary); use --pair_style label or another model.")
        if row["chosen_ids"][0] not in label_ids or row["rejected_ids"][0] not in label_ids:
            raise UserError(f"Pair {i}: the answer does not start with a label token for this tokenizer.")
        longest = len(want) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if longest > max_length:
            raise UserError(f"Pair {i} needs {longest} tokens but --max_length is {max_length}: its answer would be "
                            "cut. Raise --max_length or lower --max_text_tokens.")


# -- trainer ---------------------------------------------------------------------------------------------


def dpo_args(s, model, ckpt_dir: Path):
    from trl import DPOConfig

    from ..training.recipe import trainer_arguments

    if s.save_steps:
        save = {"save_strategy": "steps", "save_steps": s.save_steps}
    elif s.eval_steps:  # a checkpoint at each evaluation keeps the early-stopping state in step with it
        save = {"save_strategy": "steps", "save_steps": s.eval_steps}
    else:
        save = {"save_strategy": "epoch"}
    return DPOConfig(
        **trainer_arguments(s, model, ckpt_dir),
        activation_checkpointing=s.gradient_checkpointing,  # TRL defaults to on; here only when asked
        beta=s.beta,
        loss_type=[s.loss_type],
        # The "ref" adapter's log-probs of every pair, once before training (fast_dpo.py), or on the fly each step.
        precompute_ref_log_probs=s.precompute_ref,
        **save,
    )


def build_trainer(s, model, tokenizer, data: DPOData, ckpt_dir: Path, log=None, stop_flag=None, printer=print):
    """DPOTrainer on the SFT PeftModel (TRL adds the frozen "ref" copy), with our callbacks.

    With `stop_flag` (resilience.stop_on_signal) a Ctrl-C / SIGTERM ends training with a checkpoint.
    """
    from datasets import Dataset

    from ..prompts import strip_special_prefix
    from ..training.callbacks import install_callbacks, stage_callbacks
    from ..training.diagnostics import DPODiagnosticsCallback, DPOValidationCallback
    from ..training.lean_step import lean
    from ..training.recipe import seeded_length_grouping

    prompts = strip_special_prefix(tokenizer, list(data.pairs["prompt"]))
    if prompts is None:
        raise UserError("This tokenizer adds special tokens that its chat template does not contain, so DPO would "
                        "train on different prompt tokens from the ones evaluation reads. Use another model.")
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": list(data.pairs["chosen"]),
                                 "rejected": list(data.pairs["rejected"])})
    validation = DPOValidationCallback(tokenizer, data.val_sets, batch_size=s.eval_batch_size,
                                       max_text_tokens=s.max_text_tokens, eval_steps=s.eval_steps,
                                       patience=s.patience, eval_at_start=True, log=log, printer=printer)
    project_labelled_positions_only()  # CPU/MPS: the LM head on the completion rows only (fused_head.py)
    try:
        one_pass = s.one_pass and is_label_pairs(data.pairs)
        printer(describe_step(one_pass, s.precompute_ref, s.shared_prefix))
        trainer_class = dpo_trainer_class(precompute_ref=s.precompute_ref, one_pass=one_pass,  # TRL's + fast paths
                                          shared_prefix=s.shared_prefix)
        trainer = seeded_length_grouping(lean(trainer_class))(model=model, ref_model=None, args=dpo_args(s, model, ckpt_dir), train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[validation])
    except ValueError as exc:  # TRL's checks on the settings (e.g. a loss type that needs other options)
        raise UserError(f"TRL's DPOTrainer refused these settings: {exc}") from None
    if "ref" not in model.peft_config:
        raise RuntimeError("DPOTrainer did not add the frozen 'ref' adapter; the reference would not be the SFT model.")
    check_trl_tokens(trainer.train_dataset, data.pairs, tokenizer, s.max_length)
    diagnostics = DPODiagnosticsCallback(model, tokenizer, data.probe_texts, beta=s.beta,
                                         batch_size=s.eval_batch_size, max_text_tokens=s.max_text_tokens, log=log,
                                         diagnostics_steps=s.diagnostics_steps, printer=printer)
    validation.diagnostics = diagnostics
    # The trainer holds `validation` already; the rest follow it, in stage_callbacks' order.
    install_callbacks(trainer, stage_callbacks(validation, lambda folder: save_state(folder, validation, diagnostics),
                                               save_each_epoch=bool(s.save_steps or s.eval_steps),
                                               stop_flag=stop_flag, diagnostics=diagnostics), "dpo")
    return trainer, validation, diagnostics


# -- checkpoints and resume ------------------------------------------------------------------------------


def save_state(folder: Path, validation, diagnostics) -> None:
    """Validation history, best adapter and diagnostics beside a Trainer checkpoint; the state file last."""
    from ..training.checkpoints import save_checkpoint_state

    save_checkpoint_state(folder, STATE_FILE, {"validation": validation.state_dict(),
                                               "diagnostics": diagnostics.state_dict()}, validation.best_state)


def load_state(folder: Path, validation, diagnostics) -> None:
    from ..training.checkpoints import load_checkpoint_state

    state, best = load_checkpoint_state(folder, STATE_FILE)
    validation.load_state_dict(state["validation"])
    diagnostics.load_state_dict(state["diagnostics"])
    if best is not None:
        validation.best_state = best


def sft_fingerprint(sft_dir: Path) -> str | None:
    """The SFT adapter's weights checksum: a finished DPO run is only reused while its SFT start is unchanged."""
    from ..data import file_sha256

    weights = Path(sft_dir) / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


def _finished_with(out: Path, config: dict, sft_dir: Path) -> bool:
    """True when `out` holds a finished run of these settings, from the same SFT adapter weights."""
    from ..training.checkpoints import finished_record

    record = finished_record(out, config, SUMMARY_FILE)
    return record is not None and record.get("sft_adapter_sha256") == sft_fingerprint(sft_dir)


# -- outputs ---------------------------------------------------------------------------------------------


def _window_means(records: list[dict], after: int, upto: int, beta: float) -> dict | None:
    """Mean training metrics of the logging steps in (after, upto]; the ratio from the mean margin."""
    from ..training.diagnostics import reward_ratio

    rows = [r for r in records if after < r["step"] <= upto and "train/loss" in r]
    if not rows:
        return None
    keys = ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    means = {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(r.get(k) is not None for r in rows)}
    means["dpo/reward_ratio"] = reward_ratio(means.get("rewards/margins"), beta)
    means["logged_steps"] = len(rows)
    return means


def epoch_metrics(s, validation, diagnostics) -> dict:
    """One record per evaluation: F1 on each split, the diagnostics of those weights, and the mean
    training metrics since the previous evaluation."""
    evaluations = []
    previous = 0
    for h in validation.history:
        record = dict(h)
        record["train"] = _window_means(diagnostics.records, previous, h["step"], s.beta) if h["step"] else None
        record["selected"] = h["step"] == validation.best_step
        evaluations.append(record)
        previous = h["step"]
    return {"primary_split": PRIMARY, "validation_rows": {k: len(v) for k, v in validation.val_sets.items()},
            "beta": s.beta, "best_step": validation.best_step, "best_epoch": validation.best_epoch,
            "best_f1": validation.best_f1, "stopped_early": validation.stopped_early, "evaluations": evaluations}


def batch_metrics(s, diagnostics) -> dict:
    return {"beta": s.beta, "logging_steps": s.logging_steps, "probe_size": len(diagnostics.encoded),
            "definitions": DEFINITIONS, "steps": diagnostics.records}


def build_summary(s, base_ref, sft_dir, data, trainer, validation, diagnostics, epochs, saved, device, timings,
                  resume_from, used: dict | None = None) -> dict:
    from ..training.diagnostics import kl_verdict, ratio_verdict
    from ..data import class_counts, frame_checksum
    from ..training.recipe import run_record

    history = validation.history
    best = next((h for h in history if h["step"] == validation.best_step), None)
    start = next((h for h in history if h["step"] == 0), None)
    trained = [r for r in diagnostics.records if "train/loss" in r]
    last = trained[-1] if trained else (diagnostics.records[-1] if diagnostics.records else {})
    last_eval = epochs["evaluations"][-1] if epochs["evaluations"] else {}
    window = last_eval.get("train") or {}
    ratio = window.get("dpo/reward_ratio", last.get("dpo/reward_ratio"))
    return {
        "config": {**dataclasses.asdict(s), "model": base_ref},  # models.adapter_base_model reads config.model
        "base_model": base_ref,
        "sft_model": str(sft_dir),
        "reference": "frozen copy of the SFT adapter (TRL's 'ref' adapter on the same base weights)",
        "best_step": validation.best_step,
        "best_epoch": validation.best_epoch,
        "best_f1": validation.best_f1 if math.isfinite(validation.best_f1) else None,
        "best_val": {k: best[k] for k in validation.val_sets} if best else None,
        "sft_start_val": {k: start[k] for k in validation.val_sets} if start else None,
        "improved_over_sft": bool(best and start and validation.best_step != 0),
        "stopped_early": validation.stopped_early,
        "epochs_run": round(float(trainer.state.epoch or 0), 4),
        "global_steps": trainer.state.global_step,
        "pairs": data.info,
        "data": {"val_csv": s.val_csv, "isarcasm_val_csv": s.isarcasm_val_csv or None,
                 **{f"{k}_rows": class_counts(v) for k, v in data.val_sets.items()},
                 **{f"{k}_checksum": frame_checksum(v) for k, v in data.val_sets.items()},
                 "probe_size": len(data.probe_texts)},
        "diagnostics": {"end_of_training": last, "saved_model": saved, "definitions": DEFINITIONS},
        "health": {"measured_at_step": last.get("step"),
                   "kl": kl_verdict(last.get("dpo/kl")),
                   # The verdict reads a window's mean; the curves plot each logged step: both are kept, so
                   # the printed figure can say which it is and what the plot's last point shows.
                   "reward_ratio": {**ratio_verdict(ratio),
                                    "over": ("logging steps since the last evaluation" if "dpo/reward_ratio" in window
                                             else "the last logged step"),
                                    "logged_steps": window.get("logged_steps") if "dpo/reward_ratio" in window else None,
                                    "last_logged": {"step": last.get("step"), "value": last.get("dpo/reward_ratio")}}},
        **run_record(trainer, device, resume_from, used, timings),
        "outputs": {"adapter": "adapter_model.safetensors", "epoch_metrics": EPOCH_FILE, "batch_metrics": BATCH_FILE,
                    "curves": CURVES_FILE},
    }


# -- beta sweep ------------------------------------------------------------------------------------------


def beta_dir(out: Path, beta: float) -> Path:
    return out.parent / f"{out.name}_beta_{beta:g}"


def run_sweep(s) -> dict:
    """One model per beta into OUTPUT_DIR_beta_X; the best by GEN validation F1 is named (and copied)."""
    from ..atomic import check_output_dir
    from ..models import check_adapter_dir
    from ..training.distributed import barrier, is_main_process
    from ..training.resilience import free_memory
    from ..tracking import Tracker, make_group_name

    started = time.perf_counter()
    config = dataclasses.asdict(s)
    out = Path(s.output_dir)
    main = is_main_process()
    check_adapter_dir(s.sft_model)
    check_output_dir(out, config, overwrite=s.overwrite, resume=s.resume)  # claimed once the betas are trained
    group = s.wandb_group or (None if s.no_wandb else make_group_name("dpo-beta-sweep"))
    betas = list(dict.fromkeys(s.betas))
    rows = []
    for i, beta in enumerate(betas, 1):
        sub = dataclasses.replace(s, beta=beta, beta_sweep=False, output_dir=str(beta_dir(out, beta)),
                                  wandb_group=group)
        if _finished_with(Path(sub.output_dir), dataclasses.asdict(sub), Path(s.sft_model)):
            # An interrupted sweep picks up where it stopped: finished betas are not trained again.
            if main:
                print(f"[beta sweep] {i}/{len(betas)}: beta {beta:g} already finished in {sub.output_dir}; "
                      "reusing it.")
            summary = read_json(Path(sub.output_dir) / SUMMARY_FILE)
        else:
            if main:
                print(f"[beta sweep] {i}/{len(betas)}: beta {beta:g} -> {sub.output_dir}")
            summary = train(sub, run_name=f"dpo-beta-{beta:g}")
        rows.append(sweep_row(beta, sub.output_dir, summary))
        free_memory()
    # Best by GEN validation F1; ties go to the run that stayed closest to SFT (smaller KL).
    best = max(rows, key=lambda r: (r["val_f1"] if r["val_f1"] is not None else -1.0,
                                    -(r["final_kl"] if r["final_kl"] is not None else math.inf)))
    results = {"config": config, "selection": f"highest {PRIMARY} F1 of the saved checkpoint (never the test split); "
                                              "ties go to the smaller final KL",
               "best_beta": best["beta"], "best_output_dir": best["output_dir"], "best_val_f1": best["val_f1"],
               "copied_to": str(out), "runs": rows, "seconds": round(time.perf_counter() - started, 2)}
    if not main:
        barrier()  # the main process writes the sweep's files
        return results
    prepare_output_dir(out, config, overwrite=s.overwrite, resume=s.resume)
    write_json(out / SWEEP_FILE, results)
    from ..plots import plot_beta_sweep

    plot_beta_sweep(rows, out / SWEEP_PLOT, best_beta=best["beta"])
    copy_run(Path(best["output_dir"]), out, {"best_beta": best["beta"], "source": best["output_dir"]})
    with Tracker(enabled=not s.no_wandb, project=s.wandb_project, job_type="dpo-sweep", config=config, group=group,
                 name="dpo-beta-sweep") as tracker:
        import pandas as pd

        tracker.log_table("beta_sweep/results", pd.DataFrame(rows))
        tracker.log_image("beta_sweep/plot", out / SWEEP_PLOT)
        tracker.log_summary({"best_beta": best["beta"], "best_val_f1": best["val_f1"],
                             "best_output_dir": best["output_dir"]})
    finish_output_dir(out, config, {"best_beta": best["beta"], "best_output_dir": best["output_dir"]})
    print(f"[beta sweep] best beta by {PRIMARY} F1: {best['beta']:g} (F1 {best['val_f1']:.3f}, final KL "
          f"{_fmt(best['final_kl'])}); model in {best['output_dir']} (adapter also copied to {out}). "
          f"Results: {out / SWEEP_FILE}")
    barrier()
    return results


def sweep_row(beta: float, output_dir: str, summary: dict) -> dict:
    best_val = summary.get("best_val") or {}
    end = summary["diagnostics"]["end_of_training"]
    return {"beta": beta, "output_dir": output_dir, "val_f1": summary.get("best_f1"),
            "isarcasm_val_f1": (best_val.get(SECONDARY) or {}).get("f1"),
            "val_accuracy": (best_val.get(PRIMARY) or {}).get("accuracy"),
            "best_step": summary.get("best_step"), "improved_over_sft": summary.get("improved_over_sft"),
            "final_kl": end.get("dpo/kl"), "final_reward_ratio": summary["health"]["reward_ratio"]["value"],
            "final_drift": end.get("dpo/drift"), "saved_kl": summary["diagnostics"]["saved_model"].get("dpo/kl"),
            "kl_verdict": summary["health"]["kl"]["verdict"],
            "ratio_verdict": summary["health"]["reward_ratio"]["verdict"],
            "stopped_early": summary.get("stopped_early"), "train_s": summary["timings"].get("train_s")}


def copy_run(src: Path, dst: Path, note: dict) -> None:
    """Copy the best run's adapter and records into the sweep folder (adapter_config.json last)."""
    names = [p.name for p in src.iterdir() if p.is_file() and p.name not in ("COMPLETE.json", SUMMARY_FILE)]
    names.sort(key=lambda n: n == "adapter_config.json")
    summary = read_json(src / SUMMARY_FILE)
    summary["selected_by_beta_sweep"] = note
    write_json(dst / SUMMARY_FILE, summary)
    for name in names:
        with atomic_path(dst / name) as tmp:
            shutil.copyfile(src / name, tmp)


# -- messages --------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def describe_start(s, data: DPOData, base_ref: str, device, resume_from) -> str:
    info = data.info
    counts = info.get("class_counts") or {}
    classes = f" ({counts.get('sarcastic')} sarcastic, {counts.get('not_sarcastic')} not)" if counts else ""
    vals = ", ".join(f"{k} {len(v)}" for k, v in data.val_sets.items())
    return (f"DPO on {info['used']} preference pairs{classes} from {info['file']} ({info['pair_style']} style); "
            f"SFT adapter {s.sft_model} on {base_ref}, {device}; reference = frozen SFT adapter; beta {s.beta:g}, "
            f"loss {s.loss_type}, {s.epochs:g} epoch(s), lr {s.lr:g}, batch {s.batch_size}x{s.grad_accum}"
            f"{_processes()}; "
            f"validating on {vals}; KL probe {len(data.probe_texts)} prompts"
            + (f"; resuming from {resume_from.name}" if resume_from else "") + ".")


def _processes() -> str:
    from ..training.distributed import world_size

    return f"x{world_size()} processes" if world_size() > 1 else ""


def _ratio_window(ratio: dict) -> str:
    """What the printed reward ratio covers, and the curves' last point beside it (they are not the same figure)."""
    n, last = ratio.get("logged_steps"), ratio.get("last_logged") or {}
    if last.get("value") is None:
        return ""
    if not n:  # the figure is the last logged step's own, the curves' last point
        return f"; at step {last['step']}, the curves' last point"
    return (f"; mean of the {n} logged steps since the last evaluation; "
            f"the curves' last point, step {last['step']}, is {_fmt(last['value'], '.3g')}")


def describe_result(summary: dict, out: Path) -> str:
    minutes, seconds = divmod(int(summary["timings"]["total_s"]), 60)
    best = (summary.get("best_val") or {}).get(PRIMARY) or {}
    start = (summary.get("sft_start_val") or {}).get(PRIMARY) or {}
    health = summary["health"]
    lines = [f"DPO finished in {minutes}m{seconds:02d}s ({summary['global_steps']} steps"
             + (", stopped early" if summary["stopped_early"] else "") + ")."]
    if summary["improved_over_sft"]:
        lines.append(f"Best {PRIMARY} F1 {_fmt(best.get('f1'))} at step {summary['best_step']} "
                     f"(SFT start: {_fmt(start.get('f1'))}); that adapter is saved in {out}/.")
    else:
        lines.append(f"DPO never beat the SFT start on {PRIMARY} F1 ({_fmt(start.get('f1'))}); the saved adapter "
                     f"in {out}/ is the SFT adapter unchanged.")
    lines.append(f"End of training: KL to SFT {_fmt(health['kl']['value'], '.4g')} ({health['kl']['verdict']}), "
                 f"reward ratio {_fmt(health['reward_ratio']['value'], '.2f')} ({health['reward_ratio']['verdict']}"
                 f"{_ratio_window(health['reward_ratio'])}).")
    for part in (health["kl"], health["reward_ratio"]):
        if part.get("advice"):
            lines.append("Advice: " + part["advice"])
    lines.append(f"Records: {EPOCH_FILE}, {BATCH_FILE}, {CURVES_FILE}, {SUMMARY_FILE}. "
                 f"Next: sarcasm-dpo compare --sft_model {summary.get('sft_model', 'models/sft')} --dpo_model {out}")
    return "\n".join(lines)
