"""The settings of every stage, one dataclass each; every field says what it is for.

Kept free of torch/transformers imports so `sarcasm-dpo --help` and config validation are instant.
The values actually used are saved beside every output (`training_summary.json` and friends).

Every class derives from `Settings`, whose `__post_init__` puts the path settings in one form however the
object was made (config.normalise_paths: `~` expanded, empty or blank paths refused), so the CLI, a config
file and Python code calling a stage agree on where a run reads and writes; it also refuses a W&B project
name that W&B itself would refuse (`check_wandb_project`), by every route, before any work.
"""

from __future__ import annotations

import numbers
import os
import re
import dataclasses
from dataclasses import dataclass

from .config import normalise_paths, opt
from .errors import UserError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_PROJECT = "sarcasm-detection"
SPLITS = "data/splits"


def default_of(cls: type, name: str):
    """A setting's default: a path left at it may be absent (an optional input); one the user gave may not."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def check_positive(name: str, value: float | int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"--{name} must be a positive number, got {value}.")


def check_batch_size(value: int | str) -> None:
    """A positive count or the word auto."""
    if value != "auto":
        if isinstance(value, str):
            raise UserError(f"--batch_size must be a positive whole number or auto, got {value!r}.")
        check_positive("batch_size", value, allow_none=False)


def check_device(value: str | None) -> None:
    """--device names a kind of device PyTorch can run this on (whether it is here is checked on use)."""
    if value is None or value == "":
        return
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise UserError(f"--device must be cpu, cuda, cuda:N or mps (or empty to pick one), got {value!r}.")


def _absolute_if_local(ref: str) -> str:
    """An existing local file or folder as an absolute path; anything else (a hub id) as it is (`~` is
    expanded already: Settings.__post_init__)."""
    return os.path.abspath(ref) if os.path.exists(ref) else ref


class Settings:
    """The base of every settings dataclass: its path settings in one form from construction on, by whichever
    route it was made (flags and config files through config.build, or Python), dataclasses.replace included,
    and its W&B project one that W&B accepts."""

    def __post_init__(self) -> None:
        normalise_paths(self)
        if not getattr(self, "no_wandb", True):  # with W&B off the name is never used
            check_wandb_project(getattr(self, "wandb_project", None))


# W&B's own rule for a project name (wandb.sdk.wandb_settings.Settings.validate_project, wandb 0.19 to 0.32):
# wandb.init refuses any other name, which the Tracker could only turn into a warning, with the run untracked.
# It sets no such rule for a group name (run_group), so wandb_group has none here either.
WANDB_PROJECT_MAX_CHARS = 128
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def check_wandb_project(value) -> None:
    """Refuse a --wandb_project W&B would refuse: over 128 characters, or holding one of / \\ # ? % :."""
    if not isinstance(value, str):
        return  # None (a class without the setting), or a wrong type config._coerce names
    found = "".join(dict.fromkeys(c for c in value if c in WANDB_PROJECT_FORBIDDEN))
    if len(value) > WANDB_PROJECT_MAX_CHARS:
        problem = f"it has {len(value)} characters, and W&B allows at most {WANDB_PROJECT_MAX_CHARS}"
    elif found:
        problem = (f"it holds {' '.join(found)}, and W&B allows none of {' '.join(WANDB_PROJECT_FORBIDDEN)} in a "
                   "project name" + (" (the project alone: not ENTITY/PROJECT)" if "/" in found else ""))
    else:
        return
    shown = value if len(value) <= 60 else value[:60] + "..."
    raise UserError(f"--wandb_project {shown!r} is not a W&B project name: {problem}. W&B would refuse it when the "
                    "run starts, and the run would go on untracked. Choose another name, or pass --no_wandb.")


# How training keeps its best evaluation (thresholds.selection_score computes each).
SELECTION_METRICS = ("f1", "balanced_accuracy", "roc_auc")
SELECT_BY_HELP = ("How evaluations are ranked; the best one's adapter is the one saved: f1 (of the sarcastic "
                  "class at 0.5, where a model that answers Yes to everything scores 0.667 on balanced validation), "
                  "balanced_accuracy (at the threshold the model would be saved with: the best cut on those same "
                  "validation scores, or 0.5 when the cut's bootstrap interval holds 0.5; the way the saved model "
                  "is used) or roc_auc (threshold-free).")


