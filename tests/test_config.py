"""Settings: every config file loads and validates; YAML < flags; bad values are clear errors."""

from __future__ import annotations

import dataclasses
import os

import pytest
from conftest import ROOT

from sarcasm_dpo.cli import build_parser
from sarcasm_dpo.config import build, check_known_keys, from_namespace, load_yaml
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.stages.pipeline import stage_settings
from sarcasm_dpo.settings import DPOSettings, PipelineSettings, SFTSettings
from sarcasm_dpo.stages import pipeline_stages, settings_classes

STAGES = settings_classes()  # {section: settings class}, every section a config file may hold
PIPELINE = settings_classes(pipeline_stages())  # the sections `--set` may name

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def parse(argv):
    args = build_parser().parse_args(argv)
    return args


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"qwen2.5-0.5b.yaml", "smollm2-135m-cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    text = path.read_text()
    assert text.startswith("#") and "sarcasm-dpo " in text.split("\n\n")[0] + text  # opens with the command
    data = load_yaml(path)
    check_known_keys(data, STAGES, str(path))
    stages = stage_settings(data, PipelineSettings(no_wandb=True), None, str(path))
    local = os.path.expanduser(data["model"])  # a model file that exists here is recorded absolute
    assert stages["sft"].model == (os.path.abspath(local) if os.path.exists(local) else data["model"])
    assert stages["dpo"].sft_model == stages["sft"].output_dir  # chained
    assert stages["compare"].dpo_model == stages["dpo"].output_dir
    assert stages["sft"].train_csv.startswith(stages["split"].output_dir)
    for name in ("sft", "dpo", "mine", "compare"):
        args = parse([name, "--config", str(path)])
        settings = from_namespace(STAGES, args, name)
        assert settings.max_text_tokens == data.get("max_text_tokens", 256)


def test_original_qwen_settings():
    data = load_yaml(ROOT / "configs" / "qwen2.5-0.5b.yaml")
    sft = stage_settings(data, PipelineSettings(), None)["sft"]
    assert (sft.lora_r, sft.lora_alpha, sft.lora_dropout, sft.epochs, sft.lr) == (16, 32, 0.05, 2, 2e-4)
    assert sft.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    dpo = stage_settings(data, PipelineSettings(), None)["dpo"]
    assert (dpo.beta, dpo.epochs, dpo.lr, dpo.sample_size) == (0.1, 3, 5e-5, 4000)


def test_flags_override_yaml_and_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: some/model\nsft:\n  epochs: 5\n  lr: 0.001\n")
    s = from_namespace(STAGES, parse(["sft", "--config", str(cfg), "--epochs", "1", "--lora_targets", "q_proj,v_proj"]), "sft")
    assert (s.model, s.epochs, s.lr, s.lora_targets, s.batch_size) == ("some/model", 1.0, 0.001, ["q_proj", "v_proj"], 8)
    d = from_namespace(STAGES, parse(["dpo", "--betas", "0.05,0.2", "--beta_sweep", "--no_wandb"]), "dpo")
    assert d.betas == [0.05, 0.2] and d.beta_sweep and d.no_wandb


def test_defaults_match_the_original_scripts():
    sft, dpo = SFTSettings(), DPOSettings()
    assert (sft.model, sft.output_dir, sft.epochs, sft.lr) == ("Qwen/Qwen2.5-0.5B-Instruct", "models/sft", 2, 2e-4)
    assert (dpo.sft_model, dpo.output_dir, dpo.beta, dpo.epochs, dpo.lr, dpo.sample_size) == (
        "models/sft", "models/dpo_enhanced", 0.1, 3, 5e-5, 4000)
    assert dpo.betas == [0.01, 0.02, 0.05, 0.1, 0.5]


