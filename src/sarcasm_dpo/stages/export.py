"""`sarcasm-dpo export`: one folder that plain transformers loads, with its threshold and model card.

The LoRA weights are merged into the base model (`merge_and_unload`) and saved as safetensors in
the chosen dtype, beside the tokenizer (chat template included), `sarcasm_dpo.json` (the prompt,
the label tokens and the decision threshold the run recorded) and a generated README.md: Hub
metadata (base model, datasets, license, metrics), the test metrics with their 95% intervals from
the comparison run that scored this very adapter (its folder, and the checksum compare recorded for
it), the validation metrics from the training record, the prompt, eight lines of plain-transformers
usage, and the intended use and limits. Everything is written into a staging folder beside
`--output_dir` and swapped in whole with COMPLETE.json (rundir.staged), so an export that fails or
is stopped leaves the previous folder as it was, never weights without their card. COMPLETE.json
records the checksums of the adapter and of the comparison results the card quotes: after the
adapter is retrained at the same path, the same command is no longer "already done".
`--push_to_hub REPO` uploads the folder after it is complete; a failed upload leaves it as it is.

    sarcasm-dpo export --adapter models/dpo_enhanced --output_dir exported/
    sarcasm-dpo predict --model exported/ --input texts.txt
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from ..detector import EXPORT_INFO, check_model_folder, refuse_adapter_on_export
from ..errors import UserError
from ..metrics import fmt

CARD = "README.md"
# sarcasm_dpo.json's keys, in the order it has always listed them.
EXPORT_KEYS = ("name", "stage", "adapter", "base_model", "base_hub_id", "license", "dtype", "question", "label_words",
               "label_token_ids", "threshold", "threshold_source", "max_text_tokens", "test", "validation",
               "training_config", "dpo_kept_sft")
# What to do about a --results file whose figures are of the wrong shape.
RESULTS_FIX = ("Give the model_comparison_results.json that `sarcasm-dpo compare` wrote (run it again to write it "
               "anew), or --results '' for a card without test figures.")
# Settings that say where the folder goes after it is made, not what is in it.
PUBLISH_KEYS = ("push_to_hub", "private", "overwrite")
# Licenses of the base models this project names; any other base is marked "other" until the user says.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "Qwen/Qwen2.5-0.5B-Instruct": "apache-2.0"}
DATASETS = {
    "gen": "GEN (Sarcasm Corpus V2, Oraby et al. 2016: sarcastic and not-sarcastic forum posts)",
    "isarcasmeval": "iSarcasmEval (SemEval-2022 Task 6: tweets labelled by their authors)",
}


def hub_base_id(base: str) -> str | None:
    """The Hub id of the base model: the id itself, or the model a known offline fallback file stands for."""
    from ..model_route import FALLBACKS

    for hub_id, fallback in FALLBACKS.items():
        if Path(base).name == fallback.filename:
            return hub_id
    if os.path.exists(os.path.expanduser(base)):
        return None  # a local folder: no Hub id to name
    return base


def training_record(adapter: Path) -> tuple[str, dict]:
    """(stage, record) of the run that wrote the adapter: DPO's or SFT's summary. ("unknown", {}) only for an
    adapter from elsewhere, with no record and no COMPLETE.json: a finished folder that lost its record, or a
    record of the wrong shape, is an error (models.recorded_run), not a card of defaults."""
    from ..atomic import DamagedRecord
    from ..models import RECORD_FIX, recorded_run
    from . import STAGES

    found = recorded_run(adapter)
    if found is None:
        return "unknown", {}
    path, record = found
    best = record.get("best_val")
    if best is not None and not isinstance(best, dict):
        raise DamagedRecord(path, "its best_val (the validation metrics the card shows) is not an object", RECORD_FIX)
    for name, value in (_validation_block(record) or {}).items():  # what the card prints as numbers
        if name in ("accuracy", "f1", "roc_auc", "threshold") and value is not None and \
                (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DamagedRecord(path, f"its validation {name} is {json.dumps(value, default=str)[:60]} where a "
                                      "number belongs", RECORD_FIX)
    return next((name for name, stage in STAGES.items() if stage.record == path.name), "unknown"), record


def comparison_for(adapter: Path, results_path: str | None,
                   adapter_sha256: str | None = None) -> tuple[dict | None, str | None]:
    """(comparison results, the model key in them) when the results scored this very adapter: they name its
    folder, and the checksum compare recorded for it (its COMPLETE.json "inputs") is the adapter's now
    (`adapter_sha256`: rundir.input_identity of the folder; computed here when not given).

    No file there: a note, and a card without test figures (compare may not have run). A file that is not
    a comparison's results: an error, rather than a card that silently leaves them out. Results that scored
    another version of the folder (the adapter was retrained at the same path since): their figures are not
    this model's, so a note and a card without them, or an error when the user named the file (--results)."""
    if not results_path:
        return None, None
    from ..settings import ExportSettings, default_of

    typed = results_path != default_of(ExportSettings, "results")  # a path the user typed: errors, not notes
    path = Path(results_path)
    if not path.exists():
        if typed:
            raise UserError(f"--results {path} does not exist; give the model_comparison_results.json that "
                            "`sarcasm-dpo compare` wrote, or --results '' for a card without test figures.")
        print(f"Note: no comparison results at {path}; the model card will carry no test figures.", file=sys.stderr)
        return None, None
    from ..inputs import read_input_text
    from .compare import check_results_record

    try:
        results = json.loads(read_input_text(path, "Comparison results"))
    except ValueError as exc:
        raise UserError(f"--results {path} is not valid JSON ({str(exc).splitlines()[0][:200]}); give the "
                        "model_comparison_results.json that `sarcasm-dpo compare` wrote, or --results '' for none.") from None
    paths = results.get("model_paths") if isinstance(results, dict) else None
    if not isinstance(paths, dict):
        raise UserError(f"--results {path} is not the results of `sarcasm-dpo compare` (no 'model_paths' object); give "
                        "its model_comparison_results.json, or --results '' for none.")
    for key, folder in paths.items():
        try:
            if not isinstance(folder, str) or Path(folder).resolve() != adapter.resolve():
                continue
        except OSError:
            continue
        missing = [k for k in ("models", "test_set") if not isinstance(results.get(k), dict)]
        if missing or not isinstance(results["models"].get(key), dict):
            raise UserError(f"--results {path} names this adapter ({key}) but lacks its figures (missing: "
                            f"{missing or [f'models.{key}']}); run `sarcasm-dpo compare` again, or pass --results ''.")
        # Every figure the card prints, checked before anything is merged or written (a hand-edited "high"
        # where a number belongs failed in the card's formatting, after the weights were written).
        check_results_record(results, path, fix=RESULTS_FIX)
        if adapter_sha256 is None:
            adapter_sha256 = adapter_identity(adapter)
        scored = scored_adapter_sha256(path, key)
        if scored is None:
            print(f"Note: {path} records no checksum of the adapters it scored (it has no COMPLETE.json of "
                  "`sarcasm-dpo compare` beside it, or one from an older version); its test figures go in the card "
                  f"because it names {adapter}, not because they are known to be of these weights.", file=sys.stderr)
        elif scored != adapter_sha256:
            why = (f"{path} scored another version of {adapter} (its {key} model): the adapter's weights or config "
                   "have changed since that comparison (retrained at the same path?), so its test figures are not "
                   "this model's")
            if typed:
                raise UserError(f"--results {why}. Run `sarcasm-dpo compare` on the adapter as it is now, or pass "
                                "--results '' for a card without test figures.")
            print(f"Note: {why}; the model card will carry no test figures (run `sarcasm-dpo compare` again to "
                  "measure this adapter).", file=sys.stderr)
            return None, None
        return results, key
    return None, None