def _check_sample_size(value: int | None, name: str = "sample_size") -> None:
    if value is not None and value < 0:
        raise UserError(f"--{name} must be 0 (all) or a positive count, got {value}.")


def check_threshold(value: float) -> None:
    """A decision threshold is a probability (predict's --threshold, or the one an export records)."""
    if not 0 <= value <= 1:
        raise UserError(f"--threshold is a probability and must be in [0, 1], got {value}.")


# The loss types TRL 1.16's DPOTrainer implements (DPOConfig.loss_type).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class Common(Settings):
    """Settings every stage shares."""

    seed: int = opt(42, "Random seed for sampling, splits, LoRA init and training order.")
    device: str | None = opt(None, "Device to run on: cuda, mps or cpu (auto-detected when empty).")
    max_text_tokens: int = opt(256, "Texts longer than this many tokens are cut inside the prompt (the answer never is).")
    wandb_project: str = opt(DEFAULT_PROJECT, "Weights & Biases project name.")
    wandb_group: str | None = opt(None, "W&B group that ties the runs of one pipeline together.")
    no_wandb: bool = opt(False, "Turn Weights & Biases logging off (JSON and PNG outputs are written anyway).")

    def validate(self) -> None:
        # 0 would cut every text to nothing: each would get the same probability, and SFT would train on empty texts.
        check_positive("max_text_tokens", self.max_text_tokens, allow_none=False)
        check_device(self.device)


