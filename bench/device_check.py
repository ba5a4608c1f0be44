"""The prepared device check: the default recipe's costs on one GPU, in one short command.

    python bench/device_check.py --out OUT --data_dir .gpu/data --tokenizer .gpu/qwen-tokenizer --time_budget 450
    python bench/device_check.py --out /tmp/dc --tiny      # the same parts on a CPU, tiny model (~1 min)

On the exact Qwen2.5-0.5B-Instruct shape (random weights, the GPU's bf16; `bench/speed.py`'s
config) with Qwen's real tokenizer (`bench/qwen_tokenizer.py`; another one only when that is not
to be had, and the JSON says which), it measures, each part through the project's own code:

  sft       SFT step time and MFU of `sarcasm-dpo sft` at configs/qwen2.5-0.5b.yaml's batch
            settings, and the same micro-batch at grad_accum 1 and 2;
  dpo       DPO step time and MFU of `sarcasm-dpo dpo`, from that SFT adapter;
  score     the scorer (`predict_proba`) against its bare forward passes on the same batches
            (`bench/speed_eval.py`, the speed benchmark's evaluation section);
  pipeline  split -> sft -> dpo -> compare with the config's settings, DPO early stopping off,
            each stage's wall time (`bench/speed_gpu.py`'s pipeline timing, one stage per call).

After every part (and pipeline stage) `OUT/device_check.json` is rewritten and `OUT/device_check.log`
holds everything printed, so a time limit loses nothing already measured. `--time_budget S` skips
any part whose expected time (`--expect`, defaults from the H200 run in bench/README.md) exceeds
what is left, and records it as skipped. `--set STAGE.SETTING=VALUE` (repeatable) changes a stage
setting for every part that runs that stage, checked against the stage's settings first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import speed  # noqa: E402
import speed_eval  # noqa: E402
import speed_gpu  # noqa: E402
import speed_memory  # noqa: E402
import speed_sft  # noqa: E402

PARTS = ("sft", "dpo", "score", "pipeline")
PIPELINE_STAGES = speed_gpu.PIPELINE_STAGES
# Expected seconds on one H100/H200 (bench/README.md: SFT 174 s, DPO ~430 s for 2,760 pairs x 3,
# compare ~20 s; the parts: two or three short stage runs each, model loading included).
EXPECT = {"sft": 90, "dpo": 60, "score": 90, "pipeline.split": 5, "pipeline.sft": 200, "pipeline.dpo": 480,
          "pipeline.compare": 45}
# A Qwen2 small enough for a CPU test; the vocabulary stays Qwen2.5's.
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=2048)
RESULT_FILE, LOG_FILE = "device_check.json", "device_check.log"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Figures and the command the lead runs: bench/README.md, section GPU.")
    p.add_argument("--out", required=True, help="Folder for device_check.json and device_check.log.")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA), help="Datasets laid out like shared/data.")
    p.add_argument("--tokenizer", default=None,
                   help="Tokenizer folder (default: Qwen2.5's, built by bench/qwen_tokenizer.py; SmolLM2's if that "
                        "cannot be had).")
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sarcasm-dpo-device-check"),
                   help="Scratch folder (model, splits, adapters).")
    p.add_argument("--parts", type=common.comma_list(PARTS), default=",".join(PARTS),
                   help=f"Comma-separated subset of {','.join(PARTS)} (dpo trains from the sft part's adapter).")
    p.add_argument("--time_budget", type=common.positive_float, default=None,
                   help="Seconds from the start: a part expected to run past it is skipped (and recorded so).")
    p.add_argument("--expect", action="append", default=[], metavar="PART=SECONDS",
                   help=f"Expected seconds of a part or pipeline stage, for --time_budget (defaults: {EXPECT}).")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.SETTING=VALUE",
                   help="A stage setting on top of configs/qwen2.5-0.5b.yaml (split, sft, dpo, compare), e.g. "
                        "sft.batch_size=16; repeatable. compare.batch_size and compare.max_text_tokens also set "
                        "the score part's.")
    p.add_argument("--tiny", action="store_true", help="A 2-layer Qwen2 (hidden 64) with the same vocabulary and "
                                                       "small samples: the CPU check that every part runs.")
    p.add_argument("--sft_steps", type=common.positive_int, default=None,
                   help="Optimizer steps per SFT run (default 40; tiny 3).")
    p.add_argument("--dpo_steps", type=common.positive_int, default=None,
                   help="Optimizer steps of the DPO run (default 30; tiny 3).")
    p.add_argument("--score_texts", type=common.positive_int, default=None,
                   help="GEN test texts scored (default 512; tiny 12).")
    p.add_argument("--generate_texts", type=common.positive_int, default=None,
                   help="Of those, texts also run through generate-and-parse (default 16; tiny 2).")
    p.add_argument("--score_repeats", type=common.positive_int, default=5,
                   help="Timed rounds of the score part (two H100 runs with 2 rounds differed by up to 3x per batch).")
    p.add_argument("--val_texts", type=common.positive_int, default=16,
                   help="Validation texts of the sft/dpo parts (untimed).")
    p.add_argument("--pipeline_stages", type=common.comma_list(PIPELINE_STAGES), default=",".join(PIPELINE_STAGES),
                   help="The pipeline stages this call runs; the earlier ones' times and outputs come from an "
                        "earlier call with the same --work_dir and settings (a pipeline longer than one call).")
    p.add_argument("--pipeline_sample", type=common.positive_int, default=None,
                   help="Cap every pipeline stage's sample (default: none, the config's; tiny 8).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one).")
    p.add_argument("--gpu_peak_tflops", type=common.positive_float, default=None,
                   help="The GPU's dense bf16 peak, if not in bench/speed.py's table.")
    p.add_argument("--seed", type=common.seed, default=42)
    args = p.parse_args(argv)
    try:  # checked before --out is touched: a bad value must not cost an earlier run there its device_check.json
        args.expected_seconds = parse_expect(args.expect)
        args.stage_overrides = parse_sets(args.sets)
    except common.BadInput as exc:
        p.error(str(exc))
    tiny = args.tiny
    for key, full, small in (("sft_steps", 40, 3), ("dpo_steps", 30, 3), ("score_texts", 512, 12),
                             ("generate_texts", 16, 2), ("pipeline_sample", None, 8)):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    return args


# -- settings ------------------------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """`--set sft.batch_size=16` -> {"sft": {"batch_size": "16"}}, each checked by building the stage's settings."""
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.stages import STAGES

    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not eq or not dot or stage not in PIPELINE_STAGES:
            raise common.BadInput(f"--set {item!r}: expected STAGE.SETTING=VALUE with STAGE one of "
                                  f"{', '.join(PIPELINE_STAGES)}.")
        out.setdefault(stage, {})[name.strip()] = value.strip()
    for stage, values in out.items():
        try:  # types and each stage's own checks, the way a config file is read
            common.stage_settings(common.GPU_CONFIG, STAGES[stage].settings, stage, **values)
        except UserError as exc:
            raise common.BadInput(f"--set {stage}: {exc}") from None
    return out


