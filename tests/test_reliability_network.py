"""No network: a model id or a dataset that cannot be downloaded ends in one clear paragraph naming the
offline route (--model PATH or a .gguf file; --data_dir DIR), exit code 2: no retries, no traceback.

"No network" is made without touching the machine's network: the hub endpoint and the dataset
mirror point at a local port where nothing listens (connection refused at once), or, where the
connections are counted, at a local port that takes each connection and drops it unanswered.
"""

from __future__ import annotations

import socket
import threading

import pytest
from reliability_common import error_paragraph, run_cli, toy_csvs

from sarcasm_dpo import cli, download

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


class DeadHub:
    """A local port that reads each request's first line and closes the connection without an answer (the hub's
    probe fails at once), keeping the lines: what a run asked the hub, whatever the clock."""

    def __init__(self):
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if self._stop.is_set():  # the backlog is empty too: every connection made is in self.requests
                    return
                continue
            with conn:
                conn.settimeout(5)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0]
                except OSError as exc:
                    first = repr(exc).encode()
            self.requests.append(first.decode("latin-1"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sock.close()


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
    """One probe of the hub, then the message: nothing asks the hub for the model, so huggingface_hub's own
    retries (five more connections per file, about a minute of "Retrying in 8s") never start."""
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    with DeadHub() as hub:
        done = run_cli(["sft", "--no_wandb", "--model", model, "--train_csv", str(train), "--val_csv", str(val),
                        "--output_dir", str(tmp_path / "out")],
                       timeout=300, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "empty-hf-cache"))
    assert done.returncode == 2, done.stderr[-2000:]
    message = _assert_offline_route(done.stderr, "--model PATH", ".gguf", "--data_dir DIR", "HF_HUB_OFFLINE=1")
    assert model in message and "does not answer" in message and hub.url in message
    # huggingface_hub itself may call home (GET /api/agent-harnesses); the probe and the model are ours
    assert [r for r in hub.requests if r.startswith("HEAD / ")] == ["HEAD / HTTP/1.1"], hub.requests
    assert [r for r in hub.requests if model.split("/")[1] in r] == [], hub.requests
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
