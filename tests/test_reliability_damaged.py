"""Damaged records, settings the pipeline would ignore, and beta folders that collide: each a clear error
(one paragraph, exit 2) that loses nothing, or a stage that counts as not done and runs again.

- A JSON record a run wrote and a later one reads (atomic.read_json: COMPLETE.json, summaries, checkpoint
  states, run_config.json, beta_sweep_results.json) that is cut short, edited or not UTF-8 is named with what
  to do; a damaged checkpoint's torch or safetensors files are found before anything loads.
- The pipeline reruns a finished stage whose records do not read back, instead of a traceback.
- A top-level setting the pipeline replaces with a chained value (train_csv, sft_model, --set data_dir) is refused.
- A beta sweep gives every beta its own folder and checks all of them before the first beta trains.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability_common import error_paragraph, reference_run, sft_argv, sft_settings, toy_csvs
from test_pipeline import pipeline, small_data_dir, write_config  # noqa: F401 - the fixture, for the pipeline tests
from test_reliability_resume import _DieAtStep  # a kill at a step, without a checkpoint of its own

from sarcasm_dpo import cli
from sarcasm_dpo.atomic import DamagedRecord, finish_output_dir, read_complete, read_json, write_json
from sarcasm_dpo.config import apply_overrides, build, opt
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import DPOSettings, PipelineSettings
from sarcasm_dpo.stages import STAGES, Stage, pipeline_stages, settings_classes, sft
from sarcasm_dpo.stages import pipeline as pipeline_stage
from sarcasm_dpo.stages.sweep import beta_dirs, beta_name


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what "loses nothing" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_utf8(path: Path) -> None:
    path.write_bytes(b'{"history": "\xe9t\xe9"}')


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not what was saved here")


# -- the one reader of records ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage,problem", [
    (cut_short, "not valid JSON"), (not_utf8, r"byte b'\\xe9' at position 13 is not UTF-8"),
    (lambda p: p.write_text("[1, 2]"), "holds JSON an array where an object belongs"),
    (lambda p: p.write_text(""), "the file is empty"),
])
def test_a_damaged_record_is_a_user_error_naming_the_file(tmp_path, damage, problem):
    path = write_json(tmp_path / "record.json", {"config": {"seed": 1}, "notes": "x" * 40})
    damage(path)
    with pytest.raises(DamagedRecord, match=problem) as caught:
        read_json(path, "Do this.", expect=dict)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{path} is damaged: ") and str(caught.value).endswith("Do this.")


def test_a_damaged_completion_marker_means_not_finished(tmp_path):
    finish_output_dir(tmp_path, {"seed": 1})
    assert read_complete(tmp_path)["config"] == {"seed": 1}
    for damage in (cut_short, not_utf8, lambda p: p.write_text("[]")):
        damage(tmp_path / "COMPLETE.json")
        assert read_complete(tmp_path) is None


# -- checkpoints --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory):
    """(output folder, CLI argv) of an SFT run stopped after its checkpoints 6 and 8 (copied for each test)."""
    root = tmp_path_factory.mktemp("interrupted")
    train, val = toy_csvs(root / "data")
    out = root / "sft"
    with pytest.raises(SystemExit):
        sft.run(sft_settings(tiny_model_dir, train, val, out), extra_callbacks=[_DieAtStep(9)])
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    return out, (tiny_model_dir, train, val)


def _copy(interrupted, tmp_path) -> tuple[Path, list[str]]:
    src, (model, train, val) = interrupted
    out = tmp_path / "sft"
    shutil.copytree(src, out)
    run_config = out / "checkpoints" / "run_config.json"  # the checkpoints of a run into this folder
    write_json(run_config, {**read_json(run_config), "output_dir": str(out)})
    return out, sft_argv(model, train, val, out) + ["--resume"]


@pytest.mark.parametrize("name,damage", [
    ("checkpoint-8/trainer_state.json", cut_short),
    ("checkpoint-8/validation_state.json", cut_short),
    ("checkpoint-8/validation_state.json", not_utf8),
    ("checkpoint-8/optimizer.pt", garbage),
    ("checkpoint-8/scheduler.pt", cut_short),
    ("checkpoint-8/rng_state.pth", cut_short),
    ("checkpoint-8/adapter_model.safetensors", cut_short),
    ("checkpoint-8/validation_best_adapter.safetensors", garbage),
])
def test_resume_from_a_damaged_checkpoint_names_it_and_the_way_on(interrupted, tmp_path, capsys, name, damage):
    out, argv = _copy(interrupted, tmp_path)
    damaged = out / "checkpoints" / name
    damage(damaged)
    before = snapshot(out)
    assert cli.main(argv) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert f"{damaged} is damaged" in message and "\n" not in message.strip()
    assert f"remove {out / 'checkpoints' / 'checkpoint-8'}" in message and "(checkpoint-6)" in message
    assert "without --resume and with --overwrite" in message and "Traceback" not in message
    assert snapshot(out) == before  # refused before anything was loaded or written


def test_a_damaged_run_config_is_named_and_starting_over_is_offered(interrupted, tmp_path, capsys):
    out, argv = _copy(interrupted, tmp_path)
    record = out / "checkpoints" / "run_config.json"
    cut_short(record)
    before = snapshot(out)
    assert cli.main(argv) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert f"{record} is damaged: it is not valid JSON" in message and "--overwrite" in message
    assert snapshot(out) == before


def test_removing_the_damaged_checkpoint_resumes_from_the_one_before(interrupted, tmp_path, capsys):
    """The message's advice works: without checkpoint-8 the run resumes from checkpoint-6 and finishes."""
    out, argv = _copy(interrupted, tmp_path)
    garbage(out / "checkpoints" / "checkpoint-8" / "optimizer.pt")
    assert cli.main(argv) == 2
    capsys.readouterr()
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")
    assert cli.main(argv) == 0
    assert f"Resuming from {out / 'checkpoints' / 'checkpoint-6'}" in capsys.readouterr().out
    assert read_json(out / sft.SUMMARY_FILE)["resumed_from"].endswith("checkpoint-6")


