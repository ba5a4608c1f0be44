"""How settings are read, one rule per kind, whichever route a value takes (flags, a config file, `--set`,
Python): shared `--set` keys win over the file's sections, YAML merge keys, keys that are not names,
text settings given YAML-typed values, whole numbers, `~` and empty paths, numpy scalars."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from conftest import ROOT

from sarcasm_dpo import cli
from sarcasm_dpo.cli import build_parser
from sarcasm_dpo.config import _coerce, _hints, _kinds, apply_overrides, check_known_keys, from_namespace, load_yaml
from sarcasm_dpo.errors import UserError, is_path_setting
from sarcasm_dpo.settings import PipelineSettings, SFTSettings, check_predict_args, check_scoring_args
from sarcasm_dpo.stages import pipeline_stages, settings_classes
from sarcasm_dpo.stages.pipeline import stage_settings

STAGES = settings_classes()
PIPELINE = settings_classes(pipeline_stages())
EVERY_CLASS = [*STAGES.values()]


def settings_from(argv: list[str]):
    return from_namespace(STAGES, build_parser().parse_args(argv), argv[0])


def pipeline_from(data: dict, *items: str) -> dict:
    return stage_settings(apply_overrides(data, list(items), PIPELINE), PipelineSettings(no_wandb=True), None)


def fields_where(predicate):
    """(class, field name, annotation) of every stage setting for which predicate(name, annotation) holds."""
    out = []
    for cls in EVERY_CLASS:
        hints = _hints(cls)
        out += [(cls, f.name, hints[f.name]) for f in dataclasses.fields(cls) if predicate(f.name, hints[f.name])]
    return out


# -- 1. a shared --set KEY=VALUE wins over the file's sections -----------------------------------------------


def test_a_shared_set_overrides_the_key_in_every_section_that_has_it():
    data = load_yaml(ROOT / "configs" / "smoke.yaml")
    assert data["sft"]["lr"] == 3e-4 and data["sft"]["sample_size"] == 32 and data["dpo"]["batch_size"] == 4
    stages = pipeline_from(data, "lr=1e-5", "sample_size=8", "batch_size=2", "epochs=3")
    for name in ("sft", "dpo"):
        s = stages[name]
        assert (s.lr, s.sample_size, s.batch_size, s.epochs) == (1e-5, 8, 2, 3.0), name
    assert stages["compare"].sample_size == 8  # compare's section had its own sample_size too
    assert data["sft"]["lr"] == 3e-4  # the loaded mapping itself is untouched


def test_set_items_apply_in_the_order_typed():
    data = {"sft": {"lr": 3e-4}, "dpo": {"lr": 5e-5}}
    stages = pipeline_from(data, "lr=1e-5", "sft.lr=1e-4")  # the section's item came last: it wins there
    assert (stages["sft"].lr, stages["dpo"].lr) == (1e-4, 1e-5)
    stages = pipeline_from(data, "sft.lr=1e-4", "lr=1e-5")  # the shared item came last: it wins everywhere
    assert (stages["sft"].lr, stages["dpo"].lr) == (1e-5, 1e-5)


def test_in_the_file_a_sections_own_value_still_wins_over_the_shared_one():
    stages = pipeline_from({"lr": 1e-3, "sft": {"lr": 3e-4}})
    assert (stages["sft"].lr, stages["dpo"].lr) == (3e-4, 1e-3)


# -- 2. YAML merge keys -------------------------------------------------------------------------------------


def test_yaml_merge_keys_work_and_a_mappings_own_keys_override_merged_ones(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("sft: &common\n  epochs: 1\n  batch_size: 4\ndpo:\n  <<: *common\n  epochs: 2\n  beta: 0.2\n")
    data = load_yaml(config)
    assert data == {"sft": {"epochs": 1, "batch_size": 4}, "dpo": {"epochs": 2, "batch_size": 4, "beta": 0.2}}
    check_known_keys(data, STAGES, str(config))
    dpo = settings_from(["dpo", "--config", str(config)])
    assert (dpo.epochs, dpo.batch_size, dpo.beta) == (2.0, 4, 0.2)


def test_the_testers_merge_example_loads_and_its_anchor_key_is_named_unknown(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("common: &c {epochs: 1}\nsft: {<<: *c, lr: 1.0e-4}\n")
    assert load_yaml(config) == {"common": {"epochs": 1}, "sft": {"epochs": 1, "lr": 1e-4}}
    with pytest.raises(UserError, match="unknown setting.*: common"):
        check_known_keys(load_yaml(config), STAGES, str(config))


def test_a_key_given_twice_beside_a_merge_key_is_still_refused(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("sft: &c {epochs: 1}\ndpo:\n  <<: *c\n  beta: 0.1\n  beta: 0.2\n")
    with pytest.raises(UserError, match=r"'beta' is given twice in one mapping .* at line 5"):
        load_yaml(config)


# -- 3. keys that are not names -----------------------------------------------------------------------------


@pytest.mark.parametrize("body,match", [
    ("1: 2\n", r"the key 1 is not a setting name \(YAML read it as int\)"),
    ("sft:\n  epochs: 1\n  2: 3\n", r"the key 2 in section 'sft' is not a setting name"),
    ("no: 1\n", r"the key False is not a setting name \(YAML read it as bool\)"),
    ("? [a]\n: 1\n", r"not valid YAML: the key \['a'\] is a list, not a setting name .* at line 1"),
    ("sft:\n  ? {a: 1}\n  : 1\n", r"not valid YAML: the key \{'a': 1\} is a mapping, not a setting name"),
])
def test_a_key_that_is_not_a_name_is_a_clear_error(tmp_path, capsys, body, match):
    config = tmp_path / "keys.yaml"
    config.write_text(body)
    with pytest.raises(UserError, match=match):
        check_known_keys(load_yaml(config), STAGES, str(config))
    assert cli.main(["sft", "--config", str(config)]) == 2  # not 1 with a traceback
    assert "looks like a bug" not in capsys.readouterr().err


# -- 4. text settings keep the text typed -------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["no", "0123", "1.10", "true", "null", "1e-3", "~/runs/a"])
def test_set_gives_a_text_setting_the_text_as_typed(typed):
    stages = pipeline_from({}, f"sft.output_dir={typed}", f"model={typed}", f"dpo.wandb_project={typed}")
    assert stages["sft"].output_dir == stages["sft"].model == stages["compare"].model == os.path.expanduser(typed)
    assert stages["dpo"].wandb_project == typed


def test_set_reads_a_quoted_value_as_yaml_does_and_a_list_setting_from_commas_or_yaml():
    sft = pipeline_from({}, "sft.output_dir='no'", "sft.lora_targets=q_proj,5")["sft"]
    assert sft.output_dir == "no" and sft.lora_targets == ["q_proj", "5"]
    assert pipeline_from({}, "sft.lora_targets=[q_proj, '5']")["sft"].lora_targets == ["q_proj", "5"]
    with pytest.raises(UserError, match=r"Setting 'lora_targets' expects text, got 5, which YAML reads as a "
                                        r"number .* put the value in quotes to keep it as text"):
        pipeline_from({}, "sft.lora_targets=[q_proj, 5]")


@pytest.mark.parametrize("line,shown,kind", [("output_dir: no", "False", "true/false"),
                                             ("output_dir: 1.10", "1.1", "a number"),
                                             ("wandb_project: 2024", "2024", "a number"),
                                             ("lora_targets: [q_proj, 5]", "5", "a number")])
def test_a_config_files_yaml_typed_value_for_a_text_setting_is_refused(tmp_path, line, shown, kind):
    config = tmp_path / "c.yaml"
    config.write_text(f"sft:\n  {line}\n")
    name = line.split(":")[0]
    with pytest.raises(UserError, match=rf"Setting '{name}' expects text, got {shown}, which YAML reads as {kind} "
                                        r".*put the value in quotes to keep it as text "
                                        rf"\(in a config file: {name}: \"\.\.\.\"\)\."):
        settings_from(["sft", "--config", str(config)])
    typed = line.split(": ")[1]
    config.write_text(f"sft:\n  {name}: '{typed}'\n" if "[" not in line else "sft:\n  lora_targets: [q_proj, '5']\n")
    quoted = getattr(settings_from(["sft", "--config", str(config)]), name)  # quoted: taken as the text
    assert quoted == (["q_proj", "5"] if "[" in line else typed)


def test_a_flag_gives_a_text_setting_its_text():
    s = settings_from(["sft", "--output_dir", "0123", "--wandb_project", "no", "--lora_targets", "q_proj,5"])
    assert (s.output_dir, s.wandb_project, s.lora_targets) == ("0123", "no", ["q_proj", "5"])


# -- 5. whole numbers: one rule for every int and int|str setting --------------------------------------------

INT_FIELDS = fields_where(lambda name, tp: int in _kinds(tp)[0])


def test_there_are_int_and_int_or_word_settings_to_check():
    names = {name for _, name, _ in INT_FIELDS}
    assert {"sample_size", "lora_r", "batch_size", "max_text_tokens", "seed", "n_bootstrap"} <= names


@pytest.mark.parametrize("cls,name,tp", INT_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_whole_number_setting_takes_8_8point0_1e1_and_refuses_fractions(cls, name, tp):
    for value, expected in (("8", 8), ("8.0", 8), ("1e1", 10), (" 12 ", 12), (8.0, 8), (np.int64(8), 8)):
        got = _coerce(value, tp, name)
        assert got == expected and type(got) is int, (value, got)
    for value, shown in (("2.5e0", "'2.5e0'"), ("2.7e0", "'2.7e0'"), ("1e-3", "'1e-3'"), (2.5, "2.5"),
                         ("nan", "'nan'"), (True, "True")):
        with pytest.raises(UserError, match=rf"Setting '{name}' expects int, got {shown}: give a whole number"):
            _coerce(value, tp, name)


@pytest.mark.parametrize("flag,typed", [("--sample_size", "2.5e0"), ("--lora_r", "2.7e0"), ("--lora_r", "1e-3"),
                                        ("--batch_size", "8.5"), ("--max_length", "1e-3")])
def test_a_fraction_on_the_command_line_is_refused_as_typed(capsys, flag, typed):
    with pytest.raises(UserError, match=rf"expects int, got '{typed}'"):
        settings_from(["sft", flag, typed])
    assert cli.main(["sft", "--no_wandb", flag, typed]) == 2
    assert f"got '{typed}'" in capsys.readouterr().err and "got 0" not in capsys.readouterr().err


def test_whole_numbers_in_every_notation_on_every_route(tmp_path):
    s = settings_from(["sft", "--sample_size", "1e1", "--lora_r", "2.0", "--batch_size", "8.0"])
    assert (s.sample_size, s.lora_r, s.batch_size) == (10, 2, 8)
    sft = pipeline_from({}, "sft.lora_r=2.0", "sft.batch_size=8.0", "sft.sample_size=1e1")["sft"]
    assert (sft.lora_r, sft.batch_size, sft.sample_size) == (2, 8, 10)
    config = tmp_path / "c.yaml"
    config.write_text("sft:\n  lora_r: 2.0\n  batch_size: 8.0\n  sample_size: 1e1\n")
    s = settings_from(["sft", "--config", str(config)])
    assert (s.lora_r, s.batch_size, s.sample_size) == (2, 8, 10)
    assert pipeline_from({}, "sft.batch_size=auto")["sft"].batch_size == "auto"


def test_the_argparse_type_for_other_whole_number_flags_follows_the_same_rule(capsys):
    import argparse

    from sarcasm_dpo.config import whole_number_flag

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=whole_number_flag("batch_size"))
    assert parser.parse_args(["--batch_size", "1e1"]).batch_size == 10
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--batch_size", "2.5"])
    assert stop.value.code == 2 and "expects int, got '2.5'" in capsys.readouterr().err


def test_set_to_null_names_what_was_typed():
    with pytest.raises(UserError, match=r"Setting 'batch_size' cannot be empty \(got 'null'\)"):
        pipeline_from({}, "sft.batch_size=null")
    assert pipeline_from({}, "sft.sample_size=null")["sft"].sample_size is None  # an optional one: unset


# -- 7. ~ in every path setting, on every route -------------------------------------------------------------

PATH_FIELDS = fields_where(lambda name, tp: is_path_setting(name))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_there_are_path_settings_of_every_kind():
    names = {name for _, name, _ in PATH_FIELDS}
    assert {"output_dir", "output_file", "train_csv", "model", "sft_model", "adapter", "data_dir",
            "preference_data", "extra_test", "results"} <= names


@pytest.mark.parametrize("cls,name,tp", PATH_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_path_setting_expands_the_home_folder_from_python(home, cls, name, tp):
    value = ["news=~/h.json", "~/s.csv"] if name == "extra_test" else "~/p"
    got = getattr(cls(**{name: value}), name)
    assert got == ([f"news={home}/h.json", f"{home}/s.csv"] if name == "extra_test" else f"{home}/p")
    assert getattr(dataclasses.replace(cls(**{name: value}), seed=1) if hasattr(cls, "seed") else cls(**{name: value}),
                   name) == got  # replace runs it again: unchanged


def test_home_is_expanded_the_same_on_the_cli_the_config_and_set_and_the_lock_agrees(home, tmp_path):
    from sarcasm_dpo.rundir import real_output

    config = tmp_path / "c.yaml"
    config.write_text("sft:\n  output_dir: ~/sp\n  train_csv: ~/t.csv\n")
    by_flag = settings_from(["sft", "--output_dir", "~/sp", "--train_csv", "~/t.csv"])
    by_file = settings_from(["sft", "--config", str(config)])
    by_set = pipeline_from({}, "sft.output_dir=~/sp", "split.output_dir=~/splits")
    assert by_flag.output_dir == by_file.output_dir == by_set["sft"].output_dir == f"{home}/sp"
    assert by_flag.train_csv == by_file.train_csv == f"{home}/t.csv"
    assert by_set["sft"].train_csv == f"{home}/splits/gen_train.csv"  # chained from the expanded split folder
    assert str(real_output(by_flag.output_dir)) == by_flag.output_dir  # files and lock: one place


def test_a_local_model_under_home_is_recorded_absolute(home):
    (home / "m").mkdir(parents=True)
    assert SFTSettings(model="~/m").model == f"{home}/m"


# -- 8. a path setting that names nothing -------------------------------------------------------------------


def _required(cls, name, tp) -> bool:
    """A text path setting that must name something: not optional, and empty means nothing for it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _kinds(tp) == ([str], False) and not field.metadata.get("may_be_empty")