def stage_settings(overrides: dict, cls: type, section: str, **values):
    """A stage's settings from configs/qwen2.5-0.5b.yaml, then `values`, then the --set ones (a later key wins)."""
    return common.stage_settings(common.GPU_CONFIG, cls, section, **{**values, **overrides.get(section, {})})


def parse_expect(items: list[str]) -> dict[str, float]:
    """`--expect sft=120` -> EXPECT with sft at 120.0 seconds."""
    expect = dict(EXPECT)
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in EXPECT:
            raise common.BadInput(f"--expect {item!r}: expected PART=SECONDS with PART one of {', '.join(EXPECT)}.")
        try:
            expect[key] = common.non_negative_float(value)
        except argparse.ArgumentTypeError as exc:
            raise common.BadInput(f"--expect {item!r}: SECONDS {exc}.") from None
    return expect


# -- output: the JSON after every part, everything printed into the log ------------------------------------


@contextlib.contextmanager
def tee_output(path: Path):
    """Everything written to stdout/stderr (C libraries and child processes included) also goes to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    log = open(path, "ab")

    def pump():
        while chunk := os.read(read_end, 65536):
            os.write(saved[0], chunk)
            log.write(chunk)
            log.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    # Python's own streams onto the new fds too: under a harness (pytest) they need not write to fds 1 and 2
    streams = sys.stdout, sys.stderr
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        thread.join(timeout=10)  # the pipe's last writer is gone: the pump reads to the end and stops
        os.close(read_end)
        os.close(saved[0])
        os.close(saved[1])
        log.close()


class Report:
    """The result dict, rewritten atomically to OUT/device_check.json whenever something is added."""

    def __init__(self, out: Path, started: float, budget: float | None, expect: dict):
        from sarcasm_dpo.atomic import write_json

        self._write = write_json
        self.path, self.started, self.budget, self.expect = out / RESULT_FILE, started, budget, expect
        self.data: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, key: str) -> str | None:
        """None if part `key` fits the time budget, else why it is skipped."""
        if self.budget is None:
            return None
        left = self.budget - self.elapsed()
        if self.expect[key] > left:
            return (f"skipped: expected {self.expect[key]:.0f} s (--expect {key}=...), {max(left, 0):.0f} s of "
                    f"--time_budget {self.budget:.0f} left")
        return None

    def save(self, **values) -> None:
        self.data.update(values)
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self._write(self.path, self.data)


# -- model and tokenizer -------------------------------------------------------------------------------


def pick_tokenizer(args) -> tuple[str, dict]:
    """(tokenizer folder or file, what it is): Qwen2.5's real one where it can be had."""
    import qwen_tokenizer

    if args.tokenizer:
        return args.tokenizer, {"source": f"--tokenizer {args.tokenizer}"}
    try:
        return str(qwen_tokenizer.tokenizer_dir()), {"source": "bench/qwen_tokenizer.py (dashscope ranks)"}
    except qwen_tokenizer.Unavailable as exc:
        print(f"[device_check] Qwen tokenizer unavailable ({exc}); falling back to SmolLM2's", flush=True)
        return str(common.fetch_smollm2()), {"source": "SmolLM2-135M-Instruct (fallback)", "why": str(exc)}


