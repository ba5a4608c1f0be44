"""The failure classes of the hostile-input issue, one table-driven test per class: every case exits 2
with one paragraph that names the cause, shows no traceback, and leaves the sha256 of every file that
was there before unchanged (a finished previous run in the output folder included).

Classes: output locations that cannot be written; inputs that cannot be read or decoded; numbers
that are not finite (and devices that do not exist); splits that would be empty or single-class;
unclear messages; data lost or replaced (claim rules, staging). The lock is tested with real
concurrent processes and a real SIGKILL during the swap at the end of this file (`slow`).

Run: PYTHONPATH=src python -m pytest -q tests/test_reliability_failures.py
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from reliability_common import CLI, env as cli_env, error_paragraph, wait_for
from test_reliability_inputs import _replace, compare, dpo, env, mine, previous_run, sft  # noqa: F401 (env: fixture)

from sarcasm_dpo import cli, rundir
from sarcasm_dpo.atomic import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file below the folders (links followed, loops and unreadable files skipped)."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys, words: list[str], watch: list[Path]) -> str:
    """Run the CLI in-process; assert exit 2, one paragraph, no traceback, the words, nothing changed."""
    before = hashes(*watch)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    message = error_paragraph(err)
    assert len(message.strip().splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)
    assert hashes(*watch) == before
    return message


def split_argv(out: Path, *extra: str, data_dir: Path = SHARED) -> list[str]:
    return ["split", "--no_wandb", "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


def stage_argv(stage: str, e, out: Path) -> list[str]:
    if stage == "split":
        return split_argv(out)
    if stage == "mine":
        return _replace(mine(e, out), "--output_file", str(out))
    return {"sft": sft, "dpo": dpo, "compare": compare}[stage](e, out)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A tmpfs at `folder` (root with mount rights only); skips the test, naming why, when it cannot be made."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# -- class: output locations that cannot be written, in every stage --------------------------------------


def _location(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """(output path, words its refusal must contain) for one kind of unwritable location."""
    if kind == "proc":
        return Path("/proc/sarcasm-dpo-test/out"), ["/proc/sarcasm-dpo-test", "Cannot write the output"]
    if kind == "sys":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys here")
        return Path("/sys/sarcasm-dpo-test"), ["/sys/sarcasm-dpo-test", "permi"]  # EACCES or EPERM
    if kind == "dangling-symlink":
        link = tmp_path / "link"
        link.symlink_to(tmp_path / "nowhere" / "deeper")
        return link, ["symbolic link", "does not exist"]
    if kind == "parent-is-a-file":
        (tmp_path / "a_file").write_text("x\n")
        return tmp_path / "a_file" / "out", ["a_file", "is a file"]
    if kind == "name-too-long":
        return tmp_path / ("n" * 300), ["name is too long"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["proc", "sys", "dangling-symlink", "parent-is-a-file", "name-too-long"])
@pytest.mark.parametrize("stage", ["split", "sft", "dpo", "mine", "compare"])
def test_unwritable_output_location_exits_2_in_every_stage(stage, kind, env, tmp_path, capsys):
    out, words = _location(kind, tmp_path)
    if stage == "mine":
        out = out / "pairs.json" if kind != "name-too-long" else tmp_path / ("n" * 300 + ".json")
    refused(stage_argv(stage, env, out), capsys, words, [tmp_path, env["root"]])


def test_read_only_file_system_and_full_disk(env, tmp_path, capsys):
    """A read-only mount refuses at once; a full disk fails while writing and keeps the previous run whole."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        refused(compare(env, ro / "results"), capsys, ["read-only file system", str(ro)], [env["root"]])
    with mounted_tmpfs(tmp_path / "small", "size=512k") as small:
        out = small / "results"
        assert cli.main(compare(env, out, "--no_baseline")) == 0
        capsys.readouterr()
        stats = os.statvfs(small)  # fill the disk, leaving a few pages: the lock fits, the outputs do not
        (small / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 3 * 4096))
        message = refused(compare(env, out, "--no_baseline"), capsys, ["no space left", "free there now", "needed"],
                          [out, env["root"]])
        assert (out / COMPLETE_MARKER).is_file() and not list(small.glob(".staging-*")), message


# -- class: inputs that cannot be read or decoded ------------------------------------------------------


