"""Training step overhead: the SFT and DPO stages' optimizer step against a bare PyTorch loop.

    python bench/training.py                                   # 24-layer tiny model, CPU, ~3 min
    python bench/training.py --variants lean,plain --steps 16  # also TRL's trainer as it comes
    python bench/training.py --sft_overrides '{"logging_steps": 1}' --dpo_overrides '{"diagnostics_steps": 1}'
    python bench/training.py --model ~/.cache/sarcasm-dpo/models/SmolLM2-135M-Instruct.Q4_1.gguf --layers 0   # real throughput

One process, the same model (same seed, same LoRA init) and the same batches for every setup.
Each round trains every setup for --steps optimizer steps, in turn (the order alternates between
rounds, so drifts in machine load fall on all of them alike), and the time of each optimizer step
is taken between consecutive step ends (so it includes the logging and diagnostics work of the
stage's logging steps; validation, before and after the steps, is not timed). Reported: the
median and mean ms per optimizer step (first step of each round left out: warm-up), tokens per
second, and each setup's ratio to the bare loop: of the pooled medians, and the median over rounds
of the ratio within a round (paired: on a shared, busy CPU the load drifts between rounds). Setups:

- `lean`: the stage's trainer as `sft`/`dpo` build it (training/lean_step.py), with the stage's callbacks.
- `plain`: the same with TRL's trainer as it comes (`lean` replaced by the identity).
- `bare`: a PyTorch loop doing the same algorithm on the same batches (taken from the stage's data
  loader): LoRA forward to the last hidden states, the LM head on the answer positions only (as
  the stage's fused head does on CPU), the loss (SFT: mean token NLL; DPO: sigmoid loss with the
  reference from the "ref" adapter, one visit per step), backward, clipping, AdamW, scheduler.

With a tiny model (hidden 64, --layers 24) the arithmetic is negligible and the figures measure
the per-step overhead; with a real model (--layers 0 keeps its depth) they measure throughput.
--sft_overrides / --dpo_overrides (JSON) change the stage settings of `lean` and `plain`, so a
variant of the stage (another helper's option, say) can be compared against the same bare loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

sys.path.insert(0, str(common.REPO / "tests"))  # tiny_model: the tests' random Qwen2 builder


STAGES = ("sft", "dpo")
VARIANTS = ("lean", "plain")
TINY_HEADS = 4  # tests/tiny_model.py's attention heads: the hidden size splits into them, each of even width (RoPE)


def json_object(text: str) -> str:
    """An argparse type: a JSON object (--sft_overrides '{"logging_steps": 1}'), kept as the text given."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{\"name\": value, ...}}), got {text!r}")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Base model (default: a random tiny Qwen2 built here).")
    p.add_argument("--layers", type=common.non_negative_int, default=24,
                   help="Layers of the tiny model (ignored with --model: --layers 0 there says the model keeps its "
                        "own depth).")
    p.add_argument("--hidden", type=common.positive_int, default=64,
                   help=f"Hidden size of the tiny model (a multiple of {2 * TINY_HEADS}).")
    p.add_argument("--stages", type=common.comma_list(STAGES), default="sft,dpo", help="Comma-separated: sft, dpo.")
    p.add_argument("--variants", type=common.comma_list(VARIANTS, empty_ok=True), default="lean,plain",
                   help="Stage trainers to time beside the bare loop (lean, plain; empty: the bare loop alone).")
    p.add_argument("--steps", type=common.at_least(2), default=12,
                   help="Optimizer steps per setup per round (at least 2: the first of each round is warm-up).")
    p.add_argument("--rounds", type=common.positive_int, default=3)
    p.add_argument("--batch_size", type=common.positive_int, default=1)
    p.add_argument("--grad_accum", type=common.positive_int, default=2)
    p.add_argument("--sft_overrides", type=json_object, default="{}",
                   help="JSON dict of SFT settings for the stage variants.")
    p.add_argument("--dpo_overrides", type=json_object, default="{}",
                   help="JSON dict of DPO settings for the stage variants.")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA))
    p.add_argument("--output", default=None, help="Result file (default bench/results/training_<model>.json).")
    p.add_argument("--threads", type=common.positive_int, default=1,
                   help="torch threads (1: on a shared CPU, fewer threads make the timings less noisy).")
    p.add_argument("--seed", type=common.seed, default=0)
    args = p.parse_args(argv)
    if args.model is None and args.layers == 0:
        p.error("--layers 0 keeps the depth of a --model; the tiny model built without one needs at least 1 layer")
    if args.model is None and args.hidden % (2 * TINY_HEADS):
        p.error(f"--hidden {args.hidden}: the tiny model's hidden size must be a multiple of {2 * TINY_HEADS} "
                f"({TINY_HEADS} attention heads, each of even width)")
    return args