@pytest.mark.parametrize("argv,match", [
    (["dpo", "--beta", "0"], "beta must be > 0"),
    (["dpo", "--beta", "-1"], "beta must be > 0"),
    (["sft", "--sample_size", "-5"], "sample_size must be 0"),
    (["sft", "--epochs", "two"], "expects float"),
    (["compare", "--extra_test", "nopath"], "NAME=PATH"),
    (["mine", "--batch_size", "0"], "--batch_size must be a positive number, got 0"),
    (["sft", "--max_text_tokens", "0"], "--max_text_tokens must be a positive number, got 0"),
    (["dpo", "--max_text_tokens", "-3"], "--max_text_tokens must be a positive number, got -3"),
    (["dpo", "--eval_batch_size", "0"], "--eval_batch_size must be a positive number"),
    (["compare", "--max_text_tokens", "0"], "--max_text_tokens must be a positive number"),
    (["compare", "--n_bootstrap", "0"], "--n_bootstrap must be a positive number"),
])
def test_bad_settings(argv, match):
    section = argv[0]
    with pytest.raises(UserError, match=match):
        from_namespace(STAGES, parse(argv), section)


def test_unknown_keys_in_config_are_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sft:\n  epochs: 1\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting.*learning_rate"):
        from_namespace(STAGES, parse(["sft", "--config", str(cfg)]), "sft")
    cfg.write_text("modle: x\n")
    with pytest.raises(UserError, match="unknown setting.*modle"):
        check_known_keys(load_yaml(cfg), STAGES)
    # A single stage checks the whole file, not only the keys it reads: a typo at the top level or in
    # a section's name would otherwise fall back to a default without a word.
    for text, typo in [("learning_rate: 1e-4\nsft:\n  epochs: 1\n", "learning_rate"),
                       ("sfft:\n  epochs: 1\n", "sfft"),
                       ("dpo:\n  betaa: 0.2\n", "betaa")]:
        cfg.write_text(text)
        with pytest.raises(UserError, match=f"unknown setting.*{typo}"):
            from_namespace(STAGES, parse(["sft", "--config", str(cfg)]), "sft")


def test_every_field_has_help():
    for cls in STAGES.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_set_overrides_one_stage_like_the_config_file():
    from sarcasm_dpo.config import apply_overrides

    data = load_yaml(ROOT / "configs" / "smoke.yaml")
    args = parse(["pipeline", "--config", "configs/smoke.yaml", "--set", "sft.sample_size=16",
                  "--set", "dpo.beta=0.5", "--set", "seed=7",
                  "--set", "sft.lora_targets=[q_proj, v_proj]"])
    pipe = from_namespace(STAGES, args, "pipeline")
    assert pipe.set == ["sft.sample_size=16", "dpo.beta=0.5", "seed=7", "sft.lora_targets=[q_proj, v_proj]"]
    stages = stage_settings(apply_overrides(data, pipe.set, PIPELINE), pipe, None)
    assert (stages["sft"].sample_size, stages["dpo"].beta, stages["sft"].seed, stages["compare"].seed) == (16, 0.5, 7, 7)
    assert stages["sft"].lora_targets == ["q_proj", "v_proj"]
    assert stages["dpo"].sample_size == data["dpo"]["sample_size"]  # the rest as the file says
    assert data["sft"]["sample_size"] == 32  # the loaded mapping itself is untouched


@pytest.mark.parametrize("item,match", [
    ("sft.sample_size", "expects SECTION.KEY=VALUE"),
    ("sftt.epochs=1", "unknown section 'sftt'"),
    ("sft.learning_rate=0.1", "section 'sft' has no setting 'learning_rate'. Known: .*lr"),
    ("learning_rate=0.1", "no stage has a setting 'learning_rate'"),
    ("pipeline.mine=true", "unknown section 'pipeline'.*--mine"),
    (".epochs=1", "expects SECTION.KEY=VALUE or KEY=VALUE"),  # a section left out is not a shared key
])
def test_set_refuses_unknown_keys(item, match):
    from sarcasm_dpo.config import apply_overrides

    with pytest.raises(UserError, match=match):
        apply_overrides({}, [item], PIPELINE)