def adapter_identity(adapter: Path) -> str:
    """The checksum of an adapter's weights and config, as every stage records the adapters it reads."""
    from ..rundir import input_identity

    return input_identity({"adapter": adapter})["adapter"]


def scored_adapter_sha256(results_path: Path, key: str) -> str | None:
    """The checksum of the adapter `key` ("sft", "dpo") that the comparison beside `results_path` recorded when
    it ran: compare's COMPLETE.json lists its results file and records its inputs under the setting that named
    each adapter (sft_model, dpo_model: stages/compare.inputs_of). None where nothing records it (no such
    marker, or one from a version that recorded no inputs); "" where its inputs lack this adapter (never equal
    to a checksum: the figures are not known to be of it)."""
    from ..atomic import read_complete

    record = read_complete(results_path.parent) or {}
    listed = record.get("files")
    inputs = record.get("inputs")
    if record.get("stage") != "compare" or not isinstance(listed, dict) or results_path.name not in listed \
            or not isinstance(inputs, dict):
        return None
    recorded = inputs.get(f"{key}_model")
    return recorded if isinstance(recorded, str) else ""


def export_threshold(stage_record: dict, results: dict | None, key: str | None,
                       adapter: Path | None = None) -> tuple[float, str]:
    """The decision threshold an export records, and where it was read: the adapter's threshold.json (chosen on
    validation by its training stage) first, then the comparison results, then the training record. (predict and
    the Python API read an adapter's or an export's own record: detector.recorded_threshold.)"""
    from ..thresholds import read_threshold

    chosen = read_threshold(adapter)
    if chosen is not None:
        return float(chosen["threshold"]), (f"threshold.json, chosen on the {chosen['split']} split by "
                                            f"{chosen['criterion']}" + "".join(f"; {chosen[k]}" for k in ("reason", "note")
                                                                               if chosen.get(k)))
    if results is not None and "threshold" in results["models"][key]:
        return float(results["models"][key]["threshold"]), f"comparison results, models.{key}.threshold"
    validation = _validation_block(stage_record)
    if validation and "threshold" in validation:
        # Not chosen on validation: the threshold those metrics were computed at (an adapter with no threshold.json,
        # from elsewhere or an older version). A finished folder that lost its threshold.json never gets here.
        return float(validation["threshold"]), (f"the threshold its training record's validation metrics "
                                                f"({validation['split']}) were computed at; none was chosen on "
                                                "validation")
    raise UserError("The adapter's records hold no decision threshold (no comparison results naming it, no "
                    "validation metrics in its training summary); export needs the threshold the run used. "
                    "Run `sarcasm-dpo compare` on it, or export an adapter made by `sarcasm-dpo sft`/`dpo`.")