# -- data and models -----------------------------------------------------------------------------------


def texts(data_dir: str, n: int):
    """n GEN texts with labels (both classes), the same for every setup."""
    from sarcasm_dpo.data import load_gen
    from sarcasm_dpo.sampling import stratified_sample

    frame = load_gen(Path(data_dir) / "sarcasm_v2" / "GEN-sarc-notsarc.csv", log=lambda *a: None)
    return stratified_sample(frame, n, 0).reset_index(drop=True)[["text", "label"]]


def sft_settings(args, model: str, work: Path, overrides: dict):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import SFTSettings

    values = dict(model=model, output_dir=str(work / "sft"), epochs=1, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, no_wandb=True, seed=args.seed, max_text_tokens=64)
    return build(SFTSettings, {**values, **overrides})


def dpo_settings(args, sft_dir: Path, work: Path, overrides: dict):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import DPOSettings

    values = dict(sft_model=str(sft_dir), output_dir=str(work / "dpo"), epochs=1, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, no_wandb=True, seed=args.seed, max_text_tokens=64, probe_size=8,
                  eval_batch_size=8)
    return build(DPOSettings, {**values, **overrides})


def make_adapter(model_ref: str, folder: Path, seed: int) -> Path:
    """An SFT-like adapter (B not zero) saved with the record the DPO stage reads its base model from."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sarcasm_dpo.models import load_base_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base_model(model_ref, torch.device("cpu")),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps({"config": {"model": model_ref, "max_text_tokens": 64}}))
    return folder


class StepClock:
    """A TrainerCallback-like recorder of step-end times (perf_counter), shared by the stage and the bare loop."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        return control

    def __getattr__(self, name):  # every other Trainer event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _identity(cls):
    return cls


# -- the stage trainers ----------------------------------------------------------------------------------


def build_sft(args, variant: str, model_ref: str, frame, work: Path, overrides: dict):
    """The SFT stage's trainer and callbacks as `sft.fit` builds them, minus validation (not timed)."""
    import torch
    import transformers

    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.training.callbacks import (BarrierOnSaveCallback, GracefulStopCallback, LogBeforeSaveCallback,
                                                NonFiniteLossCallback, TrackerLogCallback)
    from sarcasm_dpo.training.resilience import StopFlag
    from sarcasm_dpo.models import load_base_model, load_tokenizer

    s = sft_settings(args, model_ref, work, overrides)
    transformers.set_seed(s.seed)
    tokenizer = load_tokenizer(s.model)
    model = load_base_model(s.model, torch.device("cpu"))
    ds = sft.build_dataset(tokenizer, frame, s.max_text_tokens, s.max_length)
    clock = StepClock()
    callbacks = [BarrierOnSaveCallback(), TrackerLogCallback(lambda *a: None), NonFiniteLossCallback(),
                 GracefulStopCallback(StopFlag()), LogBeforeSaveCallback(), clock]
    original = sft.lean
    sft.lean = original if variant == "lean" else _identity
    try:
        trainer = sft.build_trainer(dataclasses.replace(s, save_steps=0), model, tokenizer, ds, work / "ckpt",
                                    callbacks)
    finally:
        sft.lean = original
    trainer.args.save_strategy = "no"  # checkpoints are not part of the step
    trainer.args.disable_tqdm = True
    return trainer, clock