def test_set_values_are_typed_and_checked_like_config_values():
    from sarcasm_dpo.config import apply_overrides

    for item, match in [("sft.sample_size=many", "Setting 'sample_size' expects int"),
                        ("dpo.beta=0", "beta must be > 0")]:
        with pytest.raises(UserError, match=match):
            stage_settings(apply_overrides({}, [item], PIPELINE), PipelineSettings(no_wandb=True), None)


def test_every_settings_rule_holds_at_build_and_when_a_stage_is_called_from_python(tmp_path):
    """The rules live in the settings' validate(): config.build (the CLI and YAML path) refuses bad
    values, and so do the stages when handed unvalidated settings, before touching --output_dir."""
    from sarcasm_dpo.config import build
    from sarcasm_dpo.stages import dpo, sft

    with pytest.raises(UserError, match=r"--save_steps must be 0 \(each epoch\) or a positive count, got -1"):
        build(SFTSettings, {"save_steps": -1})
    with pytest.raises(UserError, match="--lora_targets is empty"):
        sft.run(SFTSettings(output_dir=str(tmp_path / "sft"), lora_targets=[]))
    with pytest.raises(UserError, match="--loss_type 'nope' is not one of TRL's DPO losses"):
        build(DPOSettings, {"loss_type": "nope"})
    with pytest.raises(UserError, match="--eval_steps must be 0 or a positive count, got -2"):
        dpo.run(DPOSettings(output_dir=str(tmp_path / "dpo"), eval_steps=-2))
    with pytest.raises(UserError, match="--warmup_ratio must be in"):
        dpo.run(DPOSettings(output_dir=str(tmp_path / "dpo"), warmup_ratio=1.5))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_a_config_files_values_meet_the_flags_choices(tmp_path):
    """argparse checks choices on the command line only; a YAML value must meet them too."""
    from sarcasm_dpo.cli import main

    for value in ("int8", "16", "float64"):
        config = tmp_path / f"export_{value}.yaml"
        config.write_text(f"export:\n  adapter: nowhere\n  output_dir: {tmp_path / 'out'}\n  dtype: {value}\n")
        shown = value if value.isdigit() else repr(value)  # YAML reads 16 as a number: shown as one
        with pytest.raises(UserError, match=f"dtype must be one of float32, bfloat16, float16; got {shown}\\."):
            from_namespace(settings_classes(), build_parser().parse_args(["export", "--config", str(config)]), "export")
        assert main(["export", "--config", str(config)]) == 2


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps the last copy: a section written twice would lose every setting of its first copy."""
    for body, key in (("split:\n  output_dir: a\nsplit:\n  seed: 3\n", "'split'"), ("seed: 1\nseed: 2\n", "'seed'"),
                      ("sft:\n  epochs: 1\n  epochs: 2\n", "'epochs'")):
        config = tmp_path / "twice.yaml"
        config.write_text(body)
        with pytest.raises(UserError, match=f"{key} is given twice in one mapping .* at line"):
            load_yaml(config)


def test_dpo_flags_the_run_would_ignore_are_refused():
    for values, words in (({"beta_sweep": True, "beta": 0.3, "betas": [0.1, 0.2]}, "--beta 0.3 is not used by"),
                          ({"preference_data": "pairs.json", "pair_style": "label"}, "does not apply to --preference_data")):
        with pytest.raises(UserError, match=words):
            build(DPOSettings, values)
    build(DPOSettings, {"beta_sweep": True, "beta": 0.1, "betas": [0.1, 0.2]})  # the default beta: nothing typed


# -- true/false settings: a flag turns off what a config file turned on ------------------------------------------


def _true_false_flags() -> list[tuple[str, str]]:
    """(stage, name) of every true/false setting of every stage."""
    return [(stage, f.name) for stage, cls in STAGES.items() for f in dataclasses.fields(cls)
            if f.type in (bool, "bool")]


def test_every_true_false_flag_takes_an_optional_value(tmp_path):
    """Each true/false flag: alone = true; `--flag false`, `--flag=no`, `--flag 0`, `--flag off` = false; a config
    file's true is turned off from the command line (it used to be a store-true flag that took no value)."""
    flags = _true_false_flags()
    assert {("sft", "shared_prefix"), ("dpo", "balance"), ("dpo", "precompute_ref"), ("pipeline", "no_wandb")} <= set(flags)
    for stage, name in flags:
        cfg = tmp_path / f"{stage}-{name}.yaml"
        cfg.write_text(f"{stage}:\n  {name}: true\n")
        for argv, want in (([f"--{name}"], True), ([f"--{name}", "false"], False), ([f"--{name}=false"], False),
                           ([f"--{name}", "no"], False), ([f"--{name}", "0"], False), ([f"--{name}", "True"], True),
                           ([f"--{name}=yes"], True), ([f"--{name}", "1"], True)):
            args = parse([stage, "--config", str(cfg), *argv])
            assert getattr(args, name) is want, (stage, argv)
        # With no flag the file's value stands.
        assert parse([stage, "--config", str(cfg)]).__dict__.get(name, "unset") == "unset"