@dataclass
class SplitSettings(Settings):
    data_dir: str | None = opt(None, "Folder laid out like shared/data (sarcasm_v2/..., isarcasmeval/...); "
                                     "empty = the first verified copy in $SARCASM_DPO_DATA_DIRS, else the download cache "
                                     "(downloading what it lacks on first use).")
    output_dir: str = opt(SPLITS, "Where the split CSV files are written.")
    test_size: float = opt(0.2, "Share of GEN held out as the test split.")
    val_size: float = opt(0.1, "Share of the GEN train split carved off for validation (model selection).")
    isarcasm_val_size: float = opt(0.2, "Share of iSarcasmEval kept out of DPO training for validation.")
    strict: bool = opt(False, "Make empty texts, duplicates and conflicting labels errors instead of dropping them.")
    seed: int = opt(42, "Seed of the stratified splits.")
    overwrite: bool = opt(False, "Replace existing split files made with other settings.")
    wandb_project: str = opt(DEFAULT_PROJECT, "Weights & Biases project name.")
    wandb_group: str | None = opt(None, "W&B group that ties the runs of one pipeline together.")
    no_wandb: bool = opt(False, "Turn Weights & Biases logging off.")

    def validate(self) -> None:
        for name in ("test_size", "val_size", "isarcasm_val_size"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise UserError(f"--{name} must be between 0 and 1, got {value}.")


@dataclass
class SFTSettings(Common):
    model: str = opt(DEFAULT_MODEL, "Base model: a Hugging Face hub id, a local folder or a .gguf file.")
    train_csv: str = opt(f"{SPLITS}/gen_train.csv", "Training split (from `sarcasm-dpo split`).")
    val_csv: str = opt(f"{SPLITS}/gen_val.csv", "Validation split used for per-epoch evaluation and model selection.")
    output_dir: str = opt("models/sft", "Where the adapter, metrics and plots are written.")
    epochs: float = opt(2, "Training epochs.")
    lr: float = opt(2e-4, "Peak learning rate (AdamW, linear warmup then cosine decay).")
    warmup_ratio: float = opt(0.05, "Share of steps spent warming the learning rate up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    batch_size: int | str = opt(8, "Examples per device per step, or auto: on CUDA the largest batch that fits, at "
                                   "most batch x grad_accum of the recipe (8 x grad_accum), with grad_accum lowered "
                                   "to keep the effective batch; on CPU/MPS or with several processes, 8.")
    eval_batch_size: int = opt(16, "Texts per forward pass when scoring the validation split.")
    grad_accum: int = opt(2, "Gradient accumulation steps (effective batch = batch_size x grad_accum x processes).")
    max_length: int = opt(512, "Longest prompt+answer in tokens; longer examples are cut from the text side.")
    sample_size: int | None = opt(None, "Train on a class-balanced, seeded sample of this many examples (empty or 0 = all).")
    val_sample_size: int | None = opt(None, "Evaluate on a stratified sample of this many validation texts (empty = all).")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA path.")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "Layers that get LoRA adapters (comma-separated): "
                                  "names (q_proj; GPT-2's c_attn,c_proj), dotted suffixes (self_attn.q_proj) or "
                                  "all-linear; never the output layer.")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory: recompute activations in the backward pass.")
    shared_prefix: bool = opt(False, "Run the tokens every prompt starts with once per micro-batch (with gradients) "
                                     "instead of once per example: 2x on a CPU, slower on a GPU. Opt-in: with LoRA "
                                     "dropout the rows share the prefix's dropout mask, and what that does to "
                                     "quality is not measured yet.")
    auto_find_batch_size: bool = opt(False, "On an out-of-memory error, halve the batch size and double grad_accum, then retry.")
    compile: bool = opt(False, "torch.compile the model; sequences are padded to multiples of 64 tokens so it compiles a "
                               "few shapes rather than one per batch (opt-in: measure it on your GPU first).")
    logging_steps: int = opt(10, "Log the training loss every this many optimizer steps.")
    select_by: str = opt("f1", SELECT_BY_HELP, choices=list(SELECTION_METRICS))
    eval_steps: int = opt(0, "Also score the validation split every this many optimizer steps (0 = at each epoch "
                             "end only); the best evaluation's adapter (--select_by) is the one saved, so one long epoch can "
                             "show where more data stopped helping.")
    save_steps: int = opt(0, "Also checkpoint every this many steps (0 = at each evaluation only).")
    resume: bool = opt(False, "Continue from the newest complete checkpoint in output_dir.")
    overwrite: bool = opt(False, "Replace an output_dir that holds another run's results.")

    def __post_init__(self) -> None:
        super().__post_init__()
        # The adapter records this as its base model, and later commands (dpo, mine, compare, predict)
        # read it back, maybe from another folder: a local path is kept absolute so it still points there.
        self.model = _absolute_if_local(self.model)

    def validate(self) -> None:
        super().validate()
        _check_sample_size(self.sample_size)
        _check_sample_size(self.val_sample_size, "val_sample_size")
        check_batch_size(self.batch_size)
        for name in ("epochs", "lr", "grad_accum", "max_length", "lora_r", "eval_batch_size"):
            check_positive(name, getattr(self, name), allow_none=False)
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        check_training_settings(self)
        for name in ("save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 (each epoch) or a positive count, got {getattr(self, name)}.")
        if self.lora_alpha <= 0:
            raise UserError(f"--lora_alpha must be positive, got {self.lora_alpha}.")
        if not self.lora_targets:
            raise UserError("--lora_targets is empty; name the modules that get LoRA adapters, e.g. q_proj,v_proj.")


@dataclass
class MineSettings(Common):
    sft_model: str = opt("models/sft", "SFT adapter folder whose mistakes are mined.")
    input_csv: str = opt(f"{SPLITS}/isarcasm_train.csv", "iSarcasmEval training split to mine (never the validation split).")
    output_file: str = opt("data/preference_pairs_mined.json", "Where the mined preference pairs are written (JSON).")
    filter_strategy: str = opt("mistakes_only", "Which items become pairs: all, the SFT model's mistakes, or its confident mistakes.",
                               choices=["all", "mistakes_only", "confident_mistakes"])
    confidence: float = opt(0.7, "For confident_mistakes: keep mistakes whose wrong answer had at least this probability.")
    pair_style: str = opt("reasoning", "reasoning: label word plus one sentence of reasoning; label: the label word alone.",
                          choices=["reasoning", "label"])
    batch_size: int = opt(16, "Texts per forward pass.")
    sample_size: int | None = opt(None, "Mine a stratified sample of this many texts (empty = all).")
    overwrite: bool = opt(False, "Replace an output_file holding another run's pairs (or a file mining did not write).")

    def validate(self) -> None:
        super().validate()
        _check_sample_size(self.sample_size)
        check_positive("batch_size", self.batch_size, allow_none=False)
        if not 0.5 <= self.confidence < 1:
            raise UserError(f"--confidence must be in [0.5, 1), got {self.confidence}.")


