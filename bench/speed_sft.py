"""Speed section 2, SFT training: `sarcasm-dpo sft` against the usual setup, in real tokens per second.

    python bench/speed_sft.py                               # = python bench/speed.py --sections sft
    python bench/speed_sft.py --sft_steps 12 --sft_batch_size 8

Real (non-padding) tokens per second of `sarcasm-dpo sft` (TRL SFTTrainer, dynamic padding with
length grouping, loss on the answer only, no gradient checkpointing) against the usual setup
(plain transformers Trainer, every example padded to 256 tokens, loss on the whole sequence,
gradient checkpointing on), both training the same examples with the same LoRA, batch size,
learning rate and seed; and the padding share of each. Each setup runs in its own process
(`bench/speed.py --worker`), so its peak memory is its own (section 3, bench/speed_memory.py,
reads it). Flags and the result file: `python bench/speed.py --help`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


SFT_NOTE = ("tokens/s = real (non-padding) tokens fed to training forward passes per second, over optimizer "
            "steps 2..N (step 1 is warm-up); both setups train the same examples. Headline ratio: total tokens "
            "over total time; beside it the ratio of the median per-step rates (robust to bursts of other "
            "work on a shared machine) and of tokens per CPU-second of the process.")


def run(ctx) -> None:
    """The section as bench/speed.py runs it: ctx.result["sft_training"], and both runs in ctx.sft_runs."""
    args = ctx.args
    print("[speed] 2. SFT training: sarcasm-dpo sft vs the usual setup", flush=True)
    spec = sft_spec(ctx)
    ours = ctx.run_worker("sft_ours", {"sft": spec, "steps": args.sft_steps})
    usual = ctx.run_worker("sft_usual", {"sft": spec, "usual_max_length": args.usual_max_length,
                                         "usual_output_dir": str(ctx.work / "usual"), "rows": ours.pop("rows")})
    ctx.result["sft_training"] = sft_section(ours, usual, args)
    ctx.save_partial("sft")
    ctx.sft_runs = {"ours": ours, "usual": usual}


def sft_spec(ctx) -> dict:
    """The SFT stage's settings: the config's, one epoch of small batches from a class-balanced pool."""
    from sarcasm_dpo.settings import SFTSettings

    args, splits = ctx.args, ctx.splits
    return dataclasses.asdict(common.stage_settings(
        ctx.config, SFTSettings, "sft", model=ctx.model_ref, train_csv=str(splits / "gen_train.csv"),
        val_csv=str(splits / "gen_val.csv"), output_dir=str(ctx.work / "sft"), epochs=1, sample_size=args.sft_pool,
        val_sample_size=args.val_texts, batch_size=args.sft_batch_size, grad_accum=1, logging_steps=1000,
        max_text_tokens=ctx.max_text_tokens, device=ctx.device, seed=args.seed, no_wandb=True, overwrite=True))


def worker_sft_ours(spec: dict) -> dict:
    """The SFT stage as `sarcasm-dpo sft` runs it, metered (and stopped) by one more callback."""
    from sarcasm_dpo.settings import SFTSettings
    from sarcasm_dpo.stages.pipeline import run_stage

    # the rows let the usual setup train the same examples; reading them waits for the GPU each pass
    meter = common.make_step_meter(stop_after=spec["steps"], record_rows=spec.get("record_rows", True))
    summary = run_stage("sft", SFTSettings(**spec["sft"]), extra_callbacks=[meter])
    return {"meter": meter.report(), "stage_timings": summary["timings"], "params": summary["trainable_params"],
            "total_params": summary["total_params"], "rows": meter.rows}


def worker_sft_usual(spec: dict) -> dict:
    """The usual setup: plain Trainer, pad to max_length, loss on every real token, gradient checkpointing."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.models import load_base_model, load_tokenizer, pick_device
    from sarcasm_dpo.settings import SFTSettings

    s = SFTSettings(**spec["sft"])
    max_length = spec["usual_max_length"]
    train_df, _ = sft.load_data(s)  # the same balanced sample the stage drew its batches from
    transformers.set_seed(s.seed)
    device = pick_device(s.device)
    tokenizer = load_tokenizer(s.model)
    model = load_base_model(s.model, device)
    pairs = sft.build_dataset(tokenizer, train_df, s.max_text_tokens, s.max_length)
    # Keep exactly the examples the stage trained on: each of its rows starts with one example's prompt.
    rows = spec["rows"]
    keep = []
    for i, prompt in enumerate(pairs["prompt"]):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if any(row[:len(ids)] == ids for row in rows):
            keep.append(i)
    if len(keep) != len(spec["rows"]):
        raise SystemExit(f"matched {len(keep)} of the {len(spec['rows'])} examples the stage trained on")
    pairs = pairs.select(keep)
    texts = [p + c + tokenizer.eos_token for p, c in zip(pairs["prompt"], pairs["completion"])]
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=False)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    model = get_peft_model(model, sft.lora_config(s))  # the same LoRA config, initialised from the same seed
    args = TrainingArguments(
        output_dir=spec["usual_output_dir"], num_train_epochs=s.epochs, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=s.lr, lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio, optim="adamw_torch", bf16=model.dtype == torch.bfloat16,
        use_cpu=device.type == "cpu", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to="none",
        logging_steps=10**6, seed=s.seed, data_seed=s.seed, dataloader_num_workers=0, disable_tqdm=True)
    meter = common.make_step_meter()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[meter])
    trainer.train()
    return {"meter": meter.report(), "examples": len(texts),
            "truncated_examples": sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > max_length
                                      for t in texts)}


def sft_section(ours: dict, usual: dict, args) -> dict:
    o, u = ours["meter"], usual["meter"]
    ratio = (o["real_tokens_per_s"] / u["real_tokens_per_s"]) if o.get("real_tokens_per_s") and u.get("real_tokens_per_s") else None
    return {
        "examples": usual.get("examples"), "pool": args.sft_pool, "steps": args.sft_steps,
        "batch_size": args.sft_batch_size, "grad_accum": 1,
        "ours": {"setup": "sarcasm-dpo sft: TRL SFTTrainer, dynamic padding + group_by_length, completion-only loss, "
                          "no gradient checkpointing", **o},
        "usual": {"setup": f"transformers Trainer, padding='max_length' {args.usual_max_length}, labels = input_ids "
                           "(every real token), gradient_checkpointing=True", **u,
                  "truncated_examples": usual.get("truncated_examples")},
        "same_real_tokens": o["real_tokens"] == u["real_tokens"],
        "median_step_ratio_tokens_per_s": round(o["real_tokens_per_s_median_step"] / u["real_tokens_per_s_median_step"], 3)
        if o.get("real_tokens_per_s_median_step") and u.get("real_tokens_per_s_median_step") else None,
        "cpu_time_ratio_tokens_per_s": round(o["real_tokens_per_cpu_s"] / u["real_tokens_per_cpu_s"], 3)
        if o.get("real_tokens_per_cpu_s") and u.get("real_tokens_per_cpu_s") else None,
        "ratio_tokens_per_s": round(ratio, 3) if ratio else None,
        "note": SFT_NOTE,
    }


if __name__ == "__main__":
    common.run_section("sft")