def truncated_adapter(e, folder: Path) -> Path:
    shutil.copytree(e["sft"], folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def broken_config_adapter(e, folder: Path) -> Path:
    shutil.copytree(e["sft"], folder)
    (folder / "adapter_config.json").write_text('{"r": 16, "lora_alpha":')
    return folder


UNREADABLE = [
    ("predict-binary-file", lambda e, t: ["predict", "--model", str(e["model"]), "--input", str(_binary(t))],
     ["not UTF-8", "binary.txt", "position 0"]),
    ("predict-fifo", lambda e, t: ["predict", "--model", str(e["model"]), "--input", str(_fifo(t))],
     ["pipe (FIFO)", "not a regular file"]),
    ("predict-dev-stdin", lambda e, t: ["predict", "--model", str(e["model"]), "--input", "/dev/stdin"],
     ["/dev/stdin", "not a regular file"]),
    ("csv-symlink-loop", lambda e, t: _replace(sft(e, t / "out"), "--train_csv", str(_loop(t))),
     ["loop of symbolic links"]),
    ("csv-dangling-symlink", lambda e, t: _replace(sft(e, t / "out"), "--train_csv", str(_dangling(t))),
     ["symbolic link", "does not exist"]),
    ("csv-permission-denied", lambda e, t: _replace(sft(e, t / "out"), "--train_csv", str(_unreadable(t))),
     ["cannot be read", "Permission denied"]),
    ("csv-not-utf8", lambda e, t: _replace(sft(e, t / "out"), "--train_csv", str(_latin1_csv(t))),
     ["latin1.csv", "not UTF-8 text"]),
    ("yaml-binary", lambda e, t: sft(e, t / "out", "--config", str(_binary(t, "config.yaml"))),
     ["config.yaml", "not UTF-8"]),
    ("yaml-invalid", lambda e, t: sft(e, t / "out", "--config", str(_write(t / "bad.yaml", "sft:\n  lr: [1,\n"))),
     ["bad.yaml", "not valid YAML", "line"]),
    ("predict-truncated-adapter", lambda e, t: ["predict", "--adapter", str(truncated_adapter(e, t / "a")),
                                                "--input", str(_write(t / "x.txt", "hi\n"))],
     ["adapter_model.safetensors", "truncated"]),
    ("dpo-truncated-adapter", lambda e, t: _replace(dpo(e, t / "out"), "--sft_model", str(truncated_adapter(e, t / "a"))),
     ["adapter_model.safetensors", "truncated"]),
    ("mine-truncated-adapter", lambda e, t: _replace(mine(e, t / "out"), "--sft_model", str(truncated_adapter(e, t / "a"))),
     ["adapter_model.safetensors", "truncated"]),
    ("compare-truncated-adapter",
     lambda e, t: _replace(compare(e, t / "out"), "--sft_model", str(truncated_adapter(e, t / "a"))),
     ["adapter_model.safetensors", "truncated"]),
    ("compare-broken-adapter-config",
     lambda e, t: _replace(compare(e, t / "out"), "--sft_model", str(broken_config_adapter(e, t / "a"))),
     ["adapter_config.json is not valid JSON"]),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _binary(t: Path, name: str = "binary.txt") -> Path:
    (t / name).write_bytes(b"\xff\xfe\x00\x01binary\x00\n")
    return t / name


def _fifo(t: Path) -> Path:
    os.mkfifo(t / "fifo")
    return t / "fifo"


def _loop(t: Path) -> Path:
    (t / "loop_a.csv").symlink_to(t / "loop_b.csv")
    (t / "loop_b.csv").symlink_to(t / "loop_a.csv")
    return t / "loop_a.csv"


def _dangling(t: Path) -> Path:
    (t / "gone.csv").symlink_to(t / "nothing-here.csv")
    return t / "gone.csv"


def _unreadable(t: Path) -> Path:
    """A file even root may not read (we run as root here, so file modes alone would not refuse it)."""
    target = Path("/sys/bus/pci/rescan")  # write-only sysfs attribute
    try:
        target.open("rb").close()
    except PermissionError:
        (t / "denied.csv").symlink_to(target)
        return t / "denied.csv"
    except OSError:
        pass
    if os.geteuid() != 0:
        (t / "denied.csv").write_text("text,label\na,1\n")
        (t / "denied.csv").chmod(0)
        return t / "denied.csv"
    pytest.skip("no file this root process is refused to read (no write-only /sys/bus/pci/rescan here)")


def _latin1_csv(t: Path) -> Path:
    (t / "latin1.csv").write_bytes("text,label\ncaf\u00e9 cr\u00e8me,1\nbof,0\n".encode("latin-1"))
    return t / "latin1.csv"


@pytest.mark.parametrize("name,make_argv,words", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_unreadable_or_undecodable_input_exits_2(name, make_argv, words, env, tmp_path, capsys):
    argv = make_argv(env, tmp_path)
    refused(argv, capsys, words, [tmp_path, env["root"]])


def test_predict_binary_stdin_exits_2(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe not text\n")))
    refused(["predict", "--model", str(env["model"])], capsys, ["Standard input", "not UTF-8"], [tmp_path])


def test_predict_into_a_closed_pipe_ends_quietly(env, tmp_path):
    """`predict ... | head -1`: the reader goes away; predict stops without a traceback, as Unix tools do."""
    texts = _write(tmp_path / "t.txt", "".join(f"text number {i}\n" for i in range(2000)))
    command = " ".join(CLI) + f" predict --model {env['model']} --input {texts} --batch_size 64 | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 128 + signal.SIGPIPE and json.loads(done.stdout)["text"] == "text number 0"


def test_an_unknown_exception_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    """Real bugs stay visible: not every failure becomes a tidy one-liner."""
    from sarcasm_dpo.stages import split

    def bug(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(split, "make_splits", bug)
    assert cli.main(split_argv(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "please report it" in err


# -- class: numbers that are not finite, devices that do not exist -------------------------------------

NUMBERS = [
    ("epochs-nan", ["--epochs", "nan"], "'epochs' must be a finite number"),
    ("epochs-inf", ["--epochs", "inf"], "'epochs' must be a finite number"),
    ("lr-nan", ["--lr", "nan"], "'lr' must be a finite number"),
    ("lr-inf", ["--lr", "inf"], "'lr' must be a finite number"),
    ("lr-minus-inf", ["--lr=-inf"], "'lr' must be a finite number"),
    ("device-tpu9", ["--device", "tpu9"], "--device must be cpu, cuda, cuda:N or mps"),
]


@pytest.mark.parametrize("flags,words", [(c[1], c[2]) for c in NUMBERS], ids=[c[0] for c in NUMBERS])
@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_settings_that_are_not_finite_exit_2(flags, words, how, env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = sft(env, out)
    if how == "flag":
        argv += flags
    else:
        key, value = flags[0].lstrip("-").split("=") if "=" in flags[0] else (flags[0].lstrip("-"), flags[1])
        argv += ["--config", str(_write(tmp_path / "c.yaml", f"sft:\n  {key}: {value}\n"))]
    previous_run(out, sft(env, out))
    refused(argv, capsys, [words], [tmp_path])


def test_dpo_betas_and_predict_device_are_checked(env, tmp_path, capsys):
    refused(dpo(env, tmp_path / "out", "--beta_sweep", "--betas", "0.1,nan"), capsys, ["'betas' must be a finite"],
            [tmp_path])
    refused(["predict", "--model", str(env["model"]), "--device", "tpu9"], capsys, ["--device", "tpu9"], [tmp_path])


# -- class: splits that would be empty or single-class -------------------------------------------------


def small_data_dir(root: Path, gen_rows: pd.DataFrame) -> Path:
    (root / "sarcasm_v2").mkdir(parents=True)
    (root / "isarcasmeval").mkdir(parents=True)
    gen_rows.to_csv(root / "sarcasm_v2" / "GEN-sarc-notsarc.csv", index=False)
    shutil.copyfile(SHARED / "isarcasmeval" / "train.En.csv", root / "isarcasmeval" / "train.En.csv")
    return root


@pytest.fixture(scope="module")
def gen_frame(shared_data):
    return pd.read_csv(shared_data / "sarcasm_v2" / "GEN-sarc-notsarc.csv")


SPLITS = [
    ("test-size-tiny", lambda g: g, ["--test_size", "0.0001"], ["test share of 0.0001", "gives 1 test"]),
    ("one-row-file", lambda g: g.iloc[:1], [], ["GEN has 1 row(s) with only label"]),
    ("single-class-gen", lambda g: g[g["class"] == "sarc"].iloc[:200], [], ["only label 1", "both classes"]),
    ("val-size-tiny", lambda g: g.groupby("class").head(30), ["--val_size", "0.01"],
     ["GEN's training share", "validation share of 0.01"]),
]


@pytest.mark.parametrize("make_gen,flags,words", [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_split_refuses_empty_or_single_class_parts(make_gen, flags, words, gen_frame, tmp_path, capsys):
    data_dir = small_data_dir(tmp_path / "data", make_gen(gen_frame))
    refused(split_argv(tmp_path / "splits", *flags, data_dir=data_dir), capsys, words, [tmp_path])
    assert not (tmp_path / "splits").exists()


# -- class: unclear or wrong messages ------------------------------------------------------------------


def test_clearer_messages(env, tmp_path, capsys):
    semi = _write(tmp_path / "semi.csv", "text;label\noh great, rain;1\nfine;0\n")
    refused(_replace(sft(env, tmp_path / "o"), "--train_csv", str(semi)), capsys, ["separated by semicolons"], [tmp_path])
    semi2 = _write(tmp_path / "semi2.csv", "text;label\nfine;0\n")
    refused(_replace(sft(env, tmp_path / "o"), "--train_csv", str(semi2)), capsys, ["separated by semicolons"], [tmp_path])
    message = refused(sft(env, tmp_path / "o", "--max_length", "1"), capsys,
                      ["--max_length leaves no room", "by at least"], [tmp_path])
    assert "-1" not in message


def test_predict_warns_when_the_adapter_has_no_completion_marker(env, tmp_path, capsys):
    adapter = tmp_path / "unfinished"
    shutil.copytree(env["sft"], adapter)
    (adapter / COMPLETE_MARKER).unlink()
    texts = _write(tmp_path / "t.txt", "oh great\n")
    assert cli.main(["predict", "--adapter", str(adapter), "--input", str(texts)]) == 0
    captured = capsys.readouterr()
    assert "has no COMPLETE.json" in captured.err and json.loads(captured.out)["text"] == "oh great"


# -- class: data lost or replaced --------------------------------------------------------------------


def test_compare_refuses_another_comparison_and_files_it_did_not_write(env, tmp_path, capsys):
    out = tmp_path / "results"
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    capsys.readouterr()
    refused(compare(env, out), capsys, ["another run", "no_baseline", "--overwrite"], [tmp_path])
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / "predictions.csv").write_text("my own file\n")
    refused(compare(env, lookalike), capsys, ["predictions.csv", "--overwrite"], [tmp_path])
    # Another adapter at the same path is another input: refused, though every setting is the same.
    other_sft = tmp_path / "sft_copy"
    shutil.copytree(env["sft"], other_sft)
    assert cli.main(_replace(compare(env, tmp_path / "r2", "--no_baseline"), "--sft_model", str(other_sft))) == 0
    weights = other_sft / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    refused(_replace(compare(env, tmp_path / "r2", "--no_baseline"), "--sft_model", str(other_sft)), capsys,
            ["input sft_model"], [tmp_path / "r2"])
    assert cli.main(compare(env, out, "--overwrite")) == 0
    assert json.loads((out / COMPLETE_MARKER).read_text())["config"]["no_baseline"] is False


def test_a_failing_compare_keeps_the_previous_one(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    capsys.readouterr()
    from sarcasm_dpo import plots

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model_comparison_plot.png"))

    monkeypatch.setattr(plots, "plot_comparison", full_disk)
    refused(compare(env, out, "--no_baseline"), capsys, ["no space left", "model_comparison_plot.png"], [tmp_path])
    assert (out / COMPLETE_MARKER).is_file() and not list(tmp_path.glob(".staging-*"))


def test_split_with_other_data_is_another_run(gen_frame, tmp_path, capsys):
    rows = gen_frame.groupby("class").head(200)
    first = small_data_dir(tmp_path / "d1", rows)
    second = small_data_dir(tmp_path / "d2", rows.iloc[::-1])  # the same rows in another order: another file
    out = tmp_path / "splits"
    assert cli.main(split_argv(out, data_dir=first)) == 0
    capsys.readouterr()
    refused(split_argv(out, data_dir=second), capsys, ["input gen", "--overwrite"], [tmp_path])
    assert cli.main(split_argv(out, data_dir=first)) == 0  # the same data again: redone, allowed


def test_pipeline_refuses_a_folder_no_run_of_ours_wrote(tmp_path, capsys, shared_data, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)  # the stages' default folders (models/, results/) land here, not in the checkout
    splits = tmp_path / "mine_not_yours"
    splits.mkdir()
    _write(splits / "thesis.tex", "years of work\n")
    # A model that is there, so the pipeline's model check (done before anything is written) passes.
    config = _write(tmp_path / "p.yaml", f"no_wandb: true\nmodel: {tiny_model_dir}\nsplit:\n  output_dir: {splits}\n")
    refused(["pipeline", "--config", str(config), "--data_dir", str(shared_data)], capsys,
            ["thesis.tex", "--overwrite"], [tmp_path])


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(env, tmp_path, capsys):
    out = tmp_path / "results"
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    (out / ".tmp-save-abc").mkdir()
    (out / ".tmp-save-abc" / "adapter_model.safetensors").write_bytes(b"half")
    _write(out / ".tmp-COMPLETE.json.xyz", "{")
    (tmp_path / ".staging-results-ab12cd_4").mkdir()  # mkdtemp's name for a killed run's staging folder
    (tmp_path / ".staging-results-long-ab12cd_4").mkdir()  # another output's ("results-long"): not ours
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    assert not list(out.glob(".tmp-*"))
    assert [p.name for p in tmp_path.glob(".staging-*")] == [".staging-results-long-ab12cd_4"]
    assert not (tmp_path / ".results.lock").exists()  # released, and removed, at the end
    # The same for a training stage's folder: tidy() keeps the run's files and drops the killed saves.
    folder = tmp_path / "sft"
    folder.mkdir()
    _write(folder / "adapter_config.json", "{}")
    (folder / "checkpoints").mkdir()
    (folder / ".tmp-save-123").mkdir()
    _write(folder / ".tmp-adapter_config.json.q1", "{")
    rundir.tidy(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "checkpoints"]
    # A folder no run of ours wrote is left exactly as it was (the stage then refuses it).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _write(foreign / ".tmp-my-notes", "mine\n")
    rundir.tidy(foreign)
    assert (foreign / ".tmp-my-notes").read_text() == "mine\n"


def test_replacing_a_folder_keeps_the_outputs_nested_in_it(env, tmp_path, capsys):
    """compare into `results` while another output lives inside it (results/smollm2, as the configs have it):
    the swap replaces compare's own files and never deletes the nested run's; while that run is writing
    (its lock held), the swap is refused with exit 2 and nothing moves."""
    out = tmp_path / "results"
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    nested = out / "smollm2"
    nested.mkdir()
    _write(nested / "model_comparison_results.json", "{}\n")
    assert cli.main(compare(env, out, "--no_baseline")) == 0  # same settings: redone, swapped in
    assert (nested / "model_comparison_results.json").read_text() == "{}\n"
    assert cli.main(compare(env, out, "--no_baseline", "--overwrite")) == 0
    assert (nested / "model_comparison_results.json").read_text() == "{}\n"
    capsys.readouterr()
    holder = rundir.acquire(nested, "sarcasm-dpo compare --output_dir results/smollm2 (running)")
    try:
        before = hashes(tmp_path)
        assert cli.main(compare(env, out, "--no_baseline")) == 2
        err = capsys.readouterr().err
        assert "smollm2" in err and "running process" in err and "Traceback" not in err
        assert hashes(tmp_path) == before
    finally:
        rundir.release(holder)


def test_a_half_done_swap_of_a_dotted_folder_name_is_finished(tmp_path):
    """An output folder whose name has a dot (results/qwen2.5-0.5b) is still a folder to tidy(), not a file."""
    out = tmp_path / "qwen2.5-0.5b"
    stage = tmp_path / ".staging-qwen2.5-0.5b-ab12cd34"
    stage.mkdir()
    _write(stage / "result.txt", "new\n")
    _write(stage / COMPLETE_MARKER, "{}\n")
    rundir.tidy(out)
    assert (out / "result.txt").read_text() == "new\n" and not stage.exists()


def test_a_file_outputs_tidy_leaves_other_files_leftovers(tmp_path):
    _write(tmp_path / ".tmp-pairs.json.k2", "half")
    _write(tmp_path / ".tmp-pairs_v2.json.k3", "another run's, still being written")
    rundir.tidy(tmp_path / "pairs.json", is_file=True)
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-pairs_v2.json.k3"]


def test_a_refused_run_leaves_no_folders_behind(env, tmp_path, capsys):
    """Locking an output creates the folders above it; a run refused before it wrote anything takes them back, one
    that finished keeps them, and a folder that was already there stays."""
    (tmp_path / "kept").mkdir()
    empty = _write(tmp_path / "kept" / "empty.csv", "text,label\n")  # found out only once the run reads it
    for out in (tmp_path / "new" / "deeper" / "results", tmp_path / "kept" / "new" / "results"):
        assert cli.main(compare(env, out, "--no_baseline", "--test_csv", str(empty))) == 2
        assert "has a header but no rows" in capsys.readouterr().err
        assert not (tmp_path / "new").exists() and not (tmp_path / "kept" / "new").exists()
        assert (tmp_path / "kept").is_dir()
    assert cli.main(compare(env, tmp_path / "new" / "results", "--no_baseline")) == 0
    assert (tmp_path / "new" / "results" / "COMPLETE.json").is_file()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["results"]  # no lock file, nothing else


def test_a_stale_lock_is_taken_over_with_one_line(env, tmp_path, capsys):
    out = tmp_path / "results"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": os.uname().nodename, "command": "sarcasm-dpo compare (killed)"}
    _write(rundir.lock_path(out), json.dumps(record))
    assert cli.main(compare(env, out, "--no_baseline")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "taking over the lock" in line]
    assert len(notes) == 1 and "no longer running" in notes[0] and str(record["pid"]) in notes[0]


def test_a_busy_output_is_refused_naming_the_run_that_holds_it(env, tmp_path, capsys):
    """In-process half of the lock test: a lock held by another live process (here: a child holding flock)."""
    out = tmp_path / "results"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from sarcasm_dpo import rundir; "
        "rundir.acquire(%r, 'sarcasm-dpo compare --output_dir X'); print('held', flush=True); time.sleep(60)")
        % (str(ROOT / "src"), str(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(compare(env, out), capsys, ["in use by another run", f"pid {holder.pid}", "compare --output_dir X"],
                [tmp_path])
    finally:
        holder.kill()
        holder.wait()


# -- the lock and the swap with real processes (slow) ----------------------------------------------------


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(env, tmp_path):
    """Two real compare processes into one folder: one finishes (exit 0), the other exits 2 naming it."""
    out = tmp_path / "results"
    argv = compare(env, out)
    first = subprocess.Popen(CLI + argv, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert wait_for(lambda: rundir.lock_path(out).is_file(), timeout=120, proc=first)
        first.send_signal(signal.SIGSTOP)  # hold it inside its run while the second one starts, however fast it is
        second = subprocess.run(CLI + argv, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert (out / COMPLETE_MARKER).is_file() and not rundir.lock_path(out).exists()


KILL_DURING_SWAP = """
import os, signal, sys
sys.path.insert(0, {src!r})
from pathlib import Path
from sarcasm_dpo import rundir
from sarcasm_dpo.atomic import finish_output_dir, write_text
real_rename, calls = os.rename, []
def rename(a, b):
    real_rename(a, b)
    calls.append(b)
    if len(calls) == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
rundir.os.rename = rename
with rundir.staged({out!r}) as stage:
    write_text(stage / "result.txt", "new\\n")
    finish_output_dir(stage, {{"run": "new"}})
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 2])
def test_sigkill_during_the_swap_loses_nothing(kill_after, tmp_path):
    """SIGKILL between the swap's two renames (1) or after them (2): the next run's tidy() ends with either
    the old folder or the new one, whole, never a mix and never nothing."""
    out = tmp_path / "results"
    out.mkdir()
    _write(out / "result.txt", "old\n")
    _write(out / COMPLETE_MARKER, '{"config": {"run": "old"}}\n')
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SWAP.format(src=str(ROOT / "src"), out=str(out),
                                                                        kill_after=kill_after)], timeout=120)
    assert done.returncode == -signal.SIGKILL
    if kill_after == 1:
        assert not out.exists()  # the moment the kill caught: the old copy moved aside, the new one not in yet
    rundir.tidy(out)
    assert (out / "result.txt").read_text() == "new\n"
    assert json.loads((out / COMPLETE_MARKER).read_text())["config"] == {"run": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_mine_keeps_its_record_when_it_fails_and_counts_its_adapter(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    adapter = tmp_path / "sft"
    shutil.copytree(env["sft"], adapter)
    argv = _replace(mine(env, out), "--sft_model", str(adapter))
    assert cli.main(argv) == 0
    capsys.readouterr()
    from sarcasm_dpo import scoring

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "wandb"))

    with monkeypatch.context() as patch:
        patch.setattr(scoring.Scorer, "predict_proba", disk_full)
        refused(argv, capsys, ["no space left"], [tmp_path])
    assert (out / "pairs_run" / COMPLETE_MARKER).is_file()
    # The same path, another adapter (retrained): refused like any other change of settings.
    _write(adapter / "adapter_config.json", (adapter / "adapter_config.json").read_text() + "\n")
    refused(argv, capsys, ["input sft_model", "--overwrite"], [tmp_path])


@pytest.mark.parametrize("code,words", [
    (errno.ENOSPC, ["no space left", "free there now"]), (errno.EACCES, ["permission was denied"]),
    (errno.EROFS, ["read-only file system"]), (errno.ENAMETOOLONG, ["name is too long"]),
    (errno.ELOOP, ["loop of symbolic links"]), (errno.ENOTDIR, ["should be a folder is a file"]),
    (errno.EFBIG, ["ulimit -f"]),
])
def test_the_boundary_names_the_path_and_the_cause_of_each_os_error(code, words, tmp_path):
    """The CLI's one boundary (errors.describe_failure) for each errno the issue lists: path and cause."""
    from sarcasm_dpo.errors import describe_failure

    message = describe_failure(OSError(code, os.strerror(code), str(tmp_path / "out" / "file.json")))
    assert str(tmp_path / "out" / "file.json") in message and "\n" not in message
    for word in words:
        assert word in message
    assert describe_failure(OSError(errno.ECONNRESET, "reset")) is None  # not a file problem: a bug shows its traceback
    assert describe_failure(ValueError("x")) is None


def test_the_boundary_turns_safetensors_errors_into_a_paragraph(tmp_path):
    from safetensors.torch import load_file  # what PEFT calls: its frame holds the file name

    from sarcasm_dpo.errors import describe_failure

    bad = tmp_path / "adapter_model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(Exception) as info:
        load_file(str(bad))
    message = describe_failure(info.value)
    assert message and "adapter_model.safetensors" in message and "truncated or not a safetensors file" in message


def test_full_disk_while_saving_tensors_is_a_paragraph(tmp_path):
    """torch.save and safetensors report a full disk in their own words; the boundary still says what happened."""
    import torch
    from safetensors.torch import save_file

    from sarcasm_dpo.errors import describe_failure

    with mounted_tmpfs(tmp_path / "full", "size=64k") as full:
        for name, save in (("x.pt", torch.save), ("y.safetensors", save_file)):
            with pytest.raises(Exception) as info:
                save({"a": torch.zeros(100_000)}, str(full / name))
            message = describe_failure(info.value)
            assert message and str(full / name) in message and "free there now" in message, message


def test_file_size_limit_mid_run_keeps_the_previous_comparison(env, tmp_path, capsys):
    """Where no tmpfs can be mounted, RLIMIT_FSIZE (ulimit -f) stops writes the same way a full disk does:
    the comparison fails while writing its outputs, exits 2 naming the cause, and the previous one stays whole."""
    import resource

    out = tmp_path / "results"
    argv = compare(env, out, "--no_baseline")
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = hashes(tmp_path, env["root"])
    limit = 8 * 1024  # the lock and the predictions fit; the plot (tens of KiB) does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(CLI + argv, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "ulimit -f" in error_paragraph(done.stderr)
    assert hashes(tmp_path, env["root"]) == before and not list(tmp_path.glob(".staging-*"))


def test_a_training_run_that_fails_keeps_the_previous_run_and_its_marker(env, tmp_path, capsys, monkeypatch):
    """sft (dpo shares the code: checkpoints.claim_run_dir / save_adapter) with --overwrite over a finished run of
    other settings fails while training: the previous run's files and COMPLETE.json are as they were; the
    stopped run is then seen as interrupted (the pipeline resumes it), and --resume finishes it."""
    from sarcasm_dpo.training import checkpoints
    from sarcasm_dpo.stages import sft as sft_stage

    out = tmp_path / "sft"
    shutil.copytree(env["sft"], out)  # a finished run (the reference's settings)
    previous = hashes(out)
    argv = sft(env, out, "--lr", "0.01", "--epochs", "1", "--save_steps", "2", "--overwrite")
    real = sft_stage.run_trainer

    def disk_full_after_a_checkpoint(trainer, resume_from):
        trainer.add_callback(_FailAfterSave())
        return real(trainer, resume_from)

    monkeypatch.setattr(sft_stage, "run_trainer", disk_full_after_a_checkpoint)
    refused(argv, capsys, ["no space left"], [env["root"]])
    assert {k: v for k, v in hashes(out).items() if "/checkpoints/" not in k} == previous
    assert checkpoints.interrupted_run(out) and checkpoints.finished_record(out, {}, sft_stage.SUMMARY_FILE) is None
    monkeypatch.setattr(sft_stage, "run_trainer", real)
    assert cli.main([a for a in argv if a != "--overwrite"] + ["--resume"]) == 0
    assert json.loads((out / COMPLETE_MARKER).read_text())["config"]["lr"] == 0.01 and not checkpoints.interrupted_run(out)


class _FailAfterSave:
    """A TrainerCallback whose first checkpoint is followed by a full disk."""

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_save(self, args, state, control, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(args.output_dir) / "checkpoint-next"))


# -- class: whose OSError is it? The user's (exit 2, one paragraph) or ours (the traceback) --------------

ELSEWHERE = "/nonexistent-sarcasm-dpo-internal/state.json"  # a path no setting names: our own code's
OWNERSHIP = [  # (id, errno, path: relative to the settings' folder or absolute, the user's to fix?)
    ("enoent-inside-output", errno.ENOENT, "out/sub/file.json", True),
    ("eexist-staging-beside-output", errno.EEXIST, ".staging-out-abcd1234", True),
    ("enotdir-lock-beside-output", errno.ENOTDIR, ".out.lock", True),
    ("eisdir-input-file", errno.EISDIR, "train.csv", True),
    ("eperm-inside-adapter", errno.EPERM, "adapter/adapter_config.json", True),
    ("enoent-elsewhere", errno.ENOENT, ELSEWHERE, False),
    ("eexist-elsewhere", errno.EEXIST, ELSEWHERE, False),
    ("eisdir-elsewhere", errno.EISDIR, ELSEWHERE, False),
    ("enotdir-elsewhere", errno.ENOTDIR, ELSEWHERE, False),
    ("eperm-elsewhere", errno.EPERM, ELSEWHERE, False),
    ("enoent-no-path", errno.ENOENT, None, False),
    ("enospc-elsewhere", errno.ENOSPC, ELSEWHERE, True),  # the machine's, whatever the path
    ("eacces-elsewhere", errno.EACCES, ELSEWHERE, True),
    ("erofs-elsewhere", errno.EROFS, ELSEWHERE, True),
]


@pytest.mark.parametrize("code,where,users", [c[1:] for c in OWNERSHIP], ids=[c[0] for c in OWNERSHIP])
def test_a_path_error_is_the_users_only_about_a_path_the_settings_name(code, where, users, tmp_path):
    """ENOENT, EEXIST, EISDIR, ENOTDIR, EPERM about a path the settings name (or inside or beside one: staging
    folders, locks) are the user's; about any other path, our bug. Full disks and permissions: always the user's."""
    from sarcasm_dpo.errors import describe_failure, paths_named
    from sarcasm_dpo.settings import CompareSettings

    settings = CompareSettings(output_dir=str(tmp_path / "out"), train_csv=str(tmp_path / "train.csv"),
                               sft_model=str(tmp_path / "adapter"))
    path = None if where is None else where if where.startswith("/") else str(tmp_path / where)
    message = describe_failure(OSError(code, os.strerror(code), path), user_paths=paths_named(settings))
    if users:
        assert message and "\n" not in message and (path is None or path in message), message
    else:
        assert message is None
    # Without settings to tell by (a caller outside the CLI), every path is the user's, as before.
    assert describe_failure(OSError(code, os.strerror(code), path)) is not None


@pytest.mark.parametrize("where,code", [("output", 2), ("internal", 1)])
def test_the_cli_tells_a_missing_output_file_from_our_own_missing_file(where, code, monkeypatch, tmp_path, capsys):
    """The same FileNotFoundError: about the output folder it is one paragraph and exit 2; about a file no
    setting names it is a bug, with its traceback and the line asking to report it."""
    from sarcasm_dpo.stages import split

    out = tmp_path / "out"
    path = str(out / "gen_train.csv") if where == "output" else ELSEWHERE

    def missing(*_a, **_k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    monkeypatch.setattr(split, "make_splits", missing)
    if code == 2:
        refused(split_argv(out), capsys, [path, "does not exist"], [tmp_path])
        return
    assert cli.main(split_argv(out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and ELSEWHERE in err and "please report it" in err


def test_a_full_disk_names_the_space_the_write_needed(tmp_path, monkeypatch):
    """ENOSPC: the path, the free space, and what the write needed: the file's size when it is known (atomic
    writes), the outputs staged before it (a staged folder), or the words that it is not known."""
    import pathlib

    from sarcasm_dpo.atomic import write_json, write_text
    from sarcasm_dpo.errors import describe_failure

    out = tmp_path / "results"
    real = pathlib.Path.write_text

    def full(self, text, *a, **k):
        if self.name.startswith(".tmp-big.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError) as info:
        with rundir.staged(out) as stage:
            write_text(stage / "small.txt", "x" * 3000)
            write_json(stage / "big.json", {"rows": ["y" * 1000] * 4})
    message = describe_failure(info.value, user_paths=[str(out)])
    assert "big.json" in message and "free there now" in message, message
    assert "the file being written needed 4.0 KiB" in message  # 4 x 1,000 characters and the JSON around them
    assert "on top of the 2.9 KiB of outputs this run had staged" in message  # small.txt, 3,000 bytes
    assert not out.exists()  # nothing swapped in
    bare = describe_failure(OSError(errno.ENOSPC, "No space left on device", str(out / "x.bin")))
    assert "free there now" in bare and "how much space the write needed is not known" in bare


# -- class: a full disk (or another failed write) that names no file ------------------------------------------


def test_a_full_disk_with_no_path_known_claims_no_free_space(tmp_path):
    """No file named and none in the traceback: the message says "a file" and nothing about free space (the
    current folder's would be of another disk, as like as not)."""
    from sarcasm_dpo.errors import describe_failure

    message = describe_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith("Could not use a file: there is no space left") and "free there now" not in message


def test_a_failed_write_to_a_stream_names_it_and_says_what_the_run_left(tmp_path):
    """errors.stream_failure: the stream's name, the file behind it and its disk's free space where it is a file,
    nothing about free space for a pipe or a device; the note of what was written instead of the atomic words."""
    from sarcasm_dpo.errors import STANDARD_OUTPUT, describe_failure, stream_failure

    read_end, write_end = os.pipe()
    try:
        exc = stream_failure(OSError(errno.ENOSPC, "No space left on device"), STANDARD_OUTPUT, write_end,
                             "It wrote 3 rows.")
        message = describe_failure(exc, user_paths=[str(tmp_path)])
    finally:
        os.close(read_end), os.close(write_end)
    assert message.startswith("Could not use standard output: there is no space left"), message
    assert "free there now" not in message and message.endswith("It wrote 3 rows.") and "atomically" not in message
    with open(tmp_path / "rows.jsonl", "w") as stream:
        exc = stream_failure(OSError(errno.ENOSPC, "No space left on device"), STANDARD_OUTPUT, stream.fileno(), "")
        message = describe_failure(exc)
    assert f"Could not use standard output ({os.path.realpath(tmp_path / 'rows.jsonl')}): " in message, message
    assert "free there now" in message and "send it to another disk" in message


def test_predict_into_a_full_device_says_how_far_it_got(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`predict ... > /dev/full`: exit 2, one paragraph naming standard output (no free space: a device has
    none to tell), how many texts were scored and how many rows reached the output whole (none)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    texts = _write(tmp_path / "t.txt", "oh great, rain again\nwe met at noon\n")
    full = open("/dev/full", "w")  # noqa: SIM115 - closed below, whatever its buffer holds
    try:
        monkeypatch.setattr(sys, "stdout", full)
        message = refused(["predict", "--model", str(tiny_model_dir), "--input", str(texts)], capsys,
                          ["Could not use standard output: there is no space left", "predict had scored 2 of 2 texts",
                           "no row is known to have reached standard output whole", "A rerun scores every text"],
                          [tmp_path])
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            full.close()
    assert "free there now" not in message and "a file" not in message


def test_predict_onto_a_full_disk_names_the_file_its_free_space_and_the_rows_kept(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """stdout redirected to a file on a disk that fills: the file, that disk's free space, and the rows that
    reached it whole (those before the last successful flush), which the file indeed starts with."""
    from sarcasm_dpo.stages import predict

    texts = _write(tmp_path / "t.txt", "".join(f"text number {i}, which takes some room on the disk\n"
                                               for i in range(1000)))
    monkeypatch.setattr(predict, "STREAM_CHUNK", 100)
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        rows = small / "rows.jsonl"
        stream = open(rows, "w")  # noqa: SIM115 - closed below, whatever its buffer holds
        try:
            with monkeypatch.context() as patch:
                patch.setattr(sys, "stdout", stream)
                code = cli.main(["predict", "--model", str(tiny_model_dir), "--input", str(texts), "--batch_size",
                                 "100"])
        finally:
            with contextlib.suppress(OSError):
                stream.close()
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-3000:]
        message = error_paragraph(err)
        assert len(message.strip().splitlines()) == 1, message
        assert f"Could not use standard output ({os.path.realpath(rows)}): there is no space left" in message
        assert "(free there now: " in message, message
        import re

        kept = int(re.search(r"the first (\d+) rows reached standard output whole", message).group(1))
        assert 100 <= kept < 1000 and f"keep its first {kept} lines only" in message
        assert f"give it the texts after the first {kept}" in message
        lines = rows.read_text().splitlines()
        assert [json.loads(line)["text"] for line in lines[:kept]] == [f"text number {i}, which takes some room on "
                                                                       "the disk" for i in range(kept)]


def test_torch_save_failing_to_write_is_a_paragraph_that_tells_a_full_disk(tmp_path, monkeypatch):
    """torch.save's writer names neither the errno nor the file ("basic_ios::clear: iostream error" on a full disk,
    from serialization.write_end_of_file): the file comes from the traceback, and the free space of its disk tells
    a full disk from the other causes. The C++ stream's words outside torch.save stay a bug; a reader's failure is
    not called a write."""
    import shutil

    import torch

    from sarcasm_dpo.errors import describe_failure

    target = tmp_path / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    target.parent.mkdir(parents=True)

    def failing_writer(*_a, **_k):
        raise RuntimeError("basic_ios::clear: iostream error")

    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "_save", failing_writer)
        with pytest.raises(RuntimeError) as info:
            torch.save({"a": torch.zeros(3)}, str(target))
    usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(100 << 30, (100 << 30) - 4096, 4096))
    full = describe_failure(info.value, user_paths=[str(tmp_path)])
    assert full.startswith(f"Could not write {target}: PyTorch's file writer failed (basic_ios::clear: iostream "
                           "error), because the disk it is on is full (free there now: 4.0 KiB)."), full
    assert "\n" not in full and "--resume" in full
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(100 << 30, 50 << 30, 50 << 30))
    roomy = describe_failure(info.value)
    assert "has room now (free there now: 50.0 GiB), so the cause is not a full disk" in roomy, roomy
    assert "disk quota" in roomy and "ulimit -f" in roomy
    monkeypatch.undo()
    assert describe_failure(RuntimeError("basic_ios::clear: iostream error")) is None  # not torch's writer
    for words in ("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/7: file "
                  "write failed", "PytorchStreamWriter failed writing central directory: file write failed",
                  "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"):
        assert "PyTorch's file writer failed" in describe_failure(RuntimeError(words)), words
    assert describe_failure(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central "
                                         "directory")) is None


def test_torch_save_onto_a_full_device_is_a_paragraph(tmp_path):
    """The real writer on a device that is always full: torch 2.x's own "basic_ios::clear" error, recognised."""
    import torch

    from sarcasm_dpo.errors import describe_failure

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(RuntimeError) as info:
        torch.save({"a": torch.zeros(10)}, "/dev/full")
    message = describe_failure(info.value)
    assert message and message.startswith("Could not write /dev/full: PyTorch's file writer failed"), message


def test_a_full_disk_under_tokenizers_names_the_tokenizer_file(tiny_model_dir, tmp_path):
    """tokenizers (Rust) says "os error 28" and no file; its caller's local is `tokenizer_file`, a name the
    lookup does not list: a local whose name says file or path counts, and so does any path under the run's own."""
    from transformers import AutoTokenizer

    from sarcasm_dpo.errors import describe_failure

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    out = tmp_path / "sft"
    out.mkdir()
    (out / "tokenizer.json").symlink_to("/dev/full")  # the disk fills while tokenizer.json is written
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with pytest.raises(Exception, match=r"os error 28") as info:
        tokenizer.save_pretrained(str(out))
    for user_paths in (None, [str(out)]):
        message = describe_failure(info.value, user_paths=user_paths)
        assert message.startswith(f"Could not use {out / 'tokenizer.json'}: there is no space left"), message

    def save_weights(folder: Path):
        written = folder / "adapter_model.bin"  # noqa: F841 - a name that says neither file nor path
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002 - as a Rust library raises it

    with pytest.raises(Exception) as info:
        save_weights(out)
    assert f"Could not use {out / 'adapter_model.bin'}:" in describe_failure(info.value, user_paths=[str(out)])