def model_card(info: dict, usage: str) -> str:
    """README.md: Hub metadata, then what the model is, its measured numbers, how to use it, and its limits."""
    import yaml

    meta = {"library_name": "transformers", "license": info["license"], "pipeline_tag": "text-generation",
            "tags": ["sarcasm-detection", "text-classification", "lora", "sft", "dpo", "sarcasm-dpo"],
            "datasets": [DATASETS["gen"], DATASETS["isarcasmeval"]], "language": ["en"]}
    if info["base_hub_id"]:
        meta["base_model"] = info["base_hub_id"]
    test = info.get("test")
    if test:
        # The figures at the threshold this model labels at (_test_block), and the metric names say which: ROC-AUC
        # alone does not depend on a threshold.
        at = f" at threshold {test['threshold']:.3f}"
        metrics = [{"type": name, "value": round(test["metrics"][name], 4),
                    "name": f"{label}{at if name != 'roc_auc' else ''}"
                            + (f" (95% CI {test['metrics'][name + '_ci'][0]:.3f}-{test['metrics'][name + '_ci'][1]:.3f})"
                               if f"{name}_ci" in test["metrics"] else "")}
                   for name, label in (("accuracy", "Accuracy"), ("f1", "F1 (sarcastic)"), ("roc_auc", "ROC-AUC"))
                   if test["metrics"].get(name) is not None]
        meta["model-index"] = [{"name": info["name"], "results": [{
            "task": {"type": "text-classification", "name": "Sarcasm detection"},
            "dataset": {"name": f"GEN test split ({test['n']} items)", "type": "sarcasm-v2-gen"},
            "metrics": metrics}]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {info['name']}", "",
             f"A sarcasm detector made by sarcasm-dpo from "
             f"`{info['base_hub_id'] or info['base_model']}`: LoRA "
             f"{'supervised fine-tuning then DPO' if info['stage'] == 'dpo' else 'supervised fine-tuning'}, "
             f"merged into the base weights (saved as {info['dtype']}). It answers one question with one token, "
             "and P(sarcastic) is the softmax over the logits of the two answer tokens at the answer position.", ""]
    if info["base_model"] != info["base_hub_id"]:
        note = (" (de-quantized from that GGUF file, so they differ slightly from the Hub model's own weights)"
                if info["base_model"].endswith(".gguf") else "")
        lines += [f"Base weights loaded from `{Path(info['base_model']).name}`{note}.", ""]
    if info["stage"] == "dpo" and info.get("dpo_kept_sft"):
        lines += ["DPO did not raise validation F1 above the SFT start, so its stage kept the SFT adapter: these "
                  "are the SFT weights.", ""]
    lines += ["## Prompt", "",
              "One user turn, rendered with the tokenizer's chat template and the generation prompt:", "", "```text",
              info["question"], "```", "",
              f"Answer tokens: `{info['label_words'][1]}` (sarcastic, id {info['label_token_ids'][1]}) and "
              f"`{info['label_words'][0]}` (not sarcastic, id {info['label_token_ids'][0]}). A text is labelled "
              f"sarcastic when P(sarcastic) >= {info['threshold']} (the threshold the run used: "
              f"{info['threshold_source']}; also in `{EXPORT_INFO}`).", "",
              "## Use it with plain transformers", "", "```python", usage, "```", "",
              "Or with this project: `sarcasm-dpo predict --model THIS_FOLDER --input texts.txt`.", "",
              "## Measured results", ""]
    if test:
        lines += _test_lines(test, info["threshold"])
    else:
        lines += ["No comparison run of this adapter as it is was given, so there are no test-set figures here "
                  "(run `sarcasm-dpo compare`, then export with `--results`).", ""]
    val = info.get("validation")
    if val:
        at = val.get("at_threshold")
        lines += [f"Validation ({val['split']}, used for model selection), labelled at P(sarcastic) >= "
                  f"{fmt(val.get('threshold', 0.5))}: accuracy {fmt(val['accuracy'])}, F1 {fmt(val['f1'])}, "
                  f"ROC-AUC {fmt(val.get('roc_auc'))}, {val.get('n', '?')} texts."
                  + (f" At this model's threshold, {fmt(at['threshold'])}: accuracy {fmt(at['accuracy'])}, F1 "
                     f"{fmt(at['f1'])}, balanced accuracy {fmt(at['balanced_accuracy'])}." if at else ""), ""]
    lines += ["## Intended use and limits", "",
              "- For research on sarcasm detection in short English texts and as a baseline to compare against. "
              "Not for decisions about people (moderation, hiring, credit): the labels are noisy and sarcasm "
              "depends on context the model never sees.",
              "- Trained on forum posts (GEN) and tweets (iSarcasmEval); other registers, languages, and texts "
              "longer than the training texts are out of distribution.",
              "- The figures above come from one run, one seed and the sample sizes in `sarcasm_dpo.json`; "
              "a small model at a small budget. A TF-IDF + logistic regression baseline is listed where the "
              "comparison ran it: check it before trusting the model over it.",
              ("- The threshold was chosen on the validation split (see above), never on the test split; it was "
               "not tuned for any cost of errors." if info["threshold_source"].startswith("threshold.json") else
               "- The threshold is the run's own default; it was not tuned for any cost of errors."), ""]
    return "\n".join(lines)


def _test_table(rows: dict, key_name: str, thresholds: dict | None) -> list[str]:
    """The card's table of test rows; with `thresholds` ({name: threshold}), a column saying each row's."""
    head = "| model |" + (" threshold |" if thresholds is not None else "")
    lines = [head + " accuracy [95% CI] | F1 sarcastic [95% CI] | macro F1 | ROC-AUC |",
             "|---|" + ("---|" if thresholds is not None else "") + "---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name}{' (this model)' if name == key_name else ''} | "
                     + (f"{thresholds.get(name, 0.5):.3f} | " if thresholds is not None else "")
                     + f"{m['accuracy']:.3f} [{m['accuracy_ci'][0]:.3f}, {m['accuracy_ci'][1]:.3f}] | {m['f1']:.3f} "
                       f"[{m['f1_ci'][0]:.3f}, {m['f1_ci'][1]:.3f}] | {fmt(m.get('macro_f1'))} | {fmt(m.get('roc_auc'))} |")
    return lines + [""]


def _test_lines(test: dict, threshold: float) -> list[str]:
    """The card's test figures: first as the models are used, each at its own validation threshold (this one at
    the threshold it labels with), then at 0.5 for every model, labelled as such. A comparison from before
    models recorded thresholds has only the 0.5 figures: they are shown, and said to be at 0.5."""
    intro = f"Held-out GEN test split, {test['n']} items (of {test['n_total']}), scored once; 95% bootstrap intervals"
    if test["at"] == "validation threshold":
        lines = [f"{intro}, each model labelled at its own threshold chosen on validation and recorded beside its "
                 f"adapter, as it is used (models without one at 0.5; this model at {test['threshold']:.3f}); from "
                 f"`{test['source']}`:", "", *_test_table(test["rows"], test["key"], test["thresholds"])]
        if abs(test["threshold"] - threshold) > 1e-12:
            lines += [f"Note: the comparison decided this model at {test['threshold']!r}, but it now records "
                      f"{threshold!r} (the threshold above, and in `{EXPORT_INFO}`): its threshold.json was rewritten "
                      "since; compare it again for figures at the threshold it labels with.", ""]
        lines += [f"- {verdict} (exact McNemar test, each model at its own threshold)"
                  for verdict in test["verdicts"].values()]
        half = test.get("at_0.5")
        if half:
            lines += ["", "The same items with every model at P(sarcastic) >= 0.5 instead (not the threshold this "
                      "model labels at):", "", *_test_table(half["rows"], test["key"], None)]
            lines += [f"- at 0.5: {verdict} (exact McNemar test)" for verdict in half["verdicts"].values()]
        return lines + [""]
    differs = "" if threshold == 0.5 else (f" This model labels at {threshold:.3f}, so its figures at its own "
                                           "threshold differ; run `sarcasm-dpo compare` again to measure them.")
    return [f"{intro}, every model labelled at P(sarcastic) >= 0.5 (the comparison records no figures at the models' "
            f"own validation thresholds); from `{test['source']}`.{differs}", "",
            *_test_table(test["rows"], test["key"], None),
            *[f"- at 0.5: {verdict} (exact McNemar test)" for verdict in test["verdicts"].values()], ""]


def usage_snippet(question: str, no_id: int, yes_id: int, threshold: float, max_text_tokens: int,
                  folder: str = "THIS_FOLDER") -> str:
    """Eight lines of plain transformers that compute P(sarcastic) the way the project's scorer does, the cut of
    a long text included (prompts.truncate_text); only a text spelling a special token is read otherwise."""
    return "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok, model = AutoTokenizer.from_pretrained({folder!r}), AutoModelForCausalLM.from_pretrained({folder!r})",
        "text = 'Oh great, another Monday.'",
        f"ids = tok(text, add_special_tokens=False).input_ids  # a text over {max_text_tokens} tokens is cut, as in training:",
        f"text = text if len(ids) <= {max_text_tokens} else tok.decode(ids[:{max_text_tokens}], skip_special_tokens=True).rstrip() + ' ...'",
        f"prompt = tok.apply_chat_template([{{'role': 'user', 'content': {question!r}.format(text=text)}}], tokenize=False, add_generation_prompt=True)",
        "logits = model(**tok(prompt, return_tensors='pt', add_special_tokens=False)).logits[0, -1].float()  # softmax in float32, as the scorer",
        f"p_sarcastic = logits[[{no_id}, {yes_id}]].softmax(-1)[1].item(); print(p_sarcastic, p_sarcastic >= {threshold})",
    ])


