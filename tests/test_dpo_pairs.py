"""`sarcasm-dpo dpo --pairs SPEC`: the preference source reaches the DPO stage and builds what it says."""

from __future__ import annotations

import json

import pytest

from sarcasm_dpo.cli import main
from sarcasm_dpo.config import build
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.settings import DPOSettings, SplitSettings


@pytest.fixture(scope="module")
def real_splits(shared_data, tmp_path_factory):
    """The real splits (split_info.json names the raw iSarcasmEval file the rephrases come from)."""
    from sarcasm_dpo.stages import split

    out = tmp_path_factory.mktemp("splits") / "splits"
    split.run(SplitSettings(data_dir=str(shared_data), output_dir=str(out), no_wandb=True))
    return out


def settings_for(splits, **overrides) -> DPOSettings:
    values = dict(train_csv=str(splits / "isarcasm_train.csv"), val_csv=str(splits / "gen_val.csv"),
                  isarcasm_val_csv=str(splits / "isarcasm_val.csv"), no_wandb=True, seed=3, val_sample_size=8,
                  probe_size=4)
    values.update(overrides)
    return build(DPOSettings, values)


def test_rephrase_plus_label_builds_minimal_pairs_balanced(real_splits, tiny_model_dir):
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import prefers_yes
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = dpo.load_data(settings_for(real_splits, pairs="rephrase+label", sample_size=200), tokenizer)
    pairs, info = data.pairs, data.info
    assert info["pairs_spec"] == "rephrase+label" and len(pairs) == 200 and info["available"] > 1000
    yes = prefers_yes(pairs)
    assert int(yes.sum()) == 100 and info["balanced"] is True  # class-balanced: half the pairs teach "Yes"
    assert set(info["pair_sources"]) <= {"rephrase", "label"} and sum(info["pair_sources"].values()) == 200
    line = dpo.describe_start(settings_for(real_splits, pairs="rephrase+label"), data, "base", "cpu", None)
    assert "(--pairs rephrase+label: " in line and " style)" not in line, line  # says what the spec built
    # A rephrase pair's prompt holds the author's sincere rewording, and prefers "No".
    rephrased = pairs[(pairs["pair_source"] == "rephrase") & pairs["id"].astype(str).str.endswith(":rephrase")]
    assert len(rephrased) > 0 and not prefers_yes(rephrased).any()
    tweets = pairs[(pairs["pair_source"] == "rephrase") & ~pairs["id"].astype(str).str.endswith(":rephrase")]
    assert prefers_yes(tweets).all()
    # Rephrases are texts of the training split only: none appears in a validation split.
    from sarcasm_dpo.data import load_split, normalise

    val = {normalise(t) for name in ("gen_val", "isarcasm_val") for t in load_split(real_splits / f"{name}.csv")["text"]}
    assert not any(normalise(t) in val for t in rephrased["text"])


