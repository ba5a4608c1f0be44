"""iSarcasmEval's rephrases: each sarcastic tweet's sincere rewording by its own author.

The raw file's `rephrase` column is not in the split files (the loader keeps text, label, source,
id, and the split files stay byte for byte as they were). It is read from the raw file and joined
to a split on the row id, with the tweet's text checked, so a split made from another copy of the
data fails loudly instead of pairing a tweet with someone else's rephrase. A training file of one's
own in the raw layout (tweet, sarcastic, rephrase, ...) brings its rephrases itself: `file_rephrases`
reads them, joined back on the ids the loader gives its rows.

A rephrase counts as a text of its tweet's split: `check_rephrase_sides` fails if a rephrase or a
tweet of one split equals (case- and space-folded) a tweet or rephrase of another, which would
put the same text on both sides of the train/validation line.

    python -c "from sarcasm_dpo.rephrases import load_rephrases as l; print(l('../shared/data/isarcasmeval/train.En.csv').head())"
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .data import check_no_leakage, normalise, read_frame, standard_table
from .errors import UserError

# A "rephrase" of fewer words ("No.", "Yes", "yes": five in the raw file) answers the tweet instead of
# rewording it; it carries no message of its own, and the same "No." under several tweets would cross splits.
MIN_WORDS = 3


def load_rephrases(path: str | Path) -> pd.DataFrame:
    """(id, text, rephrase) for every row of the raw iSarcasmEval CSV with a usable rephrase.

    Usable: at least MIN_WORDS words, and not the tweet itself. The id is the raw file's first
    (unnamed) column, the id the split files carry. The raw file lives at DATA_DIR/data.ISARCASM_RELPATH
    (`download.ensure_data_dir(None, keys=["isarcasmeval"])` finds DATA_DIR the way `split` does).
    """
    raw = read_frame(path)
    if "rephrase" not in raw.columns or "tweet" not in raw.columns or not str(raw.columns[0]).startswith("Unnamed"):
        raise UserError(f"{path} is not the raw iSarcasmEval file: rephrases need its unnamed id column, `tweet` "
                        f"and `rephrase`. Found columns: {list(raw.columns)}.")
    return _usable(raw[raw.columns[0]], raw["tweet"], raw["rephrase"], path)


def file_rephrases(path: str | Path) -> pd.DataFrame | None:
    """(id, text, rephrase) from a data file's own `rephrase` column, with the ids `data.load_table` gives its
    rows (so they join to the loaded file whatever its layout), usable ones only; None without that column."""
    raw = read_frame(path)
    if "rephrase" not in raw.columns:
        return None
    rows = standard_table(raw, path)
    return _usable(rows["id"], rows["text"], raw["rephrase"], path)


def _usable(ids: pd.Series, texts: pd.Series, rephrases: pd.Series, path) -> pd.DataFrame:
    """The rows whose rephrase is a rewording: text, at least MIN_WORDS words, not the tweet itself."""
    out = pd.DataFrame({"id": ids.astype(str).to_numpy(), "text": texts.to_numpy(), "rephrase": rephrases.to_numpy()})
    out = out[out["text"].map(lambda t: isinstance(t, str)) & out["rephrase"].map(lambda r: isinstance(r, str))]
    out = out.assign(rephrase=out["rephrase"].str.strip())
    usable = (out["rephrase"].str.split().str.len() >= MIN_WORDS) & (
        out["rephrase"].map(normalise) != out["text"].map(normalise))
    out = out[usable].reset_index(drop=True)
    out.attrs["path"] = str(path)
    return out


def attach_rephrases(frame: pd.DataFrame, rephrases: pd.DataFrame, what: str = "split",
                     file: str | Path | None = None) -> pd.DataFrame:
    """`frame` (an iSarcasmEval split: text, label, source, id; read from `file`) with a `rephrase` column (None
    where none).

    Joined on id, the tweet's text checked: a row whose id has a rephrase but whose text is not that id's tweet
    is an error (a split made from another copy of the data), and so is a frame none of whose rows finds its
    rephrase (its ids are not the rephrase table's: a file that is not a split of it)."""
    source = rephrases.attrs.get("path", "the rephrase table")
    named = f"the {what}" + (f" {file}" if file else "")
    if not len(rephrases):
        raise UserError(f"{source} holds no usable rephrase (at least {MIN_WORDS} words, not the tweet itself), so "
                        f"{named} gets none. Fill in its `rephrase` column, or use other --pairs sources.")
    table = rephrases.assign(key=rephrases["text"].map(normalise)).drop_duplicates(["id", "key"])
    ids, keys = frame["id"].astype(str), frame["text"].map(normalise)
    by_row = dict(zip(zip(table["id"], table["key"]), table["rephrase"]))
    found = pd.Series([by_row.get(row) for row in zip(ids, keys)], index=frame.index, dtype=object)
    matched = found.notna()
    clash = ids.isin(set(table["id"])) & ~matched
    if len(frame) and not matched.any():
        example = ""
        if clash.any():
            first = frame[clash].iloc[0]
            other = table.loc[table["id"] == str(first["id"]), "text"].iloc[0]
            example = (f"; {int(clash.sum())} name another tweet there, e.g. id {first['id']} is "
                       f"{str(first['text'])[:40]!r} here and {str(other)[:40]!r} there")
        unknown = int((~ids.isin(set(table["id"]))).sum())
        raise UserError(f"None of the {len(frame)} rows of {named} has a rephrase in {source} (the ids do not "
                        f"match: {unknown} of them are not there{example}). Rephrases are found by the row id the "
                        "split files carry: use the splits `sarcasm-dpo split` made from that file, or a training "
                        "file with its own `rephrase` column (the raw iSarcasmEval layout: tweet, sarcastic, "
                        "rephrase).")
    if clash.any():
        first = frame[clash].iloc[0]
        raise UserError(f"The {what} and {source} disagree on {int(clash.sum())} row(s): row id "
                        f"{first['id']} is {str(first['text'])[:50]!r} in the {what} but another tweet in the raw "
                        "file. Make the splits again from this data (sarcasm-dpo split), or point at the copy they "
                        "were made from.")
    return frame.assign(rephrase=[r if isinstance(r, str) else None for r in found])


def attach_by_text(frame: pd.DataFrame, rephrases: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a `rephrase` column: each row's tweet's rephrase where the table holds that tweet (case- and
    space-folded text; the first where it holds it twice), None elsewhere. For a file whose ids are not the
    table's (a plain text,label file), when only which texts are rephrases matters (`check_rephrase_sides`)."""
    by_text = dict(zip(rephrases["text"].map(normalise)[::-1], rephrases["rephrase"][::-1]))  # the first copy wins
    return frame.assign(rephrase=[by_text.get(normalise(t)) for t in frame["text"]])


def check_rephrase_sides(splits: dict[str, pd.DataFrame]) -> None:
    """Fail loudly if a text, counting each rephrase as a text of its tweet's split, is in two splits.

    `splits`: name -> table with `text` and, for iSarcasmEval splits, `rephrase` (from attach_rephrases).
    """
    expanded = {}
    for name, frame in splits.items():
        texts = list(frame["text"])
        if "rephrase" in frame.columns:
            texts += [r for r in frame["rephrase"] if isinstance(r, str) and r]
        expanded[name] = pd.DataFrame({"text": texts})
    try:
        check_no_leakage(expanded)
    except UserError as exc:
        raise UserError(f"{exc} Counting each iSarcasmEval rephrase as a text of its tweet's split: a tweet and its "
                        "rephrase must fall on the same side of the train/validation line, and no other split may "
                        "hold either.") from None
