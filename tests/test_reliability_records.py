"""Finished run folders that lost a file, and records of the right syntax but the wrong shape: each a clear
error (one paragraph, exit 2) naming the folder or field and what to do, never defaults in silence.

- COMPLETE.json lists the files its folder held when the run finished (name and size); every reader of a
  finished folder (predict, the detector, export, compare, dpo/mine through models.check_adapter_dir) refuses
  one that lost a file, and `atomic.missing_outputs` tells the pipeline which stage to run again.
- A run record whose "config" is not an object of settings is an error, not the default settings.
- A comparison's results of the wrong shape (models.dpo.accuracy = "high") are refused where they are read
  (compare.check_results_record), and an export that fails half-way leaves no half folder behind.
- A half export of an older version (sarcasm_dpo.json, no COMPLETE.json) is refused by predict and replaced by
  export; a stopped predict says what it leaves (rows on stdout) and what a rerun does.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from reliability_common import reference_run, snapshot
from test_compare import make_adapter

from sarcasm_dpo import atomic, models
from sarcasm_dpo.atomic import (COMPLETE_MARKER, DamagedRecord, finish_output_dir, incomplete_outputs,
                                mark_complete, missing_outputs, read_complete)
from sarcasm_dpo.cli import main
from sarcasm_dpo.errors import UserError

THRESHOLD = 0.61  # what the fixture's run chose on validation: not the default 0.5
TOKENS = 8  # the text length it was trained with: not the default 256
FILES = ("training_summary.json", "threshold.json", "adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter folder as an SFT run leaves it: weights, threshold.json, run record, COMPLETE.json last
    (written by atomic.finish_output_dir, so it lists the files). Its run recorded a leaky train split."""
    root = tmp_path_factory.mktemp("finished")
    pd.DataFrame({"text": ["oh great, rain again", "we met at noon"], "label": [1, 0]}).to_csv(
        root / "train.csv", index=False)
    folder = root / "sft"
    config = {"model": str(tiny_model_dir), "max_text_tokens": TOKENS, "train_csv": str(root / "train.csv")}
    make_adapter(tiny_model_dir, folder, seed=5, summary={
        "config": config, "best_val": {"f1": 0.5, "accuracy": 0.5, "roc_auc": 0.5, "threshold": 0.5, "n": 8},
        "outputs": {"adapter": "adapter_model.safetensors", "threshold": "threshold.json"}})
    (folder / "threshold.json").write_text(json.dumps({"threshold": THRESHOLD, "criterion": "balanced_accuracy",
                                                       "split": "gen_val"}))
    finish_output_dir(folder, config, {"stage": "sft", "best_epoch": 1, "best_f1": 0.5})
    return folder


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _texts(tmp_path: Path) -> Path:
    path = tmp_path / "t.txt"
    path.write_text("oh great, rain again, what a lovely surprise for everyone involved in this\n")
    return path


# -- the marker lists the folder's files; missing_outputs compares ---------------------------------------------


def test_the_marker_lists_the_files_and_their_sizes(tmp_path):
    folder = tmp_path / "out"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "state.json").write_text("{}")
    (folder / "a.json").write_text('{"a": 1}')
    (folder / "b.bin").write_bytes(b"0123456789")
    (folder / ".tmp-b.bin.x").write_text("a killed write")
    assert missing_outputs(folder) == []  # not finished: nothing to check
    finish_output_dir(folder, {"seed": 1})
    # Only the stage's own files: no hidden leftovers, no subfolders, not the marker itself.
    assert read_complete(folder)["files"] == {"a.json": 8, "b.bin": 10}
    assert missing_outputs(folder) == [] and incomplete_outputs(folder) is None
    (folder / "a.json").write_text('{"a": 2, "edited": true}')  # a record edited by hand is not a lost one
    shutil.rmtree(folder / "checkpoints")  # not an output the marker accounts for
    assert missing_outputs(folder) == []
    (folder / "a.json").unlink()
    (folder / "b.bin").unlink()
    (folder / "b.bin").mkdir()
    assert missing_outputs(folder) == ["a.json", "b.bin"]
    error = incomplete_outputs(folder)
    assert isinstance(error, DamagedRecord) and error.path == folder and error.missing == ["a.json", "b.bin"]
    assert "files the run left there are gone: a.json (missing), b.bin (not a file)" in error.problem
    (folder / COMPLETE_MARKER).unlink()
    assert missing_outputs(folder) == []


