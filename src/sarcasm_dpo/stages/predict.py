"""`sarcasm-dpo predict`: classify texts with a base model and an optional adapter.

Input is a text file (one text per line), a CSV/TSV/JSON/JSONL file with a `text` column (or
iSarcasmEval's `tweet`), or stdin; output is one JSON line per text: {"text", "p_sarcastic", "label"}.

    echo "Oh great, another Monday." | sarcasm-dpo predict --adapter models/sft
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError


# Texts scored between two flushes of stdout: large enough that sorting by length still packs batches well.
STREAM_CHUNK = 512


def read_texts(path: str | None) -> list[str]:
    from ..inputs import check_input_file, decode_text

    if path is None:
        lines = decode_text(sys.stdin.buffer.read(), "Standard input").splitlines()
        return [line for line in lines if line.strip()]
    p = check_input_file(path, "Input file", allow_empty=True)
    from ..data import TABLE_SUFFIXES

    if p.suffix.lower() in TABLE_SUFFIXES:
        from ..data import read_frame, text_column

        return text_column(read_frame(p), path).tolist()
    return [line for line in decode_text(p.read_bytes(), f"Input file {p}").splitlines() if line.strip()]


def recorded_threshold(model: str | None, adapter: str | None = None) -> float:
    """The decision threshold the model records, else 0.5: an adapter folder's threshold.json (chosen on
    validation by its training stage), else an exported model folder's sarcasm_dpo.json (`sarcasm-dpo export`)."""
    from ..thresholds import read_threshold

    record = read_threshold(adapter)
    if record is not None:
        return float(record["threshold"])
    info = Path(model or "") / "sarcasm_dpo.json"
    if model and info.is_file():
        try:
            return float(json.loads(info.read_text())["threshold"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{info} is not a valid export record (no numeric 'threshold'); pass --threshold.") from None
    return 0.5


def run(args) -> list[dict]:
    from ..models import adapter_base_model, load_model, pick_device
    from ..scoring import Scorer
    from ..settings import check_predict_args, check_threshold

    check_predict_args(args)  # every rule on the flags lives in settings.py
    threshold = args.threshold if args.threshold is not None else recorded_threshold(args.model, args.adapter)
    check_threshold(threshold)  # the one an export records must be a probability too
    from ..model_route import route_model

    model_ref = route_model(args.model) or adapter_base_model(args.adapter)
    if args.adapter:
        from ..atomic import read_complete

        if read_complete(args.adapter) is None:  # stdout carries the JSON lines; the warning goes beside them
            print(f"Warning: {args.adapter} has no COMPLETE.json: the run that wrote this adapter may not have "
                  "finished (or was stopped while saving), so it may not be the model you expect.", file=sys.stderr)
    texts = read_texts(args.input)
    if not texts:
        raise UserError("No texts to classify (the input is empty).")
    model, tokenizer = load_model(model_ref, adapter=args.adapter, device=pick_device(args.device))
    scorer = Scorer(model, tokenizer, batch_size=args.batch_size, max_text_tokens=args.max_text_tokens)
    rows = []
    # Rows go out a chunk at a time, in input order: a long run shows progress to whoever reads the
    # stream, and a stop (Ctrl-C, a killed job) keeps every row already printed.
    chunk = max(STREAM_CHUNK, args.batch_size)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        for text, p in zip(part, scorer.predict_proba(part)):
            row = {"text": text, "p_sarcastic": round(float(p), 6), "label": int(p >= threshold)}
            print(json.dumps(row, ensure_ascii=False))
            rows.append(row)
        sys.stdout.flush()
    return rows
