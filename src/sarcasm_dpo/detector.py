"""A trained detector from Python: the model, its adapter, and the decisions its run recorded.

    from sarcasm_dpo.detector import SarcasmDetector
    detector = SarcasmDetector.load(adapter="models/smollm2/dpo_enhanced")   # or model="exported/"
    detector.predict(["Oh great, another Monday."])
    # [{'text': 'Oh great, another Monday.', 'p_sarcastic': 0.87..., 'label': 1}]

`sarcasm-dpo predict` is this class behind a command line. Unless told otherwise it uses what the
run that made the model recorded: the threshold chosen on validation, and the text length the model
was trained and validated with, so that a text gets the prompt its threshold was chosen on (a model
trained at 128 tokens and scored at 256 sees long texts it never saw, at a threshold chosen
without them). What the run recorded is never replaced by a default in silence: an adapter or export
folder whose COMPLETE.json lists a file it no longer holds, an export that never finished, and a run
record of the wrong shape are errors that say what to do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError

EXPORT_INFO = "sarcasm_dpo.json"  # what `sarcasm-dpo export` writes beside the merged weights


def default_text_tokens() -> int:
    """The settings' default text length, for a model whose run recorded none."""
    from .settings import Common, default_of

    return default_of(Common, "max_text_tokens")


def _local_folder(model: str | os.PathLike | None) -> Path | None:
    """`model` as a local folder, or None for a hub id, a .gguf file or nothing."""
    folder = Path(os.path.expanduser(str(model))) if model else None
    return folder if folder is not None and folder.is_dir() else None


def _export_stage(folder: Path) -> str | None:
    """The stage to name for a folder `sarcasm-dpo export` wrote (its record there, or in the marker's file list);
    None for another folder (atomic then names the stage from the folder's records)."""
    from .atomic import read_complete

    listed = (read_complete(folder) or {}).get("files")
    return "export" if (folder / EXPORT_INFO).is_file() or (isinstance(listed, dict) and EXPORT_INFO in listed) \
        else None


def check_model_folder(model: str | os.PathLike | None) -> None:
    """Refuse a local model folder of ours that is not whole, before it is used (predict, the detector, compare's
    --model, export's --base_model): an export that never finished (sarcasm_dpo.json but no COMPLETE.json: an
    older version stopped while writing into the folder itself) has weights without the threshold and length
    they go with; a finished folder that lost a file (atomic.require_whole) is as incomplete. A plain model
    folder (transformers' save_pretrained) has neither and is used as it is."""
    from .atomic import read_complete, require_whole

    folder = _local_folder(model)
    if folder is None:
        return
    if read_complete(folder) is None:
        if (folder / EXPORT_INFO).is_file():
            raise UserError(f"{folder} is an export that never finished: it holds {EXPORT_INFO} but no COMPLETE.json "
                            "(the export stopped while writing it), so its weights, threshold and model card may "
                            "not belong together. Run `sarcasm-dpo export` again into it (it replaces the folder "
                            "whole).")
        return
    require_whole(folder, stage=_export_stage(folder))


def _export_info(model: str | None) -> dict | None:
    """An exported model folder's record (`sarcasm-dpo export`), or None for anything else. A finished folder
    that lost a file is refused here too (the record may be the file it lost)."""
    folder = _local_folder(model)
    if folder is None:
        return None
    from .atomic import read_json, require_whole

    require_whole(folder, stage=_export_stage(folder))
    info = folder / EXPORT_INFO
    if not info.is_file():
        return None
    return read_json(info, fix="Export the model again, or pass --threshold and --max_text_tokens.", expect=dict)


def refuse_adapter_on_export(model: str | None, adapter: str | os.PathLike | None, flags: str = "--model") -> None:
    """An export already holds its adapter, merged into the base weights: an adapter on top of it (the same one
    again, or another trained on the base) would score a model that was never trained.

    Without `model`, the base the adapter records is what gets loaded (models.adapter_base_model), so that is
    the model checked: a base folder later replaced by an export (an export written over it) is refused too."""
    if not adapter:
        return
    if model:
        info = _export_info(model)
        if info is not None:
            raise UserError(f"{model} is an export ({EXPORT_INFO}): {info.get('adapter') or 'an adapter'} is already "
                            f"merged into its weights, so no adapter goes on top of it. Give {flags} {model} alone, "
                            "or the adapter with the base model it was trained on.")
        return
    from .models import adapter_base_model

    base = adapter_base_model(adapter)
    info = _export_info(os.path.expanduser(base))
    if info is not None:
        raise UserError(f"{adapter} records {base} as the base model it was trained on, but that folder now holds an "
                        f"export ({EXPORT_INFO}): {info.get('adapter') or 'an adapter'} is already merged into its "
                        f"weights, so this adapter would be applied on top of trained weights. Use the export alone "
                        f"({flags} {base}), or give {flags} the base model the adapter was trained on.")


