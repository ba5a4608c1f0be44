"""download.py against a real HTTP server on 127.0.0.1 serving the shared datasets."""

from __future__ import annotations

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sarcasm_dpo import download as dl
from sarcasm_dpo.errors import UserError

from conftest import SHARED_DATA  # noqa: E402 - the real datasets, wherever the route found them

URL_TO_FILE = {"/" + d.url_path: SHARED_DATA / d.relpath for d in dl.DATASETS.values()}
GEN = dl.DATASETS["gen"]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append(self.path)
        local = URL_TO_FILE.get(self.path)
        if local is None:
            self.send_error(404)
            return
        body = local.read_bytes()
        mode = srv.modes.get(self.path, "ok")
        if mode == "drop_once":
            srv.modes[self.path] = "ok"
            mode = "drop"
        if mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))  # always the full size
        self.end_headers()
        if mode == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(shared_data):  # skips, saying why, when no route found the real datasets to serve
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests = []
    srv.modes = {}  # url path -> "ok" | "corrupt" | "drop" | "drop_once"
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_PAUSE_S", 0)


def _get(srv, cache, **kw):
    kw.setdefault("timeout", 10)
    return dl.download(cache, base_url=srv.base_url, log=lambda _m: None, **kw)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_downloads_both_then_skips(server, tmp_path):
    paths = _get(server, tmp_path)
    assert set(paths) == {"gen", "isarcasmeval"}
    for key, d in dl.DATASETS.items():
        assert paths[key] == tmp_path / d.relpath
        assert dl.sha256_file(paths[key]) == d.sha256
    assert sorted(server.requests) == sorted(URL_TO_FILE)
    assert not list(tmp_path.rglob("*.part"))

    logs = []
    server.requests.clear()
    dl.download(tmp_path, base_url=server.base_url, log=logs.append)
    assert server.requests == []
    assert sum("skipping" in m for m in logs) == 2


def test_corrupt_download_is_rejected_and_not_kept(server, tmp_path):
    server.modes["/" + GEN.url_path] = "corrupt"
    with pytest.raises(UserError) as exc:
        _get(server, tmp_path, keys=["gen"])
    msg = str(exc.value)
    assert "Checksum" in msg and GEN.sha256 in msg and GEN.relpath in msg
    assert _leftovers(tmp_path) == []


def test_connection_dropped_every_time_gives_up(server, tmp_path):
    server.modes["/" + GEN.url_path] = "drop"
    with pytest.raises(UserError) as exc:
        _get(server, tmp_path, keys=["gen"], retries=2)
    assert "dropped" in str(exc.value) and "--data_dir" in str(exc.value)
    assert server.requests == ["/" + GEN.url_path] * 3  # first try + 2 retries
    assert _leftovers(tmp_path) == []


def test_connection_dropped_once_is_retried(server, tmp_path):
    server.modes["/" + GEN.url_path] = "drop_once"
    paths = _get(server, tmp_path, keys=["gen"])
    assert dl.sha256_file(paths["gen"]) == GEN.sha256
    assert len(server.requests) == 2
    assert _leftovers(tmp_path) == [paths["gen"]]


def test_nothing_listening_points_to_data_dir(tmp_path):
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as exc:
        dl.download(tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5, log=lambda _m: None)
    msg = str(exc.value)
    assert "--data_dir" in msg and "sarcasm_v2/GEN-sarc-notsarc.csv" in msg
    assert "isarcasmeval/train.En.csv" in msg
    assert _leftovers(tmp_path) == []


def test_http_error_is_a_user_error(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.DATASETS, "gen", dl.DatasetFile("gen", GEN.relpath, "no/such/file.csv", GEN.sha256))
    with pytest.raises(UserError, match="HTTP 404"):
        _get(server, tmp_path, keys=["gen"])
    assert _leftovers(tmp_path) == []


def test_stale_file_in_cache_is_replaced(server, tmp_path):
    stale = tmp_path / GEN.relpath
    stale.parent.mkdir(parents=True)
    stale.write_text("not the dataset\n")
    (stale.parent / (stale.name + ".part")).write_bytes(b"leftover from a killed run")
    _get(server, tmp_path, keys=["gen"])
    assert dl.sha256_file(stale) == GEN.sha256
    assert server.requests == ["/" + GEN.url_path]
    assert _leftovers(tmp_path) == [stale]