def build_model(args, work: Path) -> tuple[str, dict]:
    import qwen_tokenizer

    from sarcasm_dpo.models import load_tokenizer

    tok_ref, info = pick_tokenizer(args)
    tokenizer = load_tokenizer(tok_ref)
    qwen = len(tokenizer) == qwen_tokenizer.RANKS_COUNT + len(qwen_tokenizer.ADDED_TOKENS) and \
        tokenizer.convert_tokens_to_ids("<|im_start|>") == 151_644
    info.update({"tokens": len(tokenizer), "is_qwen2.5": qwen, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token})
    vocab = qwen_tokenizer.QWEN25_VOCAB_SIZE if qwen else None
    shape = TINY_SHAPE if args.tiny else {}
    name = ("qwen-tiny" if args.tiny else "qwen2.5-0.5b") + ("-random-qwentok" if qwen else "-random-othertok")
    t0 = time.perf_counter()
    folder = common.random_qwen_model(work / name, tok_ref, args.seed, vocab_size=vocab, **shape)
    model_info = {"path": str(folder), "shape": "tiny (CPU check)" if args.tiny else "Qwen2.5-0.5B-Instruct",
                  "config": {**common.QWEN25_05B, **shape}, "build_s": round(time.perf_counter() - t0, 1),
                  "flop_counts": speed_gpu.model_flops(str(folder))}
    config = json.loads((folder / "config.json").read_text())
    model_info["vocab_size"] = config["vocab_size"]
    return str(folder), {"tokenizer": info, "model": model_info}


