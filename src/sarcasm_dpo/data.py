"""Datasets: loaders for the formats users have (GEN, iSarcasmEval, generic text/label, and other public sets
as distributed), validation with clear errors, and the split.

Every loader returns the same table: `text`, `label` (1 = sarcastic, 0 = not), `source`, `id`
(the original id). Problems in a file are reported the way a person fixes them: which columns
were found and which were expected, which rows (1 = the first row after the header) hold an
unknown label or an empty text, which texts carry conflicting labels (dropped with their rows named,
as `split` drops them), on which line a stray quote opens a quoted text that swallows rows.

    sarcasm-dpo split --data_dir ../shared/data --output_dir data/splits
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from .atomic import file_sha256  # noqa: F401 - data.file_sha256 is read by compare and tests
from .errors import UserError
from .inputs import check_input_file, read_input_text, text_lines

COLUMNS = ["text", "label", "source", "id"]
GEN_RELPATH = "sarcasm_v2/GEN-sarc-notsarc.csv"
ISARCASM_RELPATH = "isarcasmeval/train.En.csv"

# Label spellings accepted in generic files; anything else is an error that lists the rows.
LABEL_VALUES = {
    "1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0, "yes": 1, "no": 0,
    "sarc": 1, "notsarc": 0, "sarcastic": 1, "not_sarcastic": 0, "not sarcastic": 0, "non_sarcastic": 0,
}
# The label spellings of the two datasets this project splits, as their files write them.
GEN_LABELS = {"sarc": 1, "notsarc": 0}
ISARCASM_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0}

SPLIT_FILES = {
    "gen_train": "gen_train.csv",
    "gen_val": "gen_val.csv",
    "gen_test": "gen_test.csv",
    "isarcasm_train": "isarcasm_train.csv",
    "isarcasm_val": "isarcasm_val.csv",
}


def normalise(text: str) -> str:
    """Case-folded, whitespace-collapsed: the form used for duplicate and leakage checks."""
    return " ".join(str(text).casefold().split())


def row_numbers(index, limit: int = 10) -> str:
    """Positions 0.. as a person counts them (1 = the first): "2, 5, 9 and 3 more"."""
    rows = [str(int(i) + 1) for i in list(index)[:limit]]
    more = len(index) - limit
    return ", ".join(rows) + (f" and {more} more" if more > 0 else "")


# What a data file's name says about how to read it; any other name is read as a comma-separated CSV.
# A tab-separated file is one record per line with no quoting (IANA's text/tab-separated-values), so a
# quote in a tweet stays in the text, unless the file is quoted CSV-style throughout, the way a CSV writer
# quotes (pandas, R and spreadsheets write a field holding a quote as "...""..."): `_csv_quoted` decides.
TAB_SEPARATED = (".tsv", ".tab")
JSON_LINES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".csv", ".json", *TAB_SEPARATED, *JSON_LINES)


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV, JSON or JSONL file into a DataFrame, turning every parse failure into a clear error.

    Only an empty cell is missing: "NA", "None", "null" or "nan" are texts like any other (pandas'
    default would drop a tweet that says "N/A"). Column names are matched ignoring case and surrounding
    spaces (`_fold_column_names`). Rows are numbered 0.. in file order."""
    path = check_input_file(path, "Data file")
    suffix = path.suffix.lower()
    json_file = suffix in JSON_LINES or suffix == ".json"
    try:
        if json_file:
            frame = _read_json(path, lines=suffix in JSON_LINES)
        else:
            text = read_input_text(path, "Data file")  # UTF-8 and no NUL bytes, checked once for every reader
            if text.lstrip()[:1] in ("[", "{"):  # a header never starts so; JSON read as a table would be nonsense
                raise UserError(f"Data file {path} holds JSON, but its name says {'tab' if suffix in TAB_SEPARATED else 'comma'}"
                                "-separated table: rename it .json (an array of objects) or .jsonl (one object per "
                                "line).")
            tabs = suffix in TAB_SEPARATED
            sep = "\t" if tabs else ","
            options = {"sep": sep, "dtype": str, "keep_default_na": False, "na_values": [""]}
            if tabs and not _csv_quoted(text, path):
                options["quoting"] = csv.QUOTE_NONE  # quotes are part of the text (module note at TAB_SEPARATED)
            else:
                _check_quoted_records(text, sep, path)
            frame = pd.read_csv(io.StringIO(text), **options)
            _check_header(frame, pd.read_csv(io.StringIO(text), **{**options, "header": None, "nrows": 1}), path,
                          "" if tabs else _separator_hint(path))
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        hint = "" if suffix in TAB_SEPARATED or json_file else _separator_hint(path)
        raise UserError(f"Could not parse {path}: {str(exc).splitlines()[0]}{hint}") from None
    if frame.empty:
        raise UserError(f"Data file {path} has no rows." if json_file else f"Data file {path} has a header but no rows.")
    frame = frame.reset_index(drop=True)
    frame.attrs["rows_are"] = "records" if json_file else "rows"
    _refuse_nul(frame, path)
    return _fold_column_names(frame)


