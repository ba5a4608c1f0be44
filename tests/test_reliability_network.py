"""No network: a model id or a dataset that cannot be downloaded ends in one clear paragraph naming the
offline route (--model PATH or a .gguf file; --data_dir DIR), exit code 2: no retries, no traceback.

"No network" is made without touching the machine's network: the hub endpoint and the dataset
mirror point at a local port where nothing listens (connection refused at once).
"""

from __future__ import annotations

import time

import pytest
from reliability_common import error_paragraph, run_cli, toy_csvs

from sarcasm_dpo import cli, download

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _assert_offline_route(stderr: str, *routes: str) -> str:
    message = error_paragraph(stderr)
    assert len(message.strip().splitlines()) == 1, message
    assert "Traceback" not in stderr and "Retrying" not in stderr
    for route in routes:
        assert route in message, (route, message)
    return message


def test_unreachable_hub_is_one_message_in_process(tmp_path, capsys, monkeypatch):
    """The same with the endpoint switched in this process: the probe refuses, nothing is retried."""
    import huggingface_hub.constants
    import transformers.utils.hub

    from sarcasm_dpo import models

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", DEAD)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline otherwise
    monkeypatch.setattr(transformers.utils.hub, "is_offline_mode", lambda: False)
    models.hub_unreachable.cache_clear()
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    try:
        code = cli.main(["sft", "--no_wandb", "--model", "nobody-here/no-such-model-xyz", "--train_csv", str(train),
                         "--val_csv", str(val), "--output_dir", str(tmp_path / "out")])
    finally:
        models.hub_unreachable.cache_clear()
    assert code == 2
    message = _assert_offline_route(capsys.readouterr().err, "--model PATH", ".gguf", "--data_dir DIR")
    assert "does not answer" in message and DEAD in message and "ConnectError" in message


@pytest.mark.slow
def test_unreachable_hub_gives_one_message_without_retries(tmp_path):
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    started = time.monotonic()
    done = run_cli(["sft", "--no_wandb", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--train_csv", str(train),
                    "--val_csv", str(val), "--output_dir", str(tmp_path / "out")],
                   timeout=300, HF_HUB_OFFLINE="0", HF_ENDPOINT=DEAD, HF_HOME=str(tmp_path / "empty-hf-cache"))
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    message = _assert_offline_route(done.stderr, "--model PATH", ".gguf", "--data_dir DIR", "HF_HUB_OFFLINE=1")
    assert "Qwen/Qwen2.5-0.5B-Instruct" in message and "does not answer" in message
    assert elapsed < 60  # huggingface_hub alone retries for about a minute
    assert not (tmp_path / "out").exists()


def test_model_id_in_offline_mode_names_the_local_routes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the README's offline section says to set
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    code = cli.main(["sft", "--no_wandb", "--model", "nobody-here/no-such-model-xyz", "--train_csv", str(train),
                     "--val_csv", str(val), "--output_dir", str(tmp_path / "out")])
    assert code == 2
    message = _assert_offline_route(capsys.readouterr().err, "--model PATH", ".gguf")
    assert "nobody-here/no-such-model-xyz" in message


def test_dataset_that_cannot_be_downloaded_names_data_dir(tmp_path, capsys, monkeypatch):
    code = cli.main(["data", "download", "--cache_dir", str(tmp_path / "cache"), "--base_url", DEAD])
    assert code == 2
    _assert_offline_route(capsys.readouterr().err, "--data_dir DIR", "no connection")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # no partial file left

    # `split` without --data_dir downloads into the cache first: same message, no split written.
    monkeypatch.setattr(download, "DEFAULT_BASE_URL", DEAD)
    monkeypatch.setenv("SARCASM_DPO_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv(download.DATA_DIRS_ENV, raising=False)  # no other copy of the data either
    code = cli.main(["split", "--no_wandb", "--output_dir", str(tmp_path / "splits")])
    assert code == 2
    _assert_offline_route(capsys.readouterr().err, "--data_dir DIR")
    assert not (tmp_path / "splits").exists()
