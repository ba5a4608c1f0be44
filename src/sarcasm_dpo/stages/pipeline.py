"""`sarcasm-dpo pipeline`: download/split -> sft -> (mine) -> dpo or beta sweep -> compare.

One YAML file drives every stage (shared keys at the top, one section per stage), one W&B group
ties the runs together, and each stage's output folder carries a COMPLETE.json written last with
a fingerprint of the settings that made it. A re-run skips every stage whose folder is complete
for the same settings, resumes a stage that was interrupted (its checkpoints are there but no
marker), and redoes a stage whose settings changed, and every stage after it (their inputs
changed); `--force` redoes everything. A finished stage whose JSON records no longer read back (cut
short, edited, not UTF-8) counts as not complete and is run again. A top-level setting the pipeline
would replace with a chained one (train_csv, sft_model, ...; `--set data_dir=`) is refused, naming
what to set instead.

    sarcasm-dpo pipeline --config configs/smollm2-135m-cpu.yaml --data_dir ../shared/data
    sarcasm-dpo pipeline --config configs/smoke.yaml --set sft.sample_size=64    # one stage's setting, as in the file

Before any stage writes, the base model is routed (model_route: hub id, or its offline fallback)
and checked to be loadable here, so a missing model fails at once instead of after the split.

Under `torchrun` or `accelerate launch` (--cpu --num_processes N included) every process runs this driver:

    accelerate launch --num_processes 2 -m sarcasm_dpo.cli pipeline --config configs/qwen2.5-0.5b.yaml

The process group is made first, as accelerate makes it (training.distributed.start_process_group). The
main process alone decides (models routed, checks, which stage to skip, resume or run) and hands its
decisions to the others (`on_main_process`); it alone locks and tidies the outputs, writes files, prints
and opens W&B runs. The training stages (sft, dpo) run on every process, data-parallel as when launched
on their own; split, mine and compare run on the main process while the others wait. An error there
ends every process: the main one prints it once and exits as a plain run would, the others end quietly
(exit 1, or stopped by the launcher once the main one has exited).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from ..atomic import (DamagedRecord, incomplete_outputs, input_differences, is_complete_for, marker_damage,
                      read_complete, read_json)
from ..config import apply_overrides, build, check_known_keys, load_yaml, values_for_stage
from ..errors import UserError, note_paths
from ..model_route import check_available, route_model
from . import STAGES, pipeline_stages, settings_classes


def stage_settings(data: dict, pipe, group: str | None, source: str = "config", set_keys=()) -> dict:
    """Each pipeline stage's settings from one YAML mapping, with the paths chained from stage to stage
    (each registry entry's `chain`: dpo's sft_model is sft's output_dir, ...).

    A value the pipeline sets for a stage (chained, or the pipeline's own W&B settings) replaces the one at the
    top of `data` but not one in the stage's section, so a top-level value that would be replaced is refused
    (`replaced_top_level`), unless the pipeline's own setting of that name read it from the file (`pipe`: data_dir,
    wandb_project, no_wandb). `set_keys`: the top-level keys `--set` gave, which `pipe` never read."""
    shared = {"wandb_project": pipe.wandb_project, "no_wandb": pipe.no_wandb, "wandb_group": group}
    classes = settings_classes()
    built: dict = {}
    replaced: dict = {}  # top-level key -> [(stage, the value the pipeline sets there)]
    for name, stage in pipeline_stages().items():
        values = values_for_stage(data, classes, name, source)
        names = {f.name for f in dataclasses.fields(stage.settings)}
        for key, value in {**stage.chain(built, pipe), **shared}.items():
            # A path the user set explicitly in the stage's section wins over the chained default.
            if key in names and key not in (data.get(name) or {}):
                if key in data and (key in set_keys or not hasattr(pipe, key)):
                    replaced.setdefault(key, []).append((name, value))
                values[key] = value
        built[name] = build(stage.settings, values)
    if replaced:
        key, where = next(iter(replaced.items()))
        raise replaced_top_level(key, data[key], where, built, pipe, f"--set {key}" if key in set_keys else
                                 f"{source}: the top-level setting {key}")
    return built


def replaced_top_level(key: str, given, where: list, built: dict, pipe, what: str) -> UserError:
    """The error for a top-level value the pipeline would silently replace in every stage that takes it (`where`:
    [(stage, the value it gets)]): what to set instead, the earlier stage's output it follows from."""
    runs = [item for item in where if pipeline_stages()[item[0]].when(pipe)] or where
    stages = ", ".join(name for name, _ in runs)
    first, value = runs[0]
    shown = f"{what}={given if isinstance(given, str) else json.dumps(given, default=str)}"
    if hasattr(pipe, key):  # data_dir, wandb_project, no_wandb: given to --set, which the pipeline's own flags ignore
        return UserError(f"{shown} is not used: {key} is the pipeline's own setting, which it hands to {stages}. "
                         f"Pass --{key} to the pipeline (or set {key} at the top of the config file).")
    names = list(built)
    origin = chain_origin(value, {name: built[name] for name in names[:names.index(first)]})
    how = (f"from {origin}. Change {origin} instead" if origin else
           "to one W&B group of its own for all its runs. Leave it out" if key == "wandb_group" else
           "from the earlier stages' outputs. Change those instead")
    return UserError(f"{shown} would be ignored: the pipeline sets {key} of {stages} {how}, or set {key} for one "
                     f"stage in its section ({first}.{key} in the file, or --set {first}.{key}=...).")


def chain_origin(value, built: dict) -> str | None:
    """The earlier stage's output setting ("split.output_dir") a chained path `value` is, lies in or lies beside
    (the nearest stage first: mine's pairs file goes beside sft's folder, which may lie beside split's). Read off
    the values, as the registry's `chain` functions do not name what they read."""
    if not isinstance(value, str):
        return None
    path = Path(value)
    for near in (lambda out: path == out, lambda out: path.parent == out, lambda out: path.parent == out.parent):
        for name, settings in reversed(built.items()):
            for field in ("output_dir", "output_file"):
                out = getattr(settings, field, None)
                if isinstance(out, str) and out and near(Path(out)):
                    return f"{name}.{field}"
    return None


def same_inputs(name: str, settings, out: Path) -> bool:
    """The finished stage in `out` read the same data and adapters as this run would (by checksum). Settings
    alone would not tell: they name the files by path, and a stage before this one may have rewritten them
    since (a pipeline stopped part-way, then run with another split, leaves SFT trained on the old one).
    A record without checksums (from an older version) is compared on settings only."""
    inputs = STAGES[name].inputs_of(settings)
    return inputs is None or not input_differences(read_complete(out) or {}, inputs)


def run(pipe, config_path: str | None = None) -> dict:
    from ..training.distributed import is_main_process, on_main_process, start_process_group, world_size

    if world_size() > 1:  # under a launch of several processes (this runs on each): see the module's docstring
        start_process_group(cpu=trains_on_cpu(pipe, config_path))
    # Decided once, on the main process, and handed to the others: the settings (the models as loaded, the W&B
    # group), once the checks have passed. A bad setting is said once, by the main process; the others wait for it.
    stages, order = on_main_process(lambda: prepare(pipe, config_path), share=True)
    if not is_main_process():
        note_paths(*stages.values())  # as prepare() did on the main process
    from ..rundir import claim_outputs

    # Every stage's output is locked for the whole pipeline: a second run into the same folders exits 2. Only the
    # main process locks (and tidies after killed runs); the others write nothing of their own.
    outputs = [o for name in order for o in STAGES[name].outputs(stages[name])]
    with contextlib.ExitStack() as held:
        on_main_process(lambda: held.enter_context(claim_outputs(outputs, "sarcasm-dpo " + " ".join(sys.argv[1:]))))
        return run_stages(pipe, stages, order)


def prepare(pipe, config_path: str | None) -> tuple[dict, list[str]]:
    """({stage: settings}, the stages this run includes, in order): built from the config file and the flags, each
    model as it will be loaded, checked (`checked`)."""
    stages, order = build_stages(pipe, config_path)
    note_paths(*stages.values())  # every stage's paths are the user's (errors.describe_failure)
    return checked(pipe, stages, order), order


def build_stages(pipe, config_path: str | None) -> tuple[dict, list[str]]:
    """({stage: settings}, the stages this run includes, in order) from the config file and the flags alone (no
    model routed, nothing checked on disk)."""
    from ..tracking import make_group_name

    loaded = load_yaml(config_path) if config_path else {}
    data = apply_overrides(loaded, pipe.set, settings_classes(pipeline_stages()))
    # pipe itself came from the same file + flags; --set's shared keys it has not seen
    set_keys = {k for k, v in data.items() if k not in settings_classes() and (k not in loaded or loaded[k] != v)}
    check_known_keys(data, settings_classes(), str(config_path or "defaults"))
    group = None if pipe.no_wandb else make_group_name()
    stages = stage_settings(data, pipe, group, str(config_path or "defaults"), set_keys)
    return stages, [name for name, stage in pipeline_stages().items() if stage.when(pipe)]


def trains_on_cpu(pipe, config_path: str | None) -> bool:
    """Whether the training stages train on CPUs (sft's device setting, else the device found here): the process
    group of a launch is made for that device, before anything else, on every process. A setting that cannot be
    read counts as none here: the main process says what is wrong with it, once, while the others wait."""
    from ..models import pick_device

    try:
        device = build_stages(pipe, config_path)[0]["sft"].device
        return pick_device(device).type == "cpu"
    except (UserError, OSError):
        return pick_device(None).type == "cpu"


def checked(pipe, stages: dict, order: list[str]) -> dict:
    """`stages` with each model as it will be loaded (a hub id, or its offline fallback), once the checks that need
    no stage to have run have passed: the model can be loaded here, later stages' settings fit this machine, and
    no stage writes over what it reads."""
    stages = dict(stages)
    for name, settings in stages.items():  # recorded as what is loaded: the hub id or its offline fallback
        if getattr(settings, "model", None):
            stages[name] = dataclasses.replace(settings, model=route_model(settings.model))
    sft = stages["sft"]
    if pipe.force or not is_complete_for(sft.output_dir, sft):
        check_available(sft.model)  # before the split is written or a W&B run opened
        preflight(stages, order)
    from ..rundir import input_paths, refuse_outputs_over_inputs

    for name in order:  # no stage replaces what it reads (another stage's output included)
        refuse_outputs_over_inputs(STAGES[name].outputs(stages[name]), input_paths(stages[name]))
    return stages


def preflight(stages: dict, order: list[str]) -> None:
    """The checks of later stages' settings that a stage makes only when it starts, made before SFT trains
    for an hour: a device this machine lacks, a --max_length that leaves no room for any text (the rule of
    prompts.build_prompts, for the shortest answer: a one-word label). Each stage checks again, in full."""
    from ..models import load_tokenizer, pick_device
    from ..prompts import answer_length, build_prompts, label_word

    tokenizer = None
    for name in order:
        settings = stages[name]
        try:
            if getattr(settings, "device", None):
                pick_device(settings.device)
            if getattr(settings, "max_length", None):
                tokenizer = tokenizer or load_tokenizer(stages["sft"].model)
                answer = max(answer_length(tokenizer, label_word(y)) for y in (0, 1))
                build_prompts(tokenizer, ["x"], settings.max_text_tokens, room=settings.max_length - answer)
        except UserError as exc:
            raise UserError(f"Stage {name}: {exc} Nothing was run.") from None


REPORTED = "compare"  # the stage whose results the pipeline's last lines show (`headline`)


def run_stages(pipe, stages: dict, order: list[str]) -> dict:
    """Each stage in `order`: skipped, resumed or run, as the main process decides from what the outputs hold (and
    says, once); under a launch the training stages run on every process, the others on the main one alone."""
    from ..training.distributed import on_main_process

    ran, skipped = [], []
    result = None
    for name in order:
        def decide(name=name):
            nonlocal result
            settings = plan_stage(pipe, name, stages, ran)
            if settings is None and name == REPORTED:
                result = read_json(Path(STAGES[name].marker_dir(stages[name])) / STAGES[name].record, expect=dict)
            return settings

        settings = on_main_process(decide, share=True)  # None: skipped
        if settings is None:
            skipped.append(name)
            continue
        if STAGES[name].trains:  # every process trains, data-parallel, as when it is launched on its own
            outcome = run_stage(name, settings)
        else:
            outcome = on_main_process(lambda: run_stage(name, settings))
        if name == REPORTED:
            result = outcome
        ran.append(name)

    def report():
        print(f"[pipeline] done: ran {', '.join(ran) or 'nothing'}; skipped {', '.join(skipped) or 'nothing'}.")
        if result:
            print(headline(result))

    on_main_process(report)  # under a launch, every process ends with it
    return {"ran": ran, "skipped": skipped, "compare": result}


def plan_stage(pipe, name: str, stages: dict, ran: list[str]):
    """The settings stage `name` runs with (resume, overwrite set as its output folder calls for), or None when its
    output is complete for these settings and it is skipped; says which on stdout. `ran`: the stages run so far."""
    stage, settings = STAGES[name], stages[name]
    if stage.late_chain:
        settings = dataclasses.replace(settings, **stage.late_chain(stages))
    out = Path(stage.marker_dir(settings))
    from ..training.checkpoints import checkpoint_input_differences, interrupted_run

    stopped = interrupted_run(out)
    # A run stopped there, then a stage before it was redone (the split made again): its checkpoints
    # learnt from other data, so it is started over rather than continued.
    stale = checkpoint_input_differences(out, stage.inputs_of(settings)) if stopped else []
    interrupted = stopped and not stale
    # Once a stage has run, everything after it runs too: its inputs just changed.
    marker_damaged = marker_damage(out)  # a COMPLETE.json there that does not read: our run's, spoilt
    if not pipe.force and not ran and not interrupted:
        complete, damaged = finished_here(name, settings)
        damaged = damaged or marker_damaged
        if complete:
            print(f"[pipeline] {name}: outputs in {out} are complete for these settings; skipping (--force to "
                  "redo).")
            return None
        if damaged is not None:
            print(f"[pipeline] {name}: {damaged.path} is damaged: {damaged.problem}; the stage counts as not "
                  "complete and runs again.")
    # Replacing a finished run of this stage is the pipeline's job (its settings changed); files no run of
    # ours wrote are another matter: the stage refuses them, as it does on its own, unless --overwrite.
    ours = read_complete(out) is not None or marker_damaged is not None or stopped
    if hasattr(settings, "resume"):
        settings = dataclasses.replace(settings, resume=interrupted, overwrite=pipe.overwrite or not interrupted and ours)
    elif hasattr(settings, "overwrite"):
        settings = dataclasses.replace(settings, overwrite=pipe.overwrite or ours)
    if stale:
        print(f"[pipeline] {name}: the stopped run in {out} was trained from other inputs (differ in: "
              f"{', '.join(stale)}); starting it over.")
    print(f"[pipeline] {name}: {'resuming' if interrupted else 'running'} -> {out}")
    return settings


def finished_here(name: str, settings) -> tuple[bool, DamagedRecord | None]:
    """(Does stage `name`'s output hold its finished run of these settings, from these inputs, whole?, the damage
    that stops a finished run counting, if that is why not). The one rule for reusing a stage's output instead of
    running it: the pipeline's skip, and the bench drivers' reuse of their runs.

        python -c "from sarcasm_dpo.stages.pipeline import finished_here; help(finished_here)"
    """
    stage = STAGES[name]
    out = Path(stage.marker_dir(settings))
    if not is_complete_for(out, settings) or not same_inputs(name, settings, out):
        return False, None
    damaged = damaged_record(name, out, stage.record)
    return damaged is None, damaged


def damaged_record(name: str, out: Path, record: str | None) -> DamagedRecord | None:
    """Why a finished stage's folder cannot be skipped although its marker says complete, or None: one of the
    JSON records in it (its `record`, which the pipeline's closing lines read, and those later stages read, as
    beta_sweep_results.json or split_info.json) does not read back, the comparison's results have lost their
    shape (a hand edit), or a file the run left there is gone (atomic.missing_outputs). Running the stage
    again writes them anew."""
    from .compare import check_results_record

    for path in sorted(p for p in out.glob("*.json") if not p.name.startswith(".")):
        try:
            value = read_json(path, expect=dict if path.name == record else None)
            if name == REPORTED and path.name == record:
                check_results_record(value, path)
        except DamagedRecord as exc:
            return exc
    return incomplete_outputs(out, name)


def run_stage(name: str, settings, **hooks):
    """Run one stage by its name: the one way a stage is started, by the pipeline and the bench drivers alike.

    No skipping, resuming or timing here; the caller decides those. `hooks` go to the stage's
    run() as they are (e.g. sft's `extra_callbacks`, how bench/speed_sft.py meters training).

        python -c "from sarcasm_dpo.stages.pipeline import run_stage; help(run_stage)"
    """
    return STAGES[name].run(settings, **hooks)


def headline(results: dict) -> str:
    """What the run found, last on screen: the test table and verdicts with each model at its own validation
    threshold (the way it labels texts), the same at 0.5 labelled as such, and where the evidence is."""
    from ..stages.compare import format_summary

    out = results.get("outputs", {})  # shape checked (compare.check_results_record)
    predictions = (out.get("predictions") or {}).get("main", "")
    return "\n".join([*format_summary(results), f"Plot: {out.get('plot', '')}", f"Predictions: {predictions}",
                      f"Results: {out.get('results', '')}"])
