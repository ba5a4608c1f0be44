"""Preference sources (pairs.build_preference_pairs) and iSarcasmEval's rephrases (rephrases.py).

Each source is checked for exactly what it builds: how many pairs, of which balance, which answer
is chosen, and that every prompt is THE prompt (prompts.build_prompt) for the pair's text.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest

from sarcasm_dpo import data, sampling
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.pairs import (PAIR_SOURCES, build_pairs, build_preference_pairs, parse_pairs_spec, prefers_yes,
                               write_pairs_file)
from sarcasm_dpo.prompts import build_prompt
from sarcasm_dpo.rephrases import MIN_WORDS, attach_rephrases, check_rephrase_sides, load_rephrases


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def toy(n_sarcastic: int = 3, n_plain: int = 7) -> pd.DataFrame:
    """Sarcastic rows first, each with a rephrase except the last; then plain rows (no rephrase)."""
    rows = [{"text": f"oh great, another meeting number {i}", "label": 1, "id": f"s{i}",
             "rephrase": f"I dislike meeting number {i} a lot" if i < n_sarcastic - 1 else None}
            for i in range(n_sarcastic)]
    rows += [{"text": f"the meeting number {i} is at three", "label": 0, "id": f"p{i}", "rephrase": None}
             for i in range(n_plain)]
    return pd.DataFrame(rows)


def assert_the_prompt(pairs: pd.DataFrame, tokenizer) -> None:
    assert list(pairs["prompt"]) == [build_prompt(tokenizer, t) for t in pairs["text"]]
    assert (pairs["chosen"].str.split(".").str[0] == pairs["label"].map({1: "Yes", 0: "No"})).all()


def test_spec_parsing():
    assert parse_pairs_spec("rephrase+label") == ("rephrase", "label")
    assert parse_pairs_spec(" Label ") == ("label",)
    assert set(PAIR_SOURCES) == {"label", "reasoning", "mined", "rephrase"}
    for bad, why in (("labels", "unknown source(s) 'labels'"), ("label+label", "a source is named twice"), ("", "it names no source"),
                     ("label+", "it has an empty source name")):
        with pytest.raises(UserError, match=re.escape(f"--pairs {bad!r}: {why}")):
            parse_pairs_spec(bad)


def test_label_source_is_balanced_by_default_and_natural_on_request(tokenizer):
    frame = toy()
    natural = build_preference_pairs("label", frame, tokenizer, balance=False)
    assert natural.drop(columns="pair_source").equals(build_pairs(frame, tokenizer, "label"))
    assert (natural["pair_source"] == "label").all()
    pairs = build_preference_pairs("label", frame, tokenizer, seed=3)
    assert len(pairs) == 6 and prefers_yes(pairs).sum() == 3  # all 3 sarcastic rows, 3 of the 7 plain ones
    assert set(pairs["id"]) >= {"s0", "s1", "s2"} and set(pairs["chosen"]) == {"Yes", "No"}
    assert set(pairs["rejected"]) == {"Yes", "No"} and (pairs["chosen"] != pairs["rejected"]).all()
    assert_the_prompt(pairs, tokenizer)
    assert pairs.equals(build_preference_pairs("label", frame, tokenizer, seed=3))  # seeded
    assert not pairs["id"].equals(build_preference_pairs("label", frame, tokenizer, seed=4)["id"])


def test_reasoning_source_is_todays_pairs_unchanged(tokenizer):
    frame = toy()
    pairs = build_preference_pairs("reasoning", frame, tokenizer, seed=7)
    assert pairs.drop(columns="pair_source").equals(build_pairs(frame, tokenizer, "reasoning", 7))
    assert len(pairs) == 10 and prefers_yes(pairs).sum() == 3  # the natural ratio, as today
    assert len(build_preference_pairs("reasoning", frame, tokenizer, balance=True)) == 6


def test_mined_source_loads_the_mining_file(tokenizer, tmp_path):
    mined = build_pairs(toy().iloc[[0, 4, 5]].assign(p_sarcastic=[0.2, 0.9, 0.6]), tokenizer, "reasoning")
    path = write_pairs_file(tmp_path / "mined.json", mined)
    pairs = build_preference_pairs("mined", None, tokenizer, mined_file=path)
    assert list(pairs["prompt"]) == list(mined["prompt"]) and list(pairs["chosen"]) == list(mined["chosen"])
    assert list(pairs["p_sarcastic"]) == [0.2, 0.9, 0.6] and len(pairs) == 3  # natural ratio alone
    assert len(build_preference_pairs("mined", None, tokenizer, mined_file=path, balance=True)) == 2
    with pytest.raises(UserError, match="needs the pairs file"):
        build_preference_pairs("mined", None, tokenizer)
    with pytest.raises(UserError, match="carry a prompt different"):
        build_preference_pairs("mined", None, tokenizer, mined_file=path, max_text_tokens=2)


def test_rephrase_source_is_one_yes_and_one_no_per_rephrased_tweet(tokenizer):
    frame = toy()
    pairs = build_preference_pairs("rephrase", frame, tokenizer)
    # s0 and s1 have rephrases (s2 has none; plain rows never do): tweet -> Yes, then its rephrase -> No.
    assert list(pairs["id"]) == ["s0", "s0:rephrase", "s1", "s1:rephrase"]
    assert list(pairs["text"]) == [frame.text[0], frame.rephrase[0], frame.text[1], frame.rephrase[1]]
    assert list(pairs["chosen"]) == ["Yes", "No", "Yes", "No"] and list(pairs["rejected"]) == ["No", "Yes", "No", "Yes"]
    assert list(pairs["label"]) == [1, 0, 1, 0]
    assert_the_prompt(pairs, tokenizer)
    with pytest.raises(UserError, match="attach them first"):
        build_preference_pairs("rephrase", frame.drop(columns="rephrase"), tokenizer)


def test_mixtures_keep_the_first_source_whole_and_refuse_contradictions(tokenizer):
    frame = toy()
    # rephrase+label: the tweets' Yes pairs are in both; one copy stays, named after rephrase (first).
    natural = build_preference_pairs("rephrase+label", frame, tokenizer, balance=False)
    assert len(natural) == 4 + 10 - 2 and not natural.duplicated(subset=["prompt", "chosen", "rejected"]).any()
    assert list(natural["pair_source"]).count("rephrase") == 4
    mixed = build_preference_pairs("rephrase+label", frame, tokenizer)  # balanced by default: 3 Yes, 3 No
    assert prefers_yes(mixed).sum() == 3 and len(mixed) == 6
    # The No side is cut back label pairs first: both rephrases stay.
    assert {"s0:rephrase", "s1:rephrase"} <= set(mixed["id"]) and set(mixed["pair_source"]) == {"rephrase", "label"}
    assert_the_prompt(mixed, tokenizer)
    reversed_ = build_preference_pairs("label+rephrase", frame, tokenizer)
    assert (reversed_["pair_source"] == "label").all() and len(reversed_) == 6
    # A rephrase that is another row's sarcastic tweet would teach one prompt both answers.
    bad = frame.copy()
    bad.loc[0, "rephrase"] = bad.loc[1, "text"]
    with pytest.raises(UserError, match="1 prompt\\(s\\) would be taught both answers"):
        build_preference_pairs("rephrase", bad, tokenizer)


def test_rephrases_join_on_id_and_check_the_text(tmp_path):
    raw = pd.DataFrame({"Unnamed: 0": ["0", "1", "2", "3"], "tweet": ["love mondays", "sure, great idea", "what a nice day", "ok"],
                        "sarcastic": ["1", "1", "1", "0"],
                        "rephrase": ["I hate mondays so much", "No.", "What a  NICE day", None]})
    path = tmp_path / "train.En.csv"
    raw.to_csv(path, index=False)
    table = load_rephrases(path)
    assert list(table["id"]) == ["0"]  # "No." is under MIN_WORDS words; 2's is its tweet; 3 has none
    assert MIN_WORDS == 3
    split = pd.DataFrame({"text": ["love mondays", "ok"], "label": [1, 0], "source": "isarcasmeval", "id": ["0", "3"]})
    attached = attach_rephrases(split, table)
    assert attached["rephrase"].iloc[0] == "I hate mondays so much" and pd.isna(attached["rephrase"].iloc[1])
    # Some rows found, another id naming another tweet: a split made from another copy of the data.
    other_copy = pd.concat([split, split.iloc[:1].assign(text="something else")], ignore_index=True)
    with pytest.raises(UserError, match="disagree on 1 row"):
        attach_rephrases(other_copy, table)
    # No row found at all: the file's ids are not the raw file's, and the message says so (not "make the splits
    # again", not a later "Cannot balance 0 pairs").
    with pytest.raises(UserError, match=r"None of the 2 rows of the iSarcasmEval training file mine.csv has a "
                                        r"rephrase in .*train.En.csv \(the ids do not match: 1 of them are not "
                                        r"there; 1 name another tweet there, e.g. id 0 is 'something else'"):
        attach_rephrases(split.assign(text=["something else", "ok"]), table, "iSarcasmEval training file", "mine.csv")
    (tmp_path / "generic.csv").write_text("text,label\na,1\n")
    with pytest.raises(UserError, match="not the raw iSarcasmEval file"):
        load_rephrases(tmp_path / "generic.csv")


def test_a_rephrase_on_the_other_side_of_the_split_fails_loudly():
    train = pd.DataFrame({"text": ["love mondays"], "rephrase": ["I hate mondays so much"]})
    val = pd.DataFrame({"text": ["i hate MONDAYS  so much"], "rephrase": [None]})
    with pytest.raises(UserError, match="Leakage: 1 text.*rephrase must fall on the same side"):
        check_rephrase_sides({"isarcasm_train": train, "isarcasm_val": val})
    check_rephrase_sides({"isarcasm_train": train, "isarcasm_val": val.assign(text=["another tweet"])})


def test_real_split_keeps_every_tweet_with_its_rephrase(shared_data, tokenizer):
    """The real data, split as `sarcasm-dpo split` splits it: rephrases attach, stay on their side, and pair up."""
    gen = data.load_gen(shared_data / data.GEN_RELPATH, log=lambda _m: None)
    isarcasm = data.load_isarcasm(shared_data / data.ISARCASM_RELPATH, drop_conflicts=True, log=lambda _m: None)
    splits = data.make_splits(gen, isarcasm)
    table = load_rephrases(shared_data / data.ISARCASM_RELPATH)
    for name in ("isarcasm_train", "isarcasm_val"):
        splits[name] = attach_rephrases(splits[name], table, name)
    check_rephrase_sides(splits)
    train = splits["isarcasm_train"]
    sarcastic = train[train["label"] == 1]
    with_rephrase = sarcastic["rephrase"].notna().sum()
    assert with_rephrase >= 0.95 * len(sarcastic)  # most sarcastic tweets carry one
    assert train.loc[train["label"] == 0, "rephrase"].isna().all()  # sincere tweets never do
    pairs = build_preference_pairs("rephrase", train, tokenizer)
    assert len(pairs) == 2 * with_rephrase and prefers_yes(pairs).sum() == with_rephrase


# -- a pairs file is checked pair by pair when it is read ---------------------------------------------------


def _pairs_file(tmp_path, tokenizer, rows: list[dict]):
    """A pairs file of `rows` (overrides of a sound pair each), every prompt THE prompt of its text."""
    import json

    records = []
    for i, row in enumerate(rows):
        text = f"the meeting number {i} is at three"
        records.append({"prompt": build_prompt(tokenizer, text), "chosen": "No", "rejected": "Yes", "text": text,
                        "label": 0, **row})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def test_every_pair_of_a_file_is_checked_and_the_bad_ones_named(tokenizer, tmp_path):
    from sarcasm_dpo.pairs import load_pairs_file

    yes = {"chosen": "Yes. It mocks.", "rejected": "No. It means it."}
    path = _pairs_file(tmp_path, tokenizer, [
        {}, {"label": "abc"}, {"label": 2}, {"label": 1},  # pairs 2-4: not a label, not 0/1, contradicts "No"
        {"chosen": "No. one", "rejected": "No. two"}, {**yes, "label": 0},  # 5: no preference; 6: contradicts "Yes"
        {"chosen": "Maybe", "label": None}, {**yes, "label": True}])  # 7: no label word; 8: sound
    with pytest.raises(UserError) as caught:
        load_pairs_file(path)
    message = str(caught.value)
    assert "\n" not in message and "(pairs counted from 1)" in message
    assert "2 pair(s) with an unknown label ('abc', 2;" in message and "(pairs 2, 3)" in message
    assert "2 pair(s) whose label contradicts the chosen answer" in message and "(pairs 4, 6)" in message
    assert "1 pair(s) whose chosen and rejected answers open with the same label word (pair 5)" in message
    assert "does not open with a label word" in message and "(pair 7)" in message
    assert "pair 1)" not in message and "pair 8" not in message  # the sound pairs are not named


def test_labels_are_read_as_the_data_files_spell_them_and_may_be_absent(tokenizer, tmp_path):
    from sarcasm_dpo.pairs import load_pairs_file

    yes = {"chosen": "Yes", "rejected": "No"}
    labels = [{**yes, "label": 1}, {**yes, "label": "yes"}, {**yes, "label": True}, {**yes, "label": "1.0"},
              {**yes, "label": " Sarc "}, {"label": "false"}, {"label": 0.0}, {"label": None},
              {"label": "not_sarcastic"}]
    pairs = load_pairs_file(_pairs_file(tmp_path, tokenizer, labels + [{}]))
    assert list(pairs["label"]) == [1, 1, 1, 1, 1, 0, 0, None, 0, 0]
    assert list(prefers_yes(pairs)) == [True] * 5 + [False] * 5


def test_a_null_or_blank_text_is_an_absent_text(tokenizer, tmp_path):
    """The README calls text optional: null is no text (nothing to check the prompt against), not a wrong prompt."""
    from sarcasm_dpo.pairs import check_prompts_match, load_pairs_file

    path = _pairs_file(tmp_path, tokenizer, [{}, {"text": None}, {"text": "  "}])
    pairs = load_pairs_file(path)
    assert list(pairs["text"])[1:] == [None, None] and isinstance(pairs["text"][0], str)
    check_prompts_match(pairs, tokenizer, 256, str(path))  # the pairs with text are checked, and match
    pairs = build_preference_pairs("mined", None, tokenizer, mined_file=path, balance=False)
    assert len(pairs) == 3
    with pytest.raises(UserError, match=r"2 pair\(s\) carry a prompt different .*\(pairs 1, 3, counting from 1\)"):
        check_prompts_match(pairs.assign(text=["x", None, "y"]), tokenizer, 256, "f")
    with pytest.raises(UserError, match=r"1 pair\(s\) have a 'text' that is not a string \(pair 2, counting from 1"):
        load_pairs_file(_pairs_file(tmp_path, tokenizer, [{}, {"text": 5}]))


def test_texts_cut_to_one_prompt_are_refused_as_such(tokenizer):
    """A rephrase that opens like its tweet, cut to --max_text_tokens, is the tweet's prompt: the message says
    so and what to raise, not that sources disagree (there is one source)."""
    frame = pd.DataFrame([{"text": "I am starting off my day with a meeting, what a treat", "label": 1, "id": "s0",
                           "rephrase": "I am starting off my day with a meeting, which I do not enjoy"}])
    assert len(build_preference_pairs("rephrase", frame, tokenizer)) == 2  # whole texts: two prompts
    with pytest.raises(UserError) as caught:
        build_preference_pairs("rephrase", frame, tokenizer, max_text_tokens=8)
    message = str(caught.value)
    assert message.startswith("--pairs rephrase: 1 prompt(s) would be taught both answers because cutting texts to "
                              "--max_text_tokens 8 left different texts identical"), message
    assert "raise --max_text_tokens" in message and "disagree" not in message
    assert "then reads 'which I do not enjoy', not" in message  # where the two texts part


# -- a training file of one's own in the raw iSarcasmEval layout brings its own rephrases ----------------------


def _own_files(folder, shared_data):
    """A raw-layout training file whose ids are not the shared raw file's, a plain text,label iSarcasmEval
    validation file of real raw tweets, and a toy GEN validation file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"": 5000 + i, "tweet": f"oh great, my train is late again, day {i}", "sarcastic": 1,
             "rephrase": f"I am annoyed that my train is late on day {i}"} for i in range(4)]
    rows += [{"": 6000 + i, "tweet": f"the train leaves at {i} o'clock", "sarcastic": 0, "rephrase": ""}
             for i in range(6)]
    pd.DataFrame(rows).to_csv(folder / "own_train.csv", index=False)
    raw = data.load_isarcasm(shared_data / data.ISARCASM_RELPATH, log=lambda _m: None)
    val = pd.concat([raw[raw.label == 1].head(3), raw[raw.label == 0].head(3)])[["text", "label"]]
    val.to_csv(folder / "plain_val.csv", index=False)
    pd.DataFrame({"text": ["what a lovely surprise, more rain", "it rains today"] * 2,
                  "label": [1, 0, 1, 0]}).assign(text=lambda f: f.text + [" a", " a", " b", " b"]).to_csv(
        folder / "gen_val.csv", index=False)
    return folder / "own_train.csv", folder / "plain_val.csv", folder / "gen_val.csv"


