"""Speed section 1, evaluation: the shared scorer against generate-and-parse and a bare forward pass.

    python bench/speed_eval.py                              # = python bench/speed.py --sections eval
    python bench/speed_eval.py --eval_texts 32 --eval_repeats 2

The shared `Scorer` (prompts sorted by length, the shared prompt prefix run once and its
keys/values reused, one forward pass per batch over each prompt's own tokens, LM head on the
answer position only) against the usual generate-and-parse loop (one text at a time,
`generate(max_new_tokens=10)`, greedy, Yes/No parsed from the decoded text), in texts per second;
against the same scorer without the prefix cache; and against a bare forward pass over the very
same inputs (built beforehand, no prompt rendering, tokenizing or softmax), which is the limit it
can reach. Whole `predict_proba` calls and prompt building are timed too. Flags and the result
file: `python bench/speed.py --help`.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Clock  # noqa: E402


def run(ctx) -> None:
    """The section as bench/speed.py runs it: its figures go to ctx.result["evaluation"]."""
    print("[speed] 1. evaluation: scorer vs generate-and-parse vs bare forward", flush=True)
    ctx.result["evaluation"] = eval_section(ctx.args, ctx.model_ref, ctx.splits, ctx.max_text_tokens)
    ctx.save_partial("eval")


def parse_answer(text: str) -> int | None:
    """The usual parser: the first Yes/No word in the generated text; None when there is none."""
    match = re.search(r"\b(yes|no)\b", text.lower())
    return None if match is None else int(match.group(1) == "yes")


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

    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.sampling import stratified_sample
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
    scorer = Scorer(model, tokenizer, batch_size=args.eval_batch_size, max_text_tokens=max_text_tokens, prefix_cache=True)
    default = Scorer(model, tokenizer, batch_size=args.eval_batch_size, max_text_tokens=max_text_tokens)
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
    # one transfer of the results at the end) against the prefix pass plus every bare batch, and
    # against the bare passes over full prompts; interleaved, in an order that rotates by round. The
    # scorer as the stages build it (`default`: the prefix cache on a CPU only) is timed too where
    # its choice differs from `scorer`'s, and set against the bare passes it makes.
    default_prefix = default.uses_prefix_cache() and prefix is not None
    whole_methods = ("scorer", "bare", "bare_full") + (() if default_prefix else ("scorer_default",))
    whole = {m: [] for m in whole_methods}
    for round_no in range(args.eval_repeats):
        for method in whole_methods[round_no % len(whole_methods):] + whole_methods[:round_no % len(whole_methods)]:
            with Clock(device) as clock:
                if method == "scorer":
                    scorer.predict_proba(texts)
                elif method == "scorer_default":
                    default.predict_proba(texts)
                else:
                    with torch.inference_mode():
                        bare_prefix = scorer.encode_prefix(encoded[0][:skip]) if skip and method == "bare" else None
                        for _, inputs in (tail if method == "bare" else full):
                            bare_forward(scorer, inputs, bare_prefix)
            whole[method].append(clock.wall)
    default_against = "bare" if default_prefix else "bare_full"
    default_times = whole["scorer" if default_prefix else "scorer_default"]
    # Prompt building alone (CPU work whatever the device): one template render per text, as
    # before, against one render per call (`prompts.build_prompts`). Same strings, checked.
    from sarcasm_dpo.metrics import decide
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
    scored_labels = decide(probs, 0.5)
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
        "whole_calls": {**{f"{m}_s": [round(x, 3) for x in whole[m]] for m in whole_methods},
                        "scorer_overhead_vs_bare_best": round(min(whole["scorer"]) / min(whole["bare"]) - 1, 4),
                        "bare_full_over_bare_best": round(min(whole["bare_full"]) / min(whole["bare"]), 4),
                        "default_scorer": {
                            "prefix_cache": default_prefix, "against": default_against,
                            "overhead_best": round(min(default_times) / min(whole[default_against]) - 1, 4),
                            "overhead_median": round(statistics.median(default_times)
                                                     / statistics.median(whole[default_against]) - 1, 4)},
                        "what": "scorer.predict_proba(all texts) against the prefix pass plus every bare batch "
                                "(bare) and against the bare passes over full prompts (bare_full), each timed as "
                                "one block, interleaved in rounds after the per-batch rounds; default_scorer: the "
                                "scorer as the stages build it on this device, against the bare passes it makes"},
        "prompt_building_ms_per_text": {"one_render_per_text": round(1000 * min(per_text) / len(texts), 4),
                                        "one_render_per_call": round(1000 * min(framed) / len(texts), 4)},
        "note": "Each round times the methods on each batch, one after the other, in an order that rotates by "
                "round; what the scorer (and its bare counterpart) does once per call is timed once per round and "
                "added. Headline rates: for each piece the fastest of the rounds (other jobs on the machine only "
                "ever add time), summed. Beside them: the mean over rounds, and this process's CPU seconds.",
    }


if __name__ == "__main__":
    common.run_section("eval")
