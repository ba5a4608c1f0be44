"""`sarcasm-dpo predict`: classify texts with a base model and an optional adapter (detector.py's
SarcasmDetector behind a command line).

Input is a text file (one text per line), a data file with a text column (`text`, iSarcasmEval's
`tweet`, ...; the README says which), or stdin; output is one JSON line per text: {"text", "p_sarcastic",
"label"}. A stopped run leaves the rows already printed, each whole; a rerun scores every text again. Where the
output cannot be written (a full disk under `> rows.jsonl`), the error names it and says how many rows reached it
whole (errors.stream_failure).

    echo "Oh great, another Monday." | sarcasm-dpo predict --adapter models/sft
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import STANDARD_OUTPUT, UserError, stream_failure


# Texts scored between two flushes of stdout: large enough that sorting by length still packs batches well.
STREAM_CHUNK = 512


def read_texts(path: str | None) -> list[str]:
    """The texts to classify: a data file's text column (data.TEXT_COLUMNS), else a file's or stdin's
    non-empty lines."""
    from ..data import TABLE_SUFFIXES, read_frame, text_column
    from ..inputs import check_input_file, decode_text, text_lines

    if path is not None:  # the path rule of every path setting (config._path), and `-` for stdin, as Unix tools take it
        if not path.strip():
            raise UserError("--input is empty: name the file to classify, or leave --input out (or give -) to read "
                            "standard input.")
        path = None if path == "-" else os.path.expanduser(path)
    if path is None:
        raw, where = sys.stdin.buffer.read(), "Standard input"
    else:
        p = check_input_file(path, "Input file", allow_empty=True)
        if p.suffix.lower() in TABLE_SUFFIXES:
            # A file as distributed may hold an empty text (iSarcasmEval's row 1063): left out, named on stderr,
            # as a text file's blank lines are; each output row carries its text.
            return text_column(read_frame(p), path, skip_empty=True).tolist()
        raw, where = p.read_bytes(), f"Input file {p}"
    return [line for line in text_lines(decode_text(raw, where)) if line.strip()]


def run(args) -> list[dict]:
    from ..detector import SarcasmDetector
    from ..scoring import NonFiniteScores
    from ..settings import check_predict_args

    # Before the input is read: without --model and --adapter, reading stdin would wait on a terminal first.
    check_predict_args(args.model, args.adapter, args.batch_size, args.max_text_tokens, args.device, args.threshold)
    texts = read_texts(args.input)  # bad input fails here, before minutes of loading a model
    if not texts:
        raise UserError("No texts to classify (the input is empty).")
    detector = SarcasmDetector.load(args.model, args.adapter, threshold=args.threshold,
                                    max_text_tokens=args.max_text_tokens, batch_size=args.batch_size,
                                    device=args.device)
    rows = []
    written = 0  # rows known to have reached stdout whole: those before its last successful flush
    # Rows go out a chunk at a time, in input order: a long run shows progress to whoever reads the
    # stream, and a stop (Ctrl-C, a killed job) keeps every row already printed.
    chunk = max(STREAM_CHUNK, args.batch_size)
    try:
        for start in range(0, len(texts), chunk):
            scored = detector.predict(texts[start:start + chunk])
            try:
                for row in scored:
                    print(json.dumps(row, ensure_ascii=False))
                    rows.append(row)
                sys.stdout.flush()
            except BrokenPipeError:  # the reader left (`| head`): the CLI stops quietly, as Unix tools do
                raise
            except OSError as exc:  # a full disk, a quota, an I/O error under the file stdout goes to
                raise stream_failure(exc, STANDARD_OUTPUT, _fileno(sys.stdout),
                                     failed_note(written, start + len(scored), len(texts))) from None
            written = len(rows)
    except NonFiniteScores as exc:  # a later chunk's scores: the rows before it are out already
        if not rows:
            raise
        raise UserError(f"{exc} It was met after {len(rows)} of {len(texts)} texts: the {len(rows)} rows printed "
                        "before it are whole JSON lines, but they come from the same model, so treat them with the "
                        "same doubt.") from None
    except KeyboardInterrupt:
        # predict writes no files: what a stop leaves is the rows on stdout, and a rerun starts from the first
        # text. Saying how far it got lets whoever stopped it score only the rest.
        print(stopped_note(len(rows), len(texts)), file=sys.stderr)
        raise
    return rows


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (io.StringIO, a test's capture)
        return None


def failed_note(written: int, scored: int, total: int) -> str:
    """What a predict whose rows could not be written leaves: the `written` rows before stdout's last successful
    flush are whole; of what came after them (`scored` texts in all), some may be missing and the last cut short."""
    kept = (f"the first {written} rows reached standard output whole, and what follows them may be cut short: keep "
            f"its first {written} lines only" if written else
            "no row is known to have reached standard output whole: keep none of what it holds")
    go_on = f"; to score only the rest, give it the texts after the first {written}" if 0 < written < total else ""
    return f"predict had scored {scored} of {total} texts; {kept}. A rerun scores every text again{go_on}."


def stopped_note(done: int, total: int) -> str:
    """What a stopped predict leaves: whole rows on stdout (each line is printed at once), and where to go on."""
    rest = f"; to score only the rest, give it the texts after the first {done}" if 0 < done < total else ""
    return (f"predict stopped after {done} of {total} texts: the {done} rows printed are whole JSON lines, in input "
            f"order; a rerun scores every text again{rest}.")