def test_a_bad_pairs_spec_is_one_paragraph_and_exit_2(real_splits, tmp_path, capsys):
    code = main(["dpo", "--pairs", "rephrase+sarcasm", "--train_csv", str(real_splits / "isarcasm_train.csv"),
                 "--output_dir", str(tmp_path / "dpo"), "--no_wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown source(s) 'sarcasm'" in err and "Traceback" not in err
    assert not (tmp_path / "dpo").exists()
    with pytest.raises(UserError, match="does not name it"):
        build(DPOSettings, {"pairs": "label", "preference_data": "mined.json"})
    with pytest.raises(UserError, match="give it with --preference_data"):
        build(DPOSettings, {"pairs": "rephrase+mined"})


def test_without_pairs_the_pairs_are_todays(real_splits, tiny_model_dir):
    """No --pairs: exactly the --pair_style pairs of before, and no pairs_spec in the record."""
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import build_pairs, fit_pairs
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    s = settings_for(real_splits, sample_size=120)
    data = dpo.load_data(s, tokenizer)
    train = load_split(s.train_csv, "iSarcasmEval training split")
    today = fit_pairs(build_pairs(dpo.sample_rows(train, s)[0], tokenizer, s.pair_style, s.seed, s.max_text_tokens),
                      tokenizer, s.max_text_tokens, s.max_length)
    assert data.pairs.equals(today.reset_index(drop=True))
    assert "pairs_spec" not in data.info and data.info["balanced"] is False and len(data.pairs) == 120


def test_dpo_trains_on_label_pairs_and_records_the_spec(tiny_model_dir, tmp_path):
    from test_dpo import dpo_settings, make_sft_adapter, write_toy_splits
    from types import SimpleNamespace

    from sarcasm_dpo.stages import dpo

    toy = SimpleNamespace(paths=write_toy_splits(tmp_path / "splits"), sft=make_sft_adapter(tiny_model_dir, tmp_path / "sft"))
    out = tmp_path / "dpo"
    summary = dpo.run(dpo_settings(toy, out, pairs="label", sample_size=8, epochs=1, val_sample_size=8, probe_size=4))
    saved = json.loads((out / "dpo_training_summary.json").read_text())
    assert saved["pairs"]["pairs_spec"] == "label" == summary["pairs"]["pairs_spec"]
    assert saved["pairs"]["pair_sources"] == {"label": 8} and saved["pairs"]["used"] == 8
    assert saved["pairs"]["balanced"] is True  # label is balanced by default, without --balance


# -- bad input: a clear one-paragraph refusal, exit 2, nothing lost ------------------------------------------


def _mined_file(splits, tokenizer, folder, n: int = 6, overrides: dict | None = None):
    """A pairs file as `mine` writes it, from the first n training texts; `overrides`: pair index -> fields."""
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.pairs import build_pairs

    train = load_split(splits / "isarcasm_train.csv")
    records = build_pairs(train.head(n), tokenizer, "reasoning").to_dict(orient="records")
    for index, fields in (overrides or {}).items():
        records[index].update(fields)
    path = folder / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def test_a_contradictory_pairs_file_is_one_paragraph_and_exit_2(tiny_model_dir, tmp_path, capsys):
    import pandas as pd
    from test_dpo import make_sft_adapter, write_toy_splits

    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import build_pairs

    toy = write_toy_splits(tmp_path / "splits")
    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    sound = build_pairs(pd.read_csv(toy.train).head(4), load_tokenizer(str(tiny_model_dir)), "reasoning")
    args = ["dpo", "--sft_model", str(sft), "--train_csv", str(toy.train), "--val_csv", str(toy.gen_val),
            "--isarcasm_val_csv", str(toy.is_val), "--no_wandb", "--output_dir", str(tmp_path / "dpo")]
    for fields, says in (({"label": "abc"}, "1 pair(s) with an unknown label ('abc';"),  # was a traceback
                         ({"label": 2}, "1 pair(s) with an unknown label (2;"),  # was accepted
                         ({"chosen": "No. one", "rejected": "No. two"}, "open with the same label word (pair 3)")):
        records = sound.to_dict(orient="records")
        records[2].update(fields)
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(records))
        code = main([*args, "--preference_data", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err and err.count("\n") == 1, err
        assert not (tmp_path / "dpo").exists()


def test_label_1_on_a_no_pair_is_refused_not_counted_sarcastic(real_splits, tiny_model_dir, tmp_path):
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain = _mined_file(real_splits, tokenizer, tmp_path, 6)
    data = dpo.load_data(settings_for(real_splits, preference_data=str(plain)), tokenizer)
    counts = data.info["class_counts"]
    labels = [record["label"] for record in json.loads(plain.read_text())]
    wrong = _mined_file(real_splits, tokenizer, tmp_path, 6, {i: {"label": 1 - labels[i]} for i in (1, 4)})
    with pytest.raises(UserError, match=r"2 pair\(s\) whose label contradicts the chosen answer .*\(pairs 2, 5\)"):
        dpo.load_data(settings_for(real_splits, preference_data=str(wrong)), tokenizer)
    # Without labels the counts come from the answers each pair prefers, the same as with them.
    bare = _mined_file(real_splits, tokenizer, tmp_path, 6, {i: {"label": None} for i in range(6)})
    assert dpo.load_data(settings_for(real_splits, preference_data=str(bare)), tokenizer).info["class_counts"] == counts


def test_a_pair_with_null_text_trains_and_the_others_are_still_checked_for_leakage(real_splits, tiny_model_dir,
                                                                                   tmp_path):
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import build_pairs
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = _mined_file(real_splits, tokenizer, tmp_path, 6, {0: {"text": None}})
    data = dpo.load_data(settings_for(real_splits, preference_data=str(path)), tokenizer)
    assert len(data.pairs) == 6 and int(data.pairs["text"].isna().sum()) == 1
    # One pair without text no longer switches off the leakage check for the rest.
    val = load_split(real_splits / "gen_val.csv").head(1)
    leaked = json.loads(path.read_text()) + build_pairs(val, tokenizer, "reasoning").to_dict(orient="records")
    path.write_text(json.dumps(leaked))
    with pytest.raises(UserError, match=r"also appear in the validation file .*gen_val.csv \(--val_csv\)"):
        dpo.load_data(settings_for(real_splits, preference_data=str(path)), tokenizer)


def test_rephrases_cut_to_their_tweets_prompt_say_so(real_splits, tiny_model_dir):
    """--pairs rephrase at --max_text_tokens 32: tweets and rephrases that open alike become one prompt."""
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(UserError) as caught:
        dpo.load_data(settings_for(real_splits, pairs="rephrase", sample_size=8, max_text_tokens=32), tokenizer)
    message = str(caught.value)
    assert "because cutting texts to --max_text_tokens 32 left different texts identical" in message, message
    assert "the sources disagree" not in message and "raise --max_text_tokens" in message


def test_a_one_class_gen_validation_split_is_refused(real_splits, tiny_model_dir, tmp_path):
    import pandas as pd

    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    val = pd.read_csv(real_splits / "gen_val.csv")
    one = tmp_path / "gen_val_one.csv"
    val[val["label"] == 1].to_csv(one, index=False)
    with pytest.raises(UserError, match=r"gen_val_one.csv holds one class only \(\{'sarcastic': \d+, 'not_sarcas"):
        dpo.load_data(settings_for(real_splits, val_csv=str(one), pairs="label", sample_size=8), tokenizer)
    # Both classes in the file, but --val_sample_size draws one of them only.
    skew = tmp_path / "gen_val_skew.csv"
    pd.concat([val[val["label"] == 1].head(40), val[val["label"] == 0].head(1)]).to_csv(skew, index=False)
    with pytest.raises(UserError, match=r"one class only \(as sampled by --val_sample_size 4\)"):
        dpo.load_data(settings_for(real_splits, val_csv=str(skew), val_sample_size=4, pairs="label", sample_size=8),
                      tokenizer)


# -- --balance means equal classes, and the record says what was done ----------------------------------------------


def test_balance_gives_as_many_pairs_of_each_class_and_says_so(real_splits, tiny_model_dir, capsys):
    """The training split holds 689 sarcastic and 2071 other texts. --balance used to read a --sample_size at or
    over that as "take everything" (2760 pairs, 689/2071) and fill the rest of a smaller one from the larger class
    (2000: 689/1311), and record `balanced: true` either way."""
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    for size, per_class in ((4000, 689), (0, 689), (2000, 689), (999, 499), (200, 100)):
        info = dpo.load_data(settings_for(real_splits, pair_style="label", balance=True, sample_size=size),
                             tokenizer).info
        assert info["class_counts"] == {"sarcastic": per_class, "not_sarcastic": per_class}, size
        assert info["used"] == 2 * per_class and info["balanced"] is True and info["sampling"] == "balanced"
        assert info["available_class_counts"] == {"sarcastic": 689, "not_sarcastic": 2071}
        out = " ".join(capsys.readouterr().out.split())
        if size in (4000, 0, 2000):
            assert "class-balanced: 689 pairs of each class, 1378 in all (the smaller class, sarcastic, has 689 of " \
                   "the 2760" in out, out
            assert ("asks for more pairs" not in out) and (("asked for more than there are" in out) == (size == 4000))
        elif size == 999:
            assert "499 pairs of each class, 998 in all (--sample_size 999 is odd)" in out, out
        else:
            assert "Note:" not in out, out
    # Without --balance: stratified, as before, and the record says so; `--pairs reasoning` (natural ratio) draws its
    # pairs by the same rule as `--pair_style reasoning` draws rows: the split's ratio kept, not as a random draw falls.
    info = dpo.load_data(settings_for(real_splits, pair_style="label", sample_size=400), tokenizer).info
    assert info["balanced"] is False and info["sampling"] == "stratified" and info["used"] == 400
    for request in ({"pair_style": "reasoning"}, {"pairs": "reasoning"}):
        info = dpo.load_data(settings_for(real_splits, sample_size=400, **request), tokenizer).info
        assert info["sampling"] == "stratified" and info["class_counts"] == {"sarcastic": 100, "not_sarcastic": 300}, \
            (request, info["class_counts"])


def test_balance_on_a_pairs_file_without_labels_balances_by_the_preferred_answer(real_splits, tiny_model_dir,
                                                                                 tmp_path):
    """A pair's class is the answer it prefers (pairs.prefers_yes): --balance used to fall back to a plain random
    draw when the file's pairs carried no `label`."""
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import prefers_yes
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    labelled = _mined_file(real_splits, tokenizer, tmp_path, 60)
    records = json.loads(labelled.read_text())
    assert 0 < sum(r["label"] for r in records) < 20  # mostly "No", as the split is
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{k: v for k, v in r.items() if k != "label"} for r in records]))
    for path in (labelled, bare):
        for size in (0, 10):
            data = dpo.load_data(settings_for(real_splits, preference_data=str(path), balance=True, sample_size=size),
                                 tokenizer)
            yes = prefers_yes(data.pairs)
            assert int(yes.sum()) == int((~yes).sum()) > 0 and data.info["balanced"] is True, (path.name, size)
            assert data.info["sampling"] == "balanced" and (size == 0 or len(data.pairs) == size)
    same = [dpo.load_data(settings_for(real_splits, preference_data=str(p), balance=True, sample_size=10),
                          tokenizer).pairs["prompt"].tolist() for p in (labelled, bare)]
    assert same[0] == same[1]  # the same pairs, labelled or not
    # A file of one class cannot be balanced: said, not trained on as it is.
    one_class = tmp_path / "no_only.json"
    one_class.write_text(json.dumps([r for r in json.loads(bare.read_text())
                                     if r["chosen"].startswith("No")]))
    with pytest.raises(UserError, match=r"class-balanced sample of the pairs of .*no_only.json is impossible: they "
                                        r"hold no sarcastic one"):
        dpo.load_data(settings_for(real_splits, preference_data=str(one_class), balance=True), tokenizer)
    with pytest.raises(UserError, match="--sample_size 1 leaves no room for one of each class"):
        dpo.load_data(settings_for(real_splits, pairs="label", sample_size=1), tokenizer)