def _dpo_settings(train, val, gen_val, **overrides):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import DPOSettings

    return build(DPOSettings, {"train_csv": str(train), "isarcasm_val_csv": str(val), "val_csv": str(gen_val),
                               "pairs": "rephrase", "no_wandb": True, "seed": 0, "probe_size": 2, **overrides})


def test_a_training_file_with_its_own_rephrase_column_uses_it(shared_data, tokenizer, tmp_path):
    from sarcasm_dpo.stages import dpo

    train, val, gen_val = _own_files(tmp_path, shared_data)
    built = dpo.load_data(_dpo_settings(train, val, gen_val), tokenizer)
    pairs = built.pairs
    assert len(pairs) == 8 and prefers_yes(pairs).sum() == 4  # each sarcastic tweet: Yes; its own rephrase: No
    assert sorted(pairs.loc[~prefers_yes(pairs), "text"]) == [f"I am annoyed that my train is late on day {i}"
                                                              for i in range(4)]
    # The guarantee holds with the file's own rephrases: one that is a validation tweet is refused.
    frame = pd.read_csv(train)
    frame.loc[0, "rephrase"] = pd.read_csv(val)["text"].iloc[0]
    frame.to_csv(train, index=False)
    with pytest.raises(UserError, match="rephrase must fall on the same side"):
        dpo.load_data(_dpo_settings(train, val, gen_val), tokenizer)


