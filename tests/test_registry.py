"""The stage registry: a new stage is one module plus one `Stage(...)` line, and every consumer follows.

A dummy stage registered here (its module a stand-in in sys.modules) gets a CLI subcommand with
its flags, its output locked while it runs, a YAML section the config check accepts (and checks),
`--set` keys, chained settings in the pipeline, and a place in the pipeline's run-or-skip loop.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass

import pytest

from sarcasm_dpo import cli, models, rundir
from sarcasm_dpo.atomic import finish_output_dir
from sarcasm_dpo.config import apply_overrides, from_namespace, opt
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import PipelineSettings
from sarcasm_dpo.stages import STAGES, Stage, pipeline_stages, settings_classes
from sarcasm_dpo.stages import pipeline


@dataclass
class DummySettings:
    output_dir: str = opt("out/dummy", "Where the dummy stage writes.")
    splits: str = opt("data/splits", "The split folder it reads (chained from split in a pipeline).")
    size: int = opt(3, "How many things it makes.")
    overwrite: bool = opt(False, "Replace another run's output.")
    no_wandb: bool = opt(False, "Turn W&B off.")


@pytest.fixture
def dummy(monkeypatch):
    """Register `dummy` the way a real stage is: a module with run(settings), one registry entry."""
    module = types.ModuleType("sarcasm_dpo_test_dummy_stage")
    module.calls = []

    def run(settings):
        locked = rundir.lock_path(settings.output_dir).exists()  # the CLI locks the output before run()
        module.calls.append((settings, locked))
        finish_output_dir(settings.output_dir, dataclasses.asdict(settings))
        return {"size": settings.size}

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(STAGES, "dummy", Stage(
        "dummy", DummySettings, "A stage only this test registers.", module.__name__,
        chain=lambda built, pipe: {"splits": built["split"].output_dir}))
    return module


def test_the_cli_runs_a_registered_stage_with_its_flags_and_lock(dummy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "A stage only this test registers." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["dummy", "--help"])
    assert "How many things it makes. (default: 3)" in capsys.readouterr().out
    out = tmp_path / "dummy_out"
    assert cli.main(["dummy", "--size", "5", "--output_dir", str(out)]) == 0
    (settings, locked), = dummy.calls
    assert settings.size == 5 and locked
    assert not rundir.lock_path(out).exists()  # released on exit


def test_a_config_file_may_hold_the_new_section_and_it_is_checked(dummy, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\nsft:\n  epochs: 1\ndummy:\n  size: 7\n")
    parse = cli.build_parser().parse_args
    assert from_namespace(settings_classes(), parse(["dummy", "--config", str(cfg)]), "dummy").size == 7
    assert from_namespace(settings_classes(), parse(["sft", "--config", str(cfg)]), "sft").epochs == 1
    cfg.write_text("dummy:\n  sizee: 7\n")
    with pytest.raises(UserError, match="unknown setting.*section 'dummy'.*sizee"):
        from_namespace(settings_classes(), parse(["sft", "--config", str(cfg)]), "sft")
    STAGES.pop("dummy")  # unregistered, the section is unknown again
    cfg.write_text("dummy:\n  size: 7\n")
    with pytest.raises(UserError, match="unknown setting.*dummy"):
        from_namespace(settings_classes(), parse(["sft", "--config", str(cfg)]), "sft")


def test_the_pipeline_chains_sets_and_runs_or_skips_the_new_stage(dummy, tmp_path, capsys):
    assert list(pipeline_stages())[-1] == "dummy"
    data = apply_overrides({"split": {"output_dir": str(tmp_path / "splits")}}, ["dummy.size=9"],
                           settings_classes(pipeline_stages()))
    pipe = PipelineSettings(no_wandb=True)
    stages = pipeline.stage_settings(data, pipe, None)
    settings = dataclasses.replace(stages["dummy"], output_dir=str(tmp_path / "dummy"))
    assert (settings.size, settings.splits) == (9, str(tmp_path / "splits"))  # set, and chained from split
    stages = {"dummy": settings}
    assert pipeline.run_stages(pipe, stages, ["dummy"])["ran"] == ["dummy"]
    assert pipeline.run_stages(pipe, stages, ["dummy"])["skipped"] == ["dummy"]  # complete for these settings
    assert len(dummy.calls) == 1


def test_every_entry_names_a_module_that_runs_it_and_the_record_it_writes():
    """The registry's lines agree with the modules they name: run() (and inputs_of() where the entry says so),
    and the record file is the one the stage writes (the stage modules' own constants)."""
    for name, stage in STAGES.items():
        module = stage.load()
        assert callable(module.run), name
        assert callable(getattr(module, "inputs_of", None)) == stage.inputs, name
        if stage.record:
            assert stage.record in (getattr(module, "SUMMARY_FILE", None), getattr(module, "RESULTS_FILE", None)), name
    assert STAGES["sft"].record == models.RUN_RECORD  # the naming rule models.py finds run records by
    assert STAGES["dpo"].record.endswith("_" + models.RUN_RECORD)
