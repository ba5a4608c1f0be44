"""Preference pairs for DPO: built from labelled texts, or read from a mined pairs file.

Every pair uses THE prompt (`prompts.build_prompts`), so DPO trains exactly the answer position the
scorer reads at evaluation time. Two styles:

* ``reasoning`` (default): chosen = the correct label word plus one short sentence of reasoning,
  rejected = the wrong label word plus a sentence of the same form. Sentences come in matched
  pairs (same shape, near-equal length), so length and style carry no signal; only the label
  word and what the sentence claims differ.
* ``label``: the label words alone ("Yes" vs "No").

Which sentence a pair gets is drawn with a seeded RNG, so the same data and seed give the same
pairs. The label word is always the first token of the completion (checked by
`check_pair_tokens`), which is the token the scorer's P(sarcastic) is read from.

Where the pairs come from (`build_preference_pairs`, one spec string such as ``rephrase+label``):

* ``label``: every training text, "Yes" vs "No" (the label words alone). Balanced by default.
* ``reasoning``: every training text, reasoning style (above): today's default, natural ratio.
* ``mined``: the pairs file `sarcasm-dpo mine` wrote (the SFT model's mistakes and low-margin
  items), loaded as it is. Natural ratio by default.
* ``rephrase``: iSarcasmEval's minimal pairs. A sarcastic tweet with its author's sincere
  rephrase (rephrases.py) gives two pairs: the tweet as prompt prefers "Yes", the rephrase as a
  prompt of its own prefers "No". Same content, opposite intent. One of each per tweet, so
  balanced by construction; a sample of the pairs (DPO's --sample_size) keeps or drops a tweet's
  pairs and its rephrase's together (`tweet_units`), in a mixture too.
* ``A+B``: A's pairs, then B's pairs that A does not already hold (same prompt and answers).
  Balanced by default; balancing cuts the side with more pairs back to the other's size,
  dropping the later sources' pairs first (seeded), so the first-named source is kept whole
  where it can be.

"Balanced" means as many pairs prefer "Yes" as prefer "No": a pair set that mostly prefers "No"
mostly teaches the model to say "No" more often (every DPO pair starts at loss log 2).

    python -c "from sarcasm_dpo.pairs import completions; print(completions(1, 'reasoning', 0))"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .data import LABEL_VALUES, row_numbers
from .errors import UserError
from .prompts import LABEL_WORDS, answer_length, build_prompts, label_token_ids, label_word

PAIR_STYLES = ("reasoning", "label")
PAIR_SOURCES = ("label", "reasoning", "mined", "rephrase")
NATURAL_BY_DEFAULT = {("reasoning",), ("mined",)}  # today's behaviour of these two, kept

# Matched sentence pairs: entry i of SARCASTIC_REASONS and entry i of LITERAL_REASONS have the
# same form and nearly the same length (a test holds them within 4 characters and 1 word), so DPO cannot
# prefer the chosen side for being shorter, longer or phrased differently.
SARCASTIC_REASONS = (
    "The praise is at odds with the situation it describes.",
    "The tone says the opposite of what the words claim.",
    "It exaggerates in a mocking way to make a critical point.",
    "The compliment is really just a complaint in disguise.",
    "The enthusiasm is ironic given the annoying situation.",
    "The writer pretends to approve of something they dislike.",
    "The literal meaning clashes with the intended meaning.",
    "It uses mock agreement to ridicule the other position.",
)
LITERAL_REASONS = (
    "The words mean just what they say about the situation.",
    "The tone is in line with what the words plainly claim.",
    "It states its point in a direct way, free of mockery.",
    "The remark is meant exactly the way it is written.",
    "The feelings expressed fit the situation it describes.",
    "The writer gives their honest view of what they discuss.",
    "The literal meaning and the intended meaning match up.",
    "It argues its own position sincerely, without ridicule.",
)
REASONS = {1: SARCASTIC_REASONS, 0: LITERAL_REASONS}

REPHRASE_ID = ":rephrase"  # a rephrase pair's id is its tweet's id with this added (`rephrase_pairs`)
PAIR_KEYS = ("prompt", "chosen", "rejected")
FILE_KEYS = ("prompt", "chosen", "rejected", "text", "label", "p_sarcastic", "id")


def answer_word(completion: str) -> str:
    """The word an answer opens with, up to its first full stop ("No. The words..." -> "No"): the word a pair
    claims, whatever its style. A pair is only sound when this is a label word (prompts.LABEL_WORDS)."""
    return str(completion).split(".")[0].strip()


def answer(label: int, style: str, index: int = 0) -> str:
    """The completion that claims `label`: its label word, plus reasoning sentence `index` if asked."""
    if style not in PAIR_STYLES:
        raise UserError(f"Unknown pair style {style!r}; choose one of {', '.join(PAIR_STYLES)}.")
    word = label_word(label)
    if style == "label":
        return word
    return f"{word}. {REASONS[int(label)][index % len(REASONS[int(label)])]}"


def completions(label: int, style: str, index: int = 0) -> tuple[str, str]:
    """(chosen, rejected) for a text whose true label is `label`; both use matched sentence `index`."""
    return answer(label, style, index), answer(1 - int(label), style, index)


def build_pairs(frame: pd.DataFrame, tokenizer, style: str = "reasoning", seed: int = 42,
                max_text_tokens: int = 256) -> pd.DataFrame:
    """One preference pair per row of a (text, label[, id]) table, in the same order.

    Columns: prompt, chosen, rejected, text, label, id (and p_sarcastic when the table has it).
    """
    rng = np.random.default_rng(seed)
    n_templates = len(SARCASTIC_REASONS)
    picks = rng.integers(0, n_templates, size=len(frame))
    prompts = build_prompts(tokenizer, frame["text"], max_text_tokens)
    rows = []
    for (_, row), index, prompt in zip(frame.iterrows(), picks, prompts):
        label = int(row["label"])
        chosen, rejected = completions(label, style, int(index))
        record = {"prompt": prompt, "chosen": chosen,
                  "rejected": rejected, "text": str(row["text"]), "label": label,
                  "id": str(row["id"]) if "id" in row else None}
        if "p_sarcastic" in row:
            record["p_sarcastic"] = float(row["p_sarcastic"])
        rows.append(record)
    return pd.DataFrame(rows, columns=[*PAIR_KEYS, "text", "label", "id"]
                        + (["p_sarcastic"] if "p_sarcastic" in frame.columns else []))


def check_pair_tokens(tokenizer, prompt: str, chosen: str, rejected: str, label: int | None = None) -> None:
    """Fail unless prompt+completion tokenizes as prompt tokens followed by the label token.

    DPOTrainer splits prompt and completion where their tokenizations diverge; if a tokenizer
    merged the label word with what follows (or with the prompt's last token), DPO would train
    a different token from the one the scorer reads. One pair per style is enough to check this.
    """
    no_id, yes_id = label_token_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        word = answer_word(completion)
        want = yes_id if word == label_word(1) else no_id if word == label_word(0) else None
        if want is None or ids[: len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids) or ids[len(prompt_ids)] != want:
            raise UserError(
                f"The {side} answer {completion[:40]!r} does not start with the scorer's label token for this tokenizer, "
                "so DPO would train a different answer from the one evaluation reads. Use --pair_style label, or "
                "pairs whose completion starts with 'Yes' or 'No' followed by punctuation."
            )
    if label is not None and not chosen.startswith(label_word(label)):
        raise UserError(f"A pair's chosen answer {chosen[:40]!r} does not start with its label word {label_word(label)!r}.")


def write_pairs_file(path: str | Path, pairs: pd.DataFrame) -> Path:
    """The mined-pairs JSON: a list of {prompt, chosen, rejected, text, label, p_sarcastic, id}."""
    from .atomic import write_json

    records = []
    for row in pairs.to_dict(orient="records"):
        records.append({k: row.get(k) for k in FILE_KEYS})
    return write_json(path, records)


def load_pairs_file(path: str | Path) -> pd.DataFrame:
    """Read a preference pairs JSON (list of objects with prompt/chosen/rejected), with clear errors.

    Every pair is checked here, once, whatever reads the file (`--preference_data`, `--pairs mined`): its
    answers (`_file_labels`), its optional label (returned as 1/0/None) and its optional text (a string or None).
    """
    from .inputs import read_input_text

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"Preference data file not found: {path}. Create it with `sarcasm-dpo mine` or fix the path.")
    text = read_input_text(path, "Preference data file", allow_empty=True)  # a FIFO, a loop, binary: said so
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"Preference data file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("pairs"), list):
        data = data["pairs"]
    if not isinstance(data, list):
        raise UserError(f"Preference data file {path} must hold a list of pairs, found {type(data).__name__}.")
    if not data:
        raise UserError(f"Preference data file {path} holds no pairs (the mining filter kept nothing?). "
                        "Mine with a looser --filter_strategy, or train without --preference_data.")
    bad = [i for i, row in enumerate(data) if not isinstance(row, dict)
           or any(not isinstance(row.get(k), str) or not row.get(k) for k in PAIR_KEYS)]
    if bad:
        first = data[bad[0]]
        found = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise UserError(
            f"Preference data file {path}: {len(bad)} pair(s) lack a non-empty string 'prompt', 'chosen' or "
            f"'rejected' ({pair_numbers(bad)}, counting from 1; the first bad one has keys {found}). "
            f"Expected keys: {', '.join(FILE_KEYS)} (text, label, p_sarcastic and id optional)."
        )
    frame = pd.DataFrame(data)
    frame["text"] = _file_texts(frame, path)
    frame["label"] = _file_labels(frame, path)
    return frame


def pair_numbers(index, limit: int = 5) -> str:
    """"pair 3" or "pairs 1, 4 and 2 more": positions 0.. in a file, named as a person counts them (1 = the first)."""
    index = list(index)
    return ("pair " if len(index) == 1 else "pairs ") + row_numbers(index, limit)


def _file_texts(frame: pd.DataFrame, path) -> pd.Series:
    """The optional `text` of each pair: a string, or None where absent, null or blank (no text to check the
    prompt against or cut, as in a hand-made file; an empty cell is missing in the data files too)."""
    if "text" not in frame.columns:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    values = frame["text"]
    absent = values.map(lambda v: v is None or (isinstance(v, float) and np.isnan(v))
                        or (isinstance(v, str) and not v.strip()))
    wrong = ~absent & ~values.map(lambda v: isinstance(v, str))
    if wrong.any():
        raise UserError(f"Preference data file {path}: {int(wrong.sum())} pair(s) have a 'text' that is not a string "
                        f"({pair_numbers(frame.index[wrong])}, counting from 1; the first is "
                        f"{values[wrong].iloc[0]!r}). The text is the tweet the prompt was built from: give it as a "
                        "string, or leave it out.")
    return pd.Series([None if gone else v for v, gone in zip(values, absent)], index=frame.index, dtype=object)


def _file_labels(frame: pd.DataFrame, path) -> pd.Series:
    """Each pair's label (1/0, None where absent), after checking that every pair is one preference a model can
    learn: chosen and rejected open with different label words, and a label, where given, is spelt as in the data
    files (data.LABEL_VALUES) and names the chosen answer's word. Any pair that fails is named; a contradictory
    pair would teach the opposite of its label, and a pair of two "No" answers teaches no label at all."""
    chosen, rejected = frame["chosen"].map(answer_word), frame["rejected"].map(answer_word)
    raw = frame["label"] if "label" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    absent = raw.map(lambda v: v is None or (isinstance(v, float) and np.isnan(v)))
    labels = raw.map(lambda v: None if v is None or isinstance(v, (dict, list))
                     else LABEL_VALUES.get(str(v).strip().lower()))
    problems = []

    def problem(mask: pd.Series, what: str) -> None:
        if mask.any():
            problems.append(f"{int(mask.sum())} {what} ({pair_numbers(frame.index[mask])})")

    not_word = ~chosen.isin(LABEL_WORDS) | ~rejected.isin(LABEL_WORDS)
    problem(not_word, "pair(s) whose chosen or rejected answer does not open with a label word "
                      f"({' or '.join(map(repr, LABEL_WORDS))}, then a full stop or nothing)")
    problem(~not_word & (chosen == rejected), "pair(s) whose chosen and rejected answers open with the same label word")
    unknown = ~absent & labels.isna()
    if unknown.any():
        shown = sorted({repr(v) for v in raw[unknown]})[:5]
        problem(unknown, f"pair(s) with an unknown label ({', '.join(shown)}; a label is 1/0, true/false, yes/no "
                         "or sarc/notsarc)")
    named = chosen.map({word: index for index, word in enumerate(LABEL_WORDS)})
    problem(labels.notna() & named.notna() & (labels != named),
            f"pair(s) whose label contradicts the chosen answer (label 1 must choose {label_word(1)!r}, label 0 "
            f"{label_word(0)!r})")
    if problems:
        raise UserError(f"Preference data file {path} (pairs counted from 1): {'; '.join(problems)}. Every pair must "
                        f"prefer one label word over the other (chosen '{label_word(1)}...' against rejected "
                        f"'{label_word(0)}...', or the reverse), with its label, when given, naming the chosen one. "
                        "Fix or remove these pairs, or mine them again (`sarcasm-dpo mine`).")
    return pd.Series([None if pd.isna(v) else int(v) for v in labels], index=frame.index, dtype=object)


def check_prompts_match(pairs: pd.DataFrame, tokenizer, max_text_tokens: int, source: str) -> None:
    """Pairs read from a file must carry THE prompt as this run builds it (same template and text cut).
    Pairs without their text (absent, null) cannot be checked, and are not."""
    if "text" not in pairs.columns:
        return
    has_text = pairs["text"].map(lambda t: isinstance(t, str)).to_numpy()
    if not has_text.any():
        return
    rebuilt = build_prompts(tokenizer, pairs["text"][has_text], max_text_tokens)
    positions = np.flatnonzero(has_text)
    differ = [i for i, a, b in zip(positions, pairs["prompt"][has_text], rebuilt) if a != b]
    if differ:
        raise UserError(
            f"{source}: {len(differ)} pair(s) carry a prompt different from the one this run builds for their text "
            f"({pair_numbers(differ)}, counting from 1). They were made with another tokenizer, chat template or "
            "--max_text_tokens; mine them again with the same SFT model and --max_text_tokens."
        )


def check_one_answer_per_prompt(pairs: pd.DataFrame, what: str, cut: str,
                                disagree: str = "the sources disagree on their label") -> None:
    """Refuse pairs that would teach one prompt both answers, saying why: different texts that the cut to `cut`
    (e.g. "--max_text_tokens 32") left identical, or one text given both labels (`disagree`)."""
    yes = prefers_yes(pairs)
    prompt = pairs["prompt"]
    both = prompt.map(yes.groupby(prompt).nunique()) > 1
    if not both.any():
        return
    texts = (pairs["text"] if "text" in pairs.columns else pd.Series(None, index=pairs.index, dtype=object))
    texts = texts.map(lambda t: t if isinstance(t, str) else None)
    # The prompt is built from the text, so different texts under one prompt can only come from the cut.
    by_cut = both & (prompt.map(texts.groupby(prompt).nunique()) > 1)
    parts = []
    if by_cut.any():
        group = pairs[by_cut & (prompt == prompt[by_cut].iloc[0])]
        sarcastic = texts[group.index][yes[group.index]].dropna()
        sincere = texts[group.index][~yes[group.index]].dropna()
        sincere = sincere[sincere != sarcastic.iloc[0]] if len(sarcastic) else sincere
        if len(sarcastic) and len(sincere):
            a, b = sarcastic.iloc[0], sincere.iloc[0]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            same = b.rfind(" ", 0, same) + 1  # back to the start of the word where they part
            shown = (f"{a[:50]!r}..., sarcastic, and a text with the same first {same} characters that then reads "
                     f"{b[same:same + 40]!r}, not")
        else:
            shown = repr(str(texts[group.index].dropna().iloc[0])[:60])
        parts.append(f"{prompt[by_cut].nunique()} prompt(s) would be taught both answers because cutting texts to "
                     f"{cut} left different texts identical (first: {shown}); raise --max_text_tokens so that they "
                     "stay apart")
    if (both & ~by_cut).any():
        rest = both & ~by_cut
        shown = texts[rest].dropna()
        shown = shown.iloc[0] if len(shown) else prompt[rest].iloc[0]
        parts.append(f"{prompt[rest].nunique()} prompt(s) would be taught both answers (first: {str(shown)[:60]!r}); "
                     f"{disagree}")
    raise UserError(f"{what}: {'; and '.join(parts)}.")


def parse_pairs_spec(spec: str) -> tuple[str, ...]:
    """'rephrase+label' -> ('rephrase', 'label'): sources joined by '+', each named once, order kept."""
    parts = tuple(part.strip().lower() for part in str(spec or "").split("+"))
    unknown = [p for p in parts if p and p not in PAIR_SOURCES]
    why = ("it names no source" if parts == ("",) else "it has an empty source name" if not all(parts)
           else f"unknown source(s) {', '.join(repr(p) for p in unknown)}" if unknown
           else "a source is named twice" if len(set(parts)) != len(parts) else None)
    if why:
        raise UserError(f"--pairs {spec!r}: {why}. Name one or more of {', '.join(PAIR_SOURCES)}, joined by '+' "
                        "(e.g. rephrase+label).")
    return parts


def rephrase_pairs(frame: pd.DataFrame, tokenizer, seed: int = 42, max_text_tokens: int = 256) -> pd.DataFrame:
    """Two label pairs per sarcastic row with a rephrase: the tweet prefers "Yes", then its rephrase prefers "No"."""
    if "rephrase" not in frame.columns:
        raise UserError("The rephrase pairs need the training split's rephrases; attach them first "
                        "(rephrases.attach_rephrases with the raw iSarcasmEval file).")
    has = frame["rephrase"].map(lambda r: isinstance(r, str) and bool(r.strip()))
    rows = frame[(frame["label"].astype(int) == 1) & has]
    ids = rows["id"].astype(str) if "id" in rows.columns else pd.Series(range(len(rows)), index=rows.index).astype(str)
    sincere = pd.DataFrame({"text": rows["rephrase"].to_numpy(), "label": 0, "id": (ids + REPHRASE_ID).to_numpy()})
    tweets = build_pairs(rows[["text", "label"]].assign(id=ids.to_numpy()), tokenizer, "label", seed, max_text_tokens)
    rephrased = build_pairs(sincere, tokenizer, "label", seed, max_text_tokens)
    # Interleaved: each tweet's pair sits beside its rephrase's, so a reader sees the minimal pair.
    return pd.concat([tweets, rephrased]).sort_index(kind="stable").reset_index(drop=True)


def tweet_units(pairs: pd.DataFrame) -> list[str]:
    """What sampling keeps or drops together (sampling.equal_class_sample, sampling.unit_sample): a rephrase pair (id
    TWEET:rephrase) and the pairs of its tweet (id TWEET, from whichever source kept it) are one unit, a minimal
    pair; every other pair is a unit of its own."""
    ids = (pairs["id"] if "id" in pairs.columns else pd.Series(None, index=pairs.index, dtype=object)).tolist()
    ids = [value if isinstance(value, str) else None for value in ids]
    rephrased = {value[: -len(REPHRASE_ID)] for value in ids if value and value.endswith(REPHRASE_ID)}
    units = []
    for position, value in enumerate(ids):
        tweet = value[: -len(REPHRASE_ID)] if value and value.endswith(REPHRASE_ID) else value
        units.append(f"tweet {tweet}" if tweet in rephrased else f"pair {position}")
    return units


def prefers_yes(pairs: pd.DataFrame) -> pd.Series:
    """True where a pair's chosen answer is the sarcastic label word (whatever its style or file)."""
    return pairs["chosen"].map(answer_word) == label_word(1)


def balance_pairs(pairs: pd.DataFrame, seed: int, priority: str | None = None) -> pd.DataFrame:
    """Cut the side (prefers "Yes" / prefers "No") with more pairs back to the other's size, order kept.

    Pairs are dropped at random (seeded), those with the highest `priority` column value first.
    """
    yes = prefers_yes(pairs).to_numpy()
    small = min(int(yes.sum()), int((~yes).sum()))
    if small == 0:
        raise UserError(f"Cannot balance {len(pairs)} preference pair(s): none prefers "
                        f"{label_word(0 if yes.all() else 1)!r}. Keep the natural ratio, or add a source that does.")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(pairs), dtype=bool)
    for side in (yes, ~yes):
        index = np.flatnonzero(side)
        index = index[rng.permutation(len(index))]
        if priority is not None:
            index = index[np.argsort(pairs[priority].to_numpy()[index], kind="stable")]
        keep[index[:small]] = True
    return pairs[keep].reset_index(drop=True)