@dataclass
class DPOSettings(Common):
    sft_model: str = opt("models/sft", "SFT adapter folder: the starting point and the frozen reference.")
    output_dir: str = opt("models/dpo_enhanced", "Where the DPO adapter, metrics and plots are written.")
    train_csv: str = opt(f"{SPLITS}/isarcasm_train.csv", "iSarcasmEval training split (preference pairs come from here).")
    val_csv: str = opt(f"{SPLITS}/gen_val.csv", "GEN validation split: its --select_by score picks the saved "
                                                "adapter, drives early stopping and --beta_sweep's choice.")
    isarcasm_val_csv: str = opt(f"{SPLITS}/isarcasm_val.csv", "iSarcasmEval validation split, reported beside GEN F1 "
                                "(empty = none).", may_be_empty=True)
    preference_data: str | None = opt(None, "Train on these preference pairs (JSON from `sarcasm-dpo mine`) instead of building them.")
    pair_style: str = opt("reasoning", "reasoning: label word plus one sentence of reasoning; label: the label word alone.",
                          choices=["reasoning", "label"])
    pairs: str | None = opt(None, "Preference source, replacing --pair_style: label (Yes vs No), reasoning, mined (the "
                                  "--preference_data file), rephrase (each sarcastic tweet prefers Yes; its author's "
                                  "sincere rephrase, as a prompt of its own, prefers No), or a mixture such as "
                                  "rephrase+label (duplicates dropped, earlier sources kept first). Class-balanced unless "
                                  "it is reasoning or mined alone. Empty = --pair_style pairs from --train_csv, or the "
                                  "--preference_data file.")
    sample_size: int | None = opt(4000, "Preference pairs to train on (capped at what the split holds).")
    balance: bool = opt(False, "Train on as many pairs of each class (the smaller class's count, or half of "
                               "--sample_size when that is fewer); a pair's class is the answer it prefers. --pairs "
                               "specs other than reasoning or mined alone are balanced without it.")
    beta: float = opt(0.1, "DPO beta: strength of the pull towards the reference (SFT) model.")
    beta_sweep: bool = opt(False, "Train one model per value in --betas and pick the best by its saved adapter's "
                                     "--select_by score on GEN validation.")
    betas: list[float] = opt([0.01, 0.02, 0.05, 0.1, 0.5], "Beta values for --beta_sweep (comma-separated).")
    loss_type: str = opt("sigmoid", "TRL DPO loss type (sigmoid = the DPO paper's, hinge, ipo, ...).")
    epochs: float = opt(3, "Training epochs.")
    lr: float = opt(5e-5, "Peak learning rate.")
    warmup_ratio: float = opt(0.05, "Share of steps spent warming the learning rate up.")
    batch_size: int | str = opt(4, "Preference pairs per device per step, or auto: on CUDA the largest batch that "
                                   "fits, at most batch x grad_accum of the recipe (4 x grad_accum), with grad_accum "
                                   "lowered to keep the effective batch; on CPU/MPS or with several processes, 4.")
    eval_batch_size: int = opt(16, "Texts per forward pass when scoring validation splits.")
    grad_accum: int = opt(2, "Gradient accumulation steps.")
    max_length: int = opt(512, "Longest prompt+answer in tokens.")
    eval_steps: int = opt(0, "Evaluate on validation every this many steps (0 = once per epoch).")
    select_by: str = opt("f1", SELECT_BY_HELP + " It also drives early stopping (--patience) and --beta_sweep's "
                         "choice.", choices=list(SELECTION_METRICS))
    patience: int = opt(2, "Stop after this many evaluations without a better validation score (--select_by).")
    val_sample_size: int | None = opt(None, "Evaluate on a stratified sample of this many validation texts (empty = all).")
    probe_size: int = opt(64, "Validation prompts in the fixed probe set for KL and prediction flips.")
    logging_steps: int = opt(5, "Log loss and rewards every this many optimizer steps.")
    diagnostics_steps: int = opt(0, "Measure KL, drift and prediction flips (a pass over the probe set) on the logged "
                                    "steps that are multiples of this, at the last step and at every evaluation "
                                    "(0 = about four times per epoch).")
    save_steps: int = opt(0, "Also checkpoint every this many steps (0 = at each evaluation only).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    auto_find_batch_size: bool = opt(False, "On an out-of-memory error, halve the batch size and double grad_accum, then retry.")
    compile: bool = opt(False, "torch.compile the model; sequences are padded to multiples of 64 tokens so it compiles a "
                               "few shapes rather than one per batch (opt-in: measure it on your GPU first).")
    precompute_ref: bool = opt(True, "Compute the frozen reference's log-probs of every pair once before training "
                                     "instead of at every step (same loss; false = on the fly).")
    shared_prefix: bool = opt(True, "Run the tokens every prompt starts with once per micro-batch (with gradients) "
                                    "instead of once per sequence (same loss; false = full rows).")
    one_pass: bool = opt(True, "Label pairs (answers 'Yes'/'No' alone): run each pair's prompt once for both answers "
                               "instead of two full sequences (same loss; false = TRL's two sequences).")
    pack_pairs: bool = opt(True, "With --one_pass: pack each micro-batch's prompts and both answers of every pair into "
                                 "one model call under a block attention mask, without padding (same loss; false = "
                                 "three calls: shared prefix, prompts, answers). Checked once per model; eager and "
                                 "SDPA attention only, other attention keeps the three calls.")
    resume: bool = opt(False, "Continue from the newest complete checkpoint in output_dir.")
    overwrite: bool = opt(False, "Replace an output_dir that holds another run's results.")

    def validate(self) -> None:
        super().validate()
        _check_sample_size(self.sample_size)
        _check_sample_size(self.val_sample_size, "val_sample_size")
        if self.beta <= 0:
            raise UserError(f"--beta must be > 0, got {self.beta}.")
        if any(b <= 0 for b in self.betas):
            raise UserError(f"--betas must all be > 0, got {self.betas}.")
        if self.pairs is not None:
            from .pairs import parse_pairs_spec  # here, not at the top: --help must not import pandas

            sources = parse_pairs_spec(self.pairs)
            if self.preference_data and "mined" not in sources:
                raise UserError(f"--preference_data is the `mined` source of --pairs, and --pairs {self.pairs} does not "
                                "name it: add it (e.g. mined+label) or drop --preference_data.")
            if "mined" in sources and not self.preference_data:
                raise UserError(f"--pairs {self.pairs} names the `mined` source, which reads the pairs file "
                                "`sarcasm-dpo mine` wrote: give it with --preference_data.")
        check_batch_size(self.batch_size)
        for name in ("epochs", "lr", "grad_accum", "patience", "probe_size", "eval_batch_size", "max_length"):
            check_positive(name, getattr(self, name), allow_none=False)
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {self.loss_type!r} is not one of TRL's DPO losses: {', '.join(LOSS_TYPES)}.")
        check_training_settings(self)
        for name in ("save_steps", "eval_steps", "diagnostics_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or a positive count, got {getattr(self, name)}.")
        if self.beta_sweep and not self.betas:
            raise UserError("--beta_sweep needs at least one value in --betas.")
        # Flags the run would ignore without a word (the defaults cannot be told from values typed).
        if self.beta_sweep and self.beta != default_of(DPOSettings, "beta") and self.beta not in self.betas:
            raise UserError(f"--beta {self.beta:g} is not used by --beta_sweep, which trains each value of --betas "
                            f"({', '.join(f'{b:g}' for b in self.betas)}): add it to --betas, or drop --beta_sweep.")
        if self.preference_data and not self.pairs and self.pair_style != default_of(DPOSettings, "pair_style"):
            raise UserError(f"--pair_style {self.pair_style} does not apply to --preference_data: the file's pairs are "
                            "trained with the answers they hold. Drop --pair_style, or mine the pairs again with "
                            f"`sarcasm-dpo mine --pair_style {self.pair_style}`.")
        for beta in (self.betas if self.beta_sweep else [self.beta]):
            warn_if_unusual("beta", beta, USUAL_BETA, "DPO uses 0.01 to 0.5; a much larger beta barely moves the model "
                            "from SFT, a much smaller one lets it drift without restraint")


@dataclass
class CompareSettings(Common):
    test_csv: str = opt(f"{SPLITS}/gen_test.csv", "Held-out test split.")
    train_csv: str = opt(f"{SPLITS}/gen_train.csv", "Training split for the TF-IDF baseline (and the leakage check).")
    sft_model: str = opt("models/sft", "SFT adapter folder (none or empty = leave the SFT model out).",
                         may_be_empty=True)
    dpo_model: str = opt("models/dpo_enhanced", "DPO adapter folder (none or empty = leave the DPO model out).",
                         may_be_empty=True)
    model: str | None = opt(None, "Base model (empty = the one the SFT adapter was trained on).")
    sample_size: int | None = opt(None, "Evaluate on a stratified, seeded sample of this many test texts (empty = all).")
    skip_base: bool = opt(False, "Do not evaluate the base model.")
    no_baseline: bool = opt(False, "Skip the TF-IDF + logistic regression reference row.")
    extra_test: list[str] = opt([], "Another test set, NAME=PATH (GEN, iSarcasmEval, News Headlines, SARC or text,label; CSV/TSV/JSON/JSONL); repeatable.")
    output_dir: str = opt("results", "Where the comparison JSON, plot and predictions are written.")
    batch_size: int = opt(16, "Texts per forward pass.")
    n_bootstrap: int = opt(1000, "Bootstrap resamples for the 95% intervals.")
    overwrite: bool = opt(False, "Replace an output_dir holding another comparison (other settings or inputs) "
                                 "or files compare did not write.")

    def validate(self) -> None:
        super().validate()
        _check_sample_size(self.sample_size)
        check_positive("batch_size", self.batch_size, allow_none=False)
        check_positive("n_bootstrap", self.n_bootstrap, allow_none=False)
        for item in self.extra_test:
            if "=" not in item:
                raise UserError(f"--extra_test expects NAME=PATH, got {item!r}.")


def check_predict_args(model: str | None, adapter: str | None, batch_size: int, max_text_tokens: int | None,
                       device: str | None, threshold: float | None) -> None:
    """`sarcasm-dpo predict`'s flags, which are detector.SarcasmDetector.load's arguments (predict has no
    settings section). None for max_text_tokens and threshold: what the model's run recorded."""
    for name, value in (("model", model), ("adapter", adapter), ("device", device)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise UserError(f"--{name} must be a path or name (a string), got {value!r}.")
    for name, value in (("model", model), ("adapter", adapter)):
        # "" is "not given" (predict's --model: the adapter's base); only spaces is a slip, which would be
        # looked for as a folder and then on the hub, with an offline hint that misleads.
        if isinstance(value, str) and value and not value.strip():
            raise UserError(f"--{name} is blank (only white space): give a path or hub id, or leave it out.")
    if not model and not adapter:
        raise UserError("Give --model (a hub id, folder or .gguf) and/or --adapter (an sft/dpo output folder).")
    check_scoring_args(batch_size, max_text_tokens, threshold)
    check_device(device)


def check_scoring_args(batch_size: int, max_text_tokens: int | None,
                       threshold: float | None) -> tuple[int, int | None, float | None]:
    """A detector's numbers, whoever passes them (predict's flags, or Python calling detector.py directly);
    returns them as Python numbers. Integers and reals by kind (numbers.Integral / numbers.Real), so numpy
    scalars count as what they hold (np.int64(4), np.float32(0.3)); true/false never does. A float count (4.0)
    is refused here: Python callers pass counts as integers, and the detector uses the value as given."""
    counts = []
    for name, value in (("batch_size", batch_size), ("max_text_tokens", max_text_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise UserError(f"--{name} must be a positive whole number, got {value!r}.")
        counts.append(None if value is None else int(value))
    batch_size, max_text_tokens = counts
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("max_text_tokens", max_text_tokens)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise UserError(f"--threshold must be a number in [0, 1], got {threshold!r}.")
        threshold = float(threshold)
        check_threshold(threshold)
    return batch_size, max_text_tokens, threshold


@dataclass
class PipelineSettings(Settings):
    data_dir: str | None = opt(None, "Offline data folder laid out like shared/data (empty = the first verified copy in "
                                     "$SARCASM_DPO_DATA_DIRS, else the download cache, downloading what it lacks).")
    force: bool = opt(False, "Redo every stage even when its outputs are complete and match the config.")
    mine: bool = opt(False, "Train DPO on pairs mined from the SFT model's mistakes instead of all pairs.")
    set: list[str] = opt([], "SECTION.KEY=VALUE: set one stage's setting as the config file would "
                             "(e.g. sft.sample_size=64); KEY=VALUE sets it for every stage, over the file's "
                             "sections too (e.g. lr=1e-5); a text setting takes the text as typed; repeatable.")
    overwrite: bool = opt(False, "Let stages write into output folders holding files that no run of theirs wrote.")
    wandb_project: str = opt(DEFAULT_PROJECT, "Weights & Biases project name.")
    no_wandb: bool = opt(False, "Turn Weights & Biases logging off.")


@dataclass
class ExportSettings(Settings):
    adapter: str = opt("models/dpo_enhanced", "LoRA adapter folder to export (from sft or dpo).")
    output_dir: str = opt("exported", "Where the merged model, tokenizer, sarcasm_dpo.json and README.md go.")
    base_model: str | None = opt(None, "Base model to merge into (empty = the one the adapter was trained on).")
    dtype: str = opt("float32", "Data type of the saved weights.", choices=["float32", "bfloat16", "float16"])
    results: str | None = opt("results/model_comparison_results.json",
                              "Comparison results whose test metrics go in the model card, used only if they "
                              "scored this adapter as it is now (its folder and its weights' checksum).")
    license: str | None = opt(None, "License in the model card (empty = the base model's, where known, else 'other').")
    push_to_hub: str | None = opt(None, "After exporting, upload the folder to this Hugging Face Hub repo (user/name).")
    private: bool = opt(False, "Create the Hub repo as private.")
    overwrite: bool = opt(False, "Replace an output_dir that holds another export.")

    def validate(self) -> None:
        if self.push_to_hub:  # checked before minutes of merging, not when the upload fails
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError as exc:
                raise UserError(f"--push_to_hub {self.push_to_hub!r} is not a Hub repo id (user/name): "
                                f"{str(exc).splitlines()[0][:200]}") from None


# -- checks SFT and DPO share (beyond each settings class's validate) ----------------------------------


def check_training_settings(s) -> None:
    """The checks SFT and DPO share, beyond what their settings' validate() does."""
    if not 0 <= s.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {s.warmup_ratio}.")
    if s.logging_steps < 1:
        raise UserError(f"--logging_steps must be at least 1, got {s.logging_steps}.")
    if getattr(s, "weight_decay", 0) < 0:  # a negative decay pushes weights away from zero: never meant
        raise UserError(f"--weight_decay must be 0 or more, got {s.weight_decay}.")
    # WORLD_SIZE as training.distributed.world_size reads it: settings sit below training/ and import none of it.
    if s.auto_find_batch_size and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("--auto_find_batch_size works in single-process runs only: the processes of a distributed "
                        "run cannot retry in step. Set --batch_size and --grad_accum instead.")
    warn_if_unusual("lr", s.lr, USUAL_LR, "LoRA fine-tuning uses 1e-5 to 1e-3; far above, the adapter blows up "
                    "(the run stops when its weight norm or loss explodes), far below, it does not move")


USUAL_LR = (1e-6, 1e-2)  # LoRA learning rates seen in practice, with a margin on both sides
USUAL_BETA = (0.005, 2.0)  # DPO betas seen in practice (0.01 to 0.5), with a margin


def warn_if_unusual(name: str, value: float, usual: tuple[float, float], why: str) -> None:
    """A warning, not an error: values outside the usual range are legal, but most often a typo."""
    import warnings

    low, high = usual
    if not low <= value <= high:
        warnings.warn(f"--{name} {value:g} is outside its usual range [{low:g}, {high:g}]: {why}.", stacklevel=3)
