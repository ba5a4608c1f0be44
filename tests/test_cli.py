"""The CLI: help for every command, exit code 2 with one clear paragraph for bad input, predict."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from sarcasm_dpo import cli
from sarcasm_dpo.cli import build_parser, main
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.stages import STAGES

CLI = [sys.executable, "-m", "sarcasm_dpo.cli"]


def run_cli(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, cwd=kw.pop("cwd", ROOT), **kw)


def options_of(command: str) -> list[argparse.Action]:
    """The flags `sarcasm-dpo COMMAND` accepts, as its parser holds them (not as its help prints them)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in commands.choices[command]._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", [*STAGES, "predict"])
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = options_of(command)
    assert options
    for action in options:  # every flag is listed, with a help text of its own
        assert isinstance(action.help, str) and action.help.strip() and action.help != argparse.SUPPRESS, action
        assert all(flag in out for flag in action.option_strings), action.option_strings
    if command == "sft":
        for flag in ("--epochs", "--wandb_project", "--no_wandb", "--lr", "--batch_size", "--grad_accum",
                     "--max_length", "--sample_size", "--output_dir", "--seed", "--config", "--lora_r"):
            assert flag in out
    if command == "dpo":
        for flag in ("--sft_model", "--beta", "--beta_sweep", "--epochs", "--preference_data", "--loss_type"):
            assert flag in out


