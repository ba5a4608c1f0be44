"""Today's training steps against the fast paths, side by side in one process, paths taking turns.

    python bench/dpo_paths.py                              # tiny random model + SmolLM2-135M, ~5 min on 2 CPU cores
    python bench/dpo_paths.py --models tiny --steps 4      # a quick look

Each comparison builds one trainer per path through the stages' own `build_trainer` (the same
settings but the path switches: --precompute_ref, --one_pass, --shared_prefix), takes the same
batches for all of them, and then times one training step (TRL's `training_step`: forward, loss,
backward) per path in turn, round after round, so a change in machine load hits every path alike.
The first round is a warm-up and is not counted.

- DPO, label pairs ("Yes"/"No"): today (TRL: two policy and two reference sequences per pair) vs
  the default fast path (reference precomputed, one pass per prompt, shared prefix, the micro-batch
  packed into one call) and vs the same without packing (three calls: prefix, prompts, answers).
- DPO, reasoning pairs (the default style): today vs the reference precomputed (full rows) and vs
  the reference precomputed + shared prefix (the default).
- SFT: full rows vs the shared prefix; real (non-padding) tokens per second.

Pairs/s and tokens/s are given per CPU second of this process (`time.process_time`, all its
threads) and per wall second. The precomputed reference is not free: it runs once over the pairs
before training; its time (a second, warm run of it: the constructor's first run also pays the
process's first-call set-up) is reported per pair and folded into `epoch_pairs_per_cpu_s`, the
pairs/s of a one-epoch run (the worst case: later epochs reuse it). Raw per-step times are kept in the JSON
(bench/results/dpo_paths.json). Other helpers can call `dpo_comparison` / `sft_comparison`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import DEFAULT_DATA, REPO, RESULTS, SMOLLM2_FILE, command_line, machine_info  # noqa: E402

SMOLLM2 = Path.home() / ".cache" / "smollm2" / SMOLLM2_FILE
TODAY = dict(precompute_ref=False, one_pass=False, shared_prefix=False)
MODELS = ("tiny", "smollm2")
COMPARISONS = ("dpo_label", "dpo_reasoning", "sft")
DPO_BATCH_SIZE = 4  # pairs per DPO step: --pairs must fill one batch at least


def load(model_ref: str):
    import torch

    from sarcasm_dpo.models import load_base_model, load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_base_model(model_ref, torch.device("cpu")), load_tokenizer(model_ref)
    with torch.no_grad():  # the process's first forward pass sets up kernels and memory: not the paths' cost
        model(input_ids=torch.ones((4, 64), dtype=torch.long))
    return model, tokenizer


def sft_start(base):
    """A LoRA adapter as the SFT stage makes one (its defaults), moved off zero so it is not a no-op."""
    import torch
    from peft import get_peft_model

    from sarcasm_dpo.settings import SFTSettings
    from sarcasm_dpo.stages.sft import lora_config

    model = get_peft_model(copy.deepcopy(base), lora_config(SFTSettings()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def timing(cls, method: str):
    """CPU seconds of each call of `cls.method` while the block runs."""
    original = getattr(cls, method)
    spent = []

    def timed(self, *args, **kwargs):
        cpu = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.process_time() - cpu)

    setattr(cls, method, timed)
    try:
        yield spent
    finally:
        setattr(cls, method, original)


def timed_rounds(trainers: dict, batches: list, rounds: int) -> dict:
    """{path: [(cpu_s, wall_s), ...]}: one training step per path per round, paths in turn; round 0 not kept."""
    times = {name: [] for name in trainers}
    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which we do not run
    for r in range(rounds + 1):
        for name, trainer in trainers.items():
            batch = batches[r % len(batches)]
            trainer.model.train()
            cpu, wall = time.process_time(), time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            trainer.model.zero_grad(set_to_none=True)
            if r:
                times[name].append((cpu, wall))
        progress(f"round {r}/{rounds}" + (" (warm-up)" if not r else "") + ": "
                 + ", ".join(f"{name} {times[name][-1][0] if r else 0:.2f} CPU s"
                             for name in trainers))
    return times


def summarise(times: dict, units: list[float], unit: str, today: str, extra_s: dict | None = None,
              epoch_units: float | None = None) -> dict:
    """Per path: mean step times and units (pairs or tokens) per CPU / wall second; ratios to `today`."""
    out = {}
    per_step = statistics.mean(units[i % len(units)] for i in range(1, len(next(iter(times.values()))) + 1))
    for name, rows in times.items():
        # Medians: on a shared machine one slow step (another process's burst) should not decide the ratio.
        cpu = statistics.median(c for c, _ in rows)
        wall = statistics.median(w for _, w in rows)
        out[name] = {"steps": len(rows), f"{unit}_per_cpu_s": per_step / cpu, f"{unit}_per_wall_s": per_step / wall,
                     "step_cpu_s_median": cpu, "step_wall_s_median": wall,
                     "step_cpu_s": [round(c, 4) for c, _ in rows], "step_wall_s": [round(w, 4) for _, w in rows]}
        if extra_s is not None and epoch_units:
            # One epoch over `epoch_units` pairs: steps at the measured rate plus the one-off reference pass.
            per_unit_cpu = cpu / per_step
            once = extra_s.get(name, 0.0)
            out[name]["reference_precompute_cpu_s_per_pair"] = once / epoch_units
            out[name][f"epoch_{unit}_per_cpu_s"] = epoch_units / (per_unit_cpu * epoch_units + once)
    base = out[today]
    for name, row in out.items():
        for key in [k for k in row if k.endswith("_per_cpu_s") or k.endswith("_per_wall_s")]:
            if key in base:
                row[f"x_{key}"] = row[key] / base[key]
    return out


def dpo_comparison(model_ref: str, pair_style: str, paths: dict, *, steps: int, pairs: int = 16,
                   batch_size: int = DPO_BATCH_SIZE,
                   data_dir: Path = DEFAULT_DATA, loaded=None) -> dict:
    """Time DPO training steps per path (name -> settings overrides; the first is the baseline)."""
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.config import build
    from sarcasm_dpo.data import load_isarcasm
    from sarcasm_dpo.sampling import stratified_sample
    from sarcasm_dpo.training.fast_dpo import InMemoryReference
    from sarcasm_dpo.pairs import build_pairs
    from sarcasm_dpo.training.distributed import quiet
    from sarcasm_dpo.settings import DPOSettings

    base, tokenizer = loaded or load(model_ref)
    frame = stratified_sample(load_isarcasm(data_dir / "isarcasmeval" / "train.En.csv", drop_conflicts=True), pairs, 42)
    data = dpo.DPOData(pairs=build_pairs(frame, tokenizer, pair_style, 42), val_sets={dpo.PRIMARY: frame.head(4)},
                       probe_texts=list(frame["text"].head(2)), info={})
    trainers, precompute, first = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in paths.items():
            s = build(DPOSettings, dict(output_dir=f"{tmp}/{name}", batch_size=batch_size, grad_accum=1, no_wandb=True,
                                        pair_style=pair_style, **overrides))
            with timing(InMemoryReference, "_precompute_ref_logps") as spent:  # the constructor runs it
                trainers[name], _, _ = dpo.build_trainer(s, sft_start(base), tokenizer, data, Path(tmp) / name,
                                                         printer=quiet)
            if spent:  # the constructor's pass includes first-call set-up (kernels, memory): time a second one
                trainer = trainers[name]
                cpu = time.process_time()
                trainer._precompute_ref_logps(trainer.train_dataset, "train", trainer.args.per_device_train_batch_size)
                precompute[name] = time.process_time() - cpu
                first[name] = sum(spent)
            progress(f"built {pair_style} {name}" + (f" (reference pass {first[name]:.1f} CPU s in the constructor, "
                                                     f"{precompute[name]:.1f} again)" if spent else ""))
        # The same batches for every path, with the reference columns (paths without them ignore them).
        source = next((t for t in trainers.values() if t.precompute_ref_logps), next(iter(trainers.values())))
        loader = iter(source.get_train_dataloader())
        batches = [next(loader) for _ in range(min(steps + 1, len(data.pairs) // batch_size))]
        times = timed_rounds(trainers, batches, steps)
    units = [float(len(b["input_ids"]) // 2) for b in batches]
    return {"model": model_ref, "pair_style": pair_style, "pairs": len(data.pairs), "batch_size": batch_size,
            "paths": {name: {"settings": overrides} for name, overrides in paths.items()},
            "reference_pass_cpu_s": {"in_constructor": first, "again": precompute},
            "results": summarise(times, units, "pairs", next(iter(paths)), precompute, float(len(data.pairs)))}


def sft_comparison(model_ref: str, *, steps: int, batch_size: int = 8, data_dir: Path = DEFAULT_DATA,
                   loaded=None) -> dict:
    """Time SFT training steps with full rows and with the shared prefix; real tokens per second."""
    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.config import build
    from sarcasm_dpo.data import load_gen
    from sarcasm_dpo.sampling import balanced_sample
    from sarcasm_dpo.settings import SFTSettings

    base, tokenizer = loaded or load(model_ref)
    frame = balanced_sample(load_gen(data_dir / "sarcasm_v2" / "GEN-sarc-notsarc.csv", drop_conflicts=True),
                            batch_size * (steps + 1), 42)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shared in (("today", False), ("shared_prefix", True)):
            s = build(SFTSettings, dict(model=model_ref, output_dir=f"{tmp}/{name}", batch_size=batch_size,
                                        grad_accum=1, no_wandb=True, shared_prefix=shared))
            train_ds = sft.build_dataset(tokenizer, frame, s.max_text_tokens, s.max_length)
            trainers[name] = sft.build_trainer(s, copy.deepcopy(base), tokenizer, train_ds, Path(tmp) / name)
        loader = iter(trainers["today"].get_train_dataloader())
        batches = [next(loader) for _ in range(steps + 1)]
        times = timed_rounds(trainers, batches, steps)
    units = [float(b["attention_mask"].sum()) for b in batches]
    return {"model": model_ref, "batch_size": batch_size, "results": summarise(times, units, "tokens", "today")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=common.comma_list(MODELS), default="tiny,smollm2",
                   help="Comma-separated: tiny (random 2-layer Qwen2), smollm2.")
    p.add_argument("--steps", type=common.positive_int, default=3,
                   help="Timed steps per path (after one warm-up round).")
    p.add_argument("--pairs", type=common.at_least(DPO_BATCH_SIZE), default=16,
                   help=f"DPO pairs per comparison (batch {DPO_BATCH_SIZE}, so at least {DPO_BATCH_SIZE}; the "
                        "reference pass covers them).")
    p.add_argument("--comparisons", type=common.comma_list(COMPARISONS), default=",".join(COMPARISONS),
                   help=f"Which comparisons to run (comma-separated: {', '.join(COMPARISONS)}).")
    p.add_argument("--data_dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=RESULTS / "dpo_paths.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)  # before torch loads: --help and a bad flag answer at once
    import torch

    refs = {}
    for name in args.models.split(","):
        if name == "tiny":
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_model import build_tiny_model

            refs[name] = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-qwen2"))
        else:  # the only other name --models accepts
            refs[name] = str(SMOLLM2)
    record = {"command": command_line(), "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "runs": {}}
    fast_reasoning = {"today": TODAY, "precompute_ref": {**TODAY, "precompute_ref": True},
                      "precompute_ref+shared_prefix": {**TODAY, "precompute_ref": True, "shared_prefix": True}}
    for name, ref in refs.items():
        progress(f"loading {ref}")
        loaded = load(ref)
        started = time.perf_counter()
        comparisons = {
            "dpo_label": lambda: dpo_comparison(ref, "label", {"today": TODAY, "fast": {},
                                                               "fast, three calls": {"pack_pairs": False}}, steps=args.steps,
                                                pairs=args.pairs, data_dir=args.data_dir, loaded=loaded),
            "dpo_reasoning": lambda: dpo_comparison(ref, "reasoning", fast_reasoning, steps=args.steps,
                                                    pairs=args.pairs, data_dir=args.data_dir, loaded=loaded),
            "sft": lambda: sft_comparison(ref, steps=args.steps, data_dir=args.data_dir, loaded=loaded),
        }
        runs = {name: comparisons[name]() for name in args.comparisons.split(",")}
        record["runs"][name] = {**runs, "seconds": round(time.perf_counter() - started, 1)}
        for run, result in runs.items():
            for path, row in result["results"].items():
                ratios = {k: round(v, 2) for k, v in row.items() if k.startswith("x_")}
                print(f"{name:8s} {run:14s} {path:30s} {ratios}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"Raw figures: {args.out}")
    return record


if __name__ == "__main__":
    common.run_main(main)