@pytest.mark.parametrize("cls,name,tp", [p for p in PATH_FIELDS if _required(*p)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_required_path_setting_refuses_empty_and_blank(cls, name, tp):
    with pytest.raises(UserError, match=rf"^{name} is empty: "):
        cls(**{name: ""})
    with pytest.raises(UserError, match=rf"^{name} is empty \(only white space\): "):
        cls(**{name: "  "})
    with pytest.raises(UserError, match=rf"{name} 'a\\nb' holds a control character"):
        cls(**{name: "a\nb"})


def test_optional_paths_take_empty_as_unset_and_skippable_ones_as_skipped():
    from sarcasm_dpo.settings import CompareSettings, DPOSettings, ExportSettings

    assert CompareSettings(model="", dpo_model=" ", sft_model="").model is None
    assert CompareSettings(dpo_model=" ").dpo_model == ""  # compare's documented "empty = leave it out"
    assert DPOSettings(isarcasm_val_csv="").isarcasm_val_csv == ""
    assert ExportSettings(base_model="  ").base_model is None


@pytest.mark.parametrize("model", ["", " "])
def test_an_empty_or_blank_model_is_refused_before_anything_runs(tmp_path, capsys, model):
    out = tmp_path / "o"
    assert cli.main(["sft", "--model", model, "--no_wandb", "--output_dir", str(out)]) == 2
    assert "error: model is empty" in capsys.readouterr().err
    assert not out.exists()


def test_predict_refuses_a_blank_model_or_adapter():
    for kwargs, flag in (({"model": " "}, "--model"), ({"model": "m", "adapter": "\t"}, "--adapter")):
        with pytest.raises(UserError, match=f"{flag} is blank"):
            check_predict_args(**{"model": None, "adapter": None, **kwargs}, batch_size=1, max_text_tokens=None,
                               device=None, threshold=None)


# -- 9. numpy scalars in a detector's numbers ---------------------------------------------------------------


def test_numpy_scalars_count_as_the_numbers_they_hold():
    got = check_scoring_args(np.int64(4), np.int32(8), np.float32(0.25))
    assert got == (4, 8, 0.25) and [type(v) for v in got] == [int, int, float]
    assert check_scoring_args(4, None, np.float64(0.3)) == (4, None, 0.3)
    for args, match in (((np.bool_(True), None, None), "--batch_size must be a positive whole number"),
                        ((4.0, None, None), "--batch_size must be a positive whole number, got 4.0"),
                        ((4, np.float32(8), None), "--max_text_tokens must be a positive whole number"),
                        ((4, None, np.bool_(False)), "--threshold must be a number"),
                        ((np.int64(0), None, None), "--batch_size must be a positive number, got 0"),
                        ((4, None, np.float32(1.5)), r"--threshold is a probability and must be in \[0, 1\], got 1.5")):
        with pytest.raises(UserError, match=match):
            check_scoring_args(*args)


def test_a_detector_takes_numpy_scalars(tiny_model_dir):
    from sarcasm_dpo.detector import SarcasmDetector

    detector = SarcasmDetector.load(model=str(tiny_model_dir), batch_size=np.int64(2), max_text_tokens=np.int64(8),
                                    threshold=np.float32(0.25), device="cpu")
    rows = detector.predict(["Oh great, rain again.", "The meeting was useful.", "fine"])
    assert [r["label"] for r in rows] == [int(r["p_sarcastic"] >= detector.threshold) for r in rows]
    assert detector.threshold == pytest.approx(0.25)


def test_yaml_integer_forms_other_than_decimal_are_read_as_the_flags_read_them(tmp_path):
    """YAML 1.1 reads 0123 as octal 83, 0x10 as 16 and 1:30 as 90; the flags read 0123 as 123 and refuse the
    others. A file and --set read them as the flags do, and a text setting keeps what was written."""
    config = tmp_path / "c.yaml"
    config.write_text("sft:\n  seed: 0123\n  output_dir: 0123\n")
    sft = settings_from(["sft", "--config", str(config)])
    assert sft.seed == 123 == settings_from(["sft", "--seed", "0123"]).seed and sft.output_dir == "0123"
    assert pipeline_from({}, "sft.seed=0123")["sft"].seed == 123
    for form in ("0x10", "1:30", "0o17"):
        with pytest.raises(UserError, match=rf"Setting 'grad_accum' expects int, got '{form}'"):
            pipeline_from({}, f"sft.grad_accum={form}")
        config.write_text(f"sft:\n  grad_accum: {form}\n")
        with pytest.raises(UserError, match=rf"Setting 'grad_accum' expects int, got '{form}'"):
            settings_from(["sft", "--config", str(config)])
    config.write_text("sft:\n  epochs: 1_0\n  lr: 1e-4\n")  # YAML's own forms of plain numbers still read
    assert (settings_from(["sft", "--config", str(config)]).epochs, settings_from(["sft", "--config",
                                                                                 str(config)]).lr) == (10, 1e-4)


def test_an_empty_set_value_is_the_empty_text_a_flag_gives():
    """`--set compare.dpo_model=` skips that model as `--dpo_model ''` does; a path that must name something
    says it is empty; a quoted list keeps its items, not its quotes."""
    built = pipeline_from({}, "compare.dpo_model=", "dpo.isarcasm_val_csv=")
    assert built["compare"].dpo_model == "" and built["dpo"].isarcasm_val_csv == ""
    with pytest.raises(UserError, match="train_csv is empty"):
        pipeline_from({}, "sft.train_csv=")
    assert pipeline_from({}, "sft.lora_targets='q_proj,v_proj'")["sft"].lora_targets == ["q_proj", "v_proj"]


def test_the_config_flag_expands_the_home_folder_and_refuses_an_empty_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("sft:\n  epochs: 3\n")
    assert settings_from(["sft", "--config", "~/c.yaml"]).epochs == 3
    for empty in ("", " "):  # not "no config": the defaults would run without a word
        with pytest.raises(SystemExit):
            build_parser().parse_args(["split", "--config", empty])
        assert "argument --config: --config is empty: name the YAML file" in capsys.readouterr().err
