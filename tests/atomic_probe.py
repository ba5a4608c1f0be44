"""Run a CLI command and check its output folder at every moment a kill could leave it in.

    python tests/atomic_probe.py REPORT.json sft --output_dir OUT ...

Python's audit hooks see every file the process opens and every rename. Before each rename into
OUT (the moment after which the folder changes) the folder is checked as a kill at that instant
would leave it: every file under its final name must be whole (JSON parses, PNG ends with IEND,
safetensors loads, CSV parses), and COMPLETE.json may exist only when every output is there and
whole. Opening a final-named file in OUT for writing is itself a violation (the writes must go to
temporary names). A stage that writes into a staging folder beside OUT (`.staging-OUT-*`, swapped in
whole by rundir.staged) is checked the same way: renames into the staging folder are listed with
the ones into OUT, and at the swap (a rename onto OUT itself) the staged folder must be whole and
complete. Checkpoint folders are skipped: their completeness marker is checked by the resume tests.
The report (checks made, violations) is written to REPORT.json at exit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OUTPUTS = {
    "sft": ("adapter_model.safetensors", "adapter_config.json", "sft_metrics.json", "sft_training_curves.png",
            "training_summary.json", "tokenizer_config.json"),
    "dpo": ("adapter_model.safetensors", "adapter_config.json", "dpo_epoch_metrics.json", "dpo_batch_metrics.json",
            "dpo_training_curves.png", "dpo_training_summary.json", "tokenizer_config.json"),
}


def whole(path: Path) -> str | None:
    """None when the file is complete for its type, else what is wrong with it."""
    try:
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".png":
            if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND"):
                return "PNG without its end chunk"
        elif path.suffix == ".safetensors":
            from safetensors.torch import load

            load(data)
        elif path.suffix == ".csv":
            import io

            import pandas as pd

            pd.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any failure to read back is the finding
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def check_folder(out: Path, stage: str) -> list[str]:
    problems = []
    if not out.is_dir():
        return problems
    for path in out.iterdir():
        if path.name.startswith(".tmp") or not path.is_file():
            continue
        wrong = whole(path)
        if wrong:
            problems.append(f"{path.name}: {wrong}")
    if (out / "COMPLETE.json").is_file():
        missing = [n for n in OUTPUTS[stage] if not (out / n).is_file()]
        if missing:
            problems.append(f"COMPLETE.json present while {missing} are missing")
    return problems


def main() -> int:
    report_path, argv = Path(sys.argv[1]), sys.argv[2:]
    stage = argv[0]
    out = Path(argv[argv.index("--output_dir") + 1]).resolve()
    report = {"checks": 0, "violations": [], "renames_into_out": [], "exit_code": None}
    busy = [False]

    def resolved(path) -> Path | None:
        try:
            return Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return None

    def staging(folder: Path) -> bool:  # rundir.staged's folder for OUT
        return folder.parent == out.parent and folder.name.startswith(f".staging-{out.name}-")

    def inside_out(path) -> Path | None:
        p = resolved(path)
        if p is None or p == out or out not in p.parents:
            return None
        rel = p.relative_to(out)
        return None if rel.parts[0] == "checkpoints" else p

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                mode, flags = args[1], args[2] if len(args) > 2 else 0
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                          (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
                target = inside_out(args[0])
                if writing and target is not None and not any(part.startswith(".tmp")
                                                              for part in target.relative_to(out).parts):
                    report["violations"].append(f"opened {target.name} for writing under its final name")
            elif event in ("os.rename", "os.replace"):
                target, source = resolved(args[1]), resolved(args[0])
                if target == out and source is not None and staging(source):  # the staged folder swapped in
                    report["checks"] += 1
                    report["renames_into_out"].append("<swap>")
                    report["violations"] += [f"swapping in: {p}" for p in check_folder(source, stage)]
                    if not (source / "COMPLETE.json").is_file():
                        report["violations"].append("swapping in a staged folder without COMPLETE.json")
                elif target is not None and staging(target.parent):
                    report["renames_into_out"].append(target.name)  # into the staged copy of OUT
                target = inside_out(args[1])
                if target is not None and target.parent == out:
                    report["checks"] += 1
                    report["renames_into_out"].append(target.name)
                    report["violations"] += [f"before {target.name}: {p}" for p in check_folder(out, stage)]
        finally:
            busy[0] = False

    sys.addaudithook(hook)
    from sarcasm_dpo.cli import main as cli_main

    try:
        report["exit_code"] = cli_main(argv)
    finally:
        busy[0] = True
        report["checks"] += 1
        report["violations"] += [f"at the end: {p}" for p in check_folder(out, stage)]
        report["complete"] = (out / "COMPLETE.json").is_file()
        report_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
