"""The base model an adapter records is an input of every run given that adapter, though no setting names it.

A stage given an adapter (compare, dpo, mine, export, the pipeline's later stages) loads the base model its run
record names (models.adapter_base_model). README, "No run writes over what it reads": an output on that base is
refused before anything starts, --overwrite or not, and the base stays byte for byte as it was. And where that
base folder has become an export (the adapter already merged into it), predict and the Python API refuse to put
the adapter on top of it a second time, as they do when the export is given as --model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from reliability_common import error_paragraph, reference_run, snapshot
from test_sft import toy_frame

from sarcasm_dpo import cli
from sarcasm_dpo.data import normalise
from sarcasm_dpo.errors import UserError


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """A finished SFT adapter of the tiny model, its toy splits, and a test split neither of them holds."""
    sft_dir, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    seen = set(pd.concat([pd.read_csv(train), pd.read_csv(val)]).text.map(normalise))
    test_rows = toy_frame(40, 3)
    test = tmp_path_factory.mktemp("base-model-test") / "test.csv"
    test_rows[~test_rows.text.map(normalise).isin(seen)].to_csv(test, index=False)
    return {"model": tiny_model_dir, "sft": sft_dir, "train": train, "val": val, "test": test}


def adapter_on(base: Path, made: dict, folder: Path) -> Path:
    """A copy of the finished adapter whose run record names `base` as the model it was trained on."""
    shutil.copytree(made["sft"], folder)
    record = json.loads((folder / "training_summary.json").read_text())
    record["config"]["model"] = str(base)
    (folder / "training_summary.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def own_base(made, tmp_path):
    """(adapter, base): a private copy of the tiny model, and an adapter that records it as its base."""
    base = tmp_path / "base"
    shutil.copytree(made["model"], base)
    return adapter_on(base, made, tmp_path / "sft"), base


def _commands(made: dict, adapter: Path, base: Path) -> dict[str, list[str]]:
    """Every stage that takes an adapter, each with its output on the adapter's recorded base and --overwrite, with
    inputs it would otherwise run on (so an unrefused run replaces the base, and the test fails)."""
    return {
        "compare": ["compare", "--no_wandb", "--overwrite", "--test_csv", str(made["test"]), "--train_csv",
                    str(made["train"]), "--sft_model", str(adapter), "--dpo_model", "", "--skip_base", "--no_baseline",
                    "--n_bootstrap", "20", "--max_text_tokens", "64", "--output_dir", str(base)],
        "dpo": ["dpo", "--no_wandb", "--overwrite", "--sft_model", str(adapter), "--train_csv", str(made["train"]),
                "--val_csv", str(made["val"]), "--isarcasm_val_csv", "", "--sample_size", "8", "--val_sample_size", "8",
                "--probe_size", "4", "--epochs", "1", "--batch_size", "4", "--grad_accum", "1", "--max_text_tokens",
                "64", "--output_dir", str(base)],
        # mine writes a file: over one of the base's own files (its config.json) and beside them.
        "mine": ["mine", "--no_wandb", "--overwrite", "--sft_model", str(adapter), "--input_csv", str(made["train"]),
                 "--sample_size", "8", "--filter_strategy", "all", "--max_text_tokens", "64",
                 "--output_file", str(base / "config.json")],
        "export": ["export", "--adapter", str(adapter), "--output_dir", str(base), "--overwrite", "--results", ""],
    }


@pytest.mark.parametrize("stage", ["compare", "dpo", "mine", "export"])
def test_no_stage_writes_over_the_base_model_its_adapter_records(stage, made, own_base, capsys):
    adapter, base = own_base
    before = {"base": snapshot(base), "adapter": snapshot(adapter)}
    code = cli.main(_commands(made, adapter, base)[stage])
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and ("which this run reads" in message or "is both an input" in message), message
    assert "--overwrite or not" in message and len(message.strip().splitlines()) == 1, message
    assert f"the base model that {adapter} records" in message, message  # why a path never typed is an input
    assert {"base": snapshot(base), "adapter": snapshot(adapter)} == before  # nothing written, nothing deleted


def test_the_base_is_refused_by_its_link_too(made, own_base, tmp_path, capsys):
    """The recorded base reached through a symbolic link is the same folder."""
    adapter, base = own_base
    link = tmp_path / "link-to-base"
    link.symlink_to(base, target_is_directory=True)
    before = snapshot(base)
    assert cli.main(_commands(made, adapter, link)["export"]) == 2
    assert "is both an input" in error_paragraph(capsys.readouterr().err)
    assert snapshot(base) == before


def test_the_pipeline_refuses_a_stage_output_on_the_base_of_a_finished_adapter(made, own_base, shared_data, tmp_path,
                                                                              monkeypatch, capsys):
    """A pipeline run again over a finished SFT folder: DPO's output on the base that SFT adapter records is refused
    before the split is written or anything trained."""
    adapter, base = own_base
    monkeypatch.chdir(tmp_path)
    before = snapshot(base)
    small = ["sft.sample_size=16", "sft.val_sample_size=8", "sft.epochs=1", "dpo.sample_size=8", "dpo.epochs=1",
             "dpo.val_sample_size=8", "dpo.probe_size=4", "compare.sample_size=16", "compare.n_bootstrap=20",
             "max_text_tokens=64"]
    argv = ["pipeline", "--no_wandb", "--overwrite", "--data_dir", str(shared_data)]
    for item in [f"sft.model={base}", f"sft.output_dir={adapter}", f"dpo.output_dir={base}", *small]:
        argv += ["--set", item]
    code = cli.main(argv)
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and "is both an input" in message, message
    assert snapshot(base) == before and not (tmp_path / "data").exists()  # not even the split ran


def test_input_paths_add_the_recorded_base_and_pass_over_a_damaged_record(made, own_base, tmp_path):
    """rundir.input_paths: the base the adapter records is among a run's inputs; an adapter whose record does not
    read adds nothing there (the stage's own reader names what is wrong when it starts)."""
    from sarcasm_dpo.config import build
    from sarcasm_dpo.rundir import input_paths
    from sarcasm_dpo.settings import ExportSettings

    adapter, base = own_base
    assert str(base) in input_paths(build(ExportSettings, {"adapter": str(adapter), "results": ""}))
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    (damaged / "training_summary.json").write_text("{")
    paths = input_paths(build(ExportSettings, {"adapter": str(damaged), "results": ""}))
    assert str(damaged) in paths and str(base) not in paths
    # ... and the stage then names the damaged record itself.
    code = cli.main(["export", "--adapter", str(damaged), "--output_dir", str(tmp_path / "out"), "--results", ""])
    assert code == 2 and not (tmp_path / "out").exists()


def test_an_adapter_whose_recorded_base_became_an_export_is_refused(made, own_base, tmp_path, capsys):
    """predict --adapter (no --model) and SarcasmDetector.load(adapter=...) load the base the adapter records. When
    that folder holds an export (the adapter already merged into it), the adapter would be applied twice: refused,
    as it is when the export is given as --model."""
    from sarcasm_dpo.detector import SarcasmDetector

    adapter, base = own_base
    exported = tmp_path / "exported"
    assert cli.main(["export", "--adapter", str(adapter), "--output_dir", str(exported), "--results", ""]) == 0
    twice = adapter_on(exported, made, tmp_path / "sft-on-export")
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great, rain again\n")
    capsys.readouterr()
    code = cli.main(["predict", "--adapter", str(twice), "--input", str(texts)])
    captured = capsys.readouterr()
    message = error_paragraph(captured.err)
    assert code == 2 and not captured.out, captured.out  # no probability of a model never trained
    assert "is an export" not in message and f"records {exported}" in message and "now holds an export" in message
    assert f"--model {exported}" in message, message
    with pytest.raises(UserError, match="now holds an export"):
        SarcasmDetector.load(adapter=str(twice))
    # The stages that load an adapter on its recorded base refuse it alike, before writing anything.
    for args in (["compare", "--no_wandb", "--test_csv", str(made["test"]), "--train_csv", str(made["train"]),
                  "--sft_model", str(twice), "--dpo_model", "", "--skip_base", "--no_baseline", "--n_bootstrap", "20",
                  "--output_dir", str(tmp_path / "cmp")],
                 ["mine", "--no_wandb", "--sft_model", str(twice), "--input_csv", str(made["train"]),
                  "--output_file", str(tmp_path / "mined" / "pairs.json")],
                 ["dpo", "--no_wandb", "--sft_model", str(twice), "--train_csv", str(made["train"]), "--val_csv",
                  str(made["val"]), "--isarcasm_val_csv", "", "--pair_style", "label", "--output_dir",
                  str(tmp_path / "dpo")]):
        assert cli.main(args) == 2, args[0]
        assert "now holds an export" in error_paragraph(capsys.readouterr().err), args[0]
        assert not (tmp_path / "cmp").exists() and not (tmp_path / "mined").exists() and not (tmp_path / "dpo").exists()
    # The adapter on its own base, and the export on its own, are what they always were.
    assert cli.main(["predict", "--adapter", str(adapter), "--input", str(texts)]) == 0
    assert cli.main(["predict", "--model", str(exported), "--input", str(texts)]) == 0
