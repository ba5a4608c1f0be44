"""Helpers shared by the tests/test_reliability_*.py files (one file per point of the reliability issue).

The reference SFT run (tiny random Qwen2, 48 toy examples, 2 epochs of 6 steps, a checkpoint every
4 steps, LoRA dropout on) is trained once per test session and reused by every file that compares
against "the uninterrupted run with the same seed".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from test_sft import toy_frame  # the learnable toy rule of the SFT tests

from sarcasm_dpo.stages import sft
from sarcasm_dpo.config import build
from sarcasm_dpo.settings import SFTSettings

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sarcasm_dpo.cli"]
# Settings of every SFT run here: 6 optimizer steps per epoch, checkpoints at steps 4, 6 (epoch end), 8, 12.
BASE = dict(epochs=2, lr=5e-2, batch_size=8, grad_accum=1, logging_steps=1, save_steps=4,
            lora_targets=["q_proj", "v_proj"], no_wandb=True, seed=0)
# CPU runs are bit-for-bit repeatable; the tolerance only absorbs float formatting in JSON.
ATOL = 1e-6

_cache: dict = {}


def toy_csvs(folder: Path, n_train: int = 48, n_val: int = 16) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    toy_frame(n_train, 1).to_csv(folder / "train.csv", index=False)
    toy_frame(n_val, 2).to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def sft_settings(model_dir, train_csv, val_csv, output_dir, **overrides) -> SFTSettings:
    values = dict(BASE, model=str(model_dir), train_csv=str(train_csv), val_csv=str(val_csv),
                  output_dir=str(output_dir))
    values.update(overrides)
    return build(SFTSettings, values)


def sft_argv(model_dir, train_csv, val_csv, output_dir, **overrides) -> list[str]:
    """The CLI arguments of the same run as `sft_settings` (for subprocesses)."""
    values = dict(BASE, model=str(model_dir), train_csv=str(train_csv), val_csv=str(val_csv),
                  output_dir=str(output_dir))
    values.update(overrides)
    argv = ["sft"]
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [f"--{key}", ",".join(map(str, value))]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def reference_run(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """(output folder, train csv, val csv, summary) of the uninterrupted run; trained once per session."""
    if "ref" not in _cache:
        root = tmp_path_factory.mktemp("reference")
        train, val = toy_csvs(root / "data")
        out = root / "sft"
        summary = sft.run(sft_settings(tiny_model_dir, train, val, out))
        _cache["ref"] = (out, train, val, summary)
    return _cache["ref"]


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def max_adapter_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved adapters (inf if their tensors differ in name or shape)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return math.inf
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def metrics_json(folder: Path) -> dict:
    return json.loads((Path(folder) / "sft_metrics.json").read_text())


def assert_close(a, b, atol: float = ATOL, path: str = "") -> None:
    """Nested JSON values equal, numbers within atol (NaN equals NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_close(a[key], b[key], atol, f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, atol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, f"{path}: {a} != {b}"
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{path}: {a} != {b}"
        else:
            assert abs(a - b) <= atol, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def env(**extra) -> dict:
    out = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    out.update(extra)
    return out


def start_cli(argv: list[str], log: Path, **extra_env) -> subprocess.Popen:
    """Start the CLI in a subprocess, output into `log` (read it after the process ends)."""
    handle = open(log, "w")
    return subprocess.Popen(CLI + argv, cwd=ROOT, env=env(**extra_env), stdout=handle, stderr=subprocess.STDOUT)


def run_cli(argv: list[str], timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + argv, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05) -> bool:
    """Poll until predicate() is true; False on timeout or when `proc` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(every)
    return False


def complete_checkpoints(out: Path) -> list[str]:
    """Names of the checkpoints `--resume` would accept (our state file, written last, is there)."""
    ckpt = Path(out) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(p.name for p in ckpt.glob("checkpoint-*") if (p / sft.STATE_FILE).is_file())


@contextlib.contextmanager
def cli_running_past_a_checkpoint(argv: list[str], out: Path, log: Path):
    """The CLI in a subprocess, yielded once it has written a complete checkpoint; killed on exit if still running."""
    proc = start_cli(argv, log)
    try:
        assert wait_for(lambda: complete_checkpoints(out), timeout=300, proc=proc), log.read_text()[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def error_paragraph(stderr: str) -> str:
    """The CLI's error message: what follows the last "error: " (progress bars may precede it)."""
    assert "error: " in stderr, stderr[-2000:]
    return "error: " + stderr.rsplit("error: ", 1)[1]


# -- DPO: from the reference SFT adapter, on the toy splits (8 steps per epoch, checkpoints every 3) --------
DPO_BASE = dict(epochs=2, lr=5e-3, batch_size=2, grad_accum=1, logging_steps=1, save_steps=3, sample_size=16,
                val_sample_size=8, probe_size=8, isarcasm_val_csv="", no_wandb=True, seed=0, patience=5)


def dpo_settings(sft_dir, train_csv, val_csv, output_dir, **overrides):
    from sarcasm_dpo.settings import DPOSettings

    values = dict(DPO_BASE, sft_model=str(sft_dir), train_csv=str(train_csv), val_csv=str(val_csv),
                  output_dir=str(output_dir))
    values.update(overrides)
    return build(DPOSettings, values)


def dpo_reference_run(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, tuple]:
    """(output folder, (sft dir, train csv, val csv)) of the uninterrupted DPO run; trained once per session."""
    if "dpo" not in _cache:
        from sarcasm_dpo.stages import dpo

        sft_dir, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
        out = tmp_path_factory.mktemp("dpo-reference") / "dpo"
        dpo.run(dpo_settings(sft_dir, train, val, out))
        _cache["dpo"] = (out, (sft_dir, train, val))
    return _cache["dpo"]


def dpo_records(folder: Path) -> dict:
    """The DPO run's metrics files, which must match between a resumed and an uninterrupted run."""
    folder = Path(folder)
    return {name: json.loads((folder / name).read_text())
            for name in ("dpo_epoch_metrics.json", "dpo_batch_metrics.json")}


def cli_config(argv: list[str]) -> dict:
    """The settings dict the CLI builds from `argv` (what a stage records in COMPLETE.json)."""
    import dataclasses

    from sarcasm_dpo import cli
    from sarcasm_dpo.config import from_namespace
    from sarcasm_dpo.stages import settings_classes

    args = cli.build_parser().parse_args(argv)
    return dataclasses.asdict(from_namespace(settings_classes(), args, args.command))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (by relative path) and its bytes; subfolders such as mine's <stem>_run/ too."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
