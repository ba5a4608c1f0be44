"""`sarcasm-dpo pipeline`: download/split -> sft -> (mine) -> dpo or beta sweep -> compare.

One YAML file drives every stage (shared keys at the top, one section per stage), one W&B group
ties the runs together, and each stage's output folder carries a COMPLETE.json written last with
a fingerprint of the settings that made it. A re-run skips every stage whose folder is complete
for the same settings, resumes a stage that was interrupted (its checkpoints are there but no
marker), and redoes a stage whose settings changed, and every stage after it (their inputs
changed); `--force` redoes everything.

    sarcasm-dpo pipeline --config configs/smollm2-135m-cpu.yaml --data_dir ../shared/data
    sarcasm-dpo pipeline --config configs/smoke.yaml --set sft.sample_size=64    # one stage's setting, as in the file

Before any stage writes, the base model is routed (model_route: hub id, or its offline fallback)
and checked to be loadable here, so a missing model fails at once instead of after the split.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..atomic import input_differences, is_complete_for, read_complete
from ..config import apply_overrides, build, check_known_keys, load_yaml, values_for_stage
from ..errors import note_paths
from ..model_route import check_available, route_model
from . import STAGES, pipeline_stages, settings_classes


def stage_settings(data: dict, pipe, group: str | None, source: str = "config") -> dict:
    """Each pipeline stage's settings from one YAML mapping, with the paths chained from stage to stage
    (each registry entry's `chain`: dpo's sft_model is sft's output_dir, ...)."""
    shared = {"wandb_project": pipe.wandb_project, "no_wandb": pipe.no_wandb, "wandb_group": group}
    classes = settings_classes()
    built: dict = {}
    for name, stage in pipeline_stages().items():
        values = values_for_stage(data, classes, name, source)
        names = {f.name for f in dataclasses.fields(stage.settings)}
        for key, value in {**stage.chain(built, pipe), **shared}.items():
            # A path the user set explicitly in the stage's section wins over the chained default.
            if key in names and key not in (data.get(name) or {}):
                values[key] = value
        built[name] = build(stage.settings, values)
    return built


def same_inputs(name: str, settings, out: Path) -> bool:
    """The finished stage in `out` read the same data and adapters as this run would (by checksum). A stage
    redone after an earlier pipeline run stopped part-way may have left later stages' records from older
    inputs; settings alone would not tell. Stages whose records hold settings only (sft, dpo: their inputs
    come from the stages before) always match."""
    inputs = STAGES[name].inputs_of(settings)
    return inputs is None or not input_differences(read_complete(out) or {}, inputs)


def run(pipe, config_path: str | None = None) -> dict:
    from ..tracking import make_group_name

    data = apply_overrides(load_yaml(config_path) if config_path else {}, pipe.set,
                           settings_classes(pipeline_stages()))
    # pipe itself came from the same file + flags
    check_known_keys(data, settings_classes(), str(config_path or "defaults"))
    group = None if pipe.no_wandb else make_group_name()
    stages = stage_settings(data, pipe, group, str(config_path or "defaults"))
    note_paths(*stages.values())  # every stage's paths are the user's (errors.describe_failure)
    for name, settings in stages.items():  # recorded as what is loaded: the hub id or its offline fallback
        if getattr(settings, "model", None):
            stages[name] = dataclasses.replace(settings, model=route_model(settings.model))
    order = [name for name, stage in pipeline_stages().items() if stage.when(pipe)]
    sft = stages["sft"]
    if pipe.force or not is_complete_for(sft.output_dir, sft):
        check_available(sft.model)  # before the split is written or a W&B run opened
    from ..rundir import claim_outputs, input_paths, refuse_outputs_over_inputs

    for name in order:  # no stage replaces what it reads (another stage's output included)
        refuse_outputs_over_inputs(STAGES[name].outputs(stages[name]), input_paths(stages[name]))
    # Every stage's output is locked for the whole pipeline: a second run into the same folders exits 2.
    outputs = [o for name in order for o in STAGES[name].outputs(stages[name])]
    with claim_outputs(outputs, "sarcasm-dpo " + " ".join(sys.argv[1:])):
        return run_stages(pipe, stages, order)


REPORTED = "compare"  # the stage whose results the pipeline's last lines show (`headline`)


def run_stages(pipe, stages: dict, order: list[str]) -> dict:
    ran, skipped = [], []
    result = None
    for name in order:
        stage, settings = STAGES[name], stages[name]
        if stage.late_chain:
            settings = dataclasses.replace(settings, **stage.late_chain(stages))
        out = Path(stage.marker_dir(settings))
        from ..training.checkpoints import interrupted_run

        interrupted = interrupted_run(out)
        # Once a stage has run, everything after it runs too: its inputs just changed.
        if not pipe.force and not ran and not interrupted and is_complete_for(out, settings) \
                and same_inputs(name, settings, out):
            print(f"[pipeline] {name}: outputs in {out} are complete for these settings; skipping (--force to redo).")
            skipped.append(name)
            if name == REPORTED:
                result = json.loads((out / stage.record).read_text())
            continue
        # Replacing a finished run of this stage is the pipeline's job (its settings changed); files no run of
        # ours wrote are another matter: the stage refuses them, as it does on its own, unless --overwrite.
        ours = read_complete(out) is not None or interrupted
        if hasattr(settings, "resume"):
            settings = dataclasses.replace(settings, resume=interrupted, overwrite=pipe.overwrite or not interrupted and ours)
        elif hasattr(settings, "overwrite"):
            settings = dataclasses.replace(settings, overwrite=pipe.overwrite or ours)
        print(f"[pipeline] {name}: {'resuming' if interrupted else 'running'} -> {out}")
        outcome = run_stage(name, settings)
        if name == REPORTED:
            result = outcome
        ran.append(name)
    print(f"[pipeline] done: ran {', '.join(ran) or 'nothing'}; skipped {', '.join(skipped) or 'nothing'}.")
    if result:
        print(headline(result))
    return {"ran": ran, "skipped": skipped, "compare": result}


def run_stage(name: str, settings, **hooks):
    """Run one stage by its name: the one way a stage is started, by the pipeline and the bench drivers alike.

    No skipping, resuming or timing here; the caller decides those. `hooks` go to the stage's
    run() as they are (e.g. sft's `extra_callbacks`, how bench/speed_sft.py meters training).

        python -c "from sarcasm_dpo.stages.pipeline import run_stage; help(run_stage)"
    """
    return STAGES[name].run(settings, **hooks)


def headline(results: dict) -> str:
    """What the run found, last on screen: the test table, the verdicts, and where the evidence is."""
    from ..stages.compare import format_table, format_verdicts

    info, out = results["test_set"], results.get("outputs", {})
    predictions = (out.get("predictions") or {}).get("main", "")
    return "\n".join([f"\nTest set {info['path']} ({info['n']} items):", format_table(results["models"]),
                      *format_verdicts(results), f"Plot: {out.get('plot', '')}", f"Predictions: {predictions}",
                      f"Results: {out.get('results', '')}"])
