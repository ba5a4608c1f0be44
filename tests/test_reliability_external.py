"""Files from outside this project, end to end: odd but good input gives correct results, bad input one
paragraph (exit 2) before any model is loaded.

The cases a tester found: a stray opening quote that pandas reads on past line ends (rows merged and
mislabelled), the raw iSarcasmEval file as it is distributed (texts with both labels, an empty tweet),
a training file whose texts hold no word (the TF-IDF baseline's word features have nothing to learn),
and a header spelled `Text,Label`. The loaders' own rules are tested in test_data.py; here they are
seen through `compare`, the command that reads other people's files most.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from reliability_common import error_paragraph
from test_sft import toy_frame

from sarcasm_dpo import baseline, cli, data
from sarcasm_dpo.errors import UserError


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("external")
    train, test = toy_frame(40, 11), toy_frame(40, 12)
    test = test[~test.text.map(data.normalise).isin(set(train.text.map(data.normalise)))]
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    (root / "stray.csv").write_text('text,label\n"Sure thing,0\n"ok",1\nnormal,0\nanother one,1\n')
    (root / "Capitals.csv").write_text("Text,Label\n" + "".join(f"{t},{y}\n" for t, y in zip(test.text, test.label)))
    emoji = ["😀", "😡 😡", "🙄!!", "👍", "😂😂", "🤔?", "🙃", "💀 💀 💀"]
    pd.DataFrame({"text": emoji, "label": [1, 0] * 4}).to_csv(root / "emoji.csv", index=False)
    return {"root": root, "train": root / "train.csv", "test": root / "test.csv", "stray": root / "stray.csv",
            "capitals": root / "Capitals.csv", "emoji": root / "emoji.csv"}


def compare_argv(tiny_model_dir, files, out, *extra) -> list[str]:
    """The base model alone (no adapters): the cheapest comparison that reads every data file."""
    return ["compare", "--no_wandb", "--model", str(tiny_model_dir), "--sft_model", "none", "--dpo_model", "none",
            "--test_csv", str(files["test"]), "--train_csv", str(files["train"]), "--output_dir", str(out),
            "--batch_size", "16", *extra]


def test_a_stray_quote_in_an_extra_test_set_is_refused_before_scoring(tiny_model_dir, files, tmp_path, capsys,
                                                                       monkeypatch):
    from sarcasm_dpo import models

    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded before the bad file was refused")

    monkeypatch.setattr(models, "load_base_model", no_loading)
    code = cli.main(compare_argv(tiny_model_dir, files, tmp_path / "out", "--extra_test", f"x={files['stray']}"))
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and len(message.strip().splitlines()) == 1, message
    assert str(files["stray"]) in message and "line 2" in message and "stray opening quote" in message
    assert not (tmp_path / "out").exists()


def test_compare_scores_the_raw_isarcasmeval_file_and_odd_headers(tiny_model_dir, files, shared_data, tmp_path,
                                                                  capsys):
    raw = shared_data / data.ISARCASM_RELPATH
    out = tmp_path / "out"
    code = cli.main(compare_argv(tiny_model_dir, files, out, "--sample_size", "16", "--extra_test", f"isarc={raw}",
                                 "--extra_test", f"caps={files['capitals']}"))
    done = capsys.readouterr()
    assert code == 0, done.err[-3000:]
    # Dropped as `split` drops them, and said so with the rows.
    assert "5 text(s) appear with conflicting labels (rows 18, 25" in done.out
    assert "1 row(s) with an empty text (rows 1063): dropped." in done.out
    results = json.loads((out / "model_comparison_results.json").read_text())
    extra = results["extra_tests"]
    assert set(extra) == {"isarc", "caps"} and "tfidf_logreg" in extra["caps"]["models"]
    assert extra["isarc"]["test_set"]["n"] == 16
    assert extra["isarc"]["test_set"]["n_total"] == len(data.load_table(raw, log=lambda _m: None)) < 3467
    assert extra["caps"]["test_set"]["n_total"] == len(pd.read_csv(files["test"]))


def test_a_training_file_without_a_word_still_gives_a_baseline(tiny_model_dir, files, tmp_path, capsys):
    """Emoji-only training texts: scikit-learn refused the word features' empty vocabulary (exit 1, a
    traceback); the baseline is now the character n-grams alone, and check_baseline_train says so."""
    out = tmp_path / "out"
    code = cli.main(compare_argv(tiny_model_dir, files, out, "--train_csv", str(files["emoji"])))
    assert code == 0, capsys.readouterr().err[-3000:]
    results = json.loads((out / "model_comparison_results.json").read_text())
    assert 0 <= results["models"]["tfidf_logreg"]["accuracy"] <= 1
    train = data.load_table(files["emoji"])
    notes = []
    baseline.check_baseline_train(train.text, train.label, files["emoji"], log=notes.append)
    assert notes == [f"Note: no text of {files['emoji']} has a word (two or more letters or digits), so the TF-IDF "
                     "baseline uses character 2-5-grams only."]
    assert baseline.feature_kinds(baseline.tfidf_logreg(train)) == ["char"]
    words = data.load_table(files["train"])
    assert baseline.feature_kinds(baseline.tfidf_logreg(words)) == ["word", "char"]  # as before wherever words are
    notes.clear()
    baseline.check_baseline_train(words.text, words.label, files["train"], log=notes.append)
    assert notes == []


def test_a_one_class_training_file_is_refused_naming_it():
    with pytest.raises(UserError, match=r"^my_train.csv, which the TF-IDF baseline trains on, holds only label 1 "
                                        r"\(3 text\(s\), all sarcastic\).*--train_csv.*--no_baseline"):
        baseline.check_baseline_train(["a b", "c d", "e f"], [1, 1, 1], "my_train.csv")
    with pytest.raises(UserError, match="holds no texts"):
        baseline.check_baseline_train([], [], "empty.csv")
    with pytest.raises(UserError, match=r"The TF-IDF baseline's training split holds only label 0"):
        baseline.tfidf_logreg(pd.DataFrame({"text": ["a b", "c d"], "label": [0, 0]}))