def test_resume_of_a_finished_run_with_a_damaged_summary_trains_it_again(tiny_model_dir, tmp_path_factory, tmp_path,
                                                                        capsys):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    out = tmp_path / "sft"
    shutil.copytree(ref, out)
    marker = read_complete(out)  # the finished run of these settings, in this folder
    finish_output_dir(out, {**marker["config"], "output_dir": str(out)})
    cut_short(out / sft.SUMMARY_FILE)
    assert cli.main(sft_argv(tiny_model_dir, train, val, out) + ["--resume"]) == 0
    assert f"{out / sft.SUMMARY_FILE} is damaged" in capsys.readouterr().out
    assert read_json(out / sft.SUMMARY_FILE, expect=dict)["global_steps"] == 12


# -- the pipeline: settings it would ignore ------------------------------------------------------------------


PIPELINE = settings_classes(pipeline_stages())


@pytest.mark.parametrize("item,match", [
    ("train_csv=/elsewhere/train.csv", r"would be ignored: the pipeline sets train_csv of sft, dpo, compare from "
                                       r"split\.output_dir\. Change split\.output_dir instead.*--set sft\.train_csv="),
    ("sft_model=/elsewhere/sft", r"sets sft_model of dpo, compare from sft\.output_dir"),
    ("data_dir=/elsewhere/data", r"data_dir is the pipeline's own setting.*Pass --data_dir"),
    ("no_wandb=true", r"no_wandb is the pipeline's own setting.*Pass --no_wandb"),
    ("wandb_group=mine", r"one W&B group of its own"),
])
def test_set_of_a_value_the_pipeline_chains_is_refused(tmp_path, capsys, item, match):
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tmp_path / "no-model-needed", work)
    assert cli.main(["pipeline", "--config", str(config), "--no_wandb", "--set", item]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert message.startswith(f"error: --set {item.split('=')[0]}=") and re.search(match, message), message
    assert not work.exists()  # refused before anything was written


def test_a_top_level_chained_path_in_the_config_file_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "p.yaml", tmp_path / "model", tmp_path / "work")
    config.write_text(config.read_text() + "train_csv: /elsewhere/train.csv\n")
    assert cli.main(["pipeline", "--config", str(config), "--no_wandb"]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert f"{config}: the top-level setting train_csv=/elsewhere/train.csv would be ignored" in message


def test_values_the_pipeline_reads_or_a_section_sets_are_used():
    """The pipeline's own top-level keys (read by the CLI into its settings) and one stage's section value pass."""
    data = apply_overrides({"data_dir": "/d", "wandb_project": "p", "split": {"output_dir": "/s"}},
                           ["sft.train_csv=/t.csv", "seed=3"], PIPELINE)
    stages = pipeline_stage.stage_settings(data, PipelineSettings(data_dir="/d", wandb_project="p"), None)
    assert stages["split"].data_dir == "/d" and stages["sft"].wandb_project == "p"
    assert stages["sft"].train_csv == "/t.csv" and stages["dpo"].train_csv == "/s/isarcasm_train.csv"
    assert stages["compare"].seed == 3


# -- the pipeline: a finished stage whose record does not read back --------------------------------------------


@dataclass
class RecordSettings:
    output_dir: str = opt("out/recorded", "Where it writes.")
    splits: str = opt("data/splits", "Chained from split.")
    overwrite: bool = opt(False, "Replace another run's output.")
    no_wandb: bool = opt(False, "Turn W&B off.")


@pytest.fixture
def recorded(monkeypatch):
    """A registered stage that writes a record (record.json) and its marker, and counts its runs."""
    module = types.ModuleType("sarcasm_dpo_test_recorded_stage")
    module.runs = 0

    def run(settings):
        module.runs += 1
        write_json(Path(settings.output_dir) / "record.json", {"runs": module.runs})
        finish_output_dir(settings.output_dir, dataclasses.asdict(settings))
        return {"runs": module.runs}

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(STAGES, "recorded", Stage("recorded", RecordSettings, "Test stage.", module.__name__,
                                                   record="record.json",
                                                   chain=lambda built, pipe: {"splits": built["split"].output_dir}))
    return module


@pytest.mark.parametrize("damage", [cut_short, not_utf8, lambda p: p.write_text("[]")])
def test_a_stage_whose_record_is_damaged_runs_again_instead_of_being_skipped(recorded, tmp_path, capsys, damage):
    pipe = PipelineSettings(no_wandb=True)
    settings = {"recorded": RecordSettings(output_dir=str(tmp_path / "out"), splits=str(tmp_path / "splits"))}
    assert pipeline_stage.run_stages(pipe, settings, ["recorded"])["ran"] == ["recorded"]
    assert pipeline_stage.run_stages(pipe, settings, ["recorded"])["skipped"] == ["recorded"]
    record = tmp_path / "out" / "record.json"
    damage(record)
    capsys.readouterr()
    assert pipeline_stage.run_stages(pipe, settings, ["recorded"])["ran"] == ["recorded"]
    assert f"[pipeline] recorded: {record} is damaged" in capsys.readouterr().out
    assert read_json(record) == {"runs": 2} and recorded.runs == 2


@pytest.mark.parametrize("key,value", [("config", [1]), ("config", "seed=1"), ("inputs", "x"),
                                       ("files", {"a\u0000b": 1}), ("files", {"../record.json": 1})])
def test_a_stage_whose_marker_has_the_wrong_shape_is_not_finished_and_runs_again(recorded, tmp_path, key, value,
                                                                               capsys):
    """A COMPLETE.json edited into the wrong shape is damaged as one that is not JSON: the pipeline's checks
    (is_complete_for, same_inputs, the whole-folder check) see a stage that never finished, not a traceback."""
    pipe = PipelineSettings(no_wandb=True)
    settings = {"recorded": RecordSettings(output_dir=str(tmp_path / "out"), splits=str(tmp_path / "splits"))}
    assert pipeline_stage.run_stages(pipe, settings, ["recorded"])["ran"] == ["recorded"]
    marker = tmp_path / "out" / "COMPLETE.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, key: value, "inputs": value if key == "inputs" else {"splits": "0" * 64}}))
    assert read_complete(tmp_path / "out") is None
    assert pipeline_stage.finished_here("recorded", settings["recorded"]) == (False, None)
    capsys.readouterr()
    assert pipeline_stage.run_stages(pipe, settings, ["recorded"])["ran"] == ["recorded"]
    said = capsys.readouterr().out  # the pipeline names the damage, and redoes its own stage's folder
    assert f"{marker} is damaged" in said and "runs again" in said
    assert read_json(tmp_path / "out" / "record.json") == {"runs": 2} and recorded.runs == 2
    assert read_complete(tmp_path / "out")["config"]["output_dir"] == str(tmp_path / "out")


# -- the beta sweep: one folder per beta, all checked before any training -----------------------------------


def test_every_beta_gets_a_folder_of_its_own():
    s = DPOSettings(output_dir="out/dpo", betas=[0.1, 0.1000001, 0.5, 1e-05, 2.0, 0.1])
    assert [Path(d).name for d in beta_dirs(s)] == ["dpo_beta_0.1", "dpo_beta_0.1000001", "dpo_beta_0.5",
                                                     "dpo_beta_1e-05", "dpo_beta_2"]
    assert [beta_name(b) for b in (0.01, 0.05, 1.0)] == ["0.01", "0.05", "1"]  # the names sweeps always used


def _fake_adapter(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "none", "peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return folder


def _other_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights of another run")
    finish_output_dir(folder, {"beta": 9.0})


def _checkpoints_only(folder: Path) -> None:
    (folder / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (folder / "checkpoints" / "checkpoint-3" / "dpo_state.json").write_text("{}")  # dpo.STATE_FILE


@pytest.mark.parametrize("make,match", [
    (lambda f: f.write_text("a file"), "exists and is not a folder"),
    (_other_run, "already holds the results of another run"),
    (_checkpoints_only, "holds checkpoints of an unfinished run"),
])
def test_a_sweep_checks_every_beta_folder_before_the_first_beta_trains(tmp_path, monkeypatch, make, match):
    from sarcasm_dpo.stages import dpo

    trained = []
    monkeypatch.setattr(dpo, "train", lambda sub, run_name=None: trained.append(sub.beta))
    sft_dir = _fake_adapter(tmp_path / "sft")
    last = tmp_path / "dpo_beta_0.5"
    make(last)
    before = snapshot(tmp_path)
    s = build(DPOSettings, dict(sft_model=str(sft_dir), output_dir=str(tmp_path / "dpo"), beta_sweep=True,
                                betas=[0.1, 0.5], no_wandb=True))
    with pytest.raises(UserError, match=match) as caught:
        dpo.run(s)
    assert str(last) in str(caught.value)
    assert trained == [] and snapshot(tmp_path) == before  # no lock, no folder left behind either
    assert not (tmp_path / "dpo_beta_0.1").exists()


def test_betas_that_print_alike_train_into_folders_of_their_own(tiny_model_dir, tmp_path_factory, tmp_path):
    """--betas 0.1,0.1000001 (both "0.1" at 6 digits): two folders, two rows, each naming its own folder."""
    from reliability_common import dpo_settings

    from sarcasm_dpo.stages import dpo

    sft_dir, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    s = dpo_settings(sft_dir, train, val, tmp_path / "o_sw", beta_sweep=True, betas=[0.1, 0.1000001], epochs=1,
                     sample_size=8)
    results = dpo.run(s)
    folders = [row["output_dir"] for row in results["runs"]]
    assert folders == [str(tmp_path / "o_sw_beta_0.1"), str(tmp_path / "o_sw_beta_0.1000001")]
    for beta, folder in zip((0.1, 0.1000001), folders):
        assert read_complete(folder)["config"]["beta"] == beta
    assert read_json(tmp_path / "o_sw" / "beta_sweep_results.json")["runs"] == results["runs"]


def test_pipeline_reruns_the_stage_whose_record_is_damaged(tiny_model_dir, small_data_dir, tmp_path, capsys,
                                                           monkeypatch):
    """A finished sweep pipeline: a damaged compare record reruns compare; a damaged beta_sweep_results.json
    (read by compare's chaining) reruns the sweep, which reuses its finished betas. No traceback, exit 0."""
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    config.write_text(config.read_text().replace("  val_sample_size: 24\n",
                                                 "  val_sample_size: 24\n  beta_sweep: true\n  betas: [0.1, 0.5]\n"))
    assert pipeline(capsys, config, small_data_dir).returncode == 0

    results = work / "results" / "model_comparison_results.json"
    not_utf8(results)
    again = pipeline(capsys, config, small_data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"[pipeline] compare: {results} is damaged: byte" in again.stdout
    assert "ran compare; skipped split, sft, dpo." in again.stdout and again.stdout.rstrip().endswith(str(results))
    assert read_json(results, expect=dict)["test_set"]

    sweep = work / "dpo" / "beta_sweep_results.json"
    cut_short(sweep)
    third = pipeline(capsys, config, small_data_dir)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"[pipeline] dpo: {sweep} is damaged: it is not valid JSON" in third.stdout
    assert third.stdout.count("already finished in") == 2  # the betas are reused, not trained again
    assert "ran dpo, compare; skipped split, sft." in third.stdout
    assert read_json(sweep)["best_output_dir"].startswith(str(work / "dpo_beta_"))
