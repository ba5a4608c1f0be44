"""Atomic outputs: no JSON, CSV, PNG or adapter file is ever left half-written, and a stage's folder is
marked complete (COMPLETE.json) only once every output is in place.

- atomic_path under a real SIGKILL mid-write: the old file survives whole; only a `.tmp-*` remains.
- The SFT write phase, instant by instant: tests/atomic_probe.py watches the stage with Python's
  audit hooks and checks the folder before every rename into it (each moment a kill could freeze),
  and flags any final-named file opened for writing. Run over a folder that already holds a
  finished run, the case where a half-written file would destroy something.
- Slow: real SIGKILLs at random moments of the save phase, then the re-run with --resume.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time

import pytest
from atomic_probe import check_folder
from reliability_common import (ROOT, cli_config, env, reference_run, run_cli, sft_argv, start_cli, toy_csvs,
                                wait_for)

from sarcasm_dpo.atomic import finish_output_dir

WRITER = """
import sys, time
from sarcasm_dpo.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as fh:
        fh.write('{"rows": [')
        for i in range(10_000_000):
            fh.write('"%s",' % ("x" * 1000))
            fh.flush()
            if i == 200:
                print("writing", flush=True)
            time.sleep(0.001)
        fh.write('""]}')
"""


def test_atomic_path_killed_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": true}\n')
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(target.read_text()) == {"old": True}
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".tmp-results.json.") for p in leftovers)
    assert leftovers[0].stat().st_size > 200_000  # the kill did land mid-write


def _probe(argv, report):
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "atomic_probe.py"), str(report), *argv], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text())


def test_sft_write_phase_never_exposes_a_partial_file(tiny_model_dir, tmp_path_factory, tmp_path):
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    out = tmp_path / "sft"
    argv = sft_argv(tiny_model_dir, train, val, out, epochs=1)
    # A finished run of the same settings to write over (the reference run's files, marked as this one's).
    shutil.copytree(reference_run(tiny_model_dir, tmp_path_factory)[0], out)
    finish_output_dir(out, cli_config(argv))
    report = _probe(argv, tmp_path / "report.json")
    assert report["exit_code"] == 0 and report["complete"]
    assert report["violations"] == []
    # The run's checkpoints are carried into the staged folder just before the swap, and deleted after it.
    renamed = [name for name in report["renames_into_out"] if name != "checkpoints"]
    # Every output went through a rename (written elsewhere first) into the staged copy of the folder,
    # COMPLETE.json strictly last, then the staged folder replaced the old one whole, once.
    for name in ("adapter_model.safetensors", "adapter_config.json", "threshold.json", "sft_metrics.json",
                 "sft_training_curves.png", "training_summary.json"):
        assert name in renamed, name
    assert renamed[-2:] == ["COMPLETE.json", "<swap>"] and renamed.count("COMPLETE.json") == 1
    assert renamed.count("<swap>") == 1
    assert renamed.index("adapter_config.json") > renamed.index("adapter_model.safetensors")


@pytest.mark.slow
def test_random_kills_in_the_save_phase_leave_whole_files(tiny_model_dir, tmp_path):
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    argv = sft_argv(tiny_model_dir, train, val, tmp_path / "sft", epochs=1)
    rng = random.Random(7)
    outcomes = []
    for attempt in range(4):
        out = tmp_path / f"sft-{attempt}"
        run_argv = [*argv[:argv.index("--output_dir") + 1], str(out), *argv[argv.index("--output_dir") + 2:]]
        log = tmp_path / f"log-{attempt}.txt"
        proc = start_cli(run_argv, log)
        try:
            # The save phase starts right after the last evaluation (step 2 of 2).
            assert wait_for(lambda: "[eval] step 2 " in log.read_text(), timeout=300, proc=proc, every=0.01)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert check_folder(out, "sft") == [], attempt
        written = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
        outcomes.append(f"{len(written)} files" + (", complete" if (out / "COMPLETE.json").is_file() else ""))
        done = run_cli(run_argv + ["--resume"])  # whatever the kill left, the re-run finishes the job
        assert done.returncode == 0, done.stderr[-3000:]
        assert check_folder(out, "sft") == [] and (out / "COMPLETE.json").is_file()
        shutil.rmtree(out)
    print("kill outcomes:", outcomes)


def test_the_probe_recognises_partial_files(tmp_path):
    """The checker itself: a cut JSON, a PNG without its end, a marker beside missing outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(tmp_path / "whole.png")
    plt.close(fig)
    png = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "sft_training_curves.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "sft_metrics.json").write_text('{"steps": [1, 2')
    (tmp_path / "COMPLETE.json").write_text("{}")
    (tmp_path / ".tmp-sft_metrics.json.abc").write_text("{")  # temporary names are never read
    problems = check_folder(tmp_path, "sft")
    assert any(p.startswith("sft_metrics.json: JSONDecodeError") for p in problems)
    assert any(p.startswith("sft_training_curves.png: PNG without") for p in problems)
    assert any(p.startswith("COMPLETE.json present while") for p in problems)
    assert not any(".tmp-" in p for p in problems) and check_folder(tmp_path / "absent", "sft") == []