def test_a_real_sft_run_lists_its_outputs_and_predict_refuses_it_without_its_record(
        tiny_model_dir, tmp_path_factory, tmp_path, capsys):
    ref, *_ = reference_run(tiny_model_dir, tmp_path_factory)
    listed = read_complete(ref)["files"]
    assert set(FILES) | {"sft_metrics.json", "sft_training_curves.png"} <= set(listed)
    assert missing_outputs(ref) == []
    copy = _copy(ref, tmp_path)
    assert missing_outputs(copy) == []  # a whole copy is whole
    (copy / "training_summary.json").unlink()
    assert missing_outputs(copy) == ["training_summary.json"]
    capsys.readouterr()  # the training's own lines
    assert main(["predict", "--adapter", str(copy), "--input", str(_texts(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no row at the default length
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"error: {copy} is incomplete:") and "training_summary.json (missing)" in err
    assert "Copy the whole folder again" in err and "`sarcasm-dpo sft` again into it" in err


@pytest.mark.parametrize("name", FILES)
def test_every_reader_refuses_a_finished_folder_that_lost_a_file(finished, tmp_path, capsys, name):
    from sarcasm_dpo import models
    from sarcasm_dpo.detector import SarcasmDetector
    from sarcasm_dpo.settings import CompareSettings
    from sarcasm_dpo.stages import compare

    copy = _copy(finished, tmp_path)
    (copy / name).unlink()
    # Weights gone from a config that is there: check_adapter_dir's own words for it; else the whole-folder ones.
    match = (rf"{copy} holds an adapter config but no adapter weights" if name == "adapter_model.safetensors"
             else rf"{copy} is incomplete: .*{name} \(missing\)")
    for read in (lambda: models.check_adapter_dir(copy), lambda: models.adapter_base_model(copy),
                 lambda: SarcasmDetector.load(adapter=str(copy), warn=lambda m: None),
                 lambda: compare.resolve_adapters(CompareSettings(sft_model=str(copy), dpo_model="none"))):
        with pytest.raises(UserError, match=match):
            read()
    texts = _texts(tmp_path)
    out = tmp_path / "exported"
    for argv in (["predict", "--adapter", str(copy), "--input", str(texts)],
                 ["export", "--adapter", str(copy), "--output_dir", str(out), "--results", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err, err
    assert not out.exists()


def test_the_record_and_threshold_readers_refuse_on_their_own(finished, tmp_path):
    """Readers called without check_adapter_dir first (compare's leakage and length checks, the threshold)."""
    from sarcasm_dpo.detector import note_text_lengths, recorded_text_tokens
    from sarcasm_dpo.stages import compare
    from sarcasm_dpo.thresholds import read_threshold

    copy = _copy(finished, tmp_path)
    assert read_threshold(copy)["threshold"] == THRESHOLD and recorded_text_tokens(None, str(copy)) == TOKENS
    test = pd.DataFrame({"text": ["Oh great, rain again"], "label": [1]})
    with pytest.raises(UserError, match="Leakage: 1 text"):  # the run's own train split, whatever --train_csv says
        compare.check_not_seen(test, "test.csv", {"sft": copy})
    (copy / "threshold.json").unlink()
    with pytest.raises(UserError, match=r"threshold\.json \(missing\)"):  # not 0.5 in its place
        read_threshold(copy)
    (copy / "training_summary.json").unlink()
    for read in (lambda: recorded_text_tokens(None, str(copy)),
                 lambda: compare.check_not_seen(test, "test.csv", {"sft": copy}),
                 lambda: note_text_lengths({"sft": copy}, 256, "comparison")):
        with pytest.raises(UserError, match=r"training_summary\.json \(missing\)"):  # not skipped, not defaulted
            read()


def test_a_marker_of_an_older_version_is_checked_for_what_the_stage_always_wrote(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    record = read_complete(copy)
    del record["files"], record["stage"]
    mark_complete(copy, record)  # as a version before the file list (and the stage's name) wrote it
    assert missing_outputs(copy) == []
    (copy / "adapter_model.safetensors").unlink()  # an adapter folder always held its weights
    assert missing_outputs(copy) == ["adapter_model.safetensors"]
    # Which stage wrote it, the marker does not say: the message names none.
    with pytest.raises(UserError, match=r"is incomplete: .*adapter_model\.safetensors \(missing\).* "
                                        r"or run the stage that wrote it again"):
        atomic.require_whole(copy)
    # Its run record gone: refused by the one reader of run records, as a finished folder without it.
    shutil.copy(finished / "adapter_model.safetensors", copy / "adapter_model.safetensors")
    (copy / "training_summary.json").unlink()
    assert models.recorded_run(finished) is not None
    with pytest.raises(UserError, match="training_summary"):
        models.recorded_run(copy)
    # A finished folder of another kind (nothing says what it held) cannot be checked: it is not refused.
    other = tmp_path / "splits"
    other.mkdir()
    mark_complete(other, {"config": {"seed": 42}})
    assert missing_outputs(other) == []


def test_the_message_names_the_stage_that_wrote_the_folder(finished, tmp_path):
    copy = _copy(finished, tmp_path)
    assert read_complete(copy)["stage"] == "sft"
    finish_output_dir(copy, read_complete(copy)["config"], {"stage": "dpo"})
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="`sarcasm-dpo dpo` again into it"):
        atomic.require_whole(copy)


# -- a run record of the wrong shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("config,words", [
    ([], 'its "config" holds JSON an array where an object of settings belongs'),
    ("max_text_tokens=8", 'its "config" holds JSON a string where an object'),
    ({"model": 7, "max_text_tokens": TOKENS}, "its config.model holds JSON a number where a path or model name"),
    ({"model": "m", "train_csv": ["a.csv"]}, "its config.train_csv holds JSON an array where a path"),
])
def test_a_run_record_whose_settings_are_not_settings_is_an_error(finished, tmp_path, config, words):
    from sarcasm_dpo import models
    from sarcasm_dpo.detector import SarcasmDetector, recorded_text_tokens
    from sarcasm_dpo.stages import compare

    copy = _copy(finished, tmp_path)
    record = json.loads((copy / "training_summary.json").read_text())
    (copy / "training_summary.json").write_text(json.dumps({**record, "config": config}))
    finish_output_dir(copy, {"seed": 1})  # a whole finished folder whose record says this
    test = pd.DataFrame({"text": ["a text of its own"], "label": [1]})
    for read in (lambda: recorded_text_tokens(None, str(copy)), lambda: models.adapter_base_model(copy),
                 lambda: SarcasmDetector.load(adapter=str(copy), warn=lambda m: None),
                 lambda: compare.check_not_seen(test, "test.csv", {"sft": copy})):
        with pytest.raises(DamagedRecord, match=rf"training_summary\.json is damaged: {words}"):
            read()
    (copy / COMPLETE_MARKER).unlink()  # an unfinished folder: the same record is as wrong
    with pytest.raises(DamagedRecord, match=words):
        recorded_text_tokens(None, str(copy))


# -- a comparison's results of the wrong shape -------------------------------------------------------------------


def comparison(n: int = 40) -> dict:
    """A results record as compare writes it: the 0.5 block, the own-threshold block, an extra test set."""
    from sarcasm_dpo.stages.compare import OWN, evaluate

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    probs = {key: rng.random(n) for key in ("base", "sft", "dpo")}
    s = SimpleNamespace(n_bootstrap=20, seed=0)
    block = evaluate(frame, probs, s)
    own = {"thresholds": {"sft": {"threshold": 0.6, "split": "gen_val"}}, **evaluate(frame, probs, s, {"sft": 0.6})}
    return json.loads(json.dumps({
        "test_set": {"path": "gen_test.csv", "n": n, "n_total": n}, **block, OWN: own,
        "extra_tests": {"extra": {"test_set": {"path": "x.csv", "n": n}, **block}},
        "model_paths": {"base": "m", "sft": "models/sft", "dpo": "models/dpo"}, "outputs": {"results": "r.json"}}))


def _set(record: dict, where: str, value) -> dict:
    *parents, last = where.split(".")
    node = record
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return record


@pytest.mark.parametrize("where,value,words", [
    ("models.dpo.accuracy", "high", r'models\.dpo\.accuracy is "high" where a number belongs'),
    ("models.dpo.accuracy", 1.2, r"models\.dpo\.accuracy is 1\.2 where a number in \[0, 1\] belongs"),
    ("models.sft.roc_auc", "0.8", r'models\.sft\.roc_auc is "0\.8" where a number or null belongs'),
    ("models.sft.f1_ci", [0.2], r"models\.sft\.f1_ci is \[0\.2\] where a \[low, high\] pair belongs"),
    ("models.base", 0.5, r"models\.base is 0\.5 where an object belongs"),
    ("models", {}, r"models is \{\} where at least one model's metrics belongs"),
    ("test_set", KeyError, "it has no test_set: it is not the results of a comparison"),
    ("test_set.n", "forty", r'test_set\.n is "forty" where a whole number belongs'),
    ("significance.dpo_vs_sft.verdict", None, r"significance\.dpo_vs_sft\.verdict is null where text belongs"),
    ("improvements_pp.dpo_vs_sft", KeyError, r"improvements_pp\.dpo_vs_sft is null where an object belongs"),
    ("at_validation_threshold.thresholds.sft.threshold", 1.5,
     r"at_validation_threshold\.thresholds\.sft\.threshold is 1\.5 where a number in"),
    ("at_validation_threshold.models.sft.accuracy", True, r"at_validation_threshold\.models\.sft\.accuracy is true"),
    ("extra_tests.extra.models.dpo.macro_f1", [1], r"extra_tests\.extra\.models\.dpo\.macro_f1 is \[1\]"),
    ("model_paths.sft", 3, r"model_paths\.sft is 3 where text belongs"),
])
def test_results_of_the_wrong_shape_are_named_field_by_field(tmp_path, where, value, words):
    from sarcasm_dpo.stages.compare import check_results_record, format_report, format_table, format_verdicts

    good = comparison()
    assert check_results_record(good, tmp_path / "r.json") is good
    assert "DPO vs SFT" in "\n".join(format_verdicts(good)) and "TF-IDF" not in format_table(good["models"])
    assert "Extra test set extra" in format_report(good)
    with pytest.raises(DamagedRecord, match=rf"{tmp_path / 'r.json'} is damaged: {words}.*compare"):
        check_results_record(_set(comparison(), where, value), tmp_path / "r.json")


def test_results_that_are_not_an_object_are_refused(tmp_path):
    from sarcasm_dpo.stages.compare import check_results_record

    with pytest.raises(DamagedRecord, match=r"it holds \[1, 2\] where the object a comparison writes belongs"):
        check_results_record([1, 2], tmp_path / "r.json")


def test_export_refuses_hand_edited_results_before_writing_anything(finished, tmp_path, capsys):
    from sarcasm_dpo.metrics import with_intervals

    metrics = with_intervals([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.4], n_resamples=20, seed=1)
    results = {"test_set": {"n": 4, "n_total": 4}, "models": {"dpo": {**metrics, "accuracy": "high"}},
               "significance": {}, "model_paths": {"dpo": str(finished)}}
    path = tmp_path / "model_comparison_results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "expR"
    assert main(["export", "--adapter", str(finished), "--output_dir", str(out), "--results", str(path)]) == 2
    err = capsys.readouterr().err
    assert f'{path} is damaged: models.dpo.accuracy is "high" where a number' in err and "--results ''" in err
    assert "Traceback" not in err and not out.exists()


# -- export writes through a staging folder; predict refuses half exports ------------------------------------------


def test_an_export_that_fails_half_way_leaves_the_previous_one_whole(finished, tmp_path, capsys, monkeypatch):
    from sarcasm_dpo.stages import export

    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(finished), "--output_dir", str(out), "--results", ""]) == 0
    info = json.loads((out / "sarcasm_dpo.json").read_text())
    assert info["threshold"] == THRESHOLD and info["max_text_tokens"] == TOKENS and info["stage"] == "sft"
    assert set(read_complete(out)["files"]) >= {"model.safetensors", "sarcasm_dpo.json", "README.md"}
    before = snapshot(out)

    def broken_card(*args, **kwargs):
        raise RuntimeError("the card could not be written")

    monkeypatch.setattr(export, "model_card", broken_card)
    assert main(["export", "--adapter", str(finished), "--output_dir", str(out), "--results", "",
                 "--dtype", "bfloat16", "--overwrite"]) == 1  # a bug's exit: the traceback is kept
    assert snapshot(out) == before  # not half of a bfloat16 export over the float32 one
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging-")]
    capsys.readouterr()


def test_predict_refuses_a_half_export_and_export_replaces_it(finished, tiny_model_dir, tmp_path, capsys):
    from sarcasm_dpo.detector import check_model_folder
    from sarcasm_dpo.settings import CompareSettings
    from sarcasm_dpo.stages import compare

    check_model_folder(str(tiny_model_dir))  # a plain model folder (no record of ours) is used as it is
    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(finished), "--output_dir", str(out), "--results", ""]) == 0
    texts = _texts(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(texts)]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["label"] == int(row["p_sarcastic"] >= THRESHOLD)

    lost = _copy(out, tmp_path, "lost")
    (lost / "README.md").unlink()
    assert main(["predict", "--model", str(lost), "--input", str(texts)]) == 2
    err = capsys.readouterr().err
    assert f"{lost} is incomplete" in err and "README.md (missing)" in err and "`sarcasm-dpo export`" in err

    half = _copy(out, tmp_path, "half")
    (half / COMPLETE_MARKER).unlink()  # what an older version left when export stopped before its marker
    (half / "README.md").unlink()
    assert main(["predict", "--model", str(half), "--input", str(texts)]) == 2
    captured = capsys.readouterr()
    assert "is an export that never finished" in captured.err and captured.out == ""
    with pytest.raises(UserError, match="is an export that never finished"):  # compare's --model too
        compare.resolve_base_model(CompareSettings(model=str(half), dpo_model="none"), {})
    (half / "notes.txt").write_text("mine")  # a file no export writes: refused, not swept away, without --overwrite
    before = snapshot(half)
    assert main(["export", "--adapter", str(finished), "--output_dir", str(half), "--results", ""]) == 2
    assert "holds an export that never finished" in capsys.readouterr().err and snapshot(half) == before
    assert main(["export", "--adapter", str(finished), "--output_dir", str(half), "--results", "", "--overwrite"]) == 0
    assert read_complete(half) is not None and (half / "README.md").is_file() and missing_outputs(half) == []