# -- parts -----------------------------------------------------------------------------------------------


def training_figures(meter: dict, flops: dict, peak: float | None, ref_per_step: bool = False) -> dict:
    """Step times and model FLOP/s of a training run (bench/speed_gpu.py's LoRA formula).

    Micro-batches per optimizer step are counted (the Trainer's substeps), not taken from the
    settings (a batch size found at run time changes grad_accum). Every counted token of a training
    forward pass trains (4 x params per token + attention), except in DPO with the reference computed
    on the fly (`ref_per_step`: precompute_ref off), where each micro-batch also runs the frozen "ref"
    adapter forward on the same rows, so half the counted tokens are a forward pass alone (2 x params
    + attention). With the reference precomputed (the default), its one pass before training is not
    in the timed steps. With shared-prefix training the prefix's tokens are counted once per
    micro-batch, as computed.
    """
    import statistics

    if not meter.get("padded_tokens_per_s"):
        return {"error": "fewer than 2 optimizer steps: nothing timed", "meter": meter}
    seq = meter["mean_padded_length"]
    micro = meter["micro_batches"] / meter["optimizer_steps"]
    train_share = 0.5 if ref_per_step else 1.0
    per_token = (train_share * speed_gpu.lora_flops_per_token(flops, seq)
                 + (1 - train_share) * speed_gpu.lora_flops_per_token(flops, seq, backward=False))
    tflops = per_token * meter["padded_tokens_per_s"] / 1e12
    return {"seconds_per_step": meter["seconds_per_step"],
            "median_step_s": round(statistics.median(meter["seconds_each_step"]), 4),
            "seconds_per_micro_batch": round(meter["seconds_per_step"] / micro, 4),
            "micro_batches_per_step": round(micro, 3), "timed_steps": meter["timed_steps"],
            "mean_padded_length": seq, "padding_share": meter["padding_share"],
            "real_tokens_per_s": meter["real_tokens_per_s"], "padded_tokens_per_s": meter["padded_tokens_per_s"],
            "model_tflops": round(tflops, 4), "mfu": round(tflops / peak, 5) if peak else None,
            "training_share_of_counted_tokens": train_share,
            "gpu_peak_allocated_gib": meter.get("gpu_peak_allocated_gib"), "meter": meter}


def sft_part(args, model_ref, splits, work, overrides, flops, peak) -> tuple[dict, str]:
    """The SFT stage at the config's batch settings, then the same micro-batch at grad_accum 1 and 2."""
    from sarcasm_dpo.settings import SFTSettings

    def settings(name, **extra):
        return stage_settings(
            {"sft": {**overrides.get("sft", {}), **extra}}, SFTSettings, "sft", model=model_ref,
            train_csv=str(splits / "gen_train.csv"), val_csv=str(splits / "gen_val.csv"),
            output_dir=str(work / name), epochs=1, sample_size=4096 if not args.tiny else 64,
            val_sample_size=args.val_texts, device=args.device, seed=args.seed, no_wandb=True, overwrite=True)

    config = settings("sft_config")
    runs = {"config": config}
    for accum in (1, 2):
        if config.grad_accum != accum:
            runs[f"grad_accum_{accum}"] = settings(f"sft_ga{accum}", grad_accum=accum)
    out = {"steps_per_run": args.sft_steps, "runs": {}}
    for name, s in runs.items():
        print(f"[device_check] sft {name}: batch_size {s.batch_size} x grad_accum {s.grad_accum}, "
              f"{args.sft_steps} steps", flush=True)
        t0 = time.perf_counter()
        got = speed_sft.worker_sft_ours({"sft": dataclasses.asdict(s), "steps": args.sft_steps, "record_rows": False})
        out["runs"][name] = {"batch_size": s.batch_size, "grad_accum": s.grad_accum,
                             "stage_wall_s": round(time.perf_counter() - t0, 2), "stage_timings": got["stage_timings"],
                             **training_figures(got["meter"], flops, peak)}
    by_accum = {r["grad_accum"]: r for r in out["runs"].values()}
    if 1 in by_accum and 2 in by_accum and "seconds_per_step" in by_accum[1] and "seconds_per_step" in by_accum[2]:
        out["grad_accum_2_vs_1"] = {
            "seconds_per_step": [by_accum[1]["seconds_per_step"], by_accum[2]["seconds_per_step"]],
            "seconds_per_micro_batch": [by_accum[1]["seconds_per_micro_batch"], by_accum[2]["seconds_per_micro_batch"]],
            "ratio_step_time": round(by_accum[2]["seconds_per_step"] / by_accum[1]["seconds_per_step"], 3),
            "note": "the same micro-batch; grad_accum 2 runs two of them per optimizer step"}
    return out, str(work / "sft_config")