def is_balanced(sources: tuple[str, ...], balance: bool | None) -> bool:
    """Whether the pairs of these sources are class-balanced: `balance` when given, else each spec's default
    (natural for `reasoning` or `mined` alone, balanced otherwise)."""
    return balance if balance is not None else sources not in NATURAL_BY_DEFAULT


def build_preference_pairs(spec: str, frame: pd.DataFrame | None, tokenizer, *, seed: int = 42,
                           max_text_tokens: int = 256, balance: bool | None = None,
                           mined_file: str | Path | None = None) -> pd.DataFrame:
    """The DPO pairs of the sources in `spec` (see the module doc), in build_pairs' format plus `pair_source`.

    `frame`: the training split (text, label, id; and `rephrase` for the rephrase source). `balance`:
    None = each spec's default (natural for `reasoning` or `mined` alone, balanced otherwise); True or
    False forces it. A prompt that would be taught both answers (a rephrase equal to a sarcastic tweet)
    is refused.
    """
    sources = parse_pairs_spec(spec)
    parts = []
    for rank, source in enumerate(sources):
        if source == "mined":
            if not mined_file:
                raise UserError("The mined pairs source needs the pairs file `sarcasm-dpo mine` wrote (--preference_data).")
            built = load_pairs_file(mined_file)
            check_prompts_match(built, tokenizer, max_text_tokens, str(mined_file))
        elif frame is None:
            raise UserError(f"The {source} pairs source needs the training split.")
        elif source == "rephrase":
            built = rephrase_pairs(frame, tokenizer, seed, max_text_tokens)
        else:
            built = build_pairs(frame, tokenizer, source, seed, max_text_tokens)
        parts.append(built.assign(pair_source=source, _rank=rank))
    pairs = pd.concat(parts, ignore_index=True)
    pairs = pairs[~pairs.duplicated(subset=list(PAIR_KEYS), keep="first")]
    check_one_answer_per_prompt(pairs, f"--pairs {spec}", f"--max_text_tokens {max_text_tokens}")
    if is_balanced(sources, balance):
        pairs = balance_pairs(pairs, seed, priority="_rank")
    return pairs.drop(columns="_rank").reset_index(drop=True)


