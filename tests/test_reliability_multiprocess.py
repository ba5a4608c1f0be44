"""Several processes: `accelerate launch --num_processes 2 --cpu -m sarcasm_dpo.cli sft|dpo ...` trains
data-parallel over gloo on this machine and writes the same outputs as a single process, once.

accelerate's CPU launcher starts one process and leaves the others to mpirun; the CLI notices and
starts the two ranks itself (training.distributed.run_workers), as torchrun would. Evidence that both ranks
trained on their own shard: half the optimizer steps of the single-process run at the same
per-process batch, and `processes: 2` in the summary. Written once: the completion message is
printed once and every file is whole (tests/atomic_probe.check_folder). A Ctrl-C reaching the whole
process group stops both ranks at the same step with one checkpoint, and `--resume` completes it.
A command that does not train (compare, predict) runs once under torchrun: one process does the work,
the other exits 0 at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from atomic_probe import check_folder
from reliability_common import ROOT, complete_checkpoints, env, reference_run, sft_argv, wait_for
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