def test_an_unreadable_copy_is_skipped_or_fetched_again_never_a_traceback(server, tmp_path, monkeypatch, shared_data):
    """One checksum rule (download._verified) for every reader: a copy that cannot be read (permissions, a disk
    error) is no verified copy, in $SARCASM_DPO_DATA_DIRS and in the cache alike."""
    from sarcasm_dpo import atomic

    unreadable = {tmp_path / GEN.relpath, shared_data / GEN.relpath}
    real = atomic.file_sha256

    def file_sha256(path):
        if Path(path) in unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(atomic, "file_sha256", file_sha256)
    assert not dl.verified_copy(shared_data, dl.DATASETS.values())
    (tmp_path / GEN.relpath).parent.mkdir(parents=True)
    (tmp_path / GEN.relpath).write_bytes((shared_data / GEN.relpath).read_bytes())
    logs = []
    dl.download(tmp_path, base_url=server.base_url, keys=["gen"], log=logs.append)
    assert server.requests == ["/" + GEN.url_path] and "cannot be read" in logs[0]
    unreadable.clear()
    assert real(tmp_path / GEN.relpath) == GEN.sha256


def test_ensure_data_dir_uses_given_folder_without_network(monkeypatch, shared_data):
    def no_network(*a, **k):
        raise AssertionError("ensure_data_dir(dir) must not download")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    logs = []
    assert dl.ensure_data_dir(str(SHARED_DATA), log=logs.append) == SHARED_DATA
    assert not any("WARNING" in m for m in logs)


def test_ensure_data_dir_missing_files_lists_layout(tmp_path):
    with pytest.raises(UserError) as exc:
        dl.ensure_data_dir(str(tmp_path))
    msg = str(exc.value)
    for d in dl.DATASETS.values():
        assert str(tmp_path / d.relpath) in msg


def test_ensure_data_dir_own_copy_with_other_checksum_only_warns(tmp_path):
    for d in dl.DATASETS.values():
        (tmp_path / d.relpath).parent.mkdir(parents=True)
        (tmp_path / d.relpath).write_text("my own copy\n")
    logs = []
    assert dl.ensure_data_dir(tmp_path, log=logs.append) == tmp_path
    assert sum("WARNING" in m for m in logs) == 2