def _test_block(results: dict, key: str, results_path: str) -> dict:
    """The card's test figures for model `key`: from compare's block at each model's own validation threshold
    (the threshold the export labels with) where the results have it ("at": "validation threshold", the 0.5
    block beside it as "at_0.5"), else from the 0.5 block ("at": "0.5"). "metrics", "threshold" and "verdicts"
    are this model's headline: the model-index and the first table of the card."""
    from ..stages.compare import NAMES, OWN

    info = results["test_set"]

    def named(block: dict) -> tuple[dict, dict]:
        return ({NAMES.get(k, k): m for k, m in block["models"].items()},
                {pair: t["verdict"] for pair, t in block.get("significance", {}).items()})

    own = results.get(OWN)
    lead = own if own and key in own.get("models", {}) else results
    rows, verdicts = named(lead)
    block = {"n": info["n"], "n_total": info.get("n_total", info["n"]), "metrics": lead["models"][key],
             "threshold": float(lead["models"][key].get("threshold", 0.5)),
             "at": "validation threshold" if lead is own else "0.5", "rows": rows,
             "thresholds": {NAMES.get(k, k): float(m.get("threshold", 0.5)) for k, m in lead["models"].items()},
             "key": NAMES.get(key, key), "verdicts": verdicts, "source": results_path}
    if lead is own:
        half_rows, half_verdicts = named(results)
        block["at_0.5"] = {"rows": half_rows, "verdicts": half_verdicts}
    return block