def dpo_part(args, sft_dir, splits, work, overrides, flops, peak) -> dict:
    from sarcasm_dpo.settings import DPOSettings

    s = stage_settings(
        overrides, DPOSettings, "dpo", sft_model=sft_dir, output_dir=str(work / "dpo"),
        train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
        isarcasm_val_csv=str(splits / "isarcasm_val.csv"), epochs=1, sample_size=512 if not args.tiny else 24,
        val_sample_size=args.val_texts, probe_size=min(8, args.val_texts), eval_steps=0, patience=10_000,
        device=args.device, seed=args.seed, no_wandb=True, overwrite=True)
    print(f"[device_check] dpo: batch_size {s.batch_size} x grad_accum {s.grad_accum}, {args.dpo_steps} steps",
          flush=True)
    t0 = time.perf_counter()
    got = speed_memory.worker_dpo({"dpo": dataclasses.asdict(s), "steps": args.dpo_steps})
    from sarcasm_dpo.training.packed_pairs import packing_verdicts

    return {"batch_size_pairs": s.batch_size, "grad_accum": s.grad_accum, "steps": args.dpo_steps,
            "stage_wall_s": round(time.perf_counter() - t0, 2), "stage_timings": got["stage_timings"],
            # Packing applies to label pairs only (the GPU config trains reasoning pairs: --set dpo.pairs=label
            # to check it on a device). {}: nothing was packed; False: checked there, fell back to three calls.
            "pairs": s.pairs or s.pair_style, "pack_pairs": s.pack_pairs, "packing_verdicts": packing_verdicts(),
            **training_figures(got["meter"], flops, peak, ref_per_step=not s.precompute_ref)}


def score_part(args, model_ref, splits, overrides, flops, peak) -> dict:
    """bench/speed_eval.py's evaluation section: scorer vs bare forward (and the others) on the same batches."""
    from sarcasm_dpo.settings import CompareSettings

    c = common.stage_settings(common.GPU_CONFIG, CompareSettings, "compare", **overrides.get("compare", {}))
    batch = c.batch_size if isinstance(c.batch_size, int) else 16
    sargs = speed.parse_args(["--eval_texts", str(args.score_texts), "--eval_batch_size", str(batch),
                              "--eval_repeats", str(args.score_repeats), "--generate_texts", str(args.generate_texts),
                              "--seed", str(args.seed)] + (["--device", args.device] if args.device else []))
    e = speed_eval.eval_section(sargs, model_ref, splits, c.max_text_tokens)
    sc, ba = e["scorer"], e["bare_forward"]
    work = 2 * flops["block_params"] * ba["padded_tokens"] + 2 * flops["head_params"] * e["texts"]
    tflops = work / sc["best_seconds"] / 1e12
    return {"texts": e["texts"], "batch_size": batch, "scorer_texts_per_s": sc["texts_per_s"],
            "bare_forward_texts_per_s": ba["texts_per_s"],
            "scorer_time_over_bare": round(1 + e["scorer_overhead_vs_bare"], 4),
            "whole_call_time_over_bare": round(1 + e["whole_calls"]["scorer_overhead_vs_bare_best"], 4),
            # The scorer the stages use on this device (prefix cache on a CPU only) against its own bare passes.
            "default_scorer_prefix_cache": e["whole_calls"]["default_scorer"]["prefix_cache"],
            "default_scorer_time_over_bare": round(1 + e["whole_calls"]["default_scorer"]["overhead_best"], 4),
            "default_scorer_time_over_bare_median": round(1 + e["whole_calls"]["default_scorer"]["overhead_median"], 4),
            "scorer_model_tflops": round(tflops, 4), "scorer_mfu": round(tflops / peak, 5) if peak else None,
            "evaluation": e}


