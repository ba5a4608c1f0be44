"""Mining preference pairs from the SFT model's mistakes, and DPO training on the mined file."""

from __future__ import annotations

import json
import os
import signal
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


# -- --overwrite stopped at any moment: the previous pairs, or the new ones, whole ---------------------------
# The outputs are the pairs file, its summary beside it and the marker in <stem>_run/. A run replacing them writes
# each in one os.replace (atomic writes end in one) and clears the previous marker with one unlink: a stop before
# any of those calls is a stop at any moment that matters. Seven of them: the pairs, summary and marker staged,
# the previous marker cleared, then the pairs, summary and marker moved in.
_OLD = dict(filter_strategy="all", sample_size=8)
_NEW = dict(filter_strategy="all", sample_size=16)
_WRITES = 7


def _mine_settings(toy, out_file, **values):
    from sarcasm_dpo.config import build
    from sarcasm_dpo.settings import MineSettings

    return build(MineSettings, dict(sft_model=str(toy.sft), input_csv=str(toy.paths.train), output_file=str(out_file),
                                    no_wandb=True, **values))


@pytest.fixture(scope="module")
def replaced(toy):
    """The pairs a mining run of the _OLD settings writes, and those of the _NEW settings."""
    from sarcasm_dpo.stages import mine as mining

    old, new = toy.root / "replace-old" / "pairs.json", toy.root / "replace-new" / "pairs.json"
    mining.run(_mine_settings(toy, old, **_OLD))
    mining.run(_mine_settings(toy, new, **_NEW))
    return SimpleNamespace(old_pairs=json.loads(old.read_text()), new_pairs=json.loads(new.read_text()))


