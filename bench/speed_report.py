"""The speed benchmark's verdicts against its targets, and its markdown table (bench/speed.py writes both).

    python bench/speed.py --sections eval --eval_texts 32    # the table is printed last and kept as .md
"""

from __future__ import annotations

import json

TARGETS = {"scorer_vs_generate": 3.0, "scorer_overhead_vs_bare": 0.15, "sft_vs_usual": 2.5, "dpo_vs_sft_memory": 1.2}


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
            d = w.get("default_scorer")
            if d and not d["prefix_cache"]:  # off a CPU the stages score full prompts: that scorer, its bare passes
                lines.append(f"| Whole call, s: the stages' scorer (full prompts) vs bare passes over full prompts | "
                             f"{min(w['scorer_default_s']):.2f} | {min(w['bare_full_s']):.2f} | "
                             f"{100 * d['overhead_best']:+.1f}% time | <= +15% | "
                             f"{'yes' if d['overhead_best'] <= 0.15 else '**no**'} | median of rounds "
                             f"{100 * d['overhead_median']:+.1f}% |")
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


if __name__ == "__main__":
    import common  # this folder is on sys.path when a file in it runs as a script

    common.helper_main(__doc__, "bench/speed.py writes the verdicts and the table; run python bench/speed.py --help.")