def build_dpo(args, variant: str, sft_dir: Path, frame, work: Path, overrides: dict):
    """The DPO stage's trainer, validation and diagnostics as `dpo.fit` builds them."""
    import torch
    import transformers

    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.training import lean_step as lean_module
    from sarcasm_dpo.models import adapter_base_model, load_tokenizer
    from sarcasm_dpo.pairs import build_pairs

    s = dpo_settings(args, sft_dir, work, overrides)
    base = adapter_base_model(sft_dir)
    tokenizer = load_tokenizer(base)
    pairs = build_pairs(frame, tokenizer, s.pair_style, s.seed, s.max_text_tokens)
    val = frame.head(8)
    data = dpo.DPOData(pairs=pairs, val_sets={dpo.PRIMARY: val}, probe_texts=list(val["text"]),
                       info={"used": len(pairs)})
    transformers.set_seed(s.seed)
    model = dpo.load_policy(base, sft_dir, torch.device("cpu"))
    original = lean_module.lean
    lean_module.lean = original if variant == "lean" else _identity
    try:
        trainer, _validation, _diagnostics = dpo.build_trainer(s, model, tokenizer, data, work / "ckpt",
                                                               log=lambda *a: None, printer=lambda *a: None)
    finally:
        lean_module.lean = original
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.args.save_strategy = "no"
    trainer.args.disable_tqdm = True
    return trainer, clock


# -- the bare loop ---------------------------------------------------------------------------------------


