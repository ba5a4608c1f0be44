"""`sarcasm-dpo export`: merged weights that plain transformers loads give the adapter path's probabilities."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sarcasm_dpo.cli import main

TEXTS = ["oh great, rain again", "we agreed on the plan", "i just love waiting in line for hours", "thanks for nothing"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, recorded like an SFT run's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    record = {"config": {"model": str(tiny_model_dir), "max_text_tokens": 64}, "best_val": {"f1": 0.5, "accuracy": 0.5, "n": 8,
                                                                   "roc_auc": 0.5, "threshold": 0.5}}
    (folder / "training_summary.json").write_text(json.dumps(record))
    return folder


def _scores(model, tokenizer):
    from sarcasm_dpo.scoring import Scorer

    return Scorer(model, tokenizer, batch_size=2).predict_proba(TEXTS)


def test_export_loads_in_plain_transformers_with_the_adapter_probabilities(adapter_dir, tiny_model_dir, tmp_path,
                                                                            capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarcasm_dpo.models import load_model

    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", ""]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable by others, like every other output
    plain = AutoModelForCausalLM.from_pretrained(out)  # no peft anywhere
    assert not hasattr(plain, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference_model, reference_tok = load_model(str(tiny_model_dir), adapter=str(adapter_dir))
    assert tokenizer.chat_template == reference_tok.chat_template
    exported, adapted = _scores(plain.eval(), tokenizer), _scores(reference_model, reference_tok)
    base = _scores(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer)
    assert abs(exported - adapted).max() < 1e-4
    assert abs(adapted - base).max() > 1e-3  # the adapter changed something, so the check above means something

    info = json.loads((out / "sarcasm_dpo.json").read_text())
    assert info["threshold"] == 0.5 and "training record" in info["threshold_source"]
    # The text length the adapter was trained with travels with the export, and predict uses it.
    from sarcasm_dpo.detector import SarcasmDetector, recorded_text_tokens

    assert recorded_text_tokens(None, str(adapter_dir)) == info["max_text_tokens"] == 64
    assert SarcasmDetector.load(str(out)).max_text_tokens == info["max_text_tokens"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: other" in card and "Intended use and limits" in card
    assert "Is the following text sarcastic?" in card and "no test-set figures" in card
    # The card's eight lines of plain transformers give the same probability, for a text past the recorded length
    # (64 tokens) too: they cut it as training and predict do.
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("THIS_FOLDER", str(out))
    assert len(code.strip().splitlines()) == 8
    from sarcasm_dpo.scoring import Scorer

    long_text = "Oh great, another Monday, " * 30
    for text in ("Oh great, another Monday.", long_text):
        exec(compile(code.replace("'Oh great, another Monday.'", repr(text)), "card", "exec"), {})
        p_card = float(capsys.readouterr().out.strip().split()[-2])
        expected = Scorer(plain, tokenizer, max_text_tokens=info["max_text_tokens"]).predict_proba([text])[0]
        assert p_card == pytest.approx(float(expected), abs=1e-5)
    assert Scorer(plain, tokenizer, max_text_tokens=10**6).predict_proba([long_text])[0] != pytest.approx(p_card,
                                                                                                         abs=1e-5)

    # predict reads the export like any model folder.
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(texts)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["p_sarcastic"] for r in rows] == pytest.approx([round(float(p), 6) for p in exported], abs=2e-6)


def test_card_carries_the_comparison_metrics_with_intervals(adapter_dir, tmp_path):
    from sarcasm_dpo.metrics import with_intervals

    labels = [1, 0, 1, 0, 1, 0, 1, 1]
    probs = [0.9, 0.2, 0.6, 0.4, 0.3, 0.1, 0.8, 0.7]
    metrics = with_intervals(labels, probs, n_resamples=100, seed=1)
    results = {"test_set": {"n": 8, "n_total": 100}, "models": {"sft": metrics},
               "significance": {}, "model_paths": {"sft": str(adapter_dir)}}
    path = tmp_path / "model_comparison_results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", str(path),
                 "--dtype", "bfloat16", "--license", "mit"]) == 0
    card = (out / "README.md").read_text()
    lo, hi = metrics["accuracy_ci"]
    # Results without the block at the models' own thresholds (an older comparison): the 0.5 figures, said to be.
    assert f"Accuracy at threshold 0.500 (95% CI {lo:.3f}-{hi:.3f})" in card and "license: mit" in card
    assert f"| SFT (this model) | {metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in card
    assert "every model labelled at P(sarcastic) >= 0.5 (the comparison records no figures at" in card
    info = json.loads((out / "sarcasm_dpo.json").read_text())
    assert info["threshold_source"] == "comparison results, models.sft.threshold"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_slice(next(iter(handle.keys()))).get_dtype() == "BF16"


def test_push_without_network_is_exit_2_and_keeps_the_export(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "exported"
    args = ["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", ""]
    assert main(args + ["--push_to_hub", "someone/sarcasm"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: Cannot push to the Hugging Face Hub repo someone/sarcasm") and "untouched" in err
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "COMPLETE.json" in files
    # Again: the complete export is reused, not redone, and the push fails the same clear way.
    assert main(args + ["--push_to_hub", "someone/sarcasm"]) == 2
    assert "already holds this export" in capsys.readouterr().out


def test_the_threshold_chosen_on_validation_travels_into_the_export(adapter_dir, tmp_path, capsys):
    """threshold.json beside the adapter wins over the comparison's 0.5; predict on the export then applies it,
    and the card shows the test rows at each model's own validation threshold beside the 0.5 rows."""
    import shutil

    from sarcasm_dpo.metrics import with_intervals
    from sarcasm_dpo.thresholds import threshold_record_from_validation, write_threshold

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    # Validation scores that separate the classes at 0.7, far from 0.5: the recorded threshold moves there.
    labels = [1] * 40 + [0] * 40
    probs = [0.75 + 0.2 * i / 40 for i in range(40)] + [0.45 + 0.2 * i / 40 for i in range(40)]
    record = threshold_record_from_validation(labels, probs)
    assert record["threshold"] != 0.5
    write_threshold(adapter, record)
    test_labels, test_probs = [1, 0, 1, 0, 1, 0, 1, 1], [0.9, 0.2, 0.6, 0.4, 0.3, 0.1, 0.8, 0.7]
    at_half = with_intervals(test_labels, test_probs, n_resamples=50, seed=1)
    at_own = with_intervals(test_labels, test_probs, n_resamples=50, seed=1, threshold=record["threshold"])
    results = {"test_set": {"n": 8, "n_total": 100}, "models": {"sft": at_half}, "significance": {},
               "model_paths": {"sft": str(adapter)},
               "at_validation_threshold": {"thresholds": {"sft": {"threshold": record["threshold"]}},
                                           "models": {"sft": at_own}}}
    path = tmp_path / "model_comparison_results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter), "--output_dir", str(out), "--results", str(path)]) == 0
    info = json.loads((out / "sarcasm_dpo.json").read_text())
    assert info["threshold"] == record["threshold"]
    assert info["threshold_source"].startswith("threshold.json, chosen on the gen_val split by balanced_accuracy")
    card = (out / "README.md").read_text()
    assert f"P(sarcastic) >= {record['threshold']}" in card and "never on the test split" in card
    assert f"| SFT (this model) | {record['threshold']:.3f} | {at_own['accuracy']:.3f}" in card
    # The validation line names the cut its figures are at, and adds the validation figures at the threshold.
    val = record["val_metrics_at_threshold"]
    assert "labelled at P(sarcastic) >= 0.500: accuracy" in card
    assert (f"At this model's threshold, {record['threshold']:.3f}: accuracy {val['accuracy']:.3f}, "
            f"F1 {val['f1']:.3f}") in card
    capsys.readouterr()
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great another monday\n")
    assert main(["predict", "--model", str(out), "--input", str(texts)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["label"] == int(line["p_sarcastic"] >= record["threshold"])


def test_results_that_are_not_a_comparisons_are_refused_before_anything_loads(adapter_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """A --results file that is there but is not compare's output is an error, not a card without test figures."""
    out = tmp_path / "exported"
    for name, content, words in (
            ("list.json", "[1]", "no 'model_paths' object"),
            ("broken.json", "{", "is not valid JSON"),
            ("partial.json", json.dumps({"model_paths": {"sft": str(adapter_dir)}}), "lacks its figures")):
        (tmp_path / name).write_text(content)
        code = main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, (name, err)
        assert not out.exists()
    # A path typed that is not there: an error. The default's file not there yet (compare not run): a note, and the
    # export goes on without test figures.
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out),
                 "--results", str(tmp_path / "nosuch.json")]) == 2
    assert "nosuch.json does not exist" in capsys.readouterr().err and not out.exists()
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out)]) == 0
    assert "no comparison results at" in capsys.readouterr().err


