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

from ..atomic import is_complete_for, read_complete
from ..config import apply_overrides, build, check_known_keys, load_yaml, values_for_stage
from ..model_route import check_available, route_model
from ..settings import STAGES, CompareSettings, DPOSettings, MineSettings, SFTSettings, SplitSettings


def stage_settings(data: dict, pipe, group: str | None, source: str = "config") -> dict:
    """Each stage's settings from one YAML mapping, with the paths chained from stage to stage."""
    shared = {"wandb_project": pipe.wandb_project, "no_wandb": pipe.no_wandb, "wandb_group": group}

    def make(cls, section, chained: dict):
        values = values_for_stage(data, cls, section, source)
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in {**chained, **shared}.items():
            # A path the user set explicitly in the stage's section wins over the chained default.
            if key in names and key not in (data.get(section) or {}):
                values[key] = value
        return build(cls, values)

    split = make(SplitSettings, "split", {"data_dir": pipe.data_dir})
    d = split.output_dir
    sft = make(SFTSettings, "sft", {"train_csv": f"{d}/gen_train.csv", "val_csv": f"{d}/gen_val.csv"})
    mine = make(MineSettings, "mine", {"sft_model": sft.output_dir, "input_csv": f"{d}/isarcasm_train.csv",
                                       "output_file": f"{Path(sft.output_dir).parent}/mined_pairs.json"})
    dpo_chain = {"sft_model": sft.output_dir, "train_csv": f"{d}/isarcasm_train.csv", "val_csv": f"{d}/gen_val.csv",
                 "isarcasm_val_csv": f"{d}/isarcasm_val.csv"}
    if pipe.mine:
        dpo_chain["preference_data"] = mine.output_file
    dpo = make(DPOSettings, "dpo", dpo_chain)
    compare = make(CompareSettings, "compare", {"test_csv": f"{d}/gen_test.csv", "train_csv": f"{d}/gen_train.csv",
                                                "sft_model": sft.output_dir, "dpo_model": dpo.output_dir})
    return {"split": split, "sft": sft, "mine": mine, "dpo": dpo, "compare": compare}


def _dpo_result_dir(dpo: DPOSettings) -> str:
    """Where the DPO model to compare lives: the output folder, or the sweep's best-beta folder."""
    if not dpo.beta_sweep:
        return dpo.output_dir
    results = Path(dpo.output_dir) / "beta_sweep_results.json"
    if results.is_file():
        best = json.loads(results.read_text()).get("best_output_dir")
        if best:
            return best
    return dpo.output_dir


def same_inputs(name: str, settings, out: Path) -> bool:
    """The finished stage in `out` read the same data and adapters as this run would (by checksum). A stage
    redone after an earlier pipeline run stopped part-way may have left later stages' records from older
    inputs; settings alone would not tell."""
    from . import compare, mine as mining, split
    from ..atomic import input_differences

    if name == "split":
        from ..download import ensure_data_dir

        inputs = split.inputs_of(ensure_data_dir(settings.data_dir))
    elif name == "compare":
        inputs = compare.inputs_of(settings)
    elif name == "mine":
        inputs = mining.inputs_of(settings)
    else:
        return True  # sft and dpo: their records hold settings only (their inputs come from the stages before)
    return not input_differences(read_complete(out) or {}, inputs)


def _output_of(name: str, settings) -> str:
    if name == "mine":
        return str(Path(settings.output_file).parent / (Path(settings.output_file).stem + "_run"))
    return settings.output_dir


def run(pipe, config_path: str | None = None) -> dict:
    from ..tracking import make_group_name

    data = apply_overrides(load_yaml(config_path) if config_path else {}, pipe.set,
                           {name: STAGES[name] for name in ("split", "sft", "mine", "dpo", "compare")})
    check_known_keys(data, STAGES, str(config_path or "defaults"))  # pipe itself came from the same file + flags
    group = None if pipe.no_wandb else make_group_name()
    stages = stage_settings(data, pipe, group, str(config_path or "defaults"))
    for name, settings in stages.items():  # recorded as what is loaded: the hub id or its offline fallback
        if getattr(settings, "model", None):
            stages[name] = dataclasses.replace(settings, model=route_model(settings.model))
    order = ["split", "sft", *(["mine"] if pipe.mine else []), "dpo", "compare"]
    sft = stages["sft"]
    if pipe.force or not is_complete_for(sft.output_dir, dataclasses.asdict(sft)):
        check_available(sft.model)  # before the split is written or a W&B run opened
    from ..rundir import claim_outputs, outputs_of

    # Every stage's output is locked for the whole pipeline: a second run into the same folders exits 2.
    outputs = [o for name in order for o in outputs_of(name, stages[name])]
    with claim_outputs(outputs, "sarcasm-dpo " + " ".join(sys.argv[1:])):
        return run_stages(pipe, stages, order)


def run_stages(pipe, stages: dict, order: list[str]) -> dict:
    ran, skipped = [], []
    result = None
    for name in order:
        settings = stages[name]
        if name == "compare":
            settings = dataclasses.replace(settings, dpo_model=_dpo_result_dir(stages["dpo"]))
        out = Path(_output_of(name, settings))
        config = dataclasses.asdict(settings)
        from ..training.checkpoints import interrupted_run

        interrupted = interrupted_run(out)
        # Once a stage has run, everything after it runs too: its inputs just changed.
        if not pipe.force and not ran and not interrupted and is_complete_for(out, config) \
                and same_inputs(name, settings, out):
            print(f"[pipeline] {name}: outputs in {out} are complete for these settings; skipping (--force to redo).")
            skipped.append(name)
            if name == "compare":
                result = json.loads((out / "model_comparison_results.json").read_text())
            continue
        # Replacing a finished run of this stage is the pipeline's job (its settings changed); files no run of
        # ours wrote are another matter: the stage refuses them, as it does on its own, unless --overwrite.
        ours = read_complete(out) is not None or interrupted
        if hasattr(settings, "resume"):
            settings = dataclasses.replace(settings, resume=interrupted, overwrite=pipe.overwrite or not interrupted and ours)
        elif hasattr(settings, "overwrite"):
            settings = dataclasses.replace(settings, overwrite=pipe.overwrite or ours)
        print(f"[pipeline] {name}: {'resuming' if interrupted else 'running'} -> {out}")
        result = run_stage(name, settings)
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
    module = __import__(f"sarcasm_dpo.stages.{name}", fromlist=["run"])
    return module.run(settings, **hooks)


def headline(results: dict) -> str:
    """What the run found, last on screen: the test table, the verdicts, and where the evidence is."""
    from ..stages.compare import format_table, format_verdicts

    info, out = results["test_set"], results.get("outputs", {})
    predictions = (out.get("predictions") or {}).get("main", "")
    return "\n".join([f"\nTest set {info['path']} ({info['n']} items):", format_table(results["models"]),
                      *format_verdicts(results), f"Plot: {out.get('plot', '')}", f"Predictions: {predictions}",
                      f"Results: {out.get('results', '')}"])