def _validation_block(stage_record: dict, adapter: Path | None = None) -> dict | None:
    """The saved adapter's validation metrics from its training record (at the threshold they were computed at,
    0.5), with, given the adapter, the same validation at its recorded threshold (its threshold.json)."""
    best = stage_record.get("best_val") or {}
    if "f1" in best:
        block = {"split": "GEN validation", **best}
    else:  # DPO: per validation set; the first, GEN validation, drives selection
        block = next(({"split": name, **values} for name, values in best.items()
                      if isinstance(values, dict) and "f1" in values), None)
    if block is None or adapter is None:
        return block
    from ..thresholds import read_threshold

    chosen = read_threshold(adapter) or {}
    at = chosen.get("val_metrics_at_threshold")
    if isinstance(at, dict) and all(isinstance(at.get(k), (int, float)) for k in ("accuracy", "f1", "balanced_accuracy")):
        block["at_threshold"] = {"threshold": float(chosen["threshold"]),
                                 **{k: float(at[k]) for k in ("accuracy", "f1", "balanced_accuracy")}}
    return block


def push(folder: Path, repo: str, private: bool) -> str:
    """Upload `folder` to the Hub repo; a clear error (exit 2) when the hub is out of reach, the folder intact."""
    from ..models import OFFLINE_MODE, hub_unavailable

    again = f"sarcasm-dpo export ... --output_dir {folder} --push_to_hub {repo}"
    reason = hub_unavailable()
    if reason:
        why = "HF_HUB_OFFLINE is set, so the hub is not asked" if reason == OFFLINE_MODE else \
            f"the hub does not answer ({reason})"
        raise UserError(f"Cannot push to the Hugging Face Hub repo {repo}: {why}. The "
                        f"export in {folder} is complete and untouched; upload it later with the same command "
                        f"({again}) or `huggingface-cli upload {repo} {folder}`.")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo,
                                   commit_message="Upload sarcasm detector exported by sarcasm-dpo")
    except Exception as exc:  # noqa: BLE001 - auth, permissions, network: all the user's to fix, nothing lost
        raise UserError(f"Uploading {folder} to {repo} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
                        f"The export in {folder} is complete; log in (`huggingface-cli login` or HF_TOKEN) and "
                        f"retry: {again}") from None
    return getattr(commit, "commit_url", f"https://huggingface.co/{repo}")


