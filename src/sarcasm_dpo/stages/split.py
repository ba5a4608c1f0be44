"""The split stage: GEN -> train/val/test, iSarcasmEval -> train/val, leakage-checked, written atomically.

    sarcasm-dpo split --data_dir ../shared/data --output_dir data/splits --no_wandb
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..atomic import check_output_dir, finish_output_dir, write_csv, write_json
from ..data import (GEN_RELPATH, ISARCASM_RELPATH, SPLIT_FILES, class_counts, frame_checksum, load_gen, load_isarcasm,
                    make_splits)
from ..download import ensure_data_dir
from ..rundir import input_identity, refuse_outputs_over_inputs, staged
from ..tracking import Tracker


def dataset_identity(data_dir: Path) -> dict[str, str]:
    """The checksums of the two datasets a split is made from (recorded in its COMPLETE.json)."""
    return input_identity({"gen": data_dir / GEN_RELPATH, "isarcasmeval": data_dir / ISARCASM_RELPATH})


def inputs_of(settings) -> dict[str, str]:
    """What a split of these settings reads: the datasets in --data_dir (or the verified copy found)."""
    return dataset_identity(ensure_data_dir(settings.data_dir))


def run(settings) -> dict:
    """`sarcasm-dpo split`: read both datasets, clean them, split, check leakage, write CSVs + split_info.json."""
    config = dataclasses.asdict(settings)
    out = Path(settings.output_dir)
    data_dir = ensure_data_dir(settings.data_dir)
    # The files read are known only now (--data_dir, or a copy found elsewhere): none may sit where the
    # split files go, or the swap at the end would take them away.
    refuse_outputs_over_inputs([out], [str(data_dir / GEN_RELPATH), str(data_dir / ISARCASM_RELPATH)])
    # The data's identity is part of what a finished split was made from: other data is another run.
    inputs = dataset_identity(data_dir)
    check_output_dir(out, settings, overwrite=settings.overwrite, inputs=inputs)
    with Tracker(enabled=not settings.no_wandb, project=settings.wandb_project, job_type="split",
                 group=settings.wandb_group, config=config) as tracker:
        gen = load_gen(data_dir / GEN_RELPATH, strict=settings.strict)
        isarcasm = load_isarcasm(data_dir / ISARCASM_RELPATH, strict=settings.strict, drop_conflicts=not settings.strict)
        splits = make_splits(gen, isarcasm, settings.test_size, settings.val_size, settings.isarcasm_val_size, settings.seed)
        info = {"config": config, "sources": {
                    "gen": {"path": str(data_dir / GEN_RELPATH), "sha256": inputs["gen"]},
                    "isarcasmeval": {"path": str(data_dir / ISARCASM_RELPATH), "sha256": inputs["isarcasmeval"]}},
                "splits": {}}
        print(f"{'split':<16}{'sarcastic':>10}{'not':>8}{'total':>8}")
        # Written beside the output folder and swapped in whole: a failure leaves the previous splits as they were.
        with staged(out) as stage:
            for name, frame in splits.items():
                write_csv(stage / SPLIT_FILES[name], frame)
                counts = class_counts(frame)
                info["splits"][name] = {"file": str(out / SPLIT_FILES[name]), "sha256": frame_checksum(frame), **counts}
                print(f"{name:<16}{counts['sarcastic']:>10}{counts['not_sarcastic']:>8}{counts['total']:>8}")
                tracker.log_summary({f"split/{name}/{k}": v for k, v in counts.items()})
            write_json(stage / "split_info.json", info)
            finish_output_dir(stage, config, extra={"stage": "split", "inputs": inputs})
    print(f"Splits written to {out}/ (no text appears in more than one split).")
    return info