def test_a_finished_export_that_lost_a_file_is_made_again(finished, tmp_path, capsys):
    out = tmp_path / "exported"
    argv = ["export", "--adapter", str(finished), "--output_dir", str(out), "--results", ""]
    assert main(argv) == 0
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "already holds this export" not in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and missing_outputs(out) == []


# -- a stopped predict -------------------------------------------------------------------------------------------


def test_a_stopped_predict_says_what_it_leaves_and_what_a_rerun_does(tmp_path, capsys, monkeypatch):
    from sarcasm_dpo import detector
    from sarcasm_dpo.stages import predict

    class StopsOnTheSecondChunk:
        calls = 0

        def predict(self, texts):
            StopsOnTheSecondChunk.calls += 1
            if StopsOnTheSecondChunk.calls == 2:
                raise KeyboardInterrupt
            return [{"text": t, "p_sarcastic": 0.5, "label": 1} for t in texts]

    monkeypatch.setattr(detector.SarcasmDetector, "load", classmethod(lambda cls, *a, **k: StopsOnTheSecondChunk()))
    monkeypatch.setattr(predict, "STREAM_CHUNK", 1)
    path = tmp_path / "t.txt"
    path.write_text("one\ntwo\nthree\n")
    args = SimpleNamespace(model=None, adapter="models/sft", batch_size=1, max_text_tokens=None, device=None,
                           threshold=None, input=str(path))
    with pytest.raises(KeyboardInterrupt):
        predict.run(args)
    captured = capsys.readouterr()
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == ["one"]
    assert ("predict stopped after 1 of 3 texts: the 1 rows printed are whole JSON lines, in input order; a rerun "
            "scores every text again; to score only the rest, give it the texts after the first 1.") in captured.err


