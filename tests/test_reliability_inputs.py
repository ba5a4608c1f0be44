"""Bad input and bad settings, end to end through the CLI: exit code 2, one paragraph that starts with
`error:` and says what was found and what to do, no traceback, and nothing overwritten.

"Nothing overwritten" is checked the strict way: the output folder already holds a finished run
made with exactly the settings of the failing command (so the stage would be allowed to replace
it), and after the refusal every file in it, COMPLETE.json included, is byte for byte the same.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from reliability_common import error_paragraph, reference_run, snapshot, toy_csvs
from tiny_model import build_tiny_model

from sarcasm_dpo import cli
from sarcasm_dpo.stages import mine as mining
from sarcasm_dpo.atomic import finish_output_dir
from sarcasm_dpo.config import from_namespace
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.stages import settings_classes

# Files each stage writes; the "previous run" in the output folder is made of these.
PREVIOUS = {"sft": ("adapter_model.safetensors", "training_summary.json", "sft_metrics.json"),
            "dpo": ("adapter_model.safetensors", "dpo_training_summary.json", "dpo_epoch_metrics.json"),
            "compare": ("model_comparison_results.json", "predictions.csv"),
            "mine": ("pairs.json", "pairs_summary.json")}  # mine's output file is OUT/pairs.json


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """Files the cases point at: good toy splits, bad CSVs, odd model and adapter folders."""
    root = tmp_path_factory.mktemp("inputs")
    ref, _, _, _ = reference_run(tiny_model_dir, tmp_path_factory)  # a finished SFT adapter
    train, val = toy_csvs(root / "toy")
    bad = root / "bad"
    bad.mkdir()
    for name, content in {"empty.csv": "", "header_only.csv": "text,label\n",
                          "columns.csv": "body,lbl\noh great,1\nfine,0\n",
                          "labels.csv": "text,label\noh great,1\nfine,maybe\nsure,2\n",
                          "nan_text.csv": "text,label\n,1\n  ,0\n,1\n"}.items():
        (bad / name).write_text(content)
    shutil.copyfile(train, bad / "test_overlapping_train.csv")
    (root / "not_an_adapter").mkdir()
    (root / "not_an_adapter" / "notes.txt").write_text("nothing here\n")
    shutil.copytree(ref, root / "no_weights", ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    import pandas as pd

    val_rows = pd.read_csv(val)
    val_rows[val_rows.label == 1].to_csv(bad / "val_one_class.csv", index=False)
    # compare's test split: neither what the adapter trained on nor what it was selected on (compare refuses both)
    from test_sft import toy_frame

    from sarcasm_dpo.data import normalise

    seen = set(pd.concat([pd.read_csv(train), val_rows]).text.map(normalise))
    test_rows = toy_frame(40, 3)
    test_rows[~test_rows.text.map(normalise).isin(seen)].to_csv(root / "toy" / "test.csv", index=False)
    (bad / "fake.gguf").write_bytes(b"garbage, not a GGUF file\n")
    shutil.copytree(tiny_model_dir, root / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*", "vocab*",
                                                                                         "merges*", "special*"))
    return {"root": root, "model": tiny_model_dir, "train": train, "val": val, "test": root / "toy" / "test.csv",
            "bad": bad, "sft": ref,
            "char_model": char_level_model(tiny_model_dir, root / "char-model"),
            "foreign_adapter": adapter_of_a_changed_base(root)}


def char_level_model(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model with a tokenizer that spells every word letter by letter: "Yes" is 3 tokens."""
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    specials = {t["content"] for t in spec["added_tokens"]}
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if len(k) == 1 or k in specials}
    spec["model"]["merges"] = []
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def adapter_of_a_changed_base(root: Path) -> tuple[Path, Path]:
    """(adapter folder, base folder): the adapter was made for a 32-wide model at that path, which has
    since been replaced by a 64-wide one (as when a model folder is re-downloaded in another size)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(root / "base-32", hidden_size=32)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter = root / "adapter-32"
    model.save_pretrained(str(adapter))
    (adapter / "training_summary.json").write_text(json.dumps({"config": {"model": str(base),
                                                                          "max_text_tokens": 256}}))
    other = root / "base-64"
    build_tiny_model(other, hidden_size=64)
    shutil.rmtree(base)
    shutil.copytree(other, base)
    return adapter, other


def previous_run(out: Path, argv: list[str]) -> dict[str, bytes]:
    """Fill `out` with a finished run made with the settings `argv` asks for; return its bytes."""
    args = cli.build_parser().parse_args(argv)
    try:
        config = dataclasses.asdict(from_namespace(settings_classes(), args, args.command))
    except UserError:  # settings that do not even validate: any earlier run will do
        config = {"output_dir": str(out)}
    out.mkdir(parents=True)
    for name in PREVIOUS[args.command]:
        (out / name).write_bytes(f"previous run: {name}\n".encode())
    # mine writes a file, not a folder; its completion record sits in <stem>_run/ beside the file.
    finish_output_dir(mining.marker_dir(args.output_file) if args.command == "mine" else out, config)
    return snapshot(out)


def sft(e, out, *extra):
    return ["sft", "--no_wandb", "--model", str(e["model"]), "--train_csv", str(e["train"]), "--val_csv",
            str(e["val"]), "--output_dir", str(out), "--lora_targets", "q_proj,v_proj", *extra]


def dpo(e, out, *extra):
    return ["dpo", "--no_wandb", "--sft_model", str(e["sft"]), "--train_csv", str(e["train"]), "--val_csv",
            str(e["val"]), "--isarcasm_val_csv", "", "--output_dir", str(out), "--sample_size", "8", *extra]


def compare(e, out, *extra):
    return ["compare", "--no_wandb", "--test_csv", str(e["test"]), "--train_csv", str(e["train"]), "--sft_model",
            str(e["sft"]), "--dpo_model", "none", "--output_dir", str(out), "--skip_base", *extra]


def mine(e, out, *extra):
    return ["mine", "--no_wandb", "--sft_model", str(e["sft"]), "--input_csv", str(e["train"]), "--output_file",
            str(out / "pairs.json"), "--sample_size", "8", *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# (id, argv builder, words the message must contain)
CASES = [
    ("missing-csv", lambda e, o: _replace(sft(e, o), "--train_csv", str(e["bad"] / "nope.csv")),
     ["does not exist", "nope.csv"]),
    ("empty-csv", lambda e, o: _replace(sft(e, o), "--train_csv", str(e["bad"] / "empty.csv")), ["empty", "0 bytes"]),
    ("header-only-csv", lambda e, o: _replace(sft(e, o), "--val_csv", str(e["bad"] / "header_only.csv")),
     ["header but no rows"]),
    ("wrong-columns", lambda e, o: _replace(sft(e, o), "--train_csv", str(e["bad"] / "columns.csv")),
     ["columns.csv", "'body'", "'lbl'", "text, label"]),
    ("unknown-labels", lambda e, o: _replace(sft(e, o), "--train_csv", str(e["bad"] / "labels.csv")),
     ["unknown label", "'maybe'", "rows 2, 3"]),
    ("text-all-nan", lambda e, o: _replace(sft(e, o), "--train_csv", str(e["bad"] / "nan_text.csv")),
     ["no text at all"]),
    ("multi-token-label-words", lambda e, o: _replace(sft(e, o), "--model", str(e["char_model"])),
     ["not a single token", "'No'"]),
    ("negative-sample-size", lambda e, o: sft(e, o, "--sample_size", "-5"), ["--sample_size", "-5"]),
    ("test-overlaps-train", lambda e, o: _replace(compare(e, o), "--test_csv", str(e["bad"] / "test_overlapping_train.csv")),
     ["Leakage", "appear in the training split"]),
    ("sft-model-without-adapter", lambda e, o: _replace(dpo(e, o), "--sft_model", str(e["root"] / "not_an_adapter")),
     ["no LoRA adapter", "notes.txt"]),
    ("dpo-adapter-of-another-base", lambda e, o: _replace(dpo(e, o), "--sft_model", str(e["foreign_adapter"][0])),
     ["does not fit the base model", "lora_A expects 32", "retrain the adapter"]),
    ("compare-adapter-of-another-base",
     lambda e, o: _replace(compare(e, o, "--model", str(e["foreign_adapter"][1])), "--sft_model",
                           str(e["foreign_adapter"][0])),
     ["does not fit the base model", "lora_A expects 32", "retrain the adapter"]),
    ("beta-zero", lambda e, o: dpo(e, o, "--beta", "0"), ["--beta must be > 0", "0"]),
    ("beta-negative", lambda e, o: dpo(e, o, "--beta", "-0.5"), ["--beta must be > 0", "-0.5"]),
    ("dpo-negative-sample-size", lambda e, o: _replace(dpo(e, o), "--sample_size", "-3"), ["--sample_size", "-3"]),
    ("mine-missing-csv", lambda e, o: _replace(mine(e, o), "--input_csv", str(e["bad"] / "nope.csv")),
     ["does not exist", "nope.csv"]),
    ("mine-wrong-columns", lambda e, o: _replace(mine(e, o), "--input_csv", str(e["bad"] / "columns.csv")),
     ["columns.csv", "'body'", "'lbl'", "text, label"]),
    ("mine-sft-model-without-adapter",
     lambda e, o: _replace(mine(e, o), "--sft_model", str(e["root"] / "not_an_adapter")), ["no LoRA adapter", "notes.txt"]),
    ("mine-adapter-of-another-base", lambda e, o: _replace(mine(e, o), "--sft_model", str(e["foreign_adapter"][0])),
     ["does not fit the base model", "lora_A expects 32", "retrain the adapter"]),
    ("mine-negative-sample-size", lambda e, o: _replace(mine(e, o), "--sample_size", "-4"), ["--sample_size", "-4"]),
    ("adapter-without-weights", lambda e, o: _replace(dpo(e, o), "--sft_model", str(e["root"] / "no_weights")),
     ["no adapter weights", "adapter_model.safetensors"]),
    ("compare-adapter-without-weights", lambda e, o: _replace(compare(e, o), "--sft_model", str(e["root"] / "no_weights")),
     ["no adapter weights"]),
    ("adapter-is-a-file", lambda e, o: _replace(compare(e, o), "--sft_model", str(e["train"])), ["is a file, not an adapter"]),
    ("model-is-a-file", lambda e, o: _replace(sft(e, o), "--model", str(e["train"])), ["is a file, not a model"]),
    ("extra-test-without-path", lambda e, o: compare(e, o, "--extra_test", "x="), ["names no file", "NAME=PATH"]),
    ("negative-seed", lambda e, o: sft(e, o, "--seed", "-1"), ["--seed must be a whole number from 0 to 4294967295"]),
    ("seed-too-large", lambda e, o: dpo(e, o, "--seed", "4294967296"), ["--seed", "4294967296"]),
    ("negative-weight-decay", lambda e, o: sft(e, o, "--weight_decay", "-1"), ["--weight_decay must be 0 or more"]),
    ("negative-val-sample-size", lambda e, o: sft(e, o, "--val_sample_size", "-1"), ["--val_sample_size must be 0"]),
    ("val-split-of-one-class", lambda e, o: _replace(sft(e, o), "--val_csv", str(e["bad"] / "val_one_class.csv")),
     ["holds one class only", "val_one_class.csv"]),
    ("train-and-val-overlap", lambda e, o: _replace(sft(e, o), "--val_csv", str(e["train"])),
     ["appear in both", "chosen on texts the model trained on"]),
    ("sample-of-one-class", lambda e, o: sft(e, o, "--sample_size", "1"), ["--sample_size 1 leaves one class"]),
    ("gguf-that-is-not-one", lambda e, o: _replace(sft(e, o), "--model", str(e["bad"] / "fake.gguf")),
     ["Could not load", "fake.gguf", "not a model"]),
    ("model-without-tokenizer", lambda e, o: _replace(sft(e, o), "--model", str(e["root"] / "no_tokenizer")),
     ["holds no tokenizer"]),
]


@pytest.mark.parametrize("name,make_argv,words", CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph_and_overwrites_nothing(name, make_argv, words, env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = make_argv(env, out)
    before = previous_run(out, argv)
    code = cli.main(argv)
    stderr = capsys.readouterr().err
    message = error_paragraph(stderr)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(message.strip().splitlines()) == 1, message  # one paragraph
    for word in words:
        assert word in message, (word, message)
    assert snapshot(out) == before  # same files, same bytes, COMPLETE.json still there


def test_output_folder_of_another_run_is_refused_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    before = previous_run(out, sft(env, out, "--lr", "0.5"))  # a finished run with another learning rate
    code = cli.main(sft(env, out))
    message = error_paragraph(capsys.readouterr().err)
    # Names the one setting that differs ("lr" alone is in "already" too).
    assert code == 2 and "already holds the results of another run (settings differ in: lr)." in message
    assert "--overwrite" in message and snapshot(out) == before


def test_mined_pairs_of_another_run_are_refused_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    before = previous_run(out, mine(env, out, "--filter_strategy", "all"))  # mined with another filter
    code = cli.main(mine(env, out))
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2, message
    assert "pairs.json already holds the results of another run" in message and "filter_strategy" in message
    assert "--overwrite" in message and len(message.strip().splitlines()) == 1 and snapshot(out) == before

    assert cli.main(mine(env, out, "--overwrite")) == 0
    record = json.loads((out / "pairs_run" / "COMPLETE.json").read_text())
    assert record["config"]["filter_strategy"] == "mistakes_only"
    assert json.loads((out / "pairs_summary.json").read_text())["filter_strategy"] == "mistakes_only"


def test_a_pairs_file_mine_did_not_write_is_refused_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pairs.json").write_text("[]\n")  # hand-made, or from the original scripts: no pairs_run/ record
    code = cli.main(mine(env, out))
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and "did not write" in message and "pairs.json" in message and "--overwrite" in message
    assert snapshot(out) == {"pairs.json": b"[]\n"}


def test_an_output_that_would_replace_an_input_is_refused_even_with_overwrite(env, tmp_path, capsys):
    """The output folder is replaced as a whole when a run ends: an input that is that folder, or a file directly
    in it, would be gone. Folders inside it are carried over, so an input in one of those is safe."""
    adapter = tmp_path / "adapter"
    shutil.copytree(env["sft"], adapter)
    splits = tmp_path / "splits"
    splits.mkdir()
    for path in (env["train"], env["val"]):
        shutil.copyfile(path, splits / Path(path).name)
    before = {"adapter": snapshot(adapter), "splits": snapshot(splits)}
    cases = [
        (_replace(compare(env, adapter, "--overwrite"), "--sft_model", str(adapter)), "both an input and an output"),
        (["export", "--adapter", str(adapter), "--output_dir", str(adapter), "--overwrite", "--results", ""],
         "both an input and an output"),
        (_replace(_replace(compare(env, splits, "--overwrite"), "--test_csv", str(splits / Path(env["val"]).name)),
                  "--train_csv", str(splits / Path(env["train"]).name)), "holds"),
        (_replace(mine(env, tmp_path, "--overwrite"), "--output_file", str(env["train"])),
         "both an input and an output"),  # mine's pairs file over the CSV it mines
    ]
    for argv, words in cases:
        code = cli.main(argv)
        message = error_paragraph(capsys.readouterr().err)
        assert code == 2 and words in message and "--overwrite or not" in message, (argv[0], message)
        assert len(message.strip().splitlines()) == 1
    assert {"adapter": snapshot(adapter), "splits": snapshot(splits)} == before
    # An input in a folder inside the output is carried over, not replaced: allowed.
    nested = tmp_path / "results"
    shutil.copytree(adapter, nested / "sft")
    assert cli.main(_replace(compare(env, nested, "--overwrite"), "--sft_model", str(nested / "sft"))) == 0
    assert (nested / "sft" / "adapter_model.safetensors").is_file() and (nested / "model_comparison_results.json").is_file()


def test_a_model_that_is_not_a_causal_lm_is_refused(env, tmp_path, capsys):
    """A BERT classifier would load with a freshly initialised LM head: every score noise."""
    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=len(json.loads((env["model"] / "tokenizer.json").read_text())
                                                           ["model"]["vocab"]) + 8, hidden_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(bert)
    for path in env["model"].iterdir():  # the chat model's tokenizer and template, so only the model is wrong
        if path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copyfile(path, bert / path.name)
    code = cli.main(_replace(sft(env, tmp_path / "out"), "--model", str(bert)) + ["--lora_targets", "query,value"])
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and "BertForSequenceClassification, not a causal language model" in message, message
    assert not (tmp_path / "out").exists()


def test_split_never_replaces_the_datasets_it_reads(shared_data, tmp_path, capsys):
    """--output_dir inside --data_dir, on the folder that holds a dataset: refused, --overwrite or not."""
    data = tmp_path / "data"
    shutil.copytree(shared_data, data)
    before = snapshot(data)
    for sub in ("sarcasm_v2", "isarcasmeval"):
        code = cli.main(["split", "--data_dir", str(data), "--output_dir", str(data / sub), "--overwrite", "--no_wandb"])
        message = error_paragraph(capsys.readouterr().err)
        assert code == 2 and "which this run reads" in message, message
    assert snapshot(data) == before
    # Beside them, as data/splits, is the usual layout: allowed.
    assert cli.main(["split", "--data_dir", str(data), "--output_dir", str(data / "splits"), "--no_wandb"]) == 0


def test_the_same_folder_spelled_another_way_is_the_same_run(env, tmp_path, capsys, monkeypatch):
    """./out, out and /abs/out name one folder: a finished run there is this run's, not another's."""
    monkeypatch.chdir(tmp_path)
    argv = _replace(compare(env, tmp_path / "out"), "--output_dir", "out")
    assert cli.main(argv) == 0
    for spelling in ("./out", str(tmp_path / "out"), "out/"):
        assert cli.main(_replace(argv, "--output_dir", spelling)) == 0
        assert "already holds" not in capsys.readouterr().err


def test_config_values_of_the_wrong_kind_are_refused(env, tmp_path, capsys):
    for body, words in (("sft:\n  sample_size: true\n", "'sample_size' expects int, got True"),
                        ("sft:\n  output_dir: {a: 1}\n", "'output_dir' expects str"),
                        ("sft:\n  output_dir: ''\n", "output_dir is empty"),
                        ('sft:\n  output_dir: "models/sft\\n"\n', "holds a control character")):
        config = tmp_path / "c.yaml"
        config.write_text(body)
        argv = [a for a in sft(env, tmp_path / "o") if a not in ("--output_dir", str(tmp_path / "o"))]
        code = cli.main(argv + ["--config", str(config)])
        message = error_paragraph(capsys.readouterr().err)
        assert code == 2 and words in message, (body, message)


def test_an_output_folder_of_another_stage_is_named_so(env, shared_data, tmp_path, capsys):
    """split into an SFT adapter's folder: not "another run of split with other settings" (whose --overwrite hint
    would invite replacing a trained adapter), but another kind of run."""
    adapter = tmp_path / "adapter"
    shutil.copytree(env["sft"], adapter)
    before = snapshot(adapter)
    code = cli.main(["split", "--data_dir", str(shared_data), "--output_dir", str(adapter), "--no_wandb"])
    message = error_paragraph(capsys.readouterr().err)
    assert code == 2 and "holds the output of another kind of run" in message, message
    assert snapshot(adapter) == before
