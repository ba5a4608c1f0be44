"""Tracker: offline W&B runs that really contain what was logged, a true off switch, and failures
inside W&B that cost a warning, never the training run.

Only one test starts a real wandb run (offline, ~2 s); failure paths use a fake run object.
The real run is read back from its `.wandb` transaction log: wandb 0.31 writes offline runs
only as that binary log (no config.yaml / wandb-summary.json until `wandb sync`), so the test
decodes it with the documented record framing and wandb's own protobuf `Record` type.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sarcasm_dpo import tracking  # noqa: E402
from sarcasm_dpo.tracking import Tracker, TrackingWarning, choose_mode, flatten, make_group_name  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"

WANDB_ENV = [
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_MODE",
    "WANDB_DISABLED",
    "WANDB_BASE_URL",
    "WANDB_SILENT",
    "WANDB_RUN_GROUP",
    "WANDB_INIT_TIMEOUT",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """A machine with no W&B login: no key, no netrc, every wandb folder inside tmp_path."""
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)  # conftest sets WANDB_MODE=disabled by default
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # does not exist
    for var, sub in [("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    # wandb keeps a process-wide singleton holding the settings (and paths) read at setup;
    # tear it down so the next test sees its own environment.
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


# ---------------------------------------------------------------------------------------------
# reading an offline run back


def read_wandb_records(path: Path) -> list:
    """Decode a `.wandb` transaction log into `wandb_internal_pb2.Record` messages.

    Layout (LevelDB-log style): a 7-byte header ':W&B' + magic 0xBEE1 + version 0, then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32 over type+data, uint16 length, uint8
    type: 1 full, 2 first, 3 middle, 4 last). A block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    block, header = 32 * 1024, 7
    pos, pending, payloads = 7, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad crc at {pos}"
        pos += header + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_finished_run(path: Path, timeout_s: float = 30.0) -> list:
    """The records of a finished run's log, once wandb has written them all.

    run.finish() can return before wandb-core has written the log (seen with the first run of a
    process: only the 7-byte header on disk), so wait for the exit record, which comes last.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(path)
        except AssertionError:  # a chunk still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def items_to_dict(items) -> dict:
    """History/summary items -> dict; a key nested by wandb (table, image) becomes a nested dict."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def tiny_png(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1, 1), dpi=20)
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the real offline run


