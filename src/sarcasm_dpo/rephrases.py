"""iSarcasmEval's rephrases: each sarcastic tweet's sincere rewording by its own author.

The raw file's `rephrase` column is not in the split files (the loader keeps text, label, source,
id, and the split files stay byte for byte as they were). It is read from the raw file and joined
to a split on the row id, with the tweet's text checked, so a split made from another copy of the
data fails loudly instead of pairing a tweet with someone else's rephrase.

A rephrase counts as a text of its tweet's split: `check_rephrase_sides` fails if a rephrase or a
tweet of one split equals (case- and space-folded) a tweet or rephrase of another, which would
put the same text on both sides of the train/validation line.

    python -c "from sarcasm_dpo.rephrases import load_rephrases as l; print(l('../shared/data/isarcasmeval/train.En.csv').head())"
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .data import check_no_leakage, normalise, read_frame
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
    out = pd.DataFrame({"id": raw[raw.columns[0]].astype(str), "text": raw["tweet"], "rephrase": raw["rephrase"]})
    out = out.dropna(subset=["text", "rephrase"])
    out["rephrase"] = out["rephrase"].astype(str).str.strip()
    usable = (out["rephrase"].str.split().str.len() >= MIN_WORDS) & (
        out["rephrase"].map(normalise) != out["text"].map(normalise))
    return out[usable].reset_index(drop=True)


def attach_rephrases(frame: pd.DataFrame, rephrases: pd.DataFrame, what: str = "split") -> pd.DataFrame:
    """`frame` (an iSarcasmEval split: text, label, source, id) with a `rephrase` column (None where none).

    Joined on id; a row whose id has a rephrase but whose text is not that id's tweet is an error.
    """
    by_id = rephrases.set_index("id")
    ids = frame["id"].astype(str)
    known = ids.isin(by_id.index)
    clash = known & (ids.map(lambda i: normalise(by_id.at[i, "text"]) if i in by_id.index else None)
                     != frame["text"].map(normalise))
    if clash.any():
        first = frame[clash].iloc[0]
        raise UserError(f"The {what} and the raw iSarcasmEval file disagree on {int(clash.sum())} row(s): row id "
                        f"{first['id']} is {str(first['text'])[:50]!r} in the {what} but another tweet in the raw "
                        "file. Make the splits again from this data (sarcasm-dpo split), or point at the copy they "
                        "were made from.")
    out = frame.copy()
    out["rephrase"] = [by_id.at[i, "rephrase"] if k else None for i, k in zip(ids, known)]
    return out


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
