"""The stage registry: every stage of the CLI, once. A new stage = one module here + one `Stage(...)` line.

Everything that lists stages reads `STAGES`: the CLI's subcommands and their flags (cli.py), the
YAML sections a config file may hold (config.check_known_keys is given `settings_classes()`), the
outputs the CLI locks before a stage writes (`Stage.outputs`), the pipeline's order and the paths it
chains from one stage to the next (`Stage.chain`), and the bench drivers' record files.

A stage module provides `run(settings)` (the driver, `pipeline`, also gets `config_path=`) and, if
what it reads is more than its settings say (data files, adapters), `inputs_of(settings)`: their
checksums, recorded in COMPLETE.json so a finished run of other inputs is never taken for this one
(its entry then says `inputs=True`). Modules are imported only when a stage runs or its inputs are
checked: `sarcasm-dpo --help` stays fast and never imports torch.

    python -c "from sarcasm_dpo.stages import STAGES; print(list(STAGES))"
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import read_json
from ..rundir import FileOutput
from ..settings import (CompareSettings, DPOSettings, ExportSettings, MineSettings, PipelineSettings, SFTSettings,
                        SplitSettings)


def _output_dir(s) -> list[str]:
    return [s.output_dir] if s.output_dir else []


def _always(pipe) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage: its settings, where its code lives, what it writes, and how the pipeline feeds it."""

    name: str  # the subcommand and the YAML section
    settings: type  # its settings dataclass (settings.py): the flags, the section's keys, the config recorded
    help: str  # the one line `sarcasm-dpo --help` shows
    module: str  # the module whose run(settings) runs it, imported on use
    outputs: Callable[[Any], list[str]] = _output_dir  # what a run writes, so what the CLI locks first
    record: str | None = None  # the JSON file in its output folder that holds the settings and results of a run
    # Where its COMPLETE.json lives (the output folder; mine writes a file, so a folder beside it).
    marker_dir: Callable[[Any], str] = lambda s: s.output_dir
    inputs: bool = False  # its module has inputs_of(settings): the checksums of the files it reads
    trains: bool = False  # writes checkpoints that --resume continues from; runs data-parallel under accelerate
    driver: bool = False  # runs other stages: gets the --config path and locks each stage's outputs itself
    # Pipeline stages: the settings it takes from the stages built before it ({name: settings}), given the
    # pipeline's settings; None = not part of the pipeline. `when` says whether a pipeline run includes it.
    chain: Callable[[dict, Any], dict] | None = None
    when: Callable[[Any], bool] = _always
    # Settings known only once the stages before it have run (compare: the beta sweep's best DPO folder).
    late_chain: Callable[[dict], dict] | None = None

    def load(self):
        return importlib.import_module(self.module)

    def run(self, settings, **kwargs):
        return self.load().run(settings, **kwargs)

    def inputs_of(self, settings) -> dict | None:
        """The checksums of what a run of these settings reads, or None when its settings say it all."""
        return self.load().inputs_of(settings) if self.inputs else None


def _dpo_result_dir(dpo: DPOSettings) -> str:
    """Where the DPO model to compare lives: the output folder, or the sweep's best-beta folder."""
    if not dpo.beta_sweep:
        return dpo.output_dir
    from .sweep import SWEEP_FILE  # light: the sweep's module imports no torch at the top

    results = Path(dpo.output_dir) / SWEEP_FILE
    if results.is_file():
        best = read_json(results, expect=dict).get("best_output_dir")
        if best:
            return best
    return dpo.output_dir


def _splits(built: dict) -> str:
    return built["split"].output_dir


def _mine_marker(s) -> str:
    from .mine import marker_dir  # the rule lives with the stage that writes the marker

    return str(marker_dir(s.output_file))


def _dpo_chain(built: dict, pipe) -> dict:
    d = _splits(built)
    chained = {"sft_model": built["sft"].output_dir, "train_csv": f"{d}/isarcasm_train.csv",
               "val_csv": f"{d}/gen_val.csv", "isarcasm_val_csv": f"{d}/isarcasm_val.csv"}
    if pipe.mine:
        chained["preference_data"] = built["mine"].output_file
    return chained


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("split", SplitSettings, "Split GEN into train/val/test and iSarcasmEval into train/val.",
          "sarcasm_dpo.stages.split", inputs=True, chain=lambda built, pipe: {"data_dir": pipe.data_dir}),
    Stage("sft", SFTSettings, "Phase 1: LoRA supervised fine-tuning on the GEN train split.",
          "sarcasm_dpo.stages.sft", record="training_summary.json", inputs=True, trains=True,
          chain=lambda built, pipe: {"train_csv": f"{_splits(built)}/gen_train.csv",
                                     "val_csv": f"{_splits(built)}/gen_val.csv"}),
    Stage("mine", MineSettings, "Mine preference pairs from the SFT model's mistakes on iSarcasmEval.",
          "sarcasm_dpo.stages.mine", inputs=True, outputs=lambda s: [FileOutput(s.output_file)], marker_dir=_mine_marker,
          chain=lambda built, pipe: {"sft_model": built["sft"].output_dir,
                                     "input_csv": f"{_splits(built)}/isarcasm_train.csv",
                                     "output_file": f"{Path(built['sft'].output_dir).parent}/mined_pairs.json"},
          when=lambda pipe: pipe.mine),
    Stage("dpo", DPOSettings, "Phase 2: DPO on iSarcasmEval from the SFT adapter, SFT as frozen reference.",
          "sarcasm_dpo.stages.dpo", record="dpo_training_summary.json", inputs=True, trains=True,
          chain=_dpo_chain),
    Stage("compare", CompareSettings, "Evaluate Base vs SFT vs DPO on the held-out GEN test split.",
          "sarcasm_dpo.stages.compare", record="model_comparison_results.json", inputs=True,
          chain=lambda built, pipe: {"test_csv": f"{_splits(built)}/gen_test.csv",
                                     "train_csv": f"{_splits(built)}/gen_train.csv",
                                     "sft_model": built["sft"].output_dir, "dpo_model": built["dpo"].output_dir},
          late_chain=lambda done: {"dpo_model": _dpo_result_dir(done["dpo"])}),
    Stage("pipeline", PipelineSettings, "Run download/split -> sft -> dpo -> compare with one config.",
          "sarcasm_dpo.stages.pipeline", outputs=lambda s: [], driver=True),
    Stage("export", ExportSettings, "Merge an adapter into its base model: a folder plain transformers "
                                    "loads, with threshold and model card; optionally push it to the Hub.",
          "sarcasm_dpo.stages.export"),
)}


def settings_classes(stages: dict[str, Stage] | None = None) -> dict[str, type]:
    """{YAML section: settings class} of `stages` (default: all), for config.py, which knows no stage."""
    return {name: stage.settings for name, stage in (STAGES if stages is None else stages).items()}


def pipeline_stages() -> dict[str, Stage]:
    """The stages a pipeline builds settings for, in the order they run."""
    return {name: stage for name, stage in STAGES.items() if stage.chain is not None}