def fit_pairs(pairs: pd.DataFrame, tokenizer, max_text_tokens: int, max_length: int) -> pd.DataFrame:
    """The pairs with every prompt fitted so prompt + its longer answer (with EOS) fit --max_length.

    The rule of `prompts.build_prompts` (`room`), the same SFT applies to its examples: a prompt over
    budget has its text cut further. Pairs that fit keep their prompt unchanged; a pair over budget
    without its text (a hand-made pairs file) cannot be cut, so it is refused.
    """
    rooms = [max_length - max(answer_length(tokenizer, c), answer_length(tokenizer, r))
             for c, r in zip(pairs["chosen"], pairs["rejected"])]
    lengths = [len(i) for i in tokenizer(list(pairs["prompt"]), add_special_tokens=False)["input_ids"]]
    over = [i for i, (n, room) in enumerate(zip(lengths, rooms)) if n > room]
    if not over:
        return pairs
    has_text = "text" in pairs.columns
    blind = [i for i in over if not has_text or not isinstance(pairs["text"].iloc[i], str)]
    if blind:
        raise UserError(f"Pair {blind[0]} needs {lengths[blind[0]] + max_length - rooms[blind[0]]} tokens but "
                        f"--max_length is {max_length}, and it carries no text to cut: its answer would be cut. Raise "
                        "--max_length, or use pairs that carry their text.")
    fitted = build_prompts(tokenizer, [pairs["text"].iloc[i] for i in over], max_text_tokens,
                           room=[rooms[i] for i in over])
    pairs = pairs.copy()
    pairs.loc[pairs.index[over], "prompt"] = fitted
    return pairs