def test_ensure_data_dir_none_downloads_into_cache(server, tmp_path, monkeypatch):
    monkeypatch.delenv(dl.DATA_DIRS_ENV, raising=False)
    monkeypatch.setenv("SARCASM_DPO_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "DEFAULT_BASE_URL", server.base_url)
    assert dl.default_cache_dir() == tmp_path / "cache"
    root = dl.ensure_data_dir(None, keys=["isarcasmeval"], log=lambda _m: None)
    assert root == tmp_path / "cache"
    assert dl.sha256_file(root / "isarcasmeval/train.En.csv") == dl.DATASETS["isarcasmeval"].sha256


def test_route_order_data_dirs_then_cache_then_download(server, tmp_path, monkeypatch):
    """$SARCASM_DPO_DATA_DIRS copies count only when whole and verified; then the cache; then a download."""
    import shutil

    bad, good = tmp_path / "bad", tmp_path / "good"
    for root in (bad, good):
        for d in dl.DATASETS.values():
            (root / d.relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SHARED_DATA / d.relpath, root / d.relpath)
    (bad / GEN.relpath).write_text("edited\n")
    monkeypatch.setenv("SARCASM_DPO_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "DEFAULT_BASE_URL", server.base_url)
    logs = []
    monkeypatch.setenv(dl.DATA_DIRS_ENV, f"{tmp_path / 'missing'}{os.pathsep}{bad}{os.pathsep}{good}")
    assert dl.ensure_data_dir(None, log=logs.append) == good and server.requests == []
    assert logs == [f"data: {good} (from ${dl.DATA_DIRS_ENV}, checksums verified)"]
    monkeypatch.setenv(dl.DATA_DIRS_ENV, str(bad))  # no verified copy: download into the cache
    assert dl.ensure_data_dir(None, log=lambda _m: None) == tmp_path / "cache"
    assert sorted(server.requests) == sorted(URL_TO_FILE)
    server.requests.clear()  # the cache now holds both: no request at all
    assert dl.ensure_data_dir(None, log=lambda _m: None) == tmp_path / "cache" and server.requests == []


def test_offline_error_names_every_route(tmp_path, monkeypatch):
    monkeypatch.delenv(dl.DATA_DIRS_ENV, raising=False)
    monkeypatch.setenv("SARCASM_DPO_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "DEFAULT_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    with pytest.raises(UserError) as exc:
        dl.ensure_data_dir(None, log=lambda _m: None, timeout=5, retries=0)
    msg = str(exc.value)
    assert "--data_dir DIR" in msg and "make run-cpu DATA_DIR=DIR" in msg and dl.DATA_DIRS_ENV in msg


def test_unknown_key_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        dl.download(tmp_path, keys=["nope"], log=lambda _m: None)


def test_a_base_url_that_is_not_a_url_and_a_cache_dir_that_is_a_file_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'notaurl' is not a URL .* https://"):
        dl.download(tmp_path, base_url="notaurl", log=lambda _m: None)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="Cannot create the data folder .* Set --cache_dir to a writable folder"):
        dl.download(tmp_path / "a_file", base_url="http://127.0.0.1:9", log=lambda _m: None)
    assert _leftovers(tmp_path) == [tmp_path / "a_file"]


def test_offline_hint_names_a_verified_copy_already_listed(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv(dl.DATA_DIRS_ENV, str(shared_data))
    assert "already names" in dl._offline_hint() and str(shared_data) in dl._offline_hint()
    monkeypatch.setenv(dl.DATA_DIRS_ENV, str(tmp_path))
    assert "already names" not in dl._offline_hint()


# -- two downloads into one cache at once ------------------------------------------------------------------------


def _body_and_sha(d: dl.DatasetFile) -> tuple[bytes, str]:
    import hashlib

    body = (SHARED_DATA / d.relpath).read_bytes()
    return body, hashlib.sha256(body).hexdigest()


def test_two_downloads_into_one_cache_at_once_both_succeed(tmp_path, monkeypatch, shared_data):
    """Run A is half-way through writing when run B downloads the same file from start to end: each writes a file
    of its own (B neither truncates A's nor renames it away, nor removes it on its way out), both end with the
    verified file in place, and nothing is left beside it. (One fixed `.part` for both made A fail with
    "Could not use ...csv.part -> ...csv: it does not exist".)"""
    body, sha = _body_and_sha(GEN)
    a_half_way, b_done = threading.Event(), threading.Event()
    parts = {}

    def fetch_once(url, part, timeout):
        run = threading.current_thread().name
        parts[run] = Path(part)
        with open(part, "wb") as out:
            out.write(body[: len(body) // 2])
            out.flush()
            if run == "A":
                a_half_way.set()
                assert b_done.wait(20)
            out.write(body[len(body) // 2:])
        return sha

    monkeypatch.setattr(dl, "_fetch_once", fetch_once)
    outcome = {}

    def run(name):
        try:
            outcome[name] = dl.download(tmp_path, base_url="http://127.0.0.1:9", keys=["gen"], log=lambda _m: None)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            outcome[name] = exc
        finally:
            if name == "B":
                b_done.set()

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_half_way.wait(20)
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    b.join(20)
    a.join(20)
    target = tmp_path / GEN.relpath
    assert outcome == {"A": {"gen": target}, "B": {"gen": target}}, outcome
    assert parts["A"] != parts["B"] and parts["A"].parent == target.parent  # beside the target: one rename
    assert dl.sha256_file(target) == GEN.sha256 and _leftovers(tmp_path) == [target]


def test_a_download_that_fails_while_another_run_finished_the_file_succeeds(tmp_path, monkeypatch, shared_data):
    """Our connection keeps dropping, but another run put the verified file in place meanwhile: that is the
    file we wanted, so this run succeeds (and says so) instead of failing over a file that is there."""
    target = tmp_path / GEN.relpath
    calls = []

    def fetch_once(url, part, timeout):
        calls.append(part)
        if len(calls) == 1:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((SHARED_DATA / GEN.relpath).read_bytes())  # the other run's rename
        raise dl._Dropped("got 10 of 1715209 bytes")

    monkeypatch.setattr(dl, "_fetch_once", fetch_once)
    logs = []
    assert dl.download(tmp_path, base_url="http://127.0.0.1:9", keys=["gen"], retries=1, log=logs.append) == {
        "gen": target}
    assert any("another run put it in place" in m for m in logs), logs
    assert len(calls) == 2 and _leftovers(tmp_path) == [target]
    target.write_text("edited\n")  # not the verified file: our failure stands
    with pytest.raises(UserError, match="kept failing"):
        dl.download(tmp_path, base_url="http://127.0.0.1:9", keys=["gen"], retries=0, log=lambda _m: None)


def test_leftovers_of_killed_downloads_go_but_a_live_runs_file_stays(server, tmp_path):
    """A killed run's temporary file (old, locked by no one) is removed by the next download; one a live run holds
    locked, or one just made, is not touched; the fixed-name `.part` of older versions goes too."""
    import fcntl
    import time

    folder = tmp_path / "sarcasm_v2"
    folder.mkdir()
    old = time.time() - 2 * dl.STALE_PART_S
    killed, live, young = (folder / f".GEN-sarc-notsarc.csv.{tag}.part" for tag in ("killed1", "live1", "young1"))
    for path in (killed, live, young):
        path.write_bytes(b"half a download")
    for path in (killed, live):
        os.utime(path, (old, old))
    legacy = folder / "GEN-sarc-notsarc.csv.part"
    legacy.write_bytes(b"leftover of an older version")
    holder = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        _get(server, tmp_path, keys=["gen"])
    finally:
        os.close(holder)
    assert sorted(_leftovers(tmp_path)) == sorted([folder / "GEN-sarc-notsarc.csv", live, young])
