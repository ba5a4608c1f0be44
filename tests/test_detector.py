"""The Python API (detector.SarcasmDetector): the same numbers as `sarcasm-dpo predict`, and what the model's run
recorded (threshold, text length) used unless overridden.

    PYTHONPATH=src python -m pytest -q tests/test_detector.py
"""

from __future__ import annotations

import json
import re

import pytest
from test_compare import make_adapter

from sarcasm_dpo.cli import main
from sarcasm_dpo.detector import SarcasmDetector, recorded_text_tokens
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.scoring import Scorer
from sarcasm_dpo.thresholds import THRESHOLD_FILE

TEXTS = ["oh great, rain again " * 12, "we agreed on the plan", "love waiting in line for hours"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """An adapter whose run trained and validated at 8 text tokens, and chose 0.5003 on validation."""
    folder = tmp_path_factory.mktemp("det") / "sft"
    make_adapter(tiny_model_dir, folder, seed=3,
                 summary={"config": {"model": str(tiny_model_dir), "max_text_tokens": 8}})
    (folder / THRESHOLD_FILE).write_text(json.dumps({"threshold": 0.5003}))
    return folder


def test_load_uses_the_recorded_threshold_and_text_length(adapter, tiny_model_dir):
    detector = SarcasmDetector.load(adapter=str(adapter), warn=lambda m: None)
    assert detector.threshold == pytest.approx(0.5003) and detector.max_text_tokens == 8
    rows = detector.predict(TEXTS)
    assert [r["text"] for r in rows] == TEXTS
    assert all(r["label"] == int(r["p_sarcastic"] >= 0.5003) for r in rows)
    # The scores are those of the scorer at the recorded length: the long first text is cut to 8 tokens.
    at_8 = Scorer(detector.scorer.model, detector.scorer.tokenizer, max_text_tokens=8).predict_proba(TEXTS)
    at_256 = Scorer(detector.scorer.model, detector.scorer.tokenizer, max_text_tokens=256).predict_proba(TEXTS)
    assert [r["p_sarcastic"] for r in rows] == pytest.approx(list(at_8), abs=1e-6)
    assert abs(at_8[0] - at_256[0]) > 1e-6  # the length matters for this text, so the test can tell

    chosen = SarcasmDetector.load(str(tiny_model_dir), str(adapter), threshold=0.0, max_text_tokens=256,
                                  warn=lambda m: None)
    assert chosen.threshold == 0.0 and chosen.max_text_tokens == 256
    assert [r["label"] for r in chosen.predict(TEXTS)] == [1, 1, 1]
    assert chosen.predict_proba(TEXTS) == pytest.approx(list(at_256), abs=1e-6)


def test_predict_command_gives_the_detectors_rows(adapter, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--adapter", str(adapter), "--input", str(texts)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows == SarcasmDetector.load(adapter=str(adapter), warn=lambda m: None).predict(TEXTS)
    assert "no COMPLETE.json" in captured.err  # an unfinished-looking adapter is named, beside the rows


def test_a_plain_model_uses_the_defaults(tiny_model_dir):
    detector = SarcasmDetector.load(str(tiny_model_dir))
    assert detector.threshold == 0.5 and detector.max_text_tokens == 256
    assert recorded_text_tokens(str(tiny_model_dir)) is None


@pytest.mark.parametrize("record,message", [
    ({"max_text_tokens": 0}, "records max_text_tokens 0, not a positive whole number"),
    ({"max_text_tokens": "128"}, "records max_text_tokens '128'"),
    ({"training_config": {"max_text_tokens": -4}}, "records max_text_tokens -4"),
    ([1, 2], "is damaged: it holds JSON an array where an object belongs"),
])
def test_a_bad_export_record_is_one_clear_error(tmp_path, record, message):
    (tmp_path / "sarcasm_dpo.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recorded_text_tokens(str(tmp_path))


def test_an_export_record_gives_the_length(tmp_path):
    (tmp_path / "sarcasm_dpo.json").write_text(json.dumps({"threshold": 0.6, "training_config": {"max_text_tokens": 64}}))
    assert recorded_text_tokens(str(tmp_path)) == 64
    (tmp_path / "sarcasm_dpo.json").write_text(json.dumps({"threshold": 0.6, "max_text_tokens": 32,
                                                           "training_config": {"max_text_tokens": 64}}))
    assert recorded_text_tokens(str(tmp_path)) == 32


@pytest.mark.parametrize("kwargs,message", [
    ({}, "Give --model"),
    ({"model": "m", "batch_size": 0}, "--batch_size must be a positive number, got 0"),
    ({"model": "m", "max_text_tokens": -1}, "--max_text_tokens must be a positive number, got -1"),
    ({"model": "m", "threshold": 2.0}, r"must be in \[0, 1\], got 2.0"),
    ({"model": "m", "device": "gpu"}, "--device must be cpu, cuda, cuda:N or mps"),
])
def test_load_refuses_nonsense_before_loading_anything(kwargs, message):
    with pytest.raises(UserError, match=message):
        SarcasmDetector.load(**kwargs)


def test_python_callers_get_clear_errors_not_wrong_scores(adapter, tiny_model_dir):
    """What the command line cannot be given but a Python caller can: one string, non-strings, wrong types."""
    detector = SarcasmDetector.load(adapter=str(adapter), warn=lambda m: None)
    for texts, words in (("Oh great", "not one string"), ([None], "item(s) [0] are NoneType"),
                         (["fine", b"hello"], "item(s) [1] are bytes"), (["fine", "  "], "texts [1] are empty"),
                         (None, "got NoneType")):
        with pytest.raises(UserError, match=re.escape(words)):
            detector.predict(texts)
        with pytest.raises(UserError, match=re.escape(words)):
            detector.predict_proba(texts)
    for kwargs, words in (({"threshold": "0.5"}, "--threshold must be a number"),
                          ({"threshold": True}, "--threshold must be a number"),
                          ({"batch_size": "8"}, "--batch_size must be a positive whole number"),
                          ({"batch_size": 1.5}, "--batch_size must be a positive whole number"),
                          ({"max_text_tokens": 2.5}, "--max_text_tokens must be a positive whole number")):
        with pytest.raises(UserError, match=words):
            SarcasmDetector.load(adapter=str(adapter), warn=lambda m: None, **kwargs)
    with pytest.raises(UserError, match=r"--threshold is a probability and must be in \[0, 1\], got 5"):
        SarcasmDetector(detector.scorer.model, detector.scorer.tokenizer, threshold=5)
    import pandas as pd

    for texts, words in ((pd.DataFrame({"text": ["a b", "c d"]}), "not a DataFrame"), ({"a": 1}, "not a dict"),
                         ({"a", "b"}, "not a set"), (["a\ud800b"], "lone surrogate"), (["a\x00b"], "NUL")):
        with pytest.raises(UserError, match=words):
            detector.predict(texts)
    assert len(detector.predict(pd.Series(["a b", "c d"]))) == 2  # a Series (a column) is a list of texts


def test_a_damaged_run_record_is_an_error_not_the_default_length(adapter, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    (damaged / "training_summary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="training_summary.json is damaged: .* not UTF-8 .* trained with"):
        SarcasmDetector.load(adapter=str(damaged), warn=lambda m: None)
    (damaged / "training_summary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds JSON an array where an object belongs"):
        recorded_text_tokens(None, str(damaged))