@pytest.mark.parametrize("spec", ["rephrase", "rephrase+label"])
def test_a_sample_of_rephrase_pairs_keeps_each_tweet_with_its_rephrase(real_splits, tiny_model_dir, spec):
    """--pairs rephrase --sample_size 200 used to cut single pairs from a shuffle: 6 tweets kept their rephrase."""
    from sarcasm_dpo.models import load_tokenizer
    from sarcasm_dpo.pairs import prefers_yes
    from sarcasm_dpo.stages import dpo

    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = dpo.load_data(settings_for(real_splits, pairs=spec, sample_size=200), tokenizer)
    ids = data.pairs["id"].astype(str)
    rephrases = set(ids[ids.str.endswith(":rephrase")].str.removesuffix(":rephrase"))
    assert len(rephrases) == 100 if spec == "rephrase" else len(rephrases) >= 90
    assert rephrases <= set(ids)  # every sampled rephrase with its tweet
    tweets = set(ids[(data.pairs["pair_source"] == "rephrase") & ~ids.str.endswith(":rephrase")])
    assert tweets <= rephrases  # every sampled tweet of the rephrase source with its rephrase
    yes = prefers_yes(data.pairs)
    assert int(yes.sum()) == int((~yes).sum()) == 100 and data.info["balanced"] is True