def test_the_cpu_config_shared_prefix_can_be_turned_off_from_the_command_line():
    path = str(ROOT / "configs" / "smollm2-135m-cpu.yaml")
    assert load_yaml(path)["sft"]["shared_prefix"] is True
    on = from_namespace(STAGES, parse(["sft", "--config", path]), "sft")
    off = from_namespace(STAGES, parse(["sft", "--config", path, "--shared_prefix", "false"]), "sft")
    also_off = from_namespace(STAGES, parse(["sft", "--config", path, "--shared_prefix=false", "--epochs", "1"]), "sft")
    assert on.shared_prefix is True and off.shared_prefix is False and also_off.shared_prefix is False
    # The flag alone, followed by another flag, is still true (the original spelling).
    assert from_namespace(STAGES, parse(["dpo", "--beta_sweep", "--no_wandb", "--balance"]), "dpo").balance is True


def test_a_bad_true_false_value_is_one_clear_line_and_exit_2(capsys):
    from sarcasm_dpo.cli import main

    for argv in (["sft", "--shared_prefix", "maybe"], ["dpo", "--balance=2"], ["split", "--overwrite", ""]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        flag = argv[1].split("=")[0]
        assert stop.value.code == 2 and f"argument {flag}: Setting '{flag[2:]}' expects true or false" in err, err
        assert "write true/false, yes/no, on/off or 1/0" in err and "Traceback" not in err


def test_true_false_values_follow_one_rule_by_every_route(tmp_path):
    """A config file, `--set` and Python read true/false as the flag does, and refuse the same values with the
    same message."""
    from sarcasm_dpo.config import apply_overrides

    for value, want in (("false", False), ("no", False), ("off", False), ("0", False), ("yes", True), ("1", True)):
        data = apply_overrides({"sft": {"shared_prefix": True}}, [f"sft.shared_prefix={value}"], PIPELINE)
        assert stage_settings(data, PipelineSettings(no_wandb=True), None)["sft"].shared_prefix is want, value
        assert build(SFTSettings, {"shared_prefix": value}).shared_prefix is want
    for bad in ("maybe", "2", "[true]"):
        data = apply_overrides({}, [f"sft.shared_prefix={bad}"], PIPELINE)
        with pytest.raises(UserError, match=r"Setting 'shared_prefix' expects true or false, got .*: write true/false"):
            stage_settings(data, PipelineSettings(no_wandb=True), None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft:\n  shared_prefix: 2\n")
    with pytest.raises(UserError, match=r"Setting 'shared_prefix' expects true or false, got 2"):
        from_namespace(STAGES, parse(["sft", "--config", str(cfg)]), "sft")


def test_help_shows_each_true_false_flags_default_and_value():
    help_text = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    assert "--balance [true|false]" in help_text and "--precompute_ref [true|false]" in help_text
    squashed = " ".join(help_text.split())
    assert "(default: false; the flag alone means true)" in squashed
    assert "(default: true; the flag alone means true)" in squashed  # precompute_ref, shared_prefix, ...