def run(s) -> dict:
    """Merge, save, describe; then push if asked. Re-running with the same settings only pushes."""
    import torch

    from ..atomic import (check_output_dir, file_sha256, input_differences, is_complete_for, missing_outputs,
                          read_complete)
    from ..detector import default_text_tokens, recorded_text_tokens
    from ..models import adapter_base_model, check_adapter_dir, check_adapter_fits, load_model
    from ..prompts import LABEL_WORDS, QUESTION
    from ..rundir import staged

    adapter = check_adapter_dir(s.adapter)
    config = {k: v for k, v in dataclasses.asdict(s).items() if k not in PUBLISH_KEYS}
    out = Path(s.output_dir)
    # What the folder is made from, by checksum: an export of the adapter as it was before it was retrained at
    # the same path (or with other test figures in its card) is not this export, though the settings are the same.
    inputs = {"adapter": adapter_identity(adapter)}
    results, key = comparison_for(adapter, s.results, inputs["adapter"])
    if results is not None:
        inputs["results"] = file_sha256(s.results)
    if is_complete_for(out, config) and not input_differences(read_complete(out) or {}, inputs) \
            and not missing_outputs(out):
        print(f"[export] {out} already holds this export; not redone.")
    else:
        base = s.base_model or adapter_base_model(adapter)
        check_model_folder(base)
        refuse_adapter_on_export(base, adapter, "--base_model")
        stage, stage_record = training_record(adapter)
        threshold, threshold_source = export_threshold(stage_record, results, key, adapter)
        # Everything sarcasm_dpo.json says, read before minutes of merging: a record that does not read is an
        # error now, not after the weights were written.
        short = (hub_base_id(base) or Path(base).name).rsplit("/", 1)[-1]
        info = {"name": f"{short} sarcasm detector ({'SFT + DPO' if stage == 'dpo' else stage.upper()}, sarcasm-dpo)",
                "stage": stage, "adapter": str(adapter.resolve()), "base_model": base, "base_hub_id": hub_base_id(base),
                "license": s.license or KNOWN_LICENSES.get(hub_base_id(base) or "", "other"), "dtype": s.dtype,
                "question": QUESTION, "label_words": list(LABEL_WORDS),
                "threshold": threshold, "threshold_source": threshold_source,
                "max_text_tokens": recorded_text_tokens(None, str(adapter)) or default_text_tokens(),
                "test": _test_block(results, key, s.results) if results else None,
                "validation": _validation_block(stage_record, adapter), "training_config": stage_record.get("config"),
                "dpo_kept_sft": stage == "dpo" and stage_record.get("improved_over_sft") is False}
        check_adapter_fits(adapter, base)
        if not s.overwrite:
            refuse_half_export(out)
            refuse_stale_export(out, config, inputs, s)
        check_output_dir(out, config, overwrite=s.overwrite, inputs=inputs)
        print(f"[export] merging {adapter} into {base} -> {out} ({s.dtype})")
        model, tokenizer = load_model(base, adapter=str(adapter), device=torch.device("cpu"))
        merged = model.merge_and_unload().to(getattr(torch, s.dtype))
        # Every file goes into a staging folder that replaces --output_dir whole at the end (as split and compare
        # write theirs): an export that fails or is killed half-way leaves the previous folder as it was, never
        # weights without the threshold and card that go with them.
        with staged(out) as stage_dir:
            write_export(stage_dir, merged, tokenizer, config, info, inputs)
        print(f"[export] wrote {out}: merged weights, tokenizer with chat template, {EXPORT_INFO} (threshold "
              f"{threshold}), {CARD}")
    pushed = push(out, s.push_to_hub, s.private) if s.push_to_hub else None
    if pushed:
        print(f"[export] pushed {out} to {pushed}")
    return {"output_dir": str(out), "pushed": pushed}