def test_a_training_file_whose_ids_are_not_the_raw_files_says_so(shared_data, tokenizer, tmp_path):
    from sarcasm_dpo.stages import dpo

    train, val, gen_val = _own_files(tmp_path, shared_data)
    pd.read_csv(train).drop(columns="rephrase").to_csv(train, index=False)  # no rephrases of its own
    with pytest.raises(UserError, match=r"None of the 10 rows of the iSarcasmEval training file .*own_train.csv has a "
                                        r"rephrase in .*train.En.csv \(the ids do not match: 10 of them are not there"):
        dpo.load_data(_dpo_settings(train, val, gen_val), tokenizer)


# -- sampling: a tweet and its rephrase together; balanced means equal classes ------------------------------------


def test_a_sample_keeps_each_tweet_with_its_rephrase_alone_and_in_a_mixture(tokenizer):
    """--sample_size used to cut single pairs out of a shuffle, so most sampled tweets lost their rephrase."""
    from sarcasm_dpo.pairs import tweet_units

    frame = toy(n_sarcastic=41, n_plain=60)  # 40 tweets with a rephrase, one without, 60 plain
    for spec in ("rephrase", "rephrase+label"):
        pairs = build_preference_pairs(spec, frame, tokenizer, seed=1)
        units = tweet_units(pairs)
        assert len(set(units)) < len(units)  # minimal pairs form units of two
        for n, seed in ((20, 0), (21, 5), (30, 7)):
            sample = sampling.equal_class_sample(pairs, n, seed, positive=prefers_yes(pairs), units=units)
            yes = prefers_yes(sample)
            assert int(yes.sum()) == int((~yes).sum()) == n // 2, (spec, n)
            ids = sample["id"].astype(str)
            rephrased = set(ids[ids.str.endswith(":rephrase")].str.removesuffix(":rephrase"))
            tweets_with_one = {i for i in ids if i.startswith("s") and not i.endswith(":rephrase")} - {"s40"}
            assert rephrased == tweets_with_one, (spec, n, seed)  # no tweet without its rephrase, nor the reverse
        natural = sampling.unit_sample(pairs, 21, 3, units)
        ids = set(natural["id"].astype(str))
        assert len(natural) <= 21 and all(i.removesuffix(":rephrase") in ids for i in ids if i.endswith(":rephrase"))


def test_equal_class_sample_takes_the_smaller_class_whole_and_refuses_what_cannot_be_balanced():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [1] * 7 + [0] * 23})
    for n in (None, 0, 100, 20):  # all, all, more than there is, more than twice the smaller class
        sample = sampling.equal_class_sample(frame, n, 3)
        assert sorted(sample["label"].value_counts().to_dict().items()) == [(0, 7), (1, 7)], n
    assert sampling.equal_class_sample(frame, 9, 3)["label"].value_counts().to_dict() == {0: 4, 1: 4}  # odd: one short
    assert sampling.equal_class_sample(frame, 10, 3).equals(sampling.equal_class_sample(frame, 10, 3))  # seeded
    with pytest.raises(UserError, match=r"impossible: --sample_size 1 leaves no room for one of each class"):
        sampling.equal_class_sample(frame, 1, 3)
    with pytest.raises(UserError, match=r"impossible: they hold no sarcastic one \(0 sarcastic, 23 not\)"):
        sampling.equal_class_sample(frame[frame.label == 0], None, 3, what="the pairs of x.json")