def test_an_export_takes_no_adapter_on_top_and_a_bad_repo_id_fails_first(adapter_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(out), "--results", ""]) == 0
    texts = tmp_path / "t.txt"
    texts.write_text("oh great\n")
    for argv in (["predict", "--model", str(out), "--adapter", str(adapter_dir), "--input", str(texts)],
                 ["export", "--adapter", str(adapter_dir), "--base_model", str(out), "--output_dir",
                  str(tmp_path / "twice"), "--results", ""]):
        assert main(argv) == 2
        assert "is an export" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert main(["export", "--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "e2"), "--results", "",
                 "--push_to_hub", "not a repo"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "e2").exists()


def _retrain(adapter) -> None:
    """Other weights at the same path, as `sft`/`dpo --overwrite` into the adapter's folder leave them."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({name: t * 3 + 0.01 if "lora_B" in name else t for name, t in tensors.items()}, str(weights),
              metadata={"format": "pt"})


def test_an_adapter_retrained_at_the_same_path_is_exported_again_never_kept(adapter_dir, tiny_model_dir, tmp_path,
                                                                             capsys):
    """COMPLETE.json records the adapter's checksum: after it is retrained at the same path, the same command is
    refused (naming the adapter) rather than "already done", a push included; --overwrite exports the new weights."""
    import shutil

    from reliability_common import error_paragraph, snapshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarcasm_dpo.models import load_model
    from sarcasm_dpo.rundir import input_identity

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    out = tmp_path / "exported"
    args = ["export", "--adapter", str(adapter), "--output_dir", str(out), "--results", ""]
    assert main(args) == 0
    assert json.loads((out / "COMPLETE.json").read_text())["inputs"] == input_identity({"adapter": adapter})
    before = snapshot(out)
    _retrain(adapter)
    capsys.readouterr()
    for extra in ([], ["--push_to_hub", "someone/sarcasm"]):  # never uploads the stale weights either
        assert main(args + extra) == 2
        captured = capsys.readouterr()
        message = error_paragraph(captured.err)
        assert "already holds this export" not in captured.out and "Cannot push" not in message, message
        assert f"the adapter {adapter}" in message and "--overwrite" in message, message
        assert snapshot(out) == before
    assert main(args + ["--overwrite"]) == 0
    assert "already holds this export" not in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    exported = _scores(AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out))
    assert abs(exported - _scores(*load_model(str(tiny_model_dir), adapter=str(adapter)))).max() < 1e-4
    assert main(args) == 0 and "already holds this export" in capsys.readouterr().out  # up to date again


def test_the_card_quotes_only_a_comparison_of_these_very_weights(adapter_dir, tmp_path, capsys, monkeypatch):
    """compare records the checksum of each adapter it scores. After the adapter is retrained at the same path,
    its old test figures (and threshold) stay out of the export: a note with the default --results, an error
    when the user named the file. Results whose compare recorded no checksums are used, with a note."""
    import shutil

    from reliability_common import error_paragraph
    from test_sft import toy_frame

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    toy_frame(16, 1).to_csv(tmp_path / "train.csv", index=False)
    toy_frame(16, 5).to_csv(tmp_path / "test.csv", index=False)
    monkeypatch.chdir(tmp_path)  # the default --results, results/model_comparison_results.json, is compare's output
    assert main(["compare", "--no_wandb", "--test_csv", "test.csv", "--train_csv", "train.csv", "--sft_model",
                 str(adapter), "--dpo_model", "none", "--skip_base", "--no_baseline", "--n_bootstrap", "20",
                 "--max_text_tokens", "64", "--output_dir", "results"]) == 0
    results = tmp_path / "results" / "model_comparison_results.json"
    out = tmp_path / "exported"
    args = ["export", "--adapter", str(adapter), "--output_dir", str(out)]

    def exported() -> tuple[dict, str]:
        return json.loads((out / "sarcasm_dpo.json").read_text()), (out / "README.md").read_text()

    assert main(args) == 0
    info, card = exported()
    assert info["test"]["source"] == "results/model_comparison_results.json" and "| SFT (this model) |" in card
    assert info["threshold_source"] == "comparison results, models.sft.threshold"
    capsys.readouterr()

    _retrain(adapter)
    assert main(args + ["--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "Note:" in err and "scored another version of" in err and "no test figures" in err, err
    info, card = exported()
    assert info["test"] is None and "(this model)" not in card and "no test-set figures" in card
    assert "comparison results" not in info["threshold_source"]  # the other model's threshold stays out too
    before = (out / "README.md").read_bytes(), (out / "model.safetensors").read_bytes()
    assert main(args + ["--overwrite", "--results", str(results)]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert "scored another version of" in message and "--results ''" in message, message
    assert ((out / "README.md").read_bytes(), (out / "model.safetensors").read_bytes()) == before

    # compare of an older version, which recorded no checksums: its figures are used as before, with a note.
    marker = tmp_path / "results" / "COMPLETE.json"
    record = json.loads(marker.read_text())
    del record["inputs"]
    marker.write_text(json.dumps(record))
    assert main(args + ["--overwrite"]) == 0
    assert "records no checksum of the adapters it scored" in capsys.readouterr().err
    assert exported()[0]["test"] is not None