def refuse_half_export(out: Path) -> None:
    """An export that an older version stopped while writing into the folder itself (sarcasm_dpo.json, no
    COMPLETE.json) is named as such. It is still refused without --overwrite, as any folder no finished run
    of ours holds: nothing says the other files in it are the export's (the swap would replace them all)."""
    from ..atomic import read_complete

    if out.is_dir() and (out / EXPORT_INFO).is_file() and read_complete(out) is None:
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        raise UserError(f"{out} holds an export that never finished ({EXPORT_INFO} but no COMPLETE.json; files: "
                        f"{', '.join(others[:8])}{', ...' if len(others) > 8 else ''}). Pass --overwrite to replace "
                        "everything in it with this export, or choose another --output_dir.")


def refuse_stale_export(out: Path, config: dict, inputs: dict, s) -> None:
    """An export of these settings made from other inputs (`inputs`: checksums of the adapter, and of the comparison
    results its card quotes) is named as such: its weights or card are of an adapter that is no longer there.
    Replaced only with --overwrite, as any finished output of another run is. A record from a version that kept
    no checksums is compared on settings only (atomic.input_differences)."""
    from ..atomic import input_differences, read_complete, settings_differences

    record = read_complete(out)
    if record is None or settings_differences(record, config):
        return  # another run's folder, or none: check_output_dir's rule and message
    changed = {name.removeprefix("input ") for name in input_differences(record, inputs)}
    what = [text for name, text in (
        ("adapter", f"the adapter {s.adapter} has changed since (its weights or config: retrained at the same path?)"),
        ("results", f"the comparison results its card quotes are not those it would quote now ({s.results}: "
                    "changed, or quoted then and not now, or the other way round)")) if name in changed]
    if what:
        raise UserError(f"{out} holds an export made with these settings but from other inputs, so its weights or "
                        f"model card are not those of the adapter as it is now: {'; '.join(what)}. Pass --overwrite "
                        "to export again into it, or choose another --output_dir.")