def test_offline_run_contains_what_was_logged(no_credentials, capsys):
    tmp = no_credentials
    adapter = tmp / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    png = tiny_png(tmp / "cm.png")
    frame = pd.DataFrame({"text": ["oh great", "fine"], "label": [1, 0], "pred": ["yes", 0]})  # mixed column

    tracker = Tracker(enabled=True, project="sarcasm-test", job_type="dpo", group="pipeline-test-0001",
                      config={"lr": 0.001, "lora": {"r": 16}, "out": tmp / "x"}, dir=tmp / "runs", tags=["test"])
    assert tracker.mode == "offline"
    assert tracker.run is not None
    for step, loss in enumerate([0.9, 0.7, 0.5]):
        tracker.log({"train/loss": loss, "eval": {"f1": step / 10}}, step=step)
    tracker.log_table("eval/predictions", frame, step=3)
    tracker.log_image("eval/confusion", png, step=3)
    tracker.log_summary({"eval": {"f1": 0.77}, "best_step": 2})
    tracker.log_artifact(adapter, "dpo-adapter", "model", metadata={"stage": "dpo"})
    tracker.use_artifact(adapter, "model", name="sft-adapter")
    tracker.finish()
    tracker.finish()  # idempotent
    assert tracker.mode == "offline"

    runs = list((tmp / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    # Where the offline run went and how to upload it, said once (the second finish is a no-op).
    hints = [line for line in capsys.readouterr().err.splitlines() if line.startswith("W&B: offline run")]
    assert hints == [f"W&B: offline run saved in {run_dir}; upload it with: wandb sync {run_dir}"]
    assert not (tmp / "wandb").exists()  # `dir` decides where wandb writes, not the cwd
    [log_file] = run_dir.glob("run-*.wandb")
    records = read_finished_run(log_file)
    by_type: dict[str, list] = {}
    for record in records:
        by_type.setdefault(record.WhichOneof("record_type"), []).append(record)

    # run header: config (nested dict kept, Path made a string), group, job type, tags
    [run_record] = by_type["run"]
    config = {item.key: json.loads(item.value_json) for item in run_record.run.config.update}
    assert config["lr"] == 0.001 and config["lora"] == {"r": 16} and config["out"] == str(tmp / "x")
    assert run_record.run.run_group == "pipeline-test-0001"
    assert run_record.run.job_type == "dpo"
    assert list(run_record.run.tags) == ["test"]

    # history: one row per step with the flattened keys and the exact values
    rows = [items_to_dict(r.history.item) for r in by_type["history"]]
    losses = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == {0: 0.9, 1: 0.7, 2: 0.5}
    assert [row["eval/f1"] for row in rows if "eval/f1" in row] == [0.0, 0.1, 0.2]
    [media_row] = [row for row in rows if "eval/predictions" in row]
    assert media_row["_step"] == 3
    table, image = media_row["eval/predictions"], media_row["eval/confusion"]
    assert table["_type"] == "table-file" and table["nrows"] == 2
    assert image["_type"] == "image-file" and image["format"] == "png"
    table_json = json.loads((run_dir / "files" / table["path"]).read_text())
    assert table_json["columns"] == ["text", "label", "pred"]
    assert table_json["data"][0] == ["oh great", 1, "yes"]
    assert (run_dir / "files" / image["path"]).is_file()

    # summary: the explicit update is recorded as given
    summary: dict = {}
    for r in by_type["summary"]:
        summary.update(items_to_dict(r.summary.update))
    assert summary["eval"] == {"f1": 0.77} and summary["best_step"] == 2

    # artifacts: the output is logged; the input (offline) is recorded in the config
    artifacts = {(r.artifact.name, r.artifact.type): r.artifact for r in by_type["artifact"]}
    # wandb also stores every logged table as a "run_table" artifact of the run
    assert sorted(t for _, t in artifacts) == ["model", "run_table"], list(artifacts)
    artifact = artifacts["dpo-adapter", "model"]
    assert (artifact.name, artifact.type) == ("dpo-adapter", "model")
    assert json.loads(artifact.metadata) == {"stage": "dpo"}
    assert [e.path for e in artifact.manifest.contents] == ["adapter_config.json"]
    config_updates = {}
    for r in by_type.get("config", []):
        config_updates.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config_updates["inputs/sft-adapter"] == {"path": str(adapter.resolve()), "type": "model"}

    # finish wrote the exit record, once, with code 0
    assert [r.exit.exit_code for r in by_type["exit"]] == [0]


@pytest.mark.parametrize("value", ["", "garbage"])
def test_empty_or_unknown_wandb_mode_still_tracks(no_credentials, monkeypatch, value):
    # wandb itself refuses such a value (a pydantic error at setup), which would turn tracking off.
    tmp = no_credentials
    monkeypatch.setenv("WANDB_MODE", value)
    with pytest.warns(TrackingWarning, match="WANDB_MODE") as caught:
        tracker = Tracker(enabled=True, project="sarcasm-test", job_type="sft", config={"lr": 0.1}, dir=tmp / "runs")
    assert [str(w.message) for w in caught if "failed" in str(w.message)] == []
    assert tracker.mode == "offline" and tracker.active
    assert os.environ["WANDB_MODE"] == value  # the user's environment is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # a failing call would warn and turn tracking off
        tracker.log({"train": {"loss": 0.5}}, step=0)
        tracker.finish()
    assert tracker.mode == "offline"
    [log_file] = (tmp / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_finished_run(log_file)
    rows = [items_to_dict(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["train/loss"] for row in rows] == [0.5]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


# ---------------------------------------------------------------------------------------------
# off switch


def test_disabled_tracker_is_a_noop_and_writes_nothing(no_credentials, monkeypatch):
    tmp = no_credentials
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # even with credentials, enabled=False wins
    png = tiny_png(tmp / "p.png")
    before = set(tmp.rglob("*"))
    with Tracker(enabled=False, project="p", job_type="sft", config={"a": 1}, dir=tmp / "runs") as tracker:
        assert tracker.mode == "disabled" and tracker.run is None
        tracker.log({"train": {"loss": 1.0}}, step=0)
        tracker.log_image("img", png)
        tracker.log_table("tbl", pd.DataFrame({"a": [1]}))
        tracker.log_summary({"x": 1})
        tracker.log_artifact(png, "a", "model")
        tracker.use_artifact(tmp, "model", name="sft-adapter")
    tracker.finish()
    assert set(tmp.rglob("*")) == before  # no wandb/, no runs/
    assert tracker.mode == "disabled"


def test_disabled_tracker_does_not_import_wandb(no_credentials):
    # A fresh interpreter: in this one wandb is already imported by other tests.
    code = (
        "import sys\n"
        "from sarcasm_dpo.tracking import Tracker\n"
        "t = Tracker(enabled=False, project='p', job_type='sft', config={})\n"
        "t.log({'a': 1}); t.log_summary({'a': 1}); t.finish()\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# mode selection (never goes online in tests: only the choice is checked)


def test_choose_mode(no_credentials, monkeypatch):
    home = no_credentials / "home"
    assert choose_mode(True) == "offline"
    assert choose_mode(False) == "disabled"

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert choose_mode(True) == "online"
    assert choose_mode(False) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_mode(True) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_mode(True) == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert choose_mode(True) == "disabled"
    monkeypatch.delenv("WANDB_DISABLED")
    monkeypatch.delenv("WANDB_API_KEY")

    # a netrc entry counts only for the W&B host in use
    (home / ".netrc").write_text("machine example.com login user password secret\n")
    assert choose_mode(True) == "offline"
    (home / ".netrc").write_text("machine api.wandb.ai login user password " + "n" * 40 + "\n")
    assert choose_mode(True) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.internal")
    assert choose_mode(True) == "offline"
    (home / ".netrc").write_text("machine wandb.mycompany.internal login user password abc\n")
    assert choose_mode(True) == "online"
    (home / ".netrc").write_text("machine wandb.mycompany.internal login user password\n  bad 'quote\n")
    assert choose_mode(True) == "offline"  # unreadable netrc: no credentials, no exception
    (home / ".netrc").unlink()

    # online requested without credentials: offline instead of a login prompt
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(TrackingWarning, match="no W&B credentials"):
        assert choose_mode(True) == "offline"


def test_wandb_shared_mode_counts_as_online(no_credentials, monkeypatch):
    # wandb accepts WANDB_MODE=shared (online, several writers); only our main process logs.
    monkeypatch.setenv("WANDB_MODE", "shared")
    with pytest.warns(TrackingWarning, match="WANDB_MODE=shared but no W&B credentials"):
        assert choose_mode(True) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        assert choose_mode(True) == "online"
    assert choose_mode(False) == "disabled"


# ---------------------------------------------------------------------------------------------
# failures inside wandb (fake runs: fast, and no real run is needed to break)


class FakeSummary(dict):
    def update(self, values):  # the signature wandb's summary has
        super().update(values)


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


class FakeRun:
    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls: list[tuple] = []
        self.summary = FakeSummary()
        self.config = FakeConfig()
        self.dir = "/nonexistent/files"

    def log(self, data, step=None):
        self.calls.append(("log", data, step))
        if self.fail_on == "log":
            raise OSError(28, "No space left on device")

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))

    def use_artifact(self, artifact, type=None):
        self.calls.append(("use_artifact", artifact, type))

    def log_artifact(self, artifact, aliases=None):
        self.calls.append(("log_artifact", artifact, aliases))


@pytest.fixture
def fake_wandb(no_credentials, monkeypatch):
    """wandb.init returns whatever `state["init"]` gives; wandb.setup does nothing."""
    import wandb

    state: dict = {"init_modes": []}

    def fake_init(mode=None, settings=None, **kwargs):
        state["init_modes"].append(mode)
        state["settings"], state["kwargs"] = settings, kwargs
        return state["init"](mode)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)
    return state


def test_init_failure_warns_and_disables(fake_wandb, tmp_path):
    def boom(mode):
        raise RuntimeError("disk is read-only")

    fake_wandb["init"] = boom
    with pytest.warns(TrackingWarning, match=r"wandb\.init failed .*disk is read-only"):
        tracker = Tracker(enabled=True, project="p", job_type="sft", config={}, dir=tmp_path / "runs")
    assert tracker.mode == "disabled" and tracker.run is None
    assert fake_wandb["init_modes"] == ["offline"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls: silent no-ops
        tracker.log({"a": 1}, step=0)
        tracker.log_summary({"a": 1})
        tracker.log_table("t", pd.DataFrame({"a": [1]}))
        tracker.finish()


def test_log_failure_warns_once_then_noop(fake_wandb, tmp_path):
    run = FakeRun(fail_on="log")
    fake_wandb["init"] = lambda mode: run
    tracker = Tracker(enabled=True, project="p", job_type="sft", config={}, dir=tmp_path / "runs")
    assert tracker.mode == "offline" and tracker.run is run
    # settings that keep wandb quiet and off the console
    assert fake_wandb["settings"].console == "off" and fake_wandb["settings"].silent is True

    with pytest.warns(TrackingWarning, match=r"W&B log failed .*No space left"):
        tracker.log({"train": {"loss": 1.0}}, step=5)
    assert run.calls == [("log", {"train/loss": 1.0}, 5), ("finish", 1)]  # closed as failed
    assert tracker.mode == "disabled" and tracker.run is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log({"a": 2}, step=6)
        tracker.log_summary({"a": 1})
        tracker.finish()
    assert len(run.calls) == 2  # nothing reached the broken run after the failure


def test_online_init_failure_falls_back_to_offline(fake_wandb, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    run = FakeRun()

    def init(mode):
        if mode == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        return run

    fake_wandb["init"] = init
    with pytest.warns(TrackingWarning, match="online init failed"):
        tracker = Tracker(enabled=True, project="p", job_type="sft", config={}, dir=tmp_path / "runs")
    assert fake_wandb["init_modes"] == ["online", "offline"]
    assert tracker.mode == "offline" and tracker.run is run


def test_online_use_artifact_declares_the_local_folder(fake_wandb, monkeypatch, tmp_path):
    # Online only (offline wandb refuses use_artifact): the SFT adapter folder becomes a draft
    # artifact with the same name and files the SFT run logged, so the digests match.
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    run = FakeRun()
    fake_wandb["init"] = lambda mode: run
    tracker = Tracker(enabled=True, project="p", job_type="dpo", config={}, dir=tmp_path / "runs")
    assert tracker.mode == "online"
    tracker.log_artifact(adapter, "sft-adapter", "model", metadata={"stage": "sft"})
    tracker.use_artifact(adapter, "model", name="sft-adapter")
    tracker.use_artifact("sft-adapter:latest", "model")
    (_, logged, _), (_, used, _), (_, ref, ref_type) = run.calls
    assert logged.digest == used.digest and (used.name, used.type) == ("sft-adapter", "model")
    assert list(used.manifest.entries) == ["adapter_model.safetensors"]
    assert (ref, ref_type) == ("sft-adapter:latest", "model")


@pytest.mark.parametrize(
    "exc, exit_code, interrupted",
    [(None, 0, False), (ValueError("bad"), 1, False), (KeyboardInterrupt(), 1, True), (SystemExit(3), 3, False)],
)
def test_context_manager_exit_codes(fake_wandb, tmp_path, exc, exit_code, interrupted):
    run = FakeRun()
    fake_wandb["init"] = lambda mode: run

    def body():
        with Tracker(enabled=True, project="p", job_type="sft", config={}, dir=tmp_path / "runs") as tracker:
            if exc is not None:
                raise exc
        return tracker

    if exc is None:
        tracker = body()
    else:
        with pytest.raises(type(exc)):  # the stage's exception is never swallowed
            body()
    assert run.calls == [("finish", exit_code)]
    assert run.summary.get("interrupted", False) is interrupted
    if exc is None:
        tracker.finish()  # idempotent after the with-block
        assert run.calls == [("finish", 0)]


def test_missing_files_skip_without_disabling(fake_wandb, tmp_path):
    run = FakeRun()
    fake_wandb["init"] = lambda mode: run
    tracker = Tracker(enabled=True, project="p", job_type="sft", config={}, dir=tmp_path / "runs")
    with pytest.warns(TrackingWarning, match="not a file"):
        tracker.log_image("img", tmp_path / "missing.png")
    with pytest.warns(TrackingWarning, match="does not exist"):
        tracker.log_artifact(tmp_path / "missing", "a", "model")
    with pytest.warns(TrackingWarning, match="does not exist"):
        tracker.use_artifact(tmp_path / "missing", "model")
    assert tracker.mode == "offline"  # the caller's mistake, not a W&B failure
    tracker.log({"a": 1})
    assert run.calls == [("log", {"a": 1}, None)]


# ---------------------------------------------------------------------------------------------
# helpers


def test_flatten():
    assert flatten({"eval": {"f1": 1}}) == {"eval/f1": 1}
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a/b/c": 1, "a/d": 2, "e": 3}
    assert flatten({"train/loss": 0.5}) == {"train/loss": 0.5}  # already grouped keys pass through
    assert flatten({"a": {"b": 1}}, sep=".") == {"a.b": 1}
    assert flatten({"a": {}, "b": [1, {"c": 2}]}) == {"b": [1, {"c": 2}]}  # lists are values
    assert flatten({}) == {}


def test_make_group_name():
    name = make_group_name()
    assert re.fullmatch(r"pipeline-\d{8}-\d{6}-[0-9a-f]{4}", name), name
    assert re.fullmatch(r"ablation-\d{8}-\d{6}-[0-9a-f]{4}", make_group_name("ablation"))
    assert len({make_group_name() for _ in range(3)}) == 3


def test_artifact_name_is_sanitised():
    assert tracking._artifact_name("sft adapter/v1") == "sft-adapter-v1"
    assert tracking._artifact_name("ok_name-1.0") == "ok_name-1.0"
    assert tracking._artifact_name("///") == "artifact"


# ---------------------------------------------------------------------------------------------
# which netrc entry counts as a login: the hosts the installed wandb reads its key for


KEY = "0123456789abcdef0123456789abcdef01234567"


def _netrc_for(home: Path, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)


@pytest.mark.parametrize("host", ["api.forge.coreweave.com", "api.wandb.ai"])
def test_a_wandb_login_to_either_default_host_counts_as_credentials(no_credentials, host):
    """wandb 0.31's `wandb login` writes its key under its default server, CoreWeave Forge's API host; earlier
    versions (and wandb 0.31's fallback) under api.wandb.ai. Both are a login: online, not silently offline."""
    _netrc_for(no_credentials / "home", host)
    assert tracking.has_credentials() and choose_mode(True) == "online"
    # the same verdict as wandb's own reader for its default server
    from wandb.sdk.lib import urls
    from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

    assert read_netrc_auth(host=urls.DEFAULT_BASE_URL) == KEY


def test_credential_hosts_are_asked_of_wandb(no_credentials, monkeypatch):
    from wandb.sdk.lib import urls

    assert tracking.credential_hosts() == ["api.forge.coreweave.com", "api.wandb.ai"]  # wandb 0.31's default + fallback
    monkeypatch.setenv("WANDB_BASE_URL", "https://forge.coreweave.com/api/wandb")  # Forge's proxy address
    assert tracking.credential_hosts() == ["api.forge.coreweave.com", "api.wandb.ai"]
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.internal")  # a server of one's own: no fallback
    assert tracking.credential_hosts() == ["wandb.mycompany.internal"]
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setattr(urls, "DEFAULT_BASE_URL", "https://api.example-wandb.test")  # what wandb says, not a copy
    assert tracking.credential_hosts() == ["api.example-wandb.test"]
    _netrc_for(no_credentials / "home", "api.example-wandb.test")
    assert choose_mode(True) == "online"


def test_credential_hosts_fall_back_to_the_known_hosts_where_wandb_does_not_say(no_credentials, monkeypatch):
    """A wandb version without wandb.sdk.lib.urls (or its attributes): every host a `wandb login` has used."""
    from wandb.sdk.lib import urls

    for name in ("DEFAULT_BASE_URL", "normalize_forge_base_url", "forge_upstream_url"):
        monkeypatch.delattr(urls, name)
    assert tracking.credential_hosts() == ["api.wandb.ai", "api.forge.coreweave.com"]
    for host in ("api.forge.coreweave.com", "api.wandb.ai"):
        _netrc_for(no_credentials / "home", host)
        assert choose_mode(True) == "online", host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.internal")
    assert tracking.credential_hosts() == ["wandb.mycompany.internal"]
    assert choose_mode(True) == "offline"  # the key in netrc is for another server


def test_credential_hosts_without_wandbs_url_module(no_credentials, monkeypatch):
    import wandb.sdk.lib

    monkeypatch.delattr(wandb.sdk.lib, "urls")
    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.urls", None)  # the import fails, as in a version without it
    with pytest.raises(ImportError):
        from wandb.sdk.lib import urls  # noqa: F401
    assert tracking.credential_hosts() == ["api.wandb.ai", "api.forge.coreweave.com"]
    _netrc_for(no_credentials / "home", "api.forge.coreweave.com")
    assert choose_mode(True) == "online"
