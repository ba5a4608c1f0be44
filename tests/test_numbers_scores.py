"""Every P(sarcastic) a stage uses is a finite probability, and every printed row agrees with itself.

A model with NaN weights (a damaged file, or training that diverged) gives NaN scores: the shared scorer
refuses them before any stage prints, counts or writes one (predict, compare), and the metrics refuse
scores that are not probabilities wherever they come from.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sarcasm_dpo.cli import main
from sarcasm_dpo.errors import UserError

TEXTS = ["oh great, rain again", "we agreed on the plan", "i just love waiting in line for hours",
         "thanks for nothing", "the meeting is at three"]


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its final norm set to NaN, as a diverged run would leave it: every logit is NaN."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("nan-model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


def _scorer(folder, **kwargs):
    from sarcasm_dpo.models import load_model
    from sarcasm_dpo.scoring import Scorer

    model, tokenizer = load_model(str(folder))
    return Scorer(model, tokenizer, **kwargs)


def test_the_scorer_refuses_non_finite_scores_naming_how_many_and_why(nan_model_dir, tiny_model_dir, monkeypatch):
    from sarcasm_dpo.scoring import NonFiniteScores, Scorer

    with pytest.raises(NonFiniteScores) as caught:
        _scorer(nan_model_dir, batch_size=2).predict_proba(TEXTS)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)  # one paragraph and exit 2 at the command line
    assert "for 5 of the 5 texts" in message and "damaged" in message and "diverged" in message, message
    # Some rows only (one text per batch of two, three batches): the count says so, and no score comes back.
    real = Scorer.sarcastic_proba

    def first_row_nan(self, inputs, prefix=None):
        p = real(self, inputs, prefix).clone()
        p[0] = float("nan")
        return p

    monkeypatch.setattr(Scorer, "sarcastic_proba", first_row_nan)
    scorer = _scorer(tiny_model_dir, batch_size=2, prefix_cache=False)
    with pytest.raises(NonFiniteScores, match="for 3 of the 5 texts"):
        scorer.predict_proba(TEXTS)
    scorer.name = "SFT (models/sft)"  # what compare and the detector tell it: the error names the model
    with pytest.raises(NonFiniteScores) as named:
        scorer.predict_proba(TEXTS)
    assert "for 3 of the 5 texts" in str(named.value)
    assert str(named.value).startswith("SFT (models/sft) gave")


def test_the_shared_prefix_is_not_blamed_for_nan_weights(nan_model_dir, recwarn):
    """The prefix cache's check compares two paths' scores: NaN in both is the weights' fault, not the cache's, so
    no "differs by nan" warning and no verdict on the cache for the architecture; the scorer's error follows."""
    from sarcasm_dpo import scoring

    scorer = _scorer(nan_model_dir, prefix_cache=True)
    before = dict(scoring._PREFIX_CHECKED)
    with pytest.raises(scoring.NonFiniteScores):
        scorer.predict_proba(TEXTS)
    assert not [w for w in recwarn if "shared-prefix" in str(w.message)]
    assert scoring._PREFIX_CHECKED == before


def test_predict_prints_no_row_from_a_model_with_nan_weights(nan_model_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--model", str(nan_model_dir), "--input", str(texts)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no NaN row (invalid JSON, label 0) was printed
    assert "non-finite P(sarcastic)" in captured.err and str(nan_model_dir) in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_predict_says_how_many_rows_it_printed_before_a_chunk_with_non_finite_scores(tiny_model_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    """Rows go out a chunk at a time: scores that turn non-finite in a later chunk stop predict with a count of the
    rows already printed (whole lines, from the same model), exit 2."""
    from sarcasm_dpo.scoring import NonFiniteScores, Scorer
    from sarcasm_dpo.stages import predict

    monkeypatch.setattr(predict, "STREAM_CHUNK", 2)
    real = Scorer.predict_proba
    calls = []

    def failing_later(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise NonFiniteScores(1, len(texts))
        return real(self, texts)

    monkeypatch.setattr(Scorer, "predict_proba", failing_later)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--model", str(tiny_model_dir), "--input", str(texts), "--batch_size", "1"]) == 2
    captured = capsys.readouterr()
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == TEXTS[:2]
    assert "after 2 of 5 texts" in captured.err and "Traceback" not in captured.err, captured.err


def test_the_detector_names_the_model_whose_scores_are_not_finite(nan_model_dir):
    from sarcasm_dpo.detector import SarcasmDetector

    detector = SarcasmDetector.load(str(nan_model_dir))
    for call in (detector.predict, detector.predict_proba):
        with pytest.raises(UserError, match=f"The model {nan_model_dir} gave a non-finite"):
            call(TEXTS[:2])


def test_compare_refuses_a_nan_adapter_before_writing_anything(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from test_compare import gen_like, make_adapter

    sft = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    weights = sft / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(t, float("nan")) if "lora_B" in k else t for k, t in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    gen_like(20, 0, "train").to_csv(tmp_path / "train.csv", index=False)
    gen_like(10, 1, "test").to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "results"
    code = main(["compare", "--no_wandb", "--test_csv", str(tmp_path / "test.csv"), "--train_csv",
                 str(tmp_path / "train.csv"), "--sft_model", str(sft), "--dpo_model", "none", "--model",
                 str(tiny_model_dir), "--output_dir", str(out), "--n_bootstrap", "20", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"The SFT adapter {sft}" in err and "non-finite P(sarcastic) (NaN or infinite) for 10 of the" in err, err
    assert not out.exists()  # nothing written, not even a plot of the base model alone


def test_a_printed_row_reads_back_to_its_own_label(tiny_model_dir):
    """A row's label is its printed p_sarcastic against the threshold: a score just under 0.5 is not printed as
    0.5 with label 0. The score is printed whole (float64, exact through JSON), and the label comes from it."""
    from sarcasm_dpo.detector import SarcasmDetector
    from sarcasm_dpo.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    detector = SarcasmDetector(model, tokenizer, threshold=0.5)
    scores = np.array([0.4999996, 0.5, 0.5000004, 0.49999999999999994])
    detector.scorer.predict_proba = lambda texts: scores
    rows = detector.predict(["a", "b", "c", "d"])
    back = [json.loads(json.dumps(row)) for row in rows]
    assert [r["label"] for r in back] == [0, 1, 1, 0]
    assert all(r["label"] == int(r["p_sarcastic"] >= 0.5) for r in back)
    assert [r["p_sarcastic"] for r in back] == list(scores)


def test_a_float32_score_is_labelled_by_its_value_not_by_a_rounded_threshold(tiny_model_dir):
    """numpy 2 compares a float32 score with a Python float in float32: a threshold between two float32 scores
    rounds onto one of them. Labels compare in float64 (metrics.decide), so the lower score stays below."""
    from sarcasm_dpo.detector import SarcasmDetector
    from sarcasm_dpo.models import load_model
    from test_numbers_thresholds import float32_neighbours_whose_midpoint_rounds_down

    low, high, cut = float32_neighbours_whose_midpoint_rounds_down()
    model, tokenizer = load_model(str(tiny_model_dir))
    detector = SarcasmDetector(model, tokenizer, threshold=cut)
    detector.scorer.predict_proba = lambda texts: np.array([low, high], dtype=np.float32)
    assert [r["label"] for r in detector.predict(["a", "b"])] == [0, 1]
