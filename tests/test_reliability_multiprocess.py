"""Several processes: `accelerate launch --num_processes 2 --cpu -m sarcasm_dpo.cli sft|dpo ...` trains
data-parallel over gloo on this machine and writes the same outputs as a single process, once.

accelerate's CPU launcher starts one process and leaves the others to mpirun; the CLI notices and
starts the two ranks itself (training.distributed.run_workers), as torchrun would. Evidence that both ranks
trained on their own shard: half the optimizer steps of the single-process run at the same
per-process batch, and `processes: 2` in the summary. Written once: the completion message is
printed once and every file is whole (tests/atomic_probe.check_folder). A Ctrl-C reaching the whole
process group stops both ranks at the same step with one checkpoint, and `--resume` completes it.
A command that does not train (compare, predict) runs once under torchrun: one process does the work,
the other exits 0 at once. The pipeline runs on both: sft and dpo data-parallel, split and compare on the
main process while the other waits; a failure there ends both, the message printed once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from atomic_probe import check_folder
from reliability_common import ROOT, complete_checkpoints, env, reference_run, sft_argv, wait_for
from test_pipeline import small_data_dir, write_config  # noqa: F401 - small_data_dir is a fixture
from test_sft import toy_frame

pytestmark = pytest.mark.slow

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sarcasm_dpo.cli"]


def launch(argv: list[str], log, **popen) -> subprocess.Popen:
    return subprocess.Popen(ACCELERATE + argv, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            **popen)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def two_process_sft(tiny_model_dir, tmp_path_factory):
    ref, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    root = tmp_path_factory.mktemp("ddp")
    out = root / "sft"
    proc = launch(sft_argv(tiny_model_dir, train, val, out), root / "sft.log")
    assert proc.wait(timeout=600) == 0, (root / "sft.log").read_text()[-4000:]
    return ref, out, (root / "sft.log").read_text(), (train, val), root


def test_sft_trains_data_parallel_and_writes_once(two_process_sft):
    ref, out, log, _, _ = two_process_sft
    assert "starting 2 data-parallel processes (gloo)" in log
    assert log.count("SFT finished") == 1 and log.count("SFT on 48 examples") == 1
    summary = json.loads((out / "training_summary.json").read_text())
    single = json.loads((ref / "training_summary.json").read_text())
    assert summary["batch"]["processes"] == 2 and single["batch"]["processes"] == 1
    assert summary["global_steps"] == single["global_steps"] // 2 == 6  # each rank saw half of every epoch
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # the same outputs
    assert check_folder(out, "sft") == [] and not list(out.glob(".tmp*"))
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1.0, 2.0]


def test_dpo_trains_data_parallel_from_that_adapter(two_process_sft):
    _, sft_out, _, (train, val), root = two_process_sft
    out = root / "dpo"
    argv = ["dpo", "--no_wandb", "--sft_model", str(sft_out), "--train_csv", str(train), "--val_csv", str(val),
            "--isarcasm_val_csv", "", "--output_dir", str(out), "--sample_size", "16", "--epochs", "1",
            "--batch_size", "2", "--grad_accum", "1", "--val_sample_size", "8", "--probe_size", "8",
            "--logging_steps", "1"]
    proc = launch(argv, root / "dpo.log")
    assert proc.wait(timeout=600) == 0, (root / "dpo.log").read_text()[-4000:]
    log = (root / "dpo.log").read_text()
    assert log.count("DPO finished") == 1
    summary = json.loads((out / "dpo_training_summary.json").read_text())
    assert summary["batch"]["processes"] == 2 and summary["global_steps"] == 4  # 16 pairs / (2 per rank x 2)
    assert check_folder(out, "dpo") == [] and (out / "COMPLETE.json").is_file()


def test_ctrl_c_stops_both_ranks_at_one_checkpoint_and_resume_completes(two_process_sft, tiny_model_dir):
    _, _, _, (train, val), root = two_process_sft
    out = root / "stopped"
    # 40 epochs (120 steps) although the stop comes at the first checkpoint (step 4): the tiny model trains
    # at about 20 steps/s, and with 18 steps a test process starved of CPU for under a second sent its
    # SIGINT after training had ended, into the final save (seen once on a loaded machine).
    argv = sft_argv(tiny_model_dir, train, val, out, epochs=40)
    proc = launch(argv, root / "stop.log", start_new_session=True)  # its own group, like a terminal job
    pgid = proc.pid
    try:
        assert wait_for(lambda: complete_checkpoints(out), timeout=300, proc=proc), (root / "stop.log").read_text()[-3000:]
        os.killpg(pgid, signal.SIGINT)  # what Ctrl-C does: every process of the job gets SIGINT
        # accelerate itself dies of the KeyboardInterrupt at once (reaped here); its children finish the checkpoint.
        assert wait_for(lambda: proc.poll() is not None and not group_alive(pgid), timeout=300)
    finally:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    log = (root / "stop.log").read_text()
    assert log.count("Stopped by SIGINT") == 1 and "--resume" in log
    stopped_at = int(log.split("Stopped by SIGINT at step ", 1)[1].split(":", 1)[0])
    assert f"checkpoint-{stopped_at}" in complete_checkpoints(out)
    assert len(list((out / "checkpoints" / f"checkpoint-{stopped_at}").glob("rng_state_*.pth"))) == 2  # both ranks
    assert not (out / "COMPLETE.json").exists()

    done = subprocess.run(ACCELERATE + argv + ["--resume"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{stopped_at}") and summary["global_steps"] == 120
    assert check_folder(out, "sft") == [] and (out / "COMPLETE.json").is_file()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "sarcasm_dpo.cli"]


def test_commands_that_do_not_train_run_once_under_torchrun(tiny_model_dir, tmp_path_factory):
    """Each rank used to run compare (two W&B runs, two staging folders racing to swap, Results printed twice)
    and predict (every row twice, stdin split between them). Now the main process runs them, once."""
    sft_dir, train, val, _ = reference_run(tiny_model_dir, tmp_path_factory)
    root = tmp_path_factory.mktemp("torchrun")
    test_csv = root / "data" / "test.csv"
    test_csv.parent.mkdir()
    toy_frame(16, 3).to_csv(test_csv, index=False)  # neither the training nor the validation texts
    out = root / "results"
    argv = ["compare", "--test_csv", str(test_csv), "--train_csv", str(train), "--sft_model", str(sft_dir),
            "--dpo_model", "", "--n_bootstrap", "20", "--output_dir", str(out)]
    launch_env = env(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
    done = subprocess.run(TORCHRUN + argv, cwd=root, env=launch_env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("Test set: ") == 1 and log.count("Results: ") == 1, log[-4000:]
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1  # one W&B run, the main process's
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE.json", "model_comparison_plot.png",
                                                     "model_comparison_results.json", "predictions.csv"]
    assert json.loads((out / "model_comparison_results.json").read_text())["test_set"]["n"] == 16
    assert sorted(p.name for p in root.iterdir()) == ["data", "results", "wandb"]  # no staging folder or lock left

    done = subprocess.run(TORCHRUN + ["predict", "--adapter", str(sft_dir)], cwd=root, input="a\nb\nc\n",
                          env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a", "b", "c"]  # every text once, in order, from the one reader of stdin


# -- the pipeline under a launch: every process runs it, the training stages data-parallel, the rest once ---------


def run_launch(command: list[str], cwd, launch_env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a launch in its own process group, killed whole if it outlives `timeout` (a rank left waiting would
    otherwise hang the test): (exit code, stdout + stderr) and no process of it left behind."""
    proc = subprocess.Popen(command, cwd=cwd, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the launch was still running after {timeout} s (a rank left waiting?):\n{out[-4000:]}")
    finally:
        assert wait_for(lambda: not group_alive(proc.pid), timeout=60), "processes of the launch outlived it"
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def stage_folders(work) -> dict:
    return {name: work / name for name in ("splits", "sft", "dpo", "results")}


def leftovers(work) -> list[str]:
    """Anything beside or inside the stage folders that a finished pipeline should not leave: staging folders,
    old copies, locks, temporary files, checkpoints."""
    found = [p.name for p in work.iterdir() if p.name not in stage_folders(work)]
    for folder in stage_folders(work).values():
        found += [f"{folder.name}/{p.name}" for p in folder.iterdir() if p.name.startswith(".") or p.is_dir()]
    return found


@pytest.fixture(scope="module")
def launched_pipeline(tiny_model_dir, small_data_dir, tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m sarcasm_dpo.cli pipeline` on the tiny model and small samples, W&B offline."""
    root = tmp_path_factory.mktemp("pipeline-torchrun")
    work = root / "work"
    config = write_config(root / "p.yaml", tiny_model_dir, work)
    argv = ["pipeline", "--config", str(config), "--data_dir", str(small_data_dir)]
    launch_env = env(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
    done = run_launch(TORCHRUN + argv, root, launch_env)
    return root, work, argv, launch_env, done


def test_pipeline_under_torchrun_trains_data_parallel_and_runs_every_other_stage_once(launched_pipeline):
    root, work, _, _, done = launched_pipeline
    log = done.stdout
    assert done.returncode == 0, log[-4000:]
    for name in ("split", "sft", "dpo", "compare"):  # the main process decides and says so, once
        assert log.count(f"[pipeline] {name}: running -> ") == 1, (name, log[-4000:])
    # each stage's own completion line, once: split and compare ran on the main process alone
    assert log.count("Splits written to") == 1 and log.count("SFT finished") == 1 and log.count("DPO finished") == 1
    assert log.count("Test set: ") == 1 and log.count("[pipeline] done: ran split, sft, dpo, compare; skipped "
                                                      "nothing.") == 1
    assert "error: " not in log and "Traceback" not in log, log[-4000:]
    sft = json.loads((work / "sft" / "training_summary.json").read_text())
    dpo = json.loads((work / "dpo" / "dpo_training_summary.json").read_text())
    assert sft["batch"]["processes"] == 2 and dpo["batch"]["processes"] == 2  # both ranks trained
    # written once, whole: one marker per stage folder, nothing half-made, no lock, staging folder or checkpoint left
    for name, folder in stage_folders(work).items():
        assert [p.name for p in folder.glob("COMPLETE.json")] == ["COMPLETE.json"], name
    assert check_folder(work / "sft", "sft") == [] and check_folder(work / "dpo", "dpo") == []
    assert leftovers(work) == []
    assert sorted(p.name for p in root.iterdir()) == ["p.yaml", "wandb", "work"]
    # W&B: one run per stage (split, sft, dpo, compare), all from the main process, in the group it chose
    assert len(list((root / "wandb").glob("offline-run-*"))) == 4
    groups = {json.loads((folder / "COMPLETE.json").read_text())["config"]["wandb_group"]
              for folder in stage_folders(work).values()}
    assert len(groups) == 1 and None not in groups


def test_the_same_launch_again_skips_every_stage_on_every_process(launched_pipeline):
    root, work, argv, launch_env, first = launched_pipeline
    assert first.returncode == 0, first.stdout[-4000:]
    markers = {name: (folder / "COMPLETE.json").stat().st_mtime_ns for name, folder in stage_folders(work).items()}
    again = run_launch(TORCHRUN + argv, root, launch_env, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:]
    assert again.stdout.count("complete for these settings; skipping") == 4  # split, sft, dpo, compare: once each
    assert again.stdout.count("[pipeline] done: ran nothing; skipped split, sft, dpo, compare.") == 1
    assert {name: (folder / "COMPLETE.json").stat().st_mtime_ns for name, folder in stage_folders(work).items()} == markers
    assert len(list((root / "wandb").glob("offline-run-*"))) == 4 and leftovers(work) == []  # none opened


@pytest.mark.parametrize("stage", ["compare", "split", "settings"])
def test_a_failure_on_the_main_process_alone_ends_every_process(stage, launched_pipeline, tmp_path):
    """The other rank waits for the main one while it checks the settings and runs split and compare; when that
    fails (a data file refused only when it is read: a NUL byte; a setting that does not exist), every rank ends,
    at once, non-zero, the message printed once, by the main process, which exits as a plain run would.
    compare fails after the training stages (reused), split before any Trainer has made a process group."""
    root, work, argv, launch_env, first = launched_pipeline
    assert first.returncode == 0, first.stdout[-4000:]
    results = (work / "results" / "COMPLETE.json").read_bytes()
    if stage == "compare":
        bad = tmp_path / "bad.csv"
        bad.write_bytes(b"text,label\nfine,1\nnot\x00fine,0\n")
        failing, says = argv + ["--set", f"compare.test_csv={bad}", "--no_wandb"], "NUL byte"
    elif stage == "split":  # split reads GEN from --data_dir; its output goes elsewhere (the stages after it would run)
        data = tmp_path / "data"
        shutil.copytree(argv[argv.index("--data_dir") + 1], data)
        (data / "sarcasm_v2" / "GEN-sarc-notsarc.csv").write_bytes(b"class,id,text\nsarc,1,fine\nnotsarc,2,no\x00\n")
        failing = argv[:argv.index("--data_dir")] + ["--data_dir", str(data), "--no_wandb", "--set",
                                                     f"split.output_dir={tmp_path / 'splits'}"]
        says = "NUL byte"
    else:
        failing, says = argv + ["--set", "compare.n_bootstrapp=3", "--no_wandb"], "has no setting 'n_bootstrapp'"
    done = run_launch(TORCHRUN + failing, root, launch_env, timeout=240)
    log = done.stdout
    assert done.returncode != 0, log[-4000:]
    assert log.count("error: ") == 1 and says in log, log[-4000:]
    assert ("[pipeline] " in log) == (stage != "settings") and "[pipeline] done" not in log
    if stage != "settings":
        assert log.count(f"[pipeline] {stage}: running -> ") == 1
    # torchrun's summary: the main process exited as a plain run would, first (the other waited for its end)
    assert "exitcode  : 2" in log.split("Root Cause", 1)[-1], log[-3000:]
    assert (work / "results" / "COMPLETE.json").read_bytes() == results and leftovers(work) == []


def test_pipeline_under_accelerate_launch_cpu(tiny_model_dir, small_data_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process; the CLI starts the two ranks (run_workers)."""
    work = tmp_path / "work"
    config = write_config(tmp_path / "p.yaml", tiny_model_dir, work)
    argv = ["pipeline", "--config", str(config), "--data_dir", str(small_data_dir), "--no_wandb"]
    done = run_launch(ACCELERATE + argv, tmp_path, env())
    log = done.stdout
    assert done.returncode == 0, log[-4000:]
    assert "starting 2 processes (gloo)" in log
    assert log.count("SFT finished") == 1 and log.count("DPO finished") == 1 and log.count("Test set: ") == 1
    assert log.count("[pipeline] done: ran split, sft, dpo, compare; skipped nothing.") == 1
    for name in ("sft", "dpo"):
        record = "training_summary.json" if name == "sft" else "dpo_training_summary.json"
        assert json.loads((work / name / record).read_text())["batch"]["processes"] == 2
    assert leftovers(work) == []


def test_main_process_helpers_over_gloo(tmp_path):
    """training.distributed.on_main_process with two real processes (no model): a shared value reaches both; an
    unshared one only the main process; a failure there is raised on the main process as it was and ends the
    other with MainProcessStopped (exit 1) only once the main process has ended."""
    script = tmp_path / "helpers.py"
    script.write_text('''
import json, os, sys, time
from sarcasm_dpo.training.distributed import MainProcessStopped, on_main_process, rank, start_process_group

start_process_group(cpu=True)
shared = on_main_process(lambda: {"from": rank()}, share=True)
unshared = on_main_process(lambda: "main only")
print(json.dumps({"rank": rank(), "shared": shared, "unshared": unshared}), flush=True)

def fail():
    raise ZeroDivisionError("on the main process")

try:
    on_main_process(fail)
except ZeroDivisionError:
    print(json.dumps({"rank": rank(), "raised": "ZeroDivisionError"}), flush=True)
    time.sleep(1)  # time for an other process that does not wait (the fault) to end first; no pass needs it
    with open("main-ending.part", "w") as f:  # the main process's last act before its exit
        f.write("ending")
    os.replace("main-ending.part", "main-ending")
    sys.exit(3)
except MainProcessStopped as exc:
    # Written before the main process exits, so an other process that waited for that exit always finds it.
    ending = os.path.exists("main-ending")
    print(json.dumps({"rank": rank(), "raised": "MainProcessStopped", "main_was_ending": ending}), flush=True)
    sys.exit(exc.exit_code)
''')
    port = 29500 + os.getpid() % 1000
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out in outs]
    assert [p.returncode for p in procs] == [3, 1], outs
    assert [line[0] for line in lines] == [{"rank": 0, "shared": {"from": 0}, "unshared": "main only"},
                                           {"rank": 1, "shared": {"from": 0}, "unshared": None}]
    # the other process ended only after the main one reached its exit (by cause, not by clocks)
    assert lines[0][1:] == [{"rank": 0, "raised": "ZeroDivisionError"}], outs
    assert lines[1][1:] == [{"rank": 1, "raised": "MainProcessStopped", "main_was_ending": True}], outs