def pipeline_stages(args) -> list[str]:
    """--pipeline_stages (checked as it was read) in the pipeline's order."""
    wanted = args.pipeline_stages.split(",")
    return [x for x in PIPELINE_STAGES if x in wanted]


def pipeline_part(args, model_ref, work, overrides, report: Report) -> dict:
    """The pipeline one stage per call of speed_gpu.pipeline_wall_time, so a stage that will not fit is skipped."""
    out: dict = {"settings_source": str(common.GPU_CONFIG), "set": overrides, "stages": {}}
    for stage in pipeline_stages(args):
        why = report.fits(f"pipeline.{stage}")
        if why:
            out["stages"][stage] = why
            out["incomplete"] = f"stopped before {stage}: the later stages need its output"
            break
        print(f"[device_check] pipeline: {stage}", flush=True)
        sargs = speed.parse_args(["--data_dir", args.data_dir, "--pipeline_stages", stage, "--seed", str(args.seed)]
                                 + (["--pipeline_sample", str(args.pipeline_sample)] if args.pipeline_sample else []))
        sargs.stage_overrides = overrides
        timing = speed_gpu.pipeline_wall_time(sargs, model_ref, work)
        for name in timing["stages_timed_in_earlier_calls"]:
            out["stages"].setdefault(name, timing["stage_seconds"][name])
        out["stages"][stage] = timing["stage_seconds"][stage]
        out["stages_timed_in_earlier_calls"] = timing["stages_timed_in_earlier_calls"]
        if stage == "compare":
            out.update({k: timing[k] for k in ("total_s", "test_items", "evaluations", "dpo_summary", "note")})
            out["settings"] = timing["settings"]
        report.save(pipeline=out)
    return out


def summary(data: dict) -> dict:
    """The headline figures of what ran, for the end of the log and the top of a reader's attention."""
    out: dict = {"device": data.get("machine", {}).get("gpu") or "cpu", "peak_bf16_tflops": data.get("peak_bf16_tflops"),
                 "tokenizer": data.get("tokenizer", {}).get("source"),
                 "tokenizer_is_qwen2.5": data.get("tokenizer", {}).get("is_qwen2.5")}
    sft = data.get("sft")
    if isinstance(sft, dict):
        for name, r in sft["runs"].items():
            if "seconds_per_step" in r:
                out[f"sft_{name}"] = {k: r.get(k) for k in ("batch_size", "grad_accum", "seconds_per_step", "median_step_s",
                                                        "seconds_per_micro_batch", "model_tflops", "mfu")}
    dpo = data.get("dpo")
    if isinstance(dpo, dict) and "seconds_per_step" in dpo:
        out["dpo"] = {k: dpo.get(k) for k in ("batch_size_pairs", "grad_accum", "seconds_per_step", "median_step_s",
                                          "model_tflops", "mfu", "packing_verdicts")}
    score = data.get("score")
    if isinstance(score, dict):
        out["score"] = {k: score.get(k) for k in ("scorer_texts_per_s", "bare_forward_texts_per_s", "scorer_time_over_bare",
                                              "whole_call_time_over_bare", "default_scorer_prefix_cache",
                                              "default_scorer_time_over_bare", "scorer_mfu")}
    pipe = data.get("pipeline")
    if isinstance(pipe, dict):
        out["pipeline_stage_s"] = pipe.get("stages")
        out["pipeline_total_s"] = pipe.get("total_s")
    for part in PARTS:
        if isinstance(data.get(part), str):
            out[part] = data[part]
    return out