def recorded_threshold(model: str | None, adapter: str | None = None) -> float:
    """The decision threshold the model records, else 0.5: an adapter folder's threshold.json (chosen on
    validation by its training stage), else an exported model folder's sarcasm_dpo.json (`sarcasm-dpo export`)."""
    from .thresholds import read_threshold

    record = read_threshold(adapter)
    if record is not None:
        return float(record["threshold"])
    info = _export_info(model)
    if info is None:
        return 0.5
    threshold = info.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise UserError(f"{Path(model) / EXPORT_INFO} records no decision threshold in [0, 1] (found {threshold!r}); "
                        "export the model again, or pass --threshold.")
    return float(threshold)


def recorded_text_tokens(model: str | None, adapter: str | None = None) -> int | None:
    """The text length the model was trained with, as its run recorded it: the adapter's run record, else
    an export's (`max_text_tokens`, or the training settings it keeps); None when nothing says."""
    from .models import run_settings

    candidates = []
    if adapter:  # a damaged or missing run record is an error: without it the length would silently be the default
        candidates.append((run_settings(adapter).get("max_text_tokens"), f"{adapter}'s run record"))
    info = _export_info(model)
    if info is not None:
        training = info.get("training_config") if isinstance(info.get("training_config"), dict) else {}
        candidates += [(info.get("max_text_tokens"), f"{Path(model) / EXPORT_INFO}"),
                       (training.get("max_text_tokens"), f"{Path(model) / EXPORT_INFO}")]
    for value, where in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where} records max_text_tokens {value!r}, not a positive whole number; pass "
                            "--max_text_tokens.")
        return value
    return None


def note_text_lengths(adapters: dict, max_text_tokens: int, doing: str, printer: Callable[[str], None] = print) -> None:
    """One line per adapter whose run recorded another text length than this `doing` ("comparison", "DPO run",
    "mining run") cuts texts at: every text still gets one prompt here, but a long one not the prompt the
    adapter was trained, and its threshold chosen, on. Called by every stage that loads an adapter at a
    --max_text_tokens of its own; `predict` and SarcasmDetector take the recorded length instead."""
    for name, folder in adapters.items():
        trained_at = recorded_text_tokens(None, str(folder))
        if trained_at is not None and trained_at != max_text_tokens:
            printer(f"Note: {name} ({folder}) was trained and validated with --max_text_tokens {trained_at}; this "
                    f"{doing} cuts texts at {max_text_tokens}, so longer texts get a prompt it was not trained on "
                    f"and its threshold not chosen on. Pass --max_text_tokens {trained_at} (or the config it was "
                    "trained with) to use it as it was validated.")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)  # stdout may carry predict's JSON lines: notes go beside them