def test_original_script_names_exist_and_help():
    """The one interpreter start per script door (the other script tests run them in-process: run_script)."""
    for name in ("split_gen_dataset", "finetune_qwen", "dpo_train_v2", "compare_all_models", "mine_hard_negatives"):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_bad_input_exit_code_2_without_traceback(tmp_path, capsys):
    # The one start of `python -m sarcasm_dpo.cli` in the default suite: the exit code a shell sees.
    done = run_cli(["predict", "--model", str(tmp_path / "nope.gguf"), "--input", str(tmp_path / "x.txt")])
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert main(["dpo", "--beta", "0", "--no_wandb"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err


def test_predict_json_lines(tiny_model_dir, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great, rain again\n\nwe agreed on the plan\n")
    code = main(["predict", "--model", str(tiny_model_dir), "--input", str(texts)])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["oh great, rain again", "we agreed on the plan"]
    assert all(0 < r["p_sarcastic"] < 1 and r["label"] == int(r["p_sarcastic"] >= 0.5) for r in rows)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"oh great, rain again\n")))
    assert main(["predict", "--model", str(tiny_model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["p_sarcastic"] == rows[0]["p_sarcastic"]
    csv = tmp_path / "t.csv"
    csv.write_text("body\nhello\n")
    assert main(["predict", "--model", str(tiny_model_dir), "--input", str(csv)]) == 2
    assert "no text column" in capsys.readouterr().err


def test_predict_streams_rows_in_input_order_a_chunk_at_a_time(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sarcasm_dpo.stages import predict

    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"text {'word ' * (i % 7)}{i}\n" for i in range(11)))
    argv = ["predict", "--model", str(tiny_model_dir), "--input", str(texts), "--batch_size", "2"]
    assert main(argv) == 0
    whole = [json.loads(line) for line in capsys.readouterr().out.splitlines()]


    class Stream(io.StringIO):  # records how many rows were written at each flush
        flushes: list[int] = []

        def flush(self):
            self.flushes.append(self.getvalue().count("\n"))

    monkeypatch.setattr(predict, "STREAM_CHUNK", 4)
    monkeypatch.setattr(sys, "stdout", Stream())
    assert main(argv) == 0
    assert Stream.flushes[:3] == [4, 8, 11]  # rows reach stdout after each chunk, not at the end
    chunked = [json.loads(line) for line in sys.stdout.getvalue().splitlines()]
    assert [r["text"] for r in chunked] == [r["text"] for r in whole]  # same rows, same order, same scores
    assert [r["p_sarcastic"] for r in chunked] == pytest.approx([r["p_sarcastic"] for r in whole], abs=1e-5)
    assert [r["text"] for r in whole] == texts.read_text().splitlines()
    assert len(whole) == 11 and all(0 < r["p_sarcastic"] < 1 for r in whole)


def test_predict_reads_the_text_column_of_every_table_format(tmp_path, capsys):
    from sarcasm_dpo.stages.predict import read_texts

    files = {"gen.csv": "class,id,text\nsarc,1,oh great\nnotsarc,2,fine\n",
             "isarc.csv": ",tweet,sarcastic,rephrase\n0,oh great,1,bad\n1,fine,0,\n",
             "plain.tsv": "text\nOh, great\nfine\n", "rows.jsonl": '{"text": "oh great"}\n\n{"text": "fine"}\n',
             "headlines.json": '{"headline": "oh great"}\n{"headline": "fine"}\n'}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        expected = ["Oh, great", "fine"] if name.endswith(".tsv") else ["oh great", "fine"]
        assert read_texts(str(tmp_path / name)) == expected, name
    (tmp_path / "holes.csv").write_text("text,label\n,1\nfine,0\n")  # left out, and named on stderr
    assert read_texts(str(tmp_path / "holes.csv")) == ["fine"]
    assert re.search(r"1 row\(s\) with an empty text \(rows 1;.*skipped", capsys.readouterr().err)
    (tmp_path / "none.csv").write_text("text,label\n,1\n ,0\n")
    with pytest.raises(UserError, match="nothing to score"):
        read_texts(str(tmp_path / "none.csv"))
    (tmp_path / "both.csv").write_text("text,tweet\na,b\n")
    with pytest.raises(UserError, match=r"more than one column could hold the texts: \['text', 'tweet'\]"):
        read_texts(str(tmp_path / "both.csv"))


def test_predict_text_lines_end_at_line_breaks_only_and_nul_bytes_are_refused(tmp_path):
    from sarcasm_dpo.stages.predict import read_texts

    (tmp_path / "t.txt").write_text("a\x0cb\r\nline\u2028two\rthird\n\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "t.txt")) == ["a\x0cb", "line\u2028two", "third"]
    (tmp_path / "u16.txt").write_bytes("hello\nthere\n".encode("utf-16-le"))  # UTF-16 without its byte-order mark
    with pytest.raises(UserError, match="holds a NUL byte .* UTF-16"):
        read_texts(str(tmp_path / "u16.txt"))


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "0"], "--batch_size must be a positive number, got 0"),
    (["--max_text_tokens", "0"], "--max_text_tokens must be a positive number, got 0"),
    (["--threshold", "1.5"], "--threshold is a probability and must be in [0, 1], got 1.5"),
])
def test_predict_refuses_nonsense_numbers(tiny_model_dir, tmp_path, flags, message, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great, rain again\n")
    assert main(["predict", "--model", str(tiny_model_dir), "--input", str(texts), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}."


def test_pipeline_interrupted_under_make_names_the_make_command(monkeypatch, capsys):
    """A fresh shell may not have `sarcasm-dpo` on its PATH; the Makefile's targets say how they were started."""
    import sarcasm_dpo.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    monkeypatch.setenv("SARCASM_DPO_RERUN", "make run-cpu DATA_DIR=../data")
    assert main(["pipeline", "--no_wandb"]) == 130
    assert capsys.readouterr().err.strip().endswith("resumes from its newest checkpoint: make run-cpu DATA_DIR=../data")
    monkeypatch.delenv("SARCASM_DPO_RERUN")
    assert main(["pipeline", "--no_wandb"]) == 130
    assert capsys.readouterr().err.strip().endswith("checkpoint: sarcasm-dpo pipeline --no_wandb")


def test_help_of_data_download_and_predict_explain_and_show_defaults(capsys):
    for argv, says in ((["data", "download", "--help"], "sha256"), (["predict", "--help"], "JSON line")):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "default:" in out and says in out


def test_predict_input_takes_home_relative_paths_and_dash_for_stdin_and_refuses_empty(tmp_path, monkeypatch):
    from sarcasm_dpo.stages.predict import read_texts

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.txt").write_text("oh great\nfine\n")
    assert read_texts("~/t.txt") == ["oh great", "fine"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    assert read_texts("-") == ["from stdin"]
    for empty in ("", "  "):
        with pytest.raises(UserError, match="--input is empty"):
            read_texts(empty)


# -- under torchrun / accelerate launch: the stages that train run on every process, any other command once ----


def test_a_multi_process_launch_runs_only_training_stages_and_the_pipeline_on_every_process(monkeypatch, capsys):
    """The one rule (training.distributed.runs_here, applied by cli.main): on a process other than the main one,
    sft and dpo go on (they train data-parallel), and so does the pipeline (it runs its training stages that way,
    the others on the main process: stages/pipeline.py); split, mine, compare, export, predict and data download
    end at once with 0, printing nothing, so the main process runs each of them once."""
    import sarcasm_dpo.cli as cli

    assert [name for name, stage in STAGES.items() if stage.trains] == ["sft", "dpo"]
    assert [name for name, stage in STAGES.items() if stage.driver] == ["pipeline"]
    ran: list[str] = []
    monkeypatch.setattr(cli, "run_command", lambda args: ran.append(args.command))
    commands = [[name] for name in STAGES] + [["predict"], ["data", "download"]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert [main(argv) for argv in commands] == [0] * len(commands)
    assert ran == ["sft", "dpo", "pipeline"]
    assert capsys.readouterr() == ("", "")
    ran.clear()
    monkeypatch.setenv("RANK", "0")  # the main process runs every command
    assert [main(argv) for argv in commands] == [0] * len(commands)
    assert ran == [argv[0] for argv in commands]


def test_help_and_flag_errors_are_printed_by_the_main_process_only(monkeypatch, capsys):
    """Every process of a launch parses the same command line: --help and a bad flag appear once, not per process,
    and each process still exits as argparse decides (0 for --help, 2 for a bad flag)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        for argv, code in ((["pipeline", "--help"], 0), (["sft", "--no_such_flag"], 2)):
            with pytest.raises(SystemExit) as exited:
                main(argv)
            assert exited.value.code == code
            out, err = capsys.readouterr()
            assert bool(out or err) == shown, (rank, argv, out, err)


def test_a_non_main_process_leaves_stdin_and_the_output_alone(tmp_path, monkeypatch, capsys):
    class Untouchable(io.StringIO):
        def read(self, *args):
            raise AssertionError("stdin read on a process that does not run the command")

        readline = __iter__ = read

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "stdin", Untouchable())
    assert main(["predict", "--model", str(tmp_path / "no-model")]) == 0
    out = tmp_path / "results"
    assert main(["compare", "--no_wandb", "--test_csv", str(tmp_path / "none.csv"), "--output_dir", str(out)]) == 0
    assert capsys.readouterr() == ("", "") and list(tmp_path.iterdir()) == []


def test_the_main_process_working_alone_in_a_single_process_run_is_just_the_work():
    """training.distributed.on_main_process outside a launch: the work's value, or its exception as it is; and
    start_process_group makes no process group there."""
    import torch.distributed as dist

    from sarcasm_dpo.training.distributed import on_main_process, start_process_group

    def fails(exc):
        def work():
            raise exc
        return work

    start_process_group(cpu=True)
    assert not dist.is_initialized()
    assert on_main_process(lambda: {"a": 1}, share=True) == {"a": 1}
    assert on_main_process(lambda: "value") == "value"
    with pytest.raises(UserError, match="as raised"):
        on_main_process(fails(UserError("as raised")))
    with pytest.raises(KeyboardInterrupt):
        on_main_process(fails(KeyboardInterrupt()))


def test_on_main_process_under_a_launch_needs_the_process_group_first(monkeypatch):
    from sarcasm_dpo.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_main_only_group", None)
    with pytest.raises(RuntimeError, match="start_process_group"):
        distributed.on_main_process(lambda: None)


def test_under_a_launch_the_pipeline_ends_other_processes_quietly_when_the_main_one_failed(monkeypatch, capsys):
    """A failure in a stage the main process runs alone: the main process prints it (once); the others raise
    MainProcessStopped, which ends them with exit code 1 and no line of their own. Ctrl-C names the launch line."""
    import sarcasm_dpo.cli as cli
    from sarcasm_dpo.training.distributed import MainProcessStopped

    def stopped(args):
        raise MainProcessStopped()

    monkeypatch.setattr(cli, "run_command", stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["pipeline", "--no_wandb"]) == 1
    assert capsys.readouterr() == ("", "")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    monkeypatch.setenv("RANK", "0")
    assert main(["pipeline", "--no_wandb"]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "checkpoint: sarcasm-dpo pipeline --no_wandb (under accelerate launch or torchrun: the same launch line)")


def test_ctrl_c_while_the_command_is_still_starting_is_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first moments (transformers still importing, flags being read) comes before main's own
    handler: one line and exit 130, not a traceback."""
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_known_noise", interrupted)
    monkeypatch.setattr(sys, "argv", ["sarcasm-dpo", "split", "--no_wandb"])
    with pytest.raises(SystemExit) as stop:
        cli.entry_point()
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert err.strip() == "Interrupted by SIGINT while starting, before any work: nothing was written."


def test_the_resume_command_resumes_whatever_the_interrupted_command_said_about_resume():
    """The line printed after an interrupt continues the run: `--resume false` or `--resume=no` in the stopped command
    become `--resume` (true/false flags take an optional value), and a command without it gains it."""
    import argparse

    from sarcasm_dpo.cli import resume_command

    args = argparse.Namespace(command="sft")
    for argv in (["sft", "--no_wandb"], ["sft", "--resume", "--no_wandb"], ["sft", "--resume", "false", "--no_wandb"],
                 ["sft", "--resume=no", "--no_wandb"], ["sft", "--no_wandb", "--resume", "0"]):
        assert resume_command(args, argv) == "sarcasm-dpo sft --no_wandb --resume", argv