def write_export(out: Path, merged, tokenizer, config: dict, info: dict, inputs: dict) -> None:
    """The export's files into `out` (the staging folder): weights, tokenizer, sarcasm_dpo.json (`info` with
    the label token ids), the card, and COMPLETE.json last, with the checksums of what it was made from (`inputs`)."""
    from ..atomic import finish_output_dir, write_json, write_text
    from ..prompts import QUESTION, dated_template, label_token_ids
    from ..training.checkpoints import save_adapter

    # A template that states today's date is saved with the date the scorer pins (prompts.dated_template): plain
    # `apply_chat_template` on the export (the card's snippet, any user) then renders the scorer's prompt on any day.
    pinned = dated_template(tokenizer)
    if pinned is not None:
        tokenizer.chat_template = pinned
    save_adapter(merged, tokenizer, out)  # the stages' saver: scratch folder, usual file permissions
    no_id, yes_id = label_token_ids(tokenizer)
    info = {**info, "label_token_ids": [no_id, yes_id]}
    info = {key: info[key] for key in EXPORT_KEYS}  # sarcasm_dpo.json's keys in their documented order
    write_json(out / EXPORT_INFO, info)
    write_text(out / CARD, model_card(info, usage_snippet(QUESTION, no_id, yes_id, info["threshold"], info["max_text_tokens"])))
    finish_output_dir(out, config, {"stage": "export", "threshold": info["threshold"], "inputs": inputs})