def test_weights_cut_short_count_as_an_incomplete_folder_but_an_edited_record_does_not(finished, tmp_path):
    """A copy that cut the weights short is not a finished run (the pipeline would skip it, export keep it);
    a record edited by hand (threshold.json) is the user's right, and its own reader checks what it holds."""
    copy = _copy(finished, tmp_path)
    (copy / "threshold.json").write_text(json.dumps({"threshold": 0.25, "criterion": "by hand"}))
    assert missing_outputs(copy) == []
    weights = copy / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 100)
    assert missing_outputs(copy) == ["adapter_model.safetensors"]
    with pytest.raises(UserError, match=rf"is gone or cut short: adapter_model\.safetensors \({size - 100} bytes, "
                                        rf"{size} when the run finished\)"):
        atomic.require_whole(copy)


# -- a COMPLETE.json whose fields have the wrong shape ------------------------------------------------------------
# Hand-edited or damaged markers: every field a reader uses (config, inputs, files, stage, ...) of another JSON type,
# or a "files" name that is not a plain file name, makes the whole marker damaged, as invalid JSON in it does: the
# run there counts as not finished (read_complete gives None), and the stage refuses the folder with one paragraph
# naming the marker (exit 2), never an AttributeError or ValueError from a reader deep inside.

WRONG_SHAPES = [
    ("config-array", "config", [1], 'its "config" holds JSON an array where an object belongs'),
    ("config-text", "config", "seed=1", 'its "config" holds JSON a string where an object belongs'),
    ("config-null", "config", None, 'its "config" holds JSON null where an object belongs'),
    ("inputs-text", "inputs", "x", 'its "inputs" holds JSON a string where an object belongs'),
    ("inputs-value", "inputs", {"train_csv": [1]}, "its inputs.train_csv holds JSON an array where a checksum"),
    ("files-array", "files", ["a.json"], 'its "files" holds JSON an array where an object belongs'),
    ("files-nul", "files", {"a\u0000b": 1}, r"lists 'a\\x00b', which holds a NUL character"),
    ("files-parent", "files", {"../elsewhere.json": 1}, "lists '../elsewhere.json', which is a path"),
    ("files-absolute", "files", {"/etc/passwd": 1}, "lists '/etc/passwd', which is a path"),
    ("files-dot", "files", {"..": 1}, "lists '..', which names a folder"),
    ("files-empty", "files", {"": 1}, "lists '', which is empty"),
    ("files-surrogate", "files", {"\ud800.json": 1}, "which is not a name this system can give a file"),
    ("files-size-text", "files", {"threshold.json": "2700"}, 'gives \'threshold.json\' the size "2700"'),
    ("files-size-bool", "files", {"threshold.json": True}, "gives 'threshold.json' the size true"),
    ("stage-number", "stage", 5, 'its "stage" holds JSON a number where a string belongs'),
]