class SarcasmDetector:
    """P(sarcastic) for texts, and a label at the model's threshold: one forward pass per batch, the prompt
    built by the tokenizer's chat template and the label tokens' probabilities read (scoring.py)."""

    def __init__(self, model, tokenizer, threshold: float = 0.5, max_text_tokens: int | None = None,
                 batch_size: int = 16):
        from .scoring import Scorer
        from .settings import check_scoring_args

        # numpy scalars become the Python numbers they hold (a float32 threshold from an array, say)
        batch_size, max_text_tokens, threshold = check_scoring_args(batch_size, max_text_tokens, threshold)
        self.threshold = float(threshold)
        self.max_text_tokens = max_text_tokens or default_text_tokens()
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size, max_text_tokens=self.max_text_tokens)

    @classmethod
    def load(cls, model: str | None = None, adapter: str | None = None, *, threshold: float | None = None,
             max_text_tokens: int | None = None, batch_size: int = 16, device: str | None = None,
             warn: Callable[[str], None] = _warn) -> "SarcasmDetector":
        """`model`: a hub id, folder (an `export`) or .gguf, None for the adapter's base; `adapter`: an sft or
        dpo output folder. `threshold` and `max_text_tokens`: None for what the run recorded (else 0.5 and
        the settings' default)."""
        from .atomic import marker_missing, read_complete
        from .model_route import route_model
        from .models import adapter_base_model, check_adapter_dir, load_model, pick_device
        from .settings import check_predict_args

        check_predict_args(model=model, adapter=adapter, batch_size=batch_size, max_text_tokens=max_text_tokens,
                           device=device, threshold=threshold)  # every rule on these values lives in settings.py
        # `~` as every path setting of the stages has it (config.normalise_paths): here for Python callers
        model, adapter = (os.path.expanduser(os.fspath(p)) if p else p for p in (model, adapter))
        # Before their records are read: a folder that is not whole is refused, not read with defaults.
        check_model_folder(model)
        if adapter:
            check_adapter_dir(adapter)
        refuse_adapter_on_export(model, adapter)
        if threshold is None:
            threshold = recorded_threshold(model, adapter)
        if max_text_tokens is None:
            max_text_tokens = recorded_text_tokens(model, adapter)
        model_ref = route_model(model) or adapter_base_model(adapter)
        if adapter and read_complete(adapter) is None:
            warn(f"Warning: {adapter} has {marker_missing(adapter)}: the run that wrote this adapter may not have "
                 "finished (or was stopped while saving), so it may not be the model you expect.")
        loaded, tokenizer = load_model(model_ref, adapter=adapter, device=pick_device(device))
        detector = cls(loaded, tokenizer, threshold=threshold, max_text_tokens=max_text_tokens, batch_size=batch_size)
        # Errors about its scores (scoring.NonFiniteScores) name what was loaded.
        detector.scorer.name = f"The adapter {adapter} (on {model_ref})" if adapter else f"The model {model_ref}"
        return detector

    def predict_proba(self, texts: Sequence[str]):
        """P(sarcastic) for each text, in input order (a numpy array of float64)."""
        return self.scorer.predict_proba(_checked_texts(texts))

    def predict(self, texts: Sequence[str]) -> list[dict]:
        """{"text", "p_sarcastic", "label"} for each text, in input order; label 1 at or above the threshold.

        The row is self-consistent: "p_sarcastic" is the score itself (a float64, whose JSON form reads back
        exactly), and "label" is that very number compared with the threshold (metrics.decide), so anyone
        checking p_sarcastic >= threshold on the printed row gets the label printed beside it. A rounded
        score could not promise that: 0.4999996 would print as 0.5 with label 0 at threshold 0.5. No row of
        a call is returned when any of its scores is not finite (NonFiniteScores): `predict` prints a chunk
        only after the whole chunk was scored, so it never prints a row with NaN in it.
        """
        from .metrics import decide

        texts = _checked_texts(texts)
        probs = self.scorer.predict_proba(texts)  # texts checked once, just above
        return [{"text": text, "p_sarcastic": float(p), "label": int(label)}
                for text, p, label in zip(texts, probs, decide(probs, self.threshold))]


def _checked_texts(texts) -> list[str]:
    """The texts as a list, refusing what would be scored as something else: one string (its characters
    would be the texts), items that are not strings, and empty texts (as the command line does)."""
    if isinstance(texts, (str, bytes)):
        raise UserError("texts must be a list of strings, not one string (its characters would each be scored): "
                        "pass [text].")
    if isinstance(texts, (dict, set, frozenset)) or hasattr(texts, "columns"):  # keys, no order, column names
        raise UserError(f"texts must be a list (or Series, array) of strings, not a {type(texts).__name__}: pass "
                        "the text column itself, e.g. frame['text'].")
    try:
        texts = list(texts)
    except TypeError:
        raise UserError(f"texts must be a list of strings, got {type(texts).__name__}.") from None
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise UserError(f"texts must be strings; item(s) {wrong[:10]} are {type(texts[wrong[0]]).__name__}"
                        f"{' and more' if len(wrong) > 10 else ''}.")
    unreadable = [i for i, t in enumerate(texts) if "\x00" in t or not t.encode("utf-8", "ignore").decode() == t]
    if unreadable:  # a NUL byte or a lone surrogate: what the command line refuses as not UTF-8 text
        raise UserError(f"texts {unreadable[:10]} are not valid text (a NUL character, or a lone surrogate that "
                        "UTF-8 cannot hold).")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserError(f"texts {empty[:10]}{' and more' if len(empty) > 10 else ''} are empty; a detector has "
                        "nothing to read there. Remove them.")
    return texts