def _visible(folder) -> dict[str, bytes]:
    """The files a reader sees: the pairs, the summary, the marker (not locks or staging folders)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _whole_run(folder, pairs: list, sample_size: int) -> bool:
    """Do the pairs file, the summary and the marker in `folder` all belong to the run that wrote `pairs`?"""
    from sarcasm_dpo.atomic import read_complete

    summary = json.loads((folder / "pairs_summary.json").read_text())
    marker = read_complete(folder / "pairs_run")
    return (json.loads((folder / "pairs.json").read_text()) == pairs and marker is not None
            and summary["config"]["sample_size"] == marker["config"]["sample_size"] == sample_size
            and summary["counts"]["kept"]["total"] == marker["kept"] == len(pairs))


def _stop_at_write(monkeypatch, folder, point: int, stop) -> list:
    """Call `stop()` instead of the `point`-th os.replace / os.unlink of a path under `folder`."""
    calls = []

    def counted(real):
        def call(path, *args, **kwargs):
            if str(path).startswith(str(folder)):
                calls.append(str(path))
                if len(calls) == point:
                    stop()
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "replace", counted(os.replace))
    monkeypatch.setattr(os, "unlink", counted(os.unlink))
    return calls


def _interrupt():
    raise KeyboardInterrupt  # what Ctrl-C raises between two bytecodes


@pytest.mark.parametrize("point", range(1, _WRITES + 1))
def test_mine_overwrite_stopped_at_any_write_leaves_one_whole_run(toy, replaced, tmp_path, monkeypatch, point):
    """Stopped before the swap began, the previous run's pairs, summary and marker are as they were; stopped during
    it, the next run first finishes putting the new ones in place. Never new pairs beside the old summary."""
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.stages import mine as mining

    folder = tmp_path / "m"
    mining.run(_mine_settings(toy, folder / "pairs.json", **_OLD))  # the previous run, whole
    assert _whole_run(folder, replaced.old_pairs, 8)
    before = _visible(folder)
    calls = _stop_at_write(monkeypatch, folder, point, _interrupt)
    with pytest.raises(KeyboardInterrupt):
        mining.run(_mine_settings(toy, folder / "pairs.json", overwrite=True, **_NEW))
    monkeypatch.undo()
    assert len(calls) >= point
    if (folder / "pairs_run" / "COMPLETE.json").is_file():  # a marker always stands beside one whole run
        assert _visible(folder) == before or _whole_run(folder, replaced.new_pairs, 16)
    if point <= 4:  # the swap had not begun: the previous run is untouched
        assert _visible(folder) == before

    # The next run, of the previous settings and without --overwrite. What it finds when it checks the file, once it
    # has tidied up: the previous run whole, or, stopped during the swap, the new one put in place whole. Either it
    # may replace: its own, or a stopped run's (which left no marker: the pipeline, deciding before the tidying,
    # counts on that), so it ends with the previous settings' pairs.
    found = []

    def check_output_file(*args, **kwargs):
        found.append((_whole_run(folder, replaced.old_pairs, 8), _whole_run(folder, replaced.new_pairs, 16),
                      sorted(p.name for p in folder.iterdir() if p.name.startswith((".staging-", ".tmp-")))))
        return real_check(*args, **kwargs)

    real_check = mining.check_output_file
    monkeypatch.setattr(mining, "check_output_file", check_output_file)
    mining.run(_mine_settings(toy, folder / "pairs.json", **_OLD))
    monkeypatch.undo()
    assert found == [(point <= 4, point > 4, [])]
    assert _whole_run(folder, replaced.old_pairs, 8)
    # A finished run of other settings is still refused without --overwrite.
    with pytest.raises(UserError, match=r"already holds the results of another run \(settings differ in: sample_size"):
        mining.run(_mine_settings(toy, folder / "pairs.json", **_NEW))


@pytest.mark.slow
@pytest.mark.parametrize("point", range(1, _WRITES + 1))
def test_mine_overwrite_sigkilled_at_any_write_leaves_one_whole_run(toy, replaced, tmp_path, point):
    """The same with a real SIGKILL of a `sarcasm-dpo mine --overwrite` process (nothing of it runs after that)."""
    import subprocess
    import sys

    from reliability_common import ROOT, env, run_cli

    from sarcasm_dpo.stages import mine as mining

    folder = tmp_path / "m"
    args = ["mine", "--no_wandb", "--sft_model", str(toy.sft), "--input_csv", str(toy.paths.train), "--output_file",
            str(folder / "pairs.json"), "--filter_strategy", "all"]
    killer = ("import os, signal, sys\n"
              "from sarcasm_dpo import cli\n"
              "folder, point, calls = sys.argv[1], int(sys.argv[2]), []\n"
              "def counted(real):\n"
              "    def call(path, *a, **k):\n"
              "        if str(path).startswith(folder):\n"
              "            calls.append(path)\n"
              "            if len(calls) == point:\n"
              "                os.kill(os.getpid(), signal.SIGKILL)\n"
              "        return real(path, *a, **k)\n"
              "    return call\n"
              "os.replace, os.unlink = counted(os.replace), counted(os.unlink)\n"
              "sys.exit(cli.main(sys.argv[3:]))\n")
    first = run_cli(args + ["--sample_size", "8"])  # the previous run, whole
    assert first.returncode == 0 and _whole_run(folder, replaced.old_pairs, 8), first.stderr[-3000:]
    before = _visible(folder)
    done = subprocess.run([sys.executable, "-c", killer, str(folder), str(point), *args, "--sample_size", "16",
                           "--overwrite"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    if (folder / "pairs_run" / "COMPLETE.json").is_file():
        assert _visible(folder) == before or _whole_run(folder, replaced.new_pairs, 16)
    if point <= 4:
        assert _visible(folder) == before
    assert mining.recover_outputs(folder / "pairs.json") == (point > 4)  # what the next run does first
    assert _whole_run(folder, *((replaced.old_pairs, 8) if point <= 4 else (replaced.new_pairs, 16)))
    assert not [p.name for p in folder.iterdir() if p.name.startswith((".staging-", ".tmp-"))]
    refused = run_cli(args + ["--sample_size", "32"])  # a finished run of other settings: refused, untouched
    assert refused.returncode == 2 and "already holds the results of another run" in refused.stderr, refused.stderr
    assert _whole_run(folder, *((replaced.old_pairs, 8) if point <= 4 else (replaced.new_pairs, 16)))