def _check_header(frame: pd.DataFrame, header: pd.DataFrame, path: Path, hint: str = "") -> None:
    """Refuse what pandas would read silently wrong: rows longer than the header (their first fields would
    become the row index, every column shifted) and a column name given twice (pandas renames the copy)."""
    if not isinstance(frame.index, pd.RangeIndex):
        raise UserError(f"{path}: its rows have more fields than its header ({len(frame.columns)} column(s): "
                        f"{list(frame.columns)}), so every column would be read shifted. A text that contains the "
                        "separator must be quoted (\"like, this\"); or a trailing separator ends each row. Fix the "
                        "file and run again" + (hint or "."))
    names = [str(name) for name in header.iloc[0].tolist()] if len(header) else []
    repeated = sorted({name for name in names if names.count(name) > 1 and name != "nan"})
    if repeated:
        raise UserError(f"{path}: the header names column(s) {repeated} more than once; which one holds the data "
                        "is ambiguous. Rename or remove the copies.")


_STRAY_QUOTE = ("A quote at the start of a field opens a quoted text that runs on across line ends until the next "
                "quote, so a stray opening quote swallows the rows after it into one text, labelled by whatever "
                "comes last. Remove the stray quote; or, if it belongs to the text, quote the whole text and double "
                "every quote inside it (the text \"Sure thing is written \"\"\"Sure thing\"); or save the file as "
                "JSONL.")