def _edit_marker(folder: Path, key: str, value) -> Path:
    marker = folder / COMPLETE_MARKER
    record = json.loads(marker.read_text())
    record[key] = value
    marker.write_text(json.dumps(record))
    return marker


@pytest.mark.parametrize("key,value,words", [c[1:] for c in WRONG_SHAPES], ids=[c[0] for c in WRONG_SHAPES])
def test_a_marker_whose_fields_have_the_wrong_shape_is_damaged_and_means_not_finished(finished, tmp_path, key,
                                                                                       value, words):
    from sarcasm_dpo.atomic import (check_output_dir, input_differences, is_complete_for, marker_damage,
                                    settings_differences)

    copy = _copy(finished, tmp_path)
    record = read_complete(copy)
    assert marker_damage(copy) is None and not settings_differences(record, record["config"])
    marker = _edit_marker(copy, key, value)
    before = snapshot(copy)
    assert read_complete(copy) is None  # what a marker that is not JSON at all gives: not finished
    damage = marker_damage(copy)
    assert isinstance(damage, DamagedRecord) and damage.path == marker and re.search(words, damage.problem), damage
    # Every reader of the marker goes through read_complete: none crashes on it, none reads half of it.
    assert missing_outputs(copy) == [] and incomplete_outputs(copy) is None
    atomic.require_whole(copy)
    assert not is_complete_for(copy, record["config"]) and input_differences(read_complete(copy) or {}, {}) == []
    # A stage asked to write there refuses with one paragraph naming the damaged marker (the CLI: exit 2).
    with pytest.raises(UserError, match=rf"{re.escape(str(marker))} is damaged: .*--overwrite") as caught:
        check_output_dir(copy, record["config"])
    assert "\n" not in str(caught.value) and re.search(words, str(caught.value))
    check_output_dir(copy, record["config"], overwrite=True)  # replacing it is still the user's call
    assert snapshot(copy) == before


