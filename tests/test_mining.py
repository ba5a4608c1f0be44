"""Mining preference pairs from the SFT model's mistakes, and DPO training on the mined file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_script

from test_dpo import dpo_settings, make_sft_adapter, write_toy_splits



@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mine-toy")
    paths = write_toy_splits(root / "splits")
    return SimpleNamespace(root=root, paths=paths, sft=make_sft_adapter(tiny_model_dir, root / "sft"),
                           model_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def sft_probs(toy):
    """P(sarcastic) of the SFT model on the mined split, computed independently of mining.py."""
    from sarcasm_dpo.data import load_split
    from sarcasm_dpo.models import load_model
    from sarcasm_dpo.scoring import Scorer

    frame = load_split(toy.paths.train)
    model, tokenizer = load_model(str(toy.model_dir), adapter=str(toy.sft))
    return frame.assign(p=Scorer(model, tokenizer, batch_size=16).predict_proba(frame["text"].tolist()))


def mine(toy, name: str, **overrides) -> tuple[list[dict], dict]:
    from sarcasm_dpo.stages import mine as mining
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import MineSettings

    out = toy.root / f"{name}.json"
    values = dict(sft_model=str(toy.sft), input_csv=str(toy.paths.train), output_file=str(out), no_wandb=True)
    values.update(overrides)
    summary = mining.run(build(MineSettings, values))
    pairs = json.loads(out.read_text())
    assert json.loads((toy.root / f"{name}_summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (toy.root / f"{name}_run" / "COMPLETE.json").is_file()
    return pairs, summary


def test_mistakes_only_keeps_exactly_the_sft_mistakes(toy, sft_probs):
    pairs, summary = mine(toy, "mistakes", filter_strategy="mistakes_only")
    wrong = sft_probs[(sft_probs["p"] >= 0.5).astype(int) != sft_probs["label"]]
    assert 0 < len(wrong) < len(sft_probs)  # the random SFT start gets some right and some wrong
    assert sorted(p["id"] for p in pairs) == sorted(wrong["id"])
    by_id = sft_probs.set_index("id")
    for p in pairs:
        row = by_id.loc[p["id"]]
        assert p["text"] == row["text"] and p["label"] == row["label"]
        assert p["p_sarcastic"] == pytest.approx(row["p"], abs=1e-6)
        assert (p["p_sarcastic"] >= 0.5) != bool(p["label"])  # every kept item is a mistake
        assert p["chosen"].startswith("Yes" if p["label"] == 1 else "No")
        assert p["rejected"].startswith("No" if p["label"] == 1 else "Yes")
        assert set(p) == {"prompt", "chosen", "rejected", "text", "label", "p_sarcastic", "id"}
    assert summary["counts"]["kept"]["total"] == len(pairs) == summary["counts"]["mistakes"]["total"]
    assert summary["sft_on_input"]["accuracy"] == pytest.approx(1 - len(wrong) / len(sft_probs))
    assert set(summary["sft_on_input"]["per_class"]) == {"sarcastic", "not_sarcastic"}


def test_all_and_confident_mistakes(toy, sft_probs):
    everything, _ = mine(toy, "all", filter_strategy="all", pair_style="label")
    assert len(everything) == len(sft_probs)
    assert {p["chosen"] for p in everything} == {"Yes", "No"}

    p, y = sft_probs["p"].to_numpy(), sft_probs["label"].to_numpy()
    p_wrong = np.where(y == 1, 1 - p, p)
    threshold = float(np.sort(p_wrong[p_wrong >= 0.5])[len(p_wrong[p_wrong >= 0.5]) // 2])  # keeps about half
    threshold = min(max(threshold, 0.5), 0.99)
    confident, summary = mine(toy, "confident", filter_strategy="confident_mistakes", confidence=threshold)
    expected = sft_probs[(p_wrong >= threshold) & ((p >= 0.5).astype(int) != y)]
    assert sorted(c["id"] for c in confident) == sorted(expected["id"])
    assert summary["counts"]["confident_mistakes"]["total"] == len(expected)


def test_mine_door_then_dpo_trains_on_the_mined_pairs(toy, capsys):
    from sarcasm_dpo.stages import dpo

    out_file = toy.root / "door" / "mined.json"
    code = run_script("mine_hard_negatives.py", "--no_wandb", "--sft_model", str(toy.sft),
                      "--input_csv", str(toy.paths.train), "--output_file", str(out_file), "--filter_strategy", "all")
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (toy.root / "door" / "mined_summary.json").is_file()
    mined = json.loads(out_file.read_text())

    summary = dpo.run(dpo_settings(toy, toy.root / "dpo_mined", preference_data=str(out_file), epochs=1,
                                   sample_size=8, batch_size=4, probe_size=8, val_sample_size=8))
    assert summary["pairs"]["source"] == "preference_data" and summary["pairs"]["file"] == str(out_file)
    assert summary["pairs"]["used"] == 8 and summary["pairs"]["available"] == len(mined)
    assert summary["global_steps"] == 2


def test_mined_pairs_from_a_validation_split_are_refused(toy, tmp_path):
    from sarcasm_dpo.stages import dpo, mine as mining
    from sarcasm_dpo.config import build
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.settings import MineSettings

    leaked = tmp_path / "leaked.json"
    mining.run(build(MineSettings, dict(sft_model=str(toy.sft), input_csv=str(toy.paths.is_val),
                                        output_file=str(leaked), filter_strategy="all", no_wandb=True)))
    # The message names the file the user gave, not the record's key for its role ("isarcasm_val").
    with pytest.raises(UserError, match=rf"also appear in the validation file {toy.paths.is_val} "
                                        r"\(--isarcasm_val_csv\)"):
        dpo.run(dpo_settings(toy, tmp_path / "out", preference_data=str(leaked)))


def test_prompts_built_another_way_are_refused(toy, tmp_path):
    from sarcasm_dpo.stages import dpo
    from sarcasm_dpo.errors import UserError

    pairs = [{"prompt": "Is this sarcastic? " + t, "chosen": "Yes", "rejected": "No", "text": t, "label": 1}
             for t in ("oh great another monday", "what a surprise")]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(pairs))
    with pytest.raises(UserError, match="carry a prompt different"):
        dpo.run(dpo_settings(toy, tmp_path / "out", preference_data=str(path)))


def test_a_missing_input_is_named_before_another_runs_output(toy, tmp_path):
    """The output file holds another run's pairs; the input is missing: the input is what to fix, so it is named
    (not "already holds the results of another run (settings differ in: input_csv ...)")."""
    from sarcasm_dpo.config import build
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.settings import MineSettings
    from sarcasm_dpo.stages import mine as mining

    out = toy.root / "all.json"  # written by test_all_and_confident_mistakes, or here
    if not out.is_file():
        mine(toy, "all", filter_strategy="all", pair_style="label")
    before = out.read_bytes()
    missing = tmp_path / "nope.csv"
    with pytest.raises(UserError, match=rf"The iSarcasmEval training split file {missing} does not exist") as err:
        mining.run(build(MineSettings, dict(sft_model=str(toy.sft), input_csv=str(missing), output_file=str(out),
                                            filter_strategy="all", no_wandb=True)))
    assert "another run" not in str(err.value) and out.read_bytes() == before


def test_the_raw_isarcasmeval_file_is_mined_as_distributed(toy, shared_data, tmp_path, capsys):
    """Its five texts with both labels and its empty tweet are dropped with their rows named, as `split` does."""
    from sarcasm_dpo import data
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import MineSettings
    from sarcasm_dpo.stages import mine as mining

    raw = shared_data / data.ISARCASM_RELPATH
    summary = mining.run(build(MineSettings, dict(sft_model=str(toy.sft), input_csv=str(raw), sample_size=12,
                                                  output_file=str(tmp_path / "raw.json"), filter_strategy="all",
                                                  no_wandb=True)))
    printed = capsys.readouterr().out
    assert "5 text(s) appear with conflicting labels (rows 18, 25" in printed and "all their copies dropped" in printed
    assert "1 row(s) with an empty text (rows 1063): dropped." in printed
    assert summary["counts"]["scored"]["total"] == 12 == summary["counts"]["kept"]["total"]


def test_mining_at_another_text_length_than_the_adapter_was_trained_with_says_so(toy, capsys):
    """Mining scores with the adapter at --max_text_tokens; a length other than its run's is named, as compare
    and DPO name it, so long texts scored on a prompt it never saw do not go by unremarked."""
    mine(toy, "same", filter_strategy="all", max_text_tokens=256)
    assert "was trained and validated with" not in capsys.readouterr().out
    mine(toy, "short", filter_strategy="all", max_text_tokens=64)
    out = capsys.readouterr().out
    assert "Note: the SFT adapter" in out and "--max_text_tokens 256" in out and "mining run cuts texts at 64" in out