# -- main ------------------------------------------------------------------------------------------------


def run(args, report: Report) -> None:
    import torch

    parts = args.parts.split(",")  # checked as it was read (common.comma_list)
    if "dpo" in parts and "sft" not in parts:
        parts.insert(0, "sft")  # DPO continues the SFT part's adapter
    overrides = args.stage_overrides
    on_gpu = torch.cuda.is_available() and args.device in (None, "cuda")
    report.save(command=common.command_line(), machine=common.machine_info(),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), parts_asked=parts, set=overrides,
                time_budget_s=args.time_budget, expect=report.expect, done=[],
                settings={k: v for k, v in vars(args).items()
                          if k not in ("sets", "expect", "stage_overrides", "expected_seconds")})
    if on_gpu:
        peak, source = speed_gpu.gpu_peak_tflops(args)
    else:
        peak, source = None, "no GPU: model TFLOP/s reported, MFU not"
    report.save(peak_bf16_tflops=peak, peak_source=source)
    def gate(part):  # what a part needs to fit to start at all
        return f"pipeline.{pipeline_stages(args)[0]}" if part == "pipeline" else part

    if all(report.fits(gate(p)) for p in parts):
        report.save(**{p: report.fits(gate(p)) for p in parts})
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_ref, info = build_model(args, work)
    report.save(**info)
    flops = info["model"]["flop_counts"]
    splits = common.make_splits(args.data_dir, work / "splits")
    sft_dir = None
    for part in parts:
        why = report.fits(gate(part))
        if part == "dpo" and sft_dir is None:
            why = "skipped: the sft part did not finish (DPO starts from its adapter)"
        if why:
            report.save(**{part: why})
            continue
        print(f"[device_check] part {part} ({report.elapsed():.0f} s in)", flush=True)
        t0 = time.perf_counter()
        try:
            if part == "sft":
                result, sft_dir = sft_part(args, model_ref, splits, work, overrides, flops, peak)
            elif part == "dpo":
                result = dpo_part(args, sft_dir, splits, work, overrides, flops, peak)
            elif part == "score":
                result = score_part(args, model_ref, splits, overrides, flops, peak)
            else:
                result = pipeline_part(args, model_ref, work, overrides, report)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not cost the others their device time
            import traceback

            traceback.print_exc()
            failed = f"error: {type(exc).__name__}: {exc}"
            kept = report.data.get(part)  # the pipeline keeps the stages it finished
            report.save(**{part: {**kept, "error": failed} if isinstance(kept, dict) else failed,
                           "failed": report.data.get("failed", []) + [part]})
            continue
        result["part_wall_s"] = round(time.perf_counter() - t0, 1)
        report.save(**{part: result, "done": report.data["done"] + [part]})


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")  # every stage runs with no_wandb too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tee_output(out / LOG_FILE):
        report = Report(out, started, args.time_budget, args.expected_seconds)
        try:
            run(args, report)
        except BaseException as exc:  # the error goes into the JSON too, beside what was measured before it
            report.save(error=f"{type(exc).__name__}: {exc}")
            raise
        report.save(finished=True, summary=summary(report.data))
        print("[device_check] summary: " + json.dumps(report.data["summary"], indent=1), flush=True)
        print(f"[device_check] done in {report.elapsed():.0f} s: {report.path}"
              + (f"; FAILED: {', '.join(report.data['failed'])}" if report.data.get("failed") else ""), flush=True)
    return 1 if report.data.get("failed") else 0


if __name__ == "__main__":
    common.run_main(main)