def test_a_real_finished_marker_passes_the_check(tiny_model_dir, tmp_path_factory):
    """What finish_output_dir writes (a real SFT run's marker) is what check_marker accepts."""
    from sarcasm_dpo.atomic import check_marker, marker_damage

    ref, *_ = reference_run(tiny_model_dir, tmp_path_factory)
    record = json.loads((ref / COMPLETE_MARKER).read_text())
    assert {"config", "inputs", "files", "stage", "config_fingerprint", "finished_at"} <= set(record)
    assert check_marker(record, ref / COMPLETE_MARKER) == record and marker_damage(ref) is None
    assert read_complete(ref) == record


@pytest.mark.parametrize("key,value", [("config", [1]), ("inputs", "x"), ("files", {"a\u0000b": 1})])
def test_the_cli_refuses_a_folder_whose_marker_has_the_wrong_shape_and_predict_does_not_crash(
        tiny_model_dir, tmp_path_factory, tmp_path, capsys, key, value):
    """sft into the folder: exit 2, one paragraph, nothing changed; predict with it as the adapter: no traceback
    (a damaged marker is a run not known to have finished, as an unreadable one always was)."""
    from reliability_common import sft_argv

    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    copy = _copy(ref, tmp_path)
    marker = _edit_marker(copy, key, value)
    before = snapshot(copy)
    capsys.readouterr()
    assert main(sft_argv(tiny_model_dir, train, val, copy)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "looks like a bug" not in err, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: {marker} is damaged: ") and "--overwrite" in message, message
    assert main(["predict", "--adapter", str(copy), "--input", str(_texts(tmp_path))]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.out.splitlines()) == 1, captured.err[-2000:]
    assert "has a damaged COMPLETE.json (its " in captured.err  # not "no COMPLETE.json": it is there, spoilt
    assert snapshot(copy) == before
