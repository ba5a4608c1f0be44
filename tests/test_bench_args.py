"""The bench scripts' command lines: --help only prints; a bad value ends in one line and exit code 2, no traceback.

Every script runs as a subprocess from an empty folder (HOME and TMPDIR pointed into it), so a script that did
its work anyway would show: in that folder, or in bench/results/, whose files are compared before and after.
Nothing here loads a model or runs a benchmark; each script stops while reading its flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py"))
HELPERS = ("common.py", "speed_report.py")  # modules the scripts import; run alone they say so


def results_state() -> dict[str, tuple[int, str]]:
    return {str(path.relative_to(RESULTS)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(RESULTS.rglob("*")) if path.is_file()}


def run(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGS` from an empty folder, with its home and temporary folder inside it."""
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for folder in (cwd, home, tmp):
        folder.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def written(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())


@pytest.fixture
def results_untouched():
    before = results_state()
    yield
    assert results_state() == before, "bench/results/ changed"


def test_every_script_is_covered():
    # a new file in bench/ is picked up by the --help test below; this names the ones known today
    known = {"detector_check.py", "speed.py", "speed_eval.py", "training.py", "device_check.py", *HELPERS}
    assert known <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_writes_nothing(script, tmp_path, results_untouched):
    done = run(tmp_path, script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and done.stderr == ""
    assert written(tmp_path) == []


@pytest.mark.parametrize("script", HELPERS)
def test_a_helper_module_run_alone_says_what_it_is(script, tmp_path, results_untouched):
    done = run(tmp_path, script)
    assert done.returncode == 2 and "helper module, not a benchmark" in done.stderr
    assert "Traceback" not in done.stderr and written(tmp_path) == []


# (script, arguments before the bad flag, the flag, a value it refuses). Zeros here would have meant "all" or
# "none" without saying so (0 eval texts scored all 1,304), or crashed later (0 threads).
REFUSED = [
    ("speed.py", ["--sections", "eval"], "--eval_texts", "-5"),
    ("speed.py", [], "--eval_texts", "0"),
    ("speed.py", [], "--sft_steps", "0"),
    ("speed.py", [], "--pipeline_sample", "0"),
    ("speed.py", [], "--gpu_peak_tflops", "0"),
    ("speed.py", [], "--seed", "-1"),
    ("speed.py", [], "--seed", str(2**32)),
    ("speed_eval.py", [], "--eval_texts", "0"),
    ("speed_eval.py", [], "--eval_repeats", "-1"),
    ("speed_sft.py", [], "--sft_pool", "0"),
    ("speed_memory.py", [], "--dpo_pairs", "-3"),
    ("speed_head.py", [], "--head_batches", "0"),
    ("speed_gpu.py", [], "--pipeline_dpo_pairs", "0"),
    ("training.py", [], "--threads", "0"),
    ("training.py", [], "--steps", "1"),  # step 1 of each round is warm-up: nothing would be timed
    ("training.py", [], "--layers", "-2"),
    ("dpo_paths.py", [], "--steps", "0"),
    ("dpo_paths.py", [], "--pairs", "2"),  # less than one batch of 4
    ("dpo_study.py", ["select", "--sft_model", "m"], "--pairs", "0"),
    ("dpo_study.py", ["select", "--sft_model", "m"], "--betas", "0.1,-1"),
    ("quality.py", [], "--sft_samples", "0"),
    ("quality.py", [], "--test_samples", "-1"),
    ("quality.py", [], "--dpo_epochs", "nan"),
    ("determinism.py", [], "--runs", "1"),  # nothing to compare the first run with
    ("determinism.py", [], "--val_samples", "0"),
    ("device_check.py", ["--out", "OUT"], "--score_texts", "0"),
    ("device_check.py", ["--out", "OUT"], "--time_budget", "-5"),
    ("isarcasm_reference.py", [], "--seed", "x"),
]


@pytest.mark.parametrize("script, before, flag, value", REFUSED, ids=[f"{s} {f} {v}" for s, _, f, v in REFUSED])
def test_a_refused_count_exits_2_with_one_line(script, before, flag, value, tmp_path, results_untouched):
    done = run(tmp_path, script, *before, flag, value)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if not line.startswith(("usage:", " "))]
    assert len(error) == 1 and f"argument {flag}:" in error[0], done.stderr
    assert done.stdout == "" and written(tmp_path) == []