def _check_quoted_records(text: str, sep: str, path: Path) -> None:
    """Refuse a stray quote that pandas would read silently wrong, naming the row and its lines.

    pandas reads a quoted field on past line ends, and past its closing quote too (`"Sure thing,0` then
    `"ok",1` on the next line become one text, `Sure thing,0\\nok"`, labelled 1). Read strictly (RFC 4180,
    Python's csv with strict=True), a closing quote must be followed by a separator or a line end and an
    open quote must close: that catches a stray quote that runs into another quote or to the end of the
    file. A stray quote can also close cleanly on a later line (one that ends in a quote), and then the file
    is valid CSV; what gives it away is a line inside the quoted text that is a whole row of this file: as
    many fields as the header, and in the label column(s) a label exactly as this format writes it (texts
    of GEN and iSarcasmEval span lines over 1,500 times without one such line)."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # one text may be as long as the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    header: list[str] | None = None
    labels: list[tuple[int, dict]] = []  # (position, the spellings of that label column) in the header
    rows, start = 0, 1  # data rows read (row 1 = the first after the header); the line the next record starts on
    try:
        for record in reader:
            if not record:  # a blank line: pandas skips it, so it counts as no row
                pass
            elif header is None:
                header = record
                labels = [(i, LABEL_COLUMNS[name]) for i, name in enumerate(_fold(n) for n in record)
                          if name in LABEL_COLUMNS]
            else:
                rows += 1
                if labels and reader.line_num > start:  # a record over more than one line
                    _refuse_swallowed_rows(record, header, labels, sep, path, rows, start, reader.line_num)
            start = reader.line_num + 1
    except csv.Error as exc:
        cause = str(exc)
        if "expected after" in cause:
            cause = (f"the quote that closes it, on line {reader.line_num}, is followed by more text instead of "
                     f"{'a tab' if sep == chr(9) else 'a comma'} or the line's end")
        elif "end of data" in cause:
            cause = "it is never closed and runs on to the end of the file"
        where = "the header" if header is None else f"row {rows + 1}; row 1 = the first row after the header"
        raise UserError(f"{path}: a quoted field opens on line {start} of the file ({where}) and is not closed "
                        f"properly: {cause}. {_STRAY_QUOTE}") from None


def _refuse_swallowed_rows(record: list[str], header: list[str], labels: list[tuple[int, dict]], sep: str,
                           path: Path, row: int, start: int, end: int) -> None:
    """Refuse a record one of whose multi-line fields holds a line that is a whole row (`_check_quoted_records`)."""
    line = start
    for field in record:
        pieces = text_lines(field)
        for offset, piece in enumerate(pieces[:-1]):  # the last piece runs on into the record's own next field
            fields = next(csv.reader([piece], delimiter=sep), [])
            if len(fields) == len(header) and all(fields[i].casefold() in spellings for i, spellings in labels):
                shown = ", ".join(f"{header[i]} {fields[i]!r}" for i, _ in labels)
                raise UserError(f"{path}: row {row} (row 1 = the first row after the header) holds a quoted text "
                                f"over lines {start}-{end} of the file, and line {line + offset} inside it, "
                                f"{piece[:80]!r}, reads as a row of its own ({len(header)} fields, {shown}). "
                                + _STRAY_QUOTE)
        line += len(pieces) - 1


def _csv_quoted(text: str, path: Path) -> bool:
    """Whether a tab-separated text is quoted CSV-style: some field is quoted, every field that opens with a
    quote is a whole quoted field (closed right before a tab or a line end, inner quotes doubled, line breaks
    allowed inside), and the quoting is a CSV writer's. A writer quotes either every text, the header's names
    too (R's write.table, csv.QUOTE_ALL), or only the fields that need it, those holding a quote, a tab or a
    line break (pandas, Python's csv, spreadsheets). So in a file with an unquoted header, "Best. Day. Ever."
    (a field that needs no quotes) is a quotation, quotes and all; beside fields that do need their quotes it
    could be either, and the file is refused rather than read one way by guess."""
    scanned = _quoted_fields(text, "\t")
    if scanned is None:
        return False
    fields, header_quoted = scanned
    if header_quoted:
        return True
    needed = [(line, content) for line, content in fields if any(c in content for c in '"\t\r\n')]
    plain = [(line, content) for line, content in fields if content and (line, content) not in needed]
    if needed and plain:
        raise UserError(f"{path}: its quotes are mixed. Line {needed[0][0]} quotes a field the way a CSV writer "
                        f"does ({needed[0][1][:40]!r}: it holds a quote, a tab or a line break), but line "
                        f"{plain[0][0]} quotes one a CSV writer would leave bare ({plain[0][1][:40]!r}), so whether "
                        "those quotes are part of its text is a guess. If they are, write them CSV-style (the text "
                        '"Best. Day. Ever." is written """Best. Day. Ever."""); if not, remove them; or save the '
                        "file as JSONL.")
    return bool(needed)


def _quoted_fields(text: str, sep: str) -> tuple[list[tuple[int, str]], bool] | None:
    """([(line, content) of each quoted field], whether every field of the first line is quoted), or None when
    a field opens with a quote that does not close right before a separator, a line end or the end of the text."""
    field_end = re.compile(f"[{re.escape(sep)}\r\n]")
    fields: list[tuple[int, str]] = []
    i, n, line = 0, len(text), 1
    header_fields = header_quoted = 0
    while i < n:  # at the start of a field
        first_line = line == 1
        if text[i] == '"':
            j = i + 1
            while (k := text.find('"', j)) >= 0 and text.startswith('""', k):
                j = k + 2
            if k < 0:
                return None
            fields.append((line, text[i + 1:k].replace('""', '"')))
            line += len(text_lines(text[i:k])) - 1
            i = k + 1
            if i < n and text[i] not in (sep, "\r", "\n"):
                return None
            header_quoted += first_line
        else:
            found = field_end.search(text, i)
            i = found.start() if found else n
        header_fields += first_line
        if i < n and text[i] == sep:
            i += 1
        elif i < n:  # a line end
            i += 2 if text.startswith("\r\n", i) else 1
            line += 1
    return fields, header_fields > 0 and header_quoted == header_fields


def _fold(name) -> str:
    """A column name as it is matched: case-folded, surrounding spaces dropped (`Text`, ` label`)."""
    return str(name).strip().casefold()


def _known_columns() -> set[str]:
    return {c for columns in FORMAT_COLUMNS.values() for c in columns} | set(TEXT_COLUMNS) | {"id", "source",
                                                                                              "rephrase"}


def _fold_column_names(frame: pd.DataFrame) -> pd.DataFrame:
    """`Text,Label` or ` text, label` name the known columns all the same (spreadsheets capitalise headers,
    hand-written CSVs put a space after each comma): each column whose folded name is a known column name is
    renamed to it, unless two columns would then share a name (or it is there as it is): that is left for
    `detect_format`, whose error names them."""
    known = _known_columns()
    folded = [_fold(c) for c in frame.columns]
    renames = {c: f for c, f in zip(frame.columns, folded) if f != c and f in known and folded.count(f) == 1}
    return frame.rename(columns=renames) if renames else frame


def _refuse_nul(frame: pd.DataFrame, path: Path) -> None:
    """A NUL character is never part of a text, in any format. `inputs.decode_text` refuses one in a file's
    bytes (a binary or UTF-16 file); this refuses one in the values as read, which a JSON string can spell
    as the escape \\u0000 in plain ASCII bytes."""
    for name in frame.columns:
        if "\x00" in str(name):
            raise UserError(f"{path}: the column name {str(name)!r} holds a NUL character (\\u0000), which is never "
                            "part of a name or a text. Remove it.")
        values = frame[name]
        # One search of the column's texts joined (a million cells in about 0.03 s); rows only once one is there.
        if "\x00" not in "".join([v for v in values.to_numpy() if type(v) is str]):
            continue
        nul = values.map(lambda v: isinstance(v, str) and "\x00" in v)
        if nul.any():
            raise UserError(f"{path}: {int(nul.sum())} {_rows_are(values)}(s) hold a NUL character (\\u0000) in "
                            f"column {str(name)!r} ({_rows_are(values)}s {row_numbers(values.index[nul])}; "
                            f"{_first(values)}). A NUL is never part of a text: it marks binary data, and a "
                            "tokenizer or C library may cut the text at it. Remove it from those texts.")


def _read_json(path: Path, lines: bool) -> pd.DataFrame:
    """A JSON Lines file (one object per line, blank lines skipped; a bad line named by its number, as an
    editor shows it), or a .json document: an array of objects, or an object of columns. A .json file that
    holds lines (News Headlines ships so) is read as lines."""
    import json

    text = read_input_text(path, "Data file")
    if not lines:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": a whole first document, then more of them: lines
                raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})") from None
        else:
            if isinstance(document, list) and all(isinstance(item, dict) for item in document):
                return _as_text(pd.DataFrame.from_records(document))
            if isinstance(document, dict) and document:  # an object of columns, or one record
                columns = all(isinstance(v, (dict, list)) for v in document.values())
                return _as_text(pd.DataFrame(document) if columns else pd.DataFrame([document]))
            raise ValueError("a .json file must hold an array of objects such as "
                             '[{"text": "...", "label": 1}], or an object of columns')
    records = []
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object such as "
                             '{"text": "...", "label": 1}')
        records.append(record)
    return _as_text(pd.DataFrame.from_records(records))


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every plain value as text, as the CSV reader gives it, missing ones kept missing: labels such as 1, "1"
    and true are then read alike, whatever file they came from. Objects and arrays stay as they are (a
    text or label column holding one is refused where it is read: `_plain_values`)."""
    if not len(frame):
        return frame
    nested = frame.apply(lambda column: column.map(lambda v: isinstance(v, (dict, list))))
    return frame.astype(object).where(frame.isna() | nested, frame.astype(str))  # isna: False for a list or dict


def _plain_values(values: pd.Series, path, what: str) -> None:
    """Refuse a column that holds JSON objects or arrays where a text or a label belongs."""
    nested = values.map(lambda v: isinstance(v, (dict, list)))
    if nested.any():
        raise UserError(f"{path}: {int(nested.sum())} {_rows_are(values)}(s) hold a JSON object or array in the "
                        f"{what} column {values.name!r} ({_rows_are(values)}s {row_numbers(values.index[nested])}; "
                        f"{_first(values)}); it must hold a plain value.")


def _rows_are(values) -> str:
    return "record" if values.attrs.get("rows_are") == "records" else "row"


def _first(values) -> str:
    """How rows are counted in a message: a table's rows after its header, a JSON file's records."""
    return ("record 1 = the first object in the file" if _rows_are(values) == "record"
            else "row 1 = the first row after the header")


def _separator_hint(path: Path) -> str:
    """A hint when the header looks separated by something other than commas (a European-locale export)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return ""
    for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars")):
        if header.count(sep) > header.count(","):
            return (f". Its header is separated by {name}, not commas: save it as a comma-separated CSV "
                    "(or as JSONL).")
    return ""


def _require(frame: pd.DataFrame, expected: list[str], path, kind: str) -> None:
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing} for the {kind} format. Found columns: {list(frame.columns)}; "
            f"expected: {expected}."
        )


def _labels(values: pd.Series, path, mapping: dict[str, int]) -> pd.Series:
    _plain_values(values, path, "label")
    text = values.astype(str).str.strip().str.lower()
    labels = text.map(mapping)
    bad = labels.isna()
    if bad.any():
        shown = sorted({"(blank)" if pd.isna(v) or not str(v).strip() else str(v) for v in values[bad]})[:5]
        raise UserError(
            f"{path}: {int(bad.sum())} {_rows_are(values)}(s) have unknown label values {shown} "
            f"({_rows_are(values)}s {row_numbers(values.index[bad])}; {_first(values)}) in column {values.name!r}. "
            f"Known labels: {sorted(set(mapping))}."
        )
    return labels.astype(int)


# Other public sarcasm datasets as they are distributed, read like generic files: format -> (text, label)
# column. News Headlines (Misra & Arora, Sarcasm_Headlines_Dataset.json) and SARC (Khodak et al.,
# train-balanced-sarcasm.csv), so a model is scored on them without reshaping a file first.
PUBLIC_FORMATS = {"headlines": ("headline", "is_sarcastic"), "sarc": ("comment", "label")}
# Where the text of a file without labels is found, in this order (predict).
TEXT_COLUMNS = ("text", "tweet", *(text for text, _ in PUBLIC_FORMATS.values()))


# Each format by the columns that identify it (a file may hold more).
FORMAT_COLUMNS = {"gen": ("class", "text"), "isarcasmeval": ("tweet", "sarcastic"), "generic": ("text", "label"),
                  **PUBLIC_FORMATS}
# Each label column by name, with the spellings its format reads.
LABEL_COLUMNS = {"class": GEN_LABELS, "sarcastic": ISARCASM_LABELS, "label": LABEL_VALUES,
                 **{label: LABEL_VALUES for _, label in PUBLIC_FORMATS.values()}}


def detect_format(frame: pd.DataFrame, path: str | Path | None = None) -> str:
    cols = set(frame.columns)
    found = [name for name, columns in FORMAT_COLUMNS.items() if set(columns) <= cols]
    if len(found) == 1:
        return found[0]
    if found:  # which column holds the text, which the label, would be a guess
        described = "; ".join(f"{name} ({', '.join(FORMAT_COLUMNS[name])})" for name in found)
        raise UserError(f"{path or 'The table'}: its columns fit more than one format: {described}. Found columns: "
                        f"{list(frame.columns)}. Remove or rename the columns of the format it is not.")
    opening = "Unrecognised" if path is None else f"{path}: unrecognised"
    raise UserError(
        f"{opening} columns. Found columns: {list(frame.columns)}; expected one of: GEN (class, id, text), "
        "iSarcasmEval (tweet, sarcastic, rephrase, ...), News Headlines (headline, is_sarcastic), SARC "
        "(comment, label), or generic (text, label)" + _folding_clash(frame.columns)
        + (_separator_hint(Path(path)) if path is not None else ".")
    )


def _folding_clash(columns) -> str:
    """Why names that differ from a known column only in case or spaces were not read as it (`_fold_column_names`)."""
    known = _known_columns()
    groups: dict[str, list] = {}
    for name in columns:
        groups.setdefault(_fold(name), []).append(str(name))
    clashes = [f"{names} all read as {folded!r}" for folded, names in groups.items()
               if folded in known and len(names) > 1]
    if not clashes:
        return ""
    return (f". Column names are matched ignoring case and surrounding spaces, and {'; '.join(clashes)}, so which "
            "one holds the data is a guess: rename or remove the others")


def is_empty_text(texts: pd.Series) -> pd.Series:
    """Which rows hold no text: missing, or only whitespace."""
    return texts.isna() | (texts.astype(str).str.strip() == "")


def text_column(frame: pd.DataFrame, path, skip_empty: bool = False,
                log: Callable[[str], None] | None = None) -> pd.Series:
    """The texts of a file with or without labels, in any format this module reads (TEXT_COLUMNS), on the
    file's row index. Empty texts are an error that lists their rows; with `skip_empty` they are left out
    and `log` (stderr when None: predict's stdout is its JSON lines) names them, as a plain text file's
    blank lines are (a file as distributed may hold one: iSarcasmEval's row 1063). A file of empty texts
    only is an error either way."""
    found = [c for c in TEXT_COLUMNS if c in frame.columns]
    if len(found) > 1:
        raise UserError(f"{path}: more than one column could hold the texts: {found}. Keep one of them (or rename "
                        "the others), so that what is scored is not a guess.")
    column = found[0] if found else None
    if column is None:
        raise UserError(f"{path}: no text column. Found columns: {list(frame.columns)}; expected one of "
                        f"{list(TEXT_COLUMNS)} (`text` for GEN and generic files)" + (_separator_hint(Path(path)) or "."))
    texts = frame[column]
    _plain_values(texts, path, "text")
    empty = is_empty_text(texts)
    if empty.any():
        found = (f"{path}: {int(empty.sum())} {_rows_are(texts)}(s) with an empty text ({_rows_are(texts)}s "
                 f"{row_numbers(frame.index[empty])}; {_first(texts)})")
        if not skip_empty or empty.all():
            raise UserError(found + (". Remove them or fill them in." if not empty.all() else ": nothing to score."))
        (log or (lambda message: print(message, file=sys.stderr)))(found + ": skipped; every other row is "
                                                                   "scored, in file order.")
        texts = texts[~empty]
    return texts.astype(str)


def _standard(frame: pd.DataFrame, path, fmt: str) -> pd.DataFrame:
    """Map any known format to the standard columns, without cleaning yet."""
    if fmt in PUBLIC_FORMATS:
        text, label = PUBLIC_FORMATS[fmt]
        _require(frame, [text, label], path, fmt)
        kept = {"text": frame[text], "label": frame[label], **{c: frame[c] for c in ("id", "source") if c in frame}}
        frame, fmt = pd.DataFrame(kept), "generic"
    text = "tweet" if fmt == "isarcasmeval" else "text"
    if text in frame.columns:
        _plain_values(frame[text], path, "text")
    if fmt == "gen":
        _require(frame, ["class", "id", "text"], path, "GEN")
        return pd.DataFrame({
            "text": frame["text"], "label": _labels(frame["class"], path, GEN_LABELS),
            "source": "gen", "id": frame["id"].astype(str),
        })
    if fmt == "isarcasmeval":
        _require(frame, ["tweet", "sarcastic"], path, "iSarcasmEval")
        ids = frame[frame.columns[0]] if str(frame.columns[0]).startswith("Unnamed") else pd.Series(frame.index)
        return pd.DataFrame({
            "text": frame["tweet"], "label": _labels(frame["sarcastic"], path, ISARCASM_LABELS),
            "source": "isarcasmeval", "id": ids.astype(str).values,
        })
    _require(frame, ["text", "label"], path, "generic")
    out = pd.DataFrame({"text": frame["text"], "label": _labels(frame["label"], path, LABEL_VALUES)})
    out["source"] = frame["source"].astype(str) if "source" in frame.columns else Path(path).stem
    out["id"] = frame["id"].astype(str) if "id" in frame.columns else [str(i + 1) for i in range(len(frame))]
    return out


def clean(frame: pd.DataFrame, path, strict: bool = False, drop_conflicts: bool = True,
          log: Callable[[str], None] = print) -> pd.DataFrame:
    """Drop (or, with strict, refuse) empty texts, duplicates and texts with conflicting labels, saying how
    many and which rows. A text given both labels has no right answer to train, select or score on, so every
    copy of it goes: the rule of `split` (iSarcasmEval as distributed holds five such texts), now of every
    labelled file, so the raw file reads the same as an evaluation set or mining input as it does in
    `split`. `drop_conflicts=False` makes conflicts an error without making the rest strict."""
    frame = frame.copy()
    text = frame["text"]
    empty = is_empty_text(text)
    if empty.any():
        msg = f"{path}: {int(empty.sum())} row(s) with an empty text (rows {row_numbers(frame.index[empty])})"
        if strict:
            raise UserError(msg + "; remove them or run without --strict to drop them.")
        if empty.all():
            raise UserError(f"{path}: the text column holds no text at all (every row is empty or NaN).")
        log(msg + ": dropped.")
        frame = frame[~empty]
    frame["text"] = frame["text"].astype(str)
    key = frame["text"].map(normalise)
    labels_per_text = frame.groupby(key)["label"].nunique()
    conflicting = key.isin(labels_per_text[labels_per_text > 1].index)
    if conflicting.any():
        n_texts = int(key[conflicting].nunique())
        msg = (f"{path}: {n_texts} text(s) appear with conflicting labels "
               f"(rows {row_numbers(frame.index[conflicting], 20)})")
        if strict or not drop_conflicts:
            raise UserError(msg + ". Fix the labels, or drop these rows (the split stage does so unless --strict).")
        if conflicting.all():
            raise UserError(msg + ": every text of the file is given both labels, so none is left to use. Check "
                            "its label column.")
        log(msg + ": all their copies dropped.")
        frame, key = frame[~conflicting], key[~conflicting]
    dup = key.duplicated(keep="first")
    if dup.any():
        msg = f"{path}: {int(dup.sum())} duplicated text(s) (rows {row_numbers(frame.index[dup])})"
        if strict:
            raise UserError(msg + "; remove them or run without --strict to keep only the first copy.")
        log(msg + ": kept the first copy of each.")
        frame = frame[~dup]
    return frame.reset_index(drop=True)[COLUMNS]


def load_table(path: str | Path, fmt: str = "auto", strict: bool = False, drop_conflicts: bool = True,
               log: Callable[[str], None] = print) -> pd.DataFrame:
    """Load GEN, iSarcasmEval or a generic text/label CSV/TSV/JSON/JSONL as the standard table."""
    frame = read_frame(path)
    return clean(standard_table(frame, path, fmt), path, strict=strict, drop_conflicts=drop_conflicts, log=log)


def standard_table(frame: pd.DataFrame, path, fmt: str = "auto") -> pd.DataFrame:
    """A file's rows (`read_frame`) as the standard table, one row for each, uncleaned: the ids `load_table`
    gives, on the same index as `frame`, so a column the standard table leaves out (iSarcasmEval's
    `rephrase`) can be joined back on."""
    return _standard(frame, path, detect_format(frame, path) if fmt == "auto" else fmt)


def load_gen(path, **kw) -> pd.DataFrame:
    return load_table(path, fmt="gen", **kw)


def load_isarcasm(path, **kw) -> pd.DataFrame:
    return load_table(path, fmt="isarcasmeval", **kw)


def load_split(path: str | Path, what: str = "split") -> pd.DataFrame:
    """Read a split file written by `sarcasm-dpo split` (or any text,label file), with a hint if absent."""
    if not Path(path).exists() and not Path(path).is_symlink():  # a broken link gets read_frame's own message
        raise UserError(f"The {what} file {path} does not exist. Run `sarcasm-dpo split` first, or pass the right path.")
    return load_table(path)


def check_validation_split(frame: pd.DataFrame, path, sample_size: int | None = None) -> None:
    """Refuse a validation split (as sampled) without both classes: F1, ROC-AUC and the decision threshold
    chosen on it would mean nothing, and a model would be selected on them all the same."""
    if frame["label"].nunique() < 2:
        sampled = f" (as sampled by --val_sample_size {sample_size})" if sample_size else ""
        raise UserError(f"The validation split {path} holds one class only{sampled} ({class_counts(frame)}): "
                        "model selection and the decision threshold need both. Use a split with sarcastic and "
                        "non-sarcastic texts (`sarcasm-dpo split` makes one), or a larger --val_sample_size.")


def check_no_leakage(splits: dict[str, pd.DataFrame]) -> None:
    """Fail loudly if any normalised text sits in more than one split."""
    seen: dict[str, str] = {}
    clashes = []
    for name, frame in splits.items():
        for text in frame["text"]:
            key = normalise(text)
            other = seen.setdefault(key, name)
            if other != name:
                clashes.append((other, name, text))
    if clashes:
        shown = "; ".join(f"{a} & {b}: {t[:60]!r}" for a, b, t in clashes[:5])
        raise UserError(f"Leakage: {len(clashes)} text(s) appear in more than one split ({shown}).")


def overlap_count(a: pd.DataFrame, b: pd.DataFrame) -> int:
    return len(set(a["text"].map(normalise)) & set(b["text"].map(normalise)))


def frame_checksum(frame: pd.DataFrame) -> str:
    """Content checksum of a table (text + label), independent of the file it came from."""
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"]):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def class_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {"sarcastic": int((frame.label == 1).sum()), "not_sarcastic": int((frame.label == 0).sum()), "total": len(frame)}


def _held_out(n: int, share: float) -> int:
    """How many of n rows scikit-learn's train_test_split puts in the held-out part for a float share."""
    return math.ceil(n * share)


def check_split_sizes(name: str, frame: pd.DataFrame, share: float, held_out: str) -> int:
    """Refuse a split of `frame` that would leave a part empty or single-class, naming the sizes; returns
    the number of rows that stay on the training side.

    A stratified split needs at least one row of each class on each side (scikit-learn then keeps
    both classes in both parts); a model cannot be trained, selected or scored on a part without."""
    n = len(frame)
    counts = frame["label"].value_counts().to_dict()
    if len(counts) < 2:
        only = f"only label {next(iter(counts))}" if counts else "no rows"
        raise UserError(f"{name} has {n} row(s) with {only}: a sarcasm split needs both classes (sarcastic and not). "
                        "Check the data file and its label column.")
    held = _held_out(n, share)
    kept = n - held
    if held < 2 or kept < 2 or min(counts.values()) < 2:
        fix = ("more data (each class needs at least two rows)" if min(counts.values()) < 2
               else "a smaller share" if kept < 2 else "a larger share, or more data")
        raise UserError(f"Splitting {name} ({n} rows: {counts.get(1, 0)} sarcastic, {counts.get(0, 0)} not) with a "
                        f"{held_out} share of {share} gives {held} {held_out} and {kept} training row(s); each part needs "
                        f"at least one row of each class. Use {fix}.")
    return kept


def make_splits(gen: pd.DataFrame, isarcasm: pd.DataFrame, test_size: float = 0.2, val_size: float = 0.1,
                isarcasm_val_size: float = 0.2, seed: int = 42) -> dict[str, pd.DataFrame]:
    """GEN -> train / val / test and iSarcasmEval -> train / val, all stratified and seeded.

    The validation split is carved from GEN's 80% training share, never from the test split, so
    model selection never sees a test item.
    """
    from sklearn.model_selection import train_test_split

    check_split_sizes("GEN", gen, test_size, "test")
    check_split_sizes("iSarcasmEval", isarcasm, isarcasm_val_size, "validation")
    gen_train_full, gen_test = train_test_split(gen, test_size=test_size, stratify=gen["label"], random_state=seed)
    check_split_sizes("GEN's training share", gen_train_full, val_size, "validation")
    gen_train, gen_val = train_test_split(gen_train_full, test_size=val_size, stratify=gen_train_full["label"],
                                          random_state=seed)
    is_train, is_val = train_test_split(isarcasm, test_size=isarcasm_val_size, stratify=isarcasm["label"],
                                        random_state=seed)
    splits = {"gen_train": gen_train, "gen_val": gen_val, "gen_test": gen_test,
              "isarcasm_train": is_train, "isarcasm_val": is_val}
    splits = {k: v.reset_index(drop=True) for k, v in splits.items()}
    check_no_leakage(splits)
    return splits
