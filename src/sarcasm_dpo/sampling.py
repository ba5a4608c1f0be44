"""Drawing rows (texts, preference pairs) for a run, seeded: every sampling rule of the package.

- `stratified_sample` / `stratified_rows`: n rows keeping the class ratio (the default for every draw);
- `equal_class_sample`: THE class-balanced draw (as many of each class), a tweet and its rephrase kept together;
- `unit_sample`: n rows at random, units (a tweet with its rephrase) kept whole;
- `balanced_sample`: SFT's fill rule (half each where the data allows, the rest from the larger class).

    python -c "from sarcasm_dpo.sampling import equal_class_sample; help(equal_class_sample)"
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import UserError


def stratified_sample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """n rows keeping the class ratio (all rows when n is empty, 0 or >= len)."""
    if not n or n >= len(frame):
        return frame.reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    counts = frame["label"].value_counts()
    if len(counts) < 2 or counts.min() < 2 or min(n, len(frame) - n) < len(counts):
        # Too few rows for scikit-learn to keep the ratio (each class twice, each side one of each): a plain draw.
        return frame.sample(n=n, random_state=seed).reset_index(drop=True)
    sample, _ = train_test_split(frame, train_size=n, stratify=frame["label"], random_state=seed)
    return sample.reset_index(drop=True)


def balanced_sample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """n rows, half of each class where the data allows (the rest from the larger class), shuffled: SFT's fill
    rule (all rows when n is empty, 0 or >= len). Not equal classes; for those, `equal_class_sample`."""
    if not n or n >= len(frame):
        n = len(frame)
    rng = np.random.default_rng(seed)
    pos, neg = frame[frame.label == 1], frame[frame.label == 0]
    take_pos = min(len(pos), n // 2 + n % 2)
    take_neg = min(len(neg), n - take_pos)
    take_pos = min(len(pos), n - take_neg)
    parts = [pos.iloc[rng.permutation(len(pos))[:take_pos]], neg.iloc[rng.permutation(len(neg))[:take_neg]]]
    out = pd.concat(parts)
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


def shuffled_units(n_rows: int, seed: int, units=None) -> list[list[int]]:
    """The positions of n_rows rows, unit by unit (`units`: one key per row; default each row alone), the units in
    the order their first row comes in a seeded shuffle of the rows (pandas' `sample(frac=1, random_state=seed)`,
    so rows alone come in exactly that shuffle), each unit's rows in their own order (a tweet before its rephrase)."""
    shuffled = pd.RangeIndex(n_rows).to_series().sample(frac=1.0, random_state=seed).to_numpy()
    keys = np.arange(n_rows) if units is None else pd.factorize(pd.Series(units).to_numpy())[0]
    members: dict[int, list[int]] = {}
    for row in shuffled:
        members.setdefault(int(keys[row]), []).append(int(row))
    return [sorted(rows) for rows in members.values()]


def unit_sample(frame: pd.DataFrame, n: int | None, seed: int, units=None) -> pd.DataFrame:
    """At most n rows (all when n is empty or 0) at random, seeded, keeping the class ratio as it falls: the units
    of `shuffled_units`, each taken while it fits (a tweet and its rephrase come together or not at all)."""
    limit = n or len(frame)
    kept: list[int] = []
    for rows in shuffled_units(len(frame), seed, units):
        if len(kept) + len(rows) <= limit:
            kept.extend(rows)
    return frame.iloc[kept].reset_index(drop=True)


def equal_class_sample(frame: pd.DataFrame, n: int | None, seed: int, *, positive=None, units=None,
                       what: str = "the rows") -> pd.DataFrame:
    """THE class-balanced sample: as many rows of each class, the smaller class's whole count, or n // 2 each when
    n (not empty or 0) asks for fewer; so at most n rows, one short of n when n is odd. Seeded.

    `positive`: each row's class (True = sarcastic; default: label == 1). `units`: rows with the same unit are kept
    or dropped together (a tweet and its rephrase, `pairs.tweet_units`); default: each row alone. Units are taken
    in the order of a seeded shuffle of the rows (pandas' `sample(frac=1, random_state=seed)`), each while both
    classes stay within their count; if units of unequal classes (two pairs of one tweet against one) still leave a
    class over, its rows taken last are dropped, whole units first. Refused (UserError) when a class is missing
    or n leaves no room for one row of each."""
    pos = (frame["label"].astype(int) == 1 if positive is None else pd.Series(positive)).to_numpy(dtype=bool)
    yes, no = int(pos.sum()), int((~pos).sum())
    per_class = min(yes, no) if not n else min(yes, no, n // 2)
    if not per_class:
        why = (f"--sample_size {n} leaves no room for one of each class" if yes and no else
               f"they hold no {'non-sarcastic' if yes else 'sarcastic'} one ({yes} sarcastic, {no} not)")
        raise UserError(f"A class-balanced sample of {what} is impossible: {why}. "
                        + ("Give --sample_size 2 or more." if yes and no else
                           "Use data with both classes, or keep the natural ratio (no --balance)."))
    taken, counts = [], {True: 0, False: 0}
    for rows in shuffled_units(len(frame), seed, units):
        add_yes = int(pos[rows].sum())
        if counts[True] + add_yes <= per_class and counts[False] + len(rows) - add_yes <= per_class:
            taken.append(rows)
            counts[True] += add_yes
            counts[False] += len(rows) - add_yes
    over = counts[True] > counts[False]
    excess = abs(counts[True] - counts[False])
    for whole in (True, False):  # a class over: its single-row units taken last go first, then its rows
        for rows in reversed(taken):
            for row in reversed(list(rows)):
                if excess and pos[row] == over and (not whole or len(rows) == 1):
                    rows.remove(row)
                    excess -= 1
    return frame.iloc[[row for rows in taken for row in rows]].reset_index(drop=True)


def stratified_rows(frame, n: int | None, seed: int, positive):
    """n rows (all when empty or 0) stratified by class (`positive`: each row's), seeded: the rows' positions are
    drawn (which rows, and their order, depend on the classes only). One rule for every unbalanced draw of rows or
    pairs: --pair_style rows, a --preference_data file, and --pairs reasoning or mined alone."""
    drawn = stratified_sample(pd.DataFrame({"label": np.asarray(positive, dtype=int), "row": np.arange(len(frame))}),
                              n, seed)["row"]
    return frame.iloc[drawn.to_numpy()].reset_index(drop=True)