@pytest.mark.parametrize("script, args, says", [
    ("speed.py", ["--sections", "nope"], "unknown ['nope']"),
    ("speed_eval.py", ["--sections", "sft"], "unrecognized arguments: --sections"),  # the file fixes its section
    ("training.py", ["--stages", "sft,rl"], "unknown ['rl']"),
    ("training.py", ["--sft_overrides", "[1]"], "expected a JSON object"),
    ("dpo_paths.py", ["--comparisons", "dpo"], "unknown ['dpo']"),
    ("detector_check.py", ["--base-lm"], "unrecognized arguments: --base-lm"),
    ("device_check.py", ["--out", "OUT", "--parts", "sft,gpu"], "unknown ['gpu']"),
    ("device_check.py", ["--out", "OUT", "--expect", "sft=soon"], "--expect 'sft=soon'"),
    ("device_check.py", ["--out", "OUT", "--set", "sft.batch_sise=2"], "Unknown setting 'batch_sise'"),
])
def test_a_bad_choice_exits_2_before_anything_is_written(script, args, says, tmp_path, results_untouched):
    done = run(tmp_path, script, *args)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert written(tmp_path) == []  # device_check's OUT folder included: an earlier result there would be kept


def test_bad_input_found_after_the_flags_is_one_paragraph_and_exit_2(tmp_path, results_untouched):
    """speed.py checks --pipeline_stages before the model loads (the gpu section runs last); detector_check.py
    reads the result file it would replace before any work, and leaves one that is not JSON as it is."""
    done = run(tmp_path, "speed.py", "--sections", "gpu", "--pipeline_stages", "sft,eval")
    assert done.returncode == 2 and done.stderr == ("error: --pipeline_stages: unknown ['eval']; choose from "
                                                    "split,sft,dpo,compare.\n")
    not_json = tmp_path / "detector_check.json"
    not_json.write_text("{half")
    done = run(tmp_path, "detector_check.py", "--output", str(not_json))
    assert done.returncode == 2 and done.stderr.startswith("error: --output") and "Traceback" not in done.stderr
    assert not_json.read_text() == "{half"


# -- the value types ---------------------------------------------------------------------------------------


def refuses(kind, text: str) -> bool:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        kind(text)
    return repr(text) in str(caught.value)  # the message shows what was given


def test_whole_number_types():
    assert common.positive_int("3") == 3 and common.non_negative_int("0") == 0 and common.at_least(2)("2") == 2
    for text in ("0", "-1", "1.5", "x", ""):
        assert refuses(common.positive_int, text)
    for text in ("-1", "2.0"):
        assert refuses(common.non_negative_int, text)
    assert refuses(common.at_least(2), "1")
    assert common.seed("0") == 0 and common.seed(str(2**32 - 1)) == 2**32 - 1
    for text in ("-1", str(2**32), "4e3"):
        assert refuses(common.seed, text)


def test_number_types():
    assert common.positive_float("0.05") == 0.05 and common.non_negative_float("0") == 0.0
    for text in ("0", "-1", "nan", "inf", "x"):
        assert refuses(common.positive_float, text)
    for text in ("-0.5", "nan", "-inf"):
        assert refuses(common.non_negative_float, text)


def test_comma_list():
    sections = common.comma_list(("eval", "sft", "gpu"))
    assert sections("eval, gpu,") == "eval,gpu"  # the text the scripts split, blanks dropped
    assert "unknown ['nope']; choose from eval,sft,gpu" in str(pytest.raises(argparse.ArgumentTypeError,
                                                                              sections, "eval,nope").value)
    assert refuses(sections, " , ")
    assert common.comma_list(("lean",), empty_ok=True)("") == ""
    betas = common.comma_list(item=common.positive_float)
    assert betas("0.05,0.5") == "0.05,0.5" and refuses(betas, "-1")