def _answer_logps(model, batch, keep):
    """Per-sequence sum of the log-probs of the labelled tokens, the LM head on those rows only."""
    import torch

    inner = model.get_base_model()
    hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    rows = hidden[:, :-1][mask]
    logps = torch.log_softmax(inner.lm_head(rows).float(), dim=-1)
    picked = logps.gather(-1, labels[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    seq = torch.zeros(labels.size(0), dtype=picked.dtype).index_add_(0, mask.nonzero()[:, 0], picked)
    return seq, int(mask.sum()) if keep else None


def bare_loop(trainer, stage: str, steps: int, beta: float) -> tuple[list[float], list[float], int]:
    """Train `trainer.model` on `trainer`'s batches with a plain loop; (step end times, losses, tokens)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trainer.args.learning_rate, weight_decay=trainer.args.weight_decay)
    accum = trainer.args.gradient_accumulation_steps
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(trainer.args.warmup_steps * steps), steps)
    loader = iter(trainer.get_train_dataloader())
    ends, losses, tokens = [], [], 0
    for _ in range(steps):
        batches = [next(loader) for _ in range(accum)]
        if stage == "dpo":
            with torch.no_grad():
                model.set_adapter("ref")
                refs = [_answer_logps(model, _dpo_labels(b), False)[0] for b in batches]
                model.set_adapter("default")
        step_loss = 0.0
        for i, batch in enumerate(batches):
            tokens += int(batch["attention_mask"].sum())
            if stage == "sft":
                seq, count = _answer_logps(model, batch, True)
                loss = -seq.sum() / max(count, 1)
            else:
                seq, _ = _answer_logps(model, _dpo_labels(batch), False)
                chosen, rejected = seq.chunk(2)
                ref_chosen, ref_rejected = refs[i].chunk(2)
                margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
                loss = -torch.nn.functional.logsigmoid(margin).mean()
            (loss / accum).backward()
            step_loss += loss.detach() / accum
        torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
        ends.append(time.perf_counter())
    return ends, losses, tokens


def _dpo_labels(batch):
    """TRL's DPO batch (input_ids, attention_mask, completion_mask) with labels on the completion tokens."""
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}


# -- timing ----------------------------------------------------------------------------------------------


def per_step_ms(ends: list[float]) -> list[float]:
    """Milliseconds between consecutive step ends (the first step, warm-up, has no predecessor)."""
    return [1000 * (b - a) for a, b in zip(ends, ends[1:])]


def run_stage(args, stage: str, model_ref: str, frame, work: Path) -> dict:
    import torch

    overrides = json.loads(getattr(args, f"{stage}_overrides"))
    setups = [*[v for v in args.variants.split(",") if v], "bare"]
    times = {name: [] for name in setups}
    per_round = {name: [] for name in setups}  # each round's median: ratios within a round cancel slow load drift
    tokens = {name: 0 for name in setups}
    losses = {}
    sft_dir = make_adapter(model_ref, work / "sft-adapter", args.seed) if stage == "dpo" else None
    needed = args.steps * args.batch_size * args.grad_accum
    for round_index in range(args.rounds):
        order = setups if round_index % 2 == 0 else list(reversed(setups))
        for name in order:
            folder = Path(tempfile.mkdtemp(dir=work))
            variant = "lean" if name == "bare" else name
            build = build_sft if stage == "sft" else build_dpo
            trainer, clock = build(args, variant, model_ref if stage == "sft" else sft_dir, frame.head(needed),
                                   folder, overrides)
            if name == "bare":
                beta = getattr(trainer, "beta", 0.1)
                ends, step_losses, count = bare_loop(trainer, stage, args.steps, beta)
                losses["bare"] = step_losses
            else:
                trainer.args.logging_steps = trainer.args.logging_steps  # as the stage sets it
                trainer.train()
                ends = clock.ends
                count = getattr(trainer, "_total_train_tokens", 0) or trainer.state.num_input_tokens_seen
                losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            times[name] += per_step_ms(ends)
            per_round[name].append(statistics.median(per_step_ms(ends)))
            tokens[name] += count
            del trainer
            torch.set_grad_enabled(True)
    rows = {}
    bare = statistics.median(times["bare"])
    for name in setups:
        ms = times[name]
        rows[name] = {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
                      "steps_timed": len(ms), "ratio_to_bare_median": round(statistics.median(ms) / bare, 3),
                      "tokens_per_step": round(tokens[name] / (args.steps * args.rounds), 1),
                      "round_medians_ms": [round(v, 2) for v in per_round[name]],
                      "ratio_to_bare_paired": round(statistics.median(
                          [a / b for a, b in zip(per_round[name], per_round["bare"])]), 3)}
        rows[name]["tokens_per_s"] = round(rows[name]["tokens_per_step"] / (rows[name]["median_ms"] / 1000), 1)
    first = {name: (values[0] if values else None) for name, values in losses.items()}
    return {"setups": rows, "stage_settings": overrides, "first_step_loss": first,
            "note": "stage losses are the logged ones (every --logging_steps); bare: every step"}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    if args.model:
        model_ref = args.model
        tag = Path(args.model).stem.lower()
    else:
        from tiny_model import build_tiny_model

        model_ref = str(build_tiny_model(work / "tiny", hidden_size=args.hidden, layers=args.layers, seed=args.seed))
        tag = f"tiny{args.layers}"
    frame = texts(args.data_dir, 4 * args.steps * args.batch_size * args.grad_accum)
    result = {"command": common.command_line(), "machine": common.machine_info(), "model": model_ref,
              "settings": {k: v for k, v in vars(args).items()}, "stages": {}}
    started = time.perf_counter()
    for stage in [s for s in args.stages.split(",") if s]:
        result["stages"][stage] = run_stage(args, stage, model_ref, frame, work)
        print(f"[{stage}] " + "  ".join(f"{name}: {row['median_ms']} ms/step (x{row['ratio_to_bare_median']}, "
                                        f"paired x{row['ratio_to_bare_paired']})"
                                        for name, row in result["stages"][stage]["setups"].items()), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.output) if args.output else common.RESULTS / f"training_{tag}_{result['machine']['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Results: {out}")


if __name__ == "__main__":
    common.run_main(main)
