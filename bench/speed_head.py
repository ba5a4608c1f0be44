"""Speed section 2b, the LM head: one SFT step projecting every position against the labelled ones only.

    python bench/speed_head.py                              # = python bench/speed.py --sections head
    python bench/speed_head.py --head_batches 6 --sft_batch_size 8

The same SFT step with TRL's fused LM head projecting every position (its choice on a CPU)
against the labelled positions only (src/sarcasm_dpo/training/fused_head.py), alternating on the
same batches in one process. Flags and the result file: `python bench/speed.py --help`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Clock  # noqa: E402


def run(ctx) -> None:
    """The section as bench/speed.py runs it: its figures go to ctx.result["lm_head"]."""
    print("[speed] 2b. SFT step: LM head over every position vs the labelled ones", flush=True)
    ctx.result["lm_head"] = head_section(ctx.args, ctx.model_ref, ctx.splits, ctx.max_text_tokens, ctx.device)
    ctx.save_partial("head")


def head_section(args, model_ref: str, splits: Path, max_text_tokens: int, device: str) -> dict:
    """One SFT training step (forward + backward, LoRA, loss on answer + EOS) with TRL's fused LM head
    projecting every position (TRL's choice on CPU) against the labelled positions only (what
    fused_head.py makes it do), alternating on the same batches in one process.

    The stage-level SFT figure compares two processes run one after the other; on a machine shared
    with other jobs their loads differ. Alternating step by step in one process lets both modes see
    the same load, so this ratio isolates the one change.
    """
    import torch
    from peft import get_peft_model
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from sarcasm_dpo.training import fused_head
    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.sampling import stratified_sample
    from sarcasm_dpo.models import load_base_model, load_tokenizer, pick_device
    from sarcasm_dpo.prompts import build_prompt, label_token_ids
    from sarcasm_dpo.settings import SFTSettings

    dev = pick_device(device)
    tokenizer = load_tokenizer(model_ref)
    model = load_base_model(model_ref, dev)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for
    model = get_peft_model(model, sft.lora_config(SFTSettings(model=model_ref)))
    model.train()
    no_id, yes_id = label_token_ids(tokenizer)
    rows = stratified_sample(load_split(splits / "gen_train.csv"), args.head_batches * args.sft_batch_size, args.seed)
    examples = []
    for text, label in zip(rows["text"], rows["label"]):
        ids = tokenizer(build_prompt(tokenizer, text, max_text_tokens), add_special_tokens=False)["input_ids"]
        examples.append(ids + [yes_id if label else no_id, tokenizer.eos_token_id])
    examples.sort(key=len)  # length-grouped batches, as the stage trains
    pad = tokenizer.pad_token_id
    batches = []
    for b in range(0, len(examples), args.sft_batch_size):
        chunk = examples[b:b + args.sft_batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in chunk])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk])
        labels = torch.full_like(ids, -100)
        for r, e in enumerate(chunk):
            labels[r, len(e) - 2:len(e)] = ids[r, len(e) - 2:len(e)]  # the answer word and EOS
        batches.append({"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)})

    original = getattr(trl_utils._use_triton, "original", trl_utils._use_triton)
    fused_head.project_labelled_positions_only()
    patched = trl_utils._use_triton
    modes = {"every_position": original, "labelled_only": patched}
    times = {m: [] for m in modes}
    losses = {m: [] for m in modes}

    def step(batch):
        model.zero_grad(set_to_none=True)
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        return float(out.loss)

    trl_utils._use_triton = patched
    step(batches[0])  # warm-up
    for b, batch in enumerate(batches):
        order = list(modes) if b % 2 == 0 else list(modes)[::-1]
        for m in order:
            trl_utils._use_triton = modes[m]
            with Clock(dev) as clock:
                losses[m].append(step(batch))
            times[m].append(clock.wall)
    trl_utils._use_triton = patched
    per = {m: {"total_s": round(sum(t), 3), "median_step_s": round(statistics.median(t), 4)} for m, t in times.items()}
    ratio = sum(times["every_position"]) / sum(times["labelled_only"])
    return {"batches": len(batches), "batch_size": args.sft_batch_size,
            "mean_length": round(sum(map(len, examples)) / len(examples), 1), "per_mode": per,
            "ratio_step_time_every_vs_labelled": round(ratio, 3),
            "ratio_median_step": round(per["every_position"]["median_step_s"] / per["labelled_only"]["median_step_s"], 3),
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["every_position"], losses["labelled_only"])),
            "note": head_section.__doc__.split("\n\n")[0]}


if __name__ == "__main__":
    common.run_section("head")