def test_an_argparse_flag_with_a_value_type_exits_2(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--n", type=common.positive_int)
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--n", "0"])
    assert caught.value.code == 2
    assert "bench: error: argument --n: expected a whole number of at least 1, got '0'" in capsys.readouterr().err


# -- run_main: the one place a script's bad input becomes one paragraph --------------------------------------


def exit_of(main) -> int:
    with pytest.raises(SystemExit) as caught:
        common.run_main(main)
    return caught.value.code


def test_run_main_turns_bad_input_into_one_paragraph_and_exit_2(capsys):
    from sarcasm_dpo.errors import UserError

    def user_error():
        raise UserError("--data_dir x is missing GEN. Give the folder with the datasets.")

    def bad_input():
        raise common.BadInput("--pipeline_stages leaves out 'sft'.")

    assert exit_of(user_error) == 2
    assert capsys.readouterr().err == "error: --data_dir x is missing GEN. Give the folder with the datasets.\n"
    assert exit_of(bad_input) == 2
    assert capsys.readouterr().err == "error: --pipeline_stages leaves out 'sft'.\n"
    assert exit_of(lambda: {"result": 1}) == 0 and exit_of(lambda: 1) == 1


def test_run_main_keeps_the_traceback_of_a_bug():
    def bug():
        raise KeyError("oops")

    with pytest.raises(KeyError):
        common.run_main(bug)


def test_bad_input_is_a_systemexit_whose_text_is_the_message():
    """Code that calls a script's functions (and the tests that match their messages) sees a SystemExit."""
    exc = common.BadInput("--set 'x': expected STAGE.SETTING=VALUE")
    assert isinstance(exc, SystemExit) and exc.code == 2 and str(exc) == "--set 'x': expected STAGE.SETTING=VALUE"


def test_pipeline_stages_asked():
    import speed_gpu

    assert speed_gpu.stages_asked(None) == list(speed_gpu.PIPELINE_STAGES)
    assert speed_gpu.stages_asked("dpo, compare") == ["dpo", "compare"]
    with pytest.raises(common.BadInput, match=r"unknown \['eval'\]"):
        speed_gpu.stages_asked("eval")
    with pytest.raises(common.BadInput, match="names no stage"):
        speed_gpu.stages_asked(",")


# -- detector_check.py: a run without --base_lm keeps the earlier base-LM section, marked ----------------------


def gen_val(n=4, shift=0):
    return pd.DataFrame({"text": [f"text {i + shift}" for i in range(n)], "label": [i % 2 for i in range(n)]})


def test_detector_check_keeps_the_earlier_base_lm_section_marked_as_such(tmp_path):
    import detector_check as dc

    path = tmp_path / "detector_check.json"
    assert dc.earlier_section(path) is None  # no file yet
    measured = {"n": 4, "gen_val_fingerprint": dc.gen_val_fingerprint(gen_val()), "threshold": 0.28}
    path.write_text(json.dumps({"thresholds": {}, dc.BASE_LM: measured}))
    section = dc.earlier_section(path)
    kept = dc.keep_earlier(section, gen_val(), path)
    assert kept == {**measured, "from_earlier_run": kept["from_earlier_run"]}
    assert kept["from_earlier_run"].startswith("not measured by this run (it had no --base_lm): kept from an earlier")
    assert "same GEN validation texts (fingerprint)" in kept["from_earlier_run"]
    assert dc.keep_earlier(kept, gen_val(), path) == kept  # kept again: still marked, once
    with pytest.raises(common.BadInput, match="other GEN validation texts"):
        dc.keep_earlier(section, gen_val(shift=1), path)  # same number, other texts: the fingerprint tells


def test_detector_check_judges_an_older_section_without_a_fingerprint_by_its_size(tmp_path):
    import detector_check as dc

    older = {"n": 4, "threshold": 0.28}  # as the committed file has it
    note = dc.keep_earlier(older, gen_val(4), tmp_path / "x.json")["from_earlier_run"]
    assert note.startswith(dc.KEPT_NOTE) and "as many GEN validation texts (4)" in note and "no fingerprint" in note
    with pytest.raises(common.BadInput, match="Nothing was written"):
        dc.keep_earlier(older, gen_val(6), tmp_path / "x.json")


def test_the_committed_detector_check_result_has_its_base_lm_section():
    """The section only a --base_lm run writes is there (a run without it used to drop it)."""
    import detector_check as dc

    section = dc.earlier_section(RESULTS / "detector_check.json")
    assert section is not None and section["n"] > 0
