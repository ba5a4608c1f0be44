"""Fetch the two sarcasm datasets from their public GitHub repositories, checked by sha256.

    python -m sarcasm_dpo.download            # into $SARCASM_DPO_DATA or ~/.cache/sarcasm-dpo/data

Every command that reads the datasets finds them in this order (`ensure_data_dir`): `--data_dir DIR`;
the folders listed in $SARCASM_DPO_DATA_DIRS (a copy counts only with the right checksums); the
download cache (filled by `sarcasm-dpo data download`, checksums verified); a download on first use.
Offline, point the pipeline at a local copy with `--data_dir DIR`, laid out as
`DIR/sarcasm_v2/GEN-sarc-notsarc.csv` and `DIR/isarcasmeval/train.En.csv`.

A file only ever appears at its final path whole and with the expected checksum: it is streamed
into a temporary file of this run's own beside the target (`.NAME.*.part`) and renamed over it after
the hash matches, so two downloads into one cache at once never write into each other's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .atomic import _umask
from .atomic import file_sha256 as sha256_file  # one sha256 helper for the whole package
from .atomic import has_sha256
from .errors import UserError


@dataclass(frozen=True)
class DatasetFile:
    key: str  # short name used on the command line and in code
    relpath: str  # layout under a data dir (same as ../shared/data)
    url_path: str  # path on the host, appended to the base URL
    sha256: str


DATASETS: dict[str, DatasetFile] = {
    d.key: d
    for d in (
        DatasetFile(
            "gen",
            "sarcasm_v2/GEN-sarc-notsarc.csv",
            "soraby/sarcasm2/main/sarcasm_v2/GEN-sarc-notsarc.csv",
            "2240c3c4ef43b413f096efd54d6faddf55c816f32a0bf8da7101d1ccd06a99ad",
        ),
        DatasetFile(
            "isarcasmeval",
            "isarcasmeval/train.En.csv",
            "iabufarha/iSarcasmEval/main/train/train.En.csv",
            "fde737b69caffbcf81ebe79858ad16ac21881573c308343cd5219c4f7a800ae7",
        ),
    )
}

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"  # canonical public GitHub repos, branch main
# More folders laid out like shared/data, separated by os.pathsep; searched before the cache.
# CI sets it to ../shared/data, which is then just one more place the datasets may be.
DATA_DIRS_ENV = "SARCASM_DPO_DATA_DIRS"
CHUNK = 1 << 16
RETRY_PAUSE_S = 1.0  # grows linearly per attempt; tests set it to 0


def default_cache_dir() -> Path:
    env = os.environ.get("SARCASM_DPO_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sarcasm-dpo" / "data"


def _offline_hint() -> str:
    layout = " and ".join(f"DIR/{d.relpath}" for d in DATASETS.values())
    ready = next((root for root in extra_data_dirs() if verified_copy(root, DATASETS.values())), None)
    note = "" if ready is None else (f" (${DATA_DIRS_ENV} already names {ready}, which holds both datasets with their "
                                     "checksums: the stages read them from there without downloading)")
    return (f"To run without network, pass --data_dir DIR with a folder laid out like {layout} "
            "(with make: add DATA_DIR=DIR to the target, `make run-cpu DATA_DIR=DIR` or `make smoke DATA_DIR=DIR`), "
            f"or list such folders in ${DATA_DIRS_ENV}{note}.")


def extra_data_dirs() -> list[Path]:
    """The folders named in $SARCASM_DPO_DATA_DIRS, in order."""
    value = os.environ.get(DATA_DIRS_ENV, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def verified_copy(root: Path, selected: Iterable[DatasetFile]) -> bool:
    """True if `root` holds every selected file with its published checksum."""
    return all(_verified(root / d.relpath, d) for d in selected)


def _select(keys: Iterable[str] | None) -> list[DatasetFile]:
    if keys is None:
        return list(DATASETS.values())
    unknown = [k for k in keys if k not in DATASETS]
    if unknown:
        raise UserError(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}.")
    return [DATASETS[k] for k in keys]


class _Dropped(Exception):
    """The connection ended before the whole body arrived; worth another try."""


def _fetch_once(url: str, part: Path, timeout: float) -> str:
    """Stream `url` into `part`; return the body's sha256. Raises _Dropped on a short body."""
    h = hashlib.sha256()
    got = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
        length = resp.headers.get("Content-Length")
        try:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
                got += len(chunk)
        # Mid-body failures: the server or a proxy cut us off, or the link stalled.
        except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
            raise _Dropped(f"{type(err).__name__}: {err}") from None
        # http.client returns b"" at EOF instead of raising when Content-Length is unmet,
        # so a truncated body would otherwise look like a finished one.
        if length is not None and length.isdigit() and got < int(length):
            raise _Dropped(f"got {got} of {length} bytes")
        out.flush()
        os.fsync(out.fileno())  # the bytes are on disk before the rename makes them "good"
    return h.hexdigest()


def _fetch(d: DatasetFile, target: Path, base_url: str, timeout: float, retries: int, log) -> None:
    """Download `d` to `target`, whole and verified, or raise UserError. Runs into one cache may overlap (two
    `data download`s, two pipelines on first use): each streams into a temporary file of its own, named and
    locked by this run, and renames it over `target` only once its checksum matches, so neither run touches the
    other's file and whichever renames last puts the same verified bytes in place. A run that fails while
    another finished the same file counts that one (`_verified`)."""
    url = f"{base_url.rstrip('/')}/{d.url_path}"
    _sweep_leftovers(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=target.parent)
    except OSError as err:  # a full disk, a folder not ours to write
        raise UserError(_cannot_write(d, target.parent, err)) from None
    part = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # ours while this run lives: no other run's sweep takes it
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only; the dataset gets the usual permissions
        try:
            _fetch_verified(d, url, part, timeout, retries, log)
        except UserError:
            if _verified(target, d):  # another run finished this very file meanwhile: it is in place, whole
                log(f"  {d.relpath}: another run put it in place with the right checksum meanwhile")
                return
            raise
        os.replace(part, target)
    finally:
        # Whatever went wrong (including Ctrl-C), no half or bad file of this run stays behind.
        with contextlib.suppress(OSError):
            part.unlink()
        os.close(fd)


def _fetch_verified(d: DatasetFile, url: str, part: Path, timeout: float, retries: int, log) -> None:
    """Stream `url` into `part` (retrying dropped connections and server errors) and check its sha256."""
    retries = max(0, retries)
    for attempt in range(retries + 1):
        try:
            actual = _fetch_once(url, part, timeout)
            break
        except urllib.error.HTTPError as err:  # before URLError: it is a subclass
            if err.code >= 500 and attempt < retries:
                log(f"  {d.relpath}: server error HTTP {err.code}, retrying")
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
                continue
            raise UserError(
                f"Downloading {d.relpath} failed: {url} answered HTTP {err.code} {err.reason}. "
                + _offline_hint()
            ) from None
        except urllib.error.URLError as err:  # refused, DNS failure, connect timeout
            raise UserError(
                f"Cannot download {d.relpath}: no connection to {url} ({err.reason}). "
                + _offline_hint()
            ) from None
        except (_Dropped, http.client.HTTPException, ConnectionError, TimeoutError) as err:
            if attempt < retries:
                log(f"  {d.relpath}: connection dropped ({err}), retry {attempt + 1}/{retries}")
                time.sleep(RETRY_PAUSE_S * (attempt + 1))
                continue
            raise UserError(
                f"Downloading {d.relpath} from {url} kept failing: the connection dropped "
                f"{retries + 1} times (last: {err}). Try again later. " + _offline_hint()
            ) from None
        except OSError as err:  # disk full, permissions: the user's side, not the network
            raise UserError(_cannot_write(d, part.parent, err)) from None
    if actual != d.sha256:
        raise UserError(
            f"Checksum mismatch for {d.relpath} downloaded from {url}: expected sha256 "
            f"{d.sha256}, got {actual}. The file was not kept; the source may have changed."
        )


def _cannot_write(d: DatasetFile, folder: Path, err: OSError) -> str:
    return (f"Cannot write {d.relpath} into {folder}: {err.strerror or err}. Free some space there, or point "
            "--cache_dir (or $SARCASM_DPO_DATA) at a writable folder with room, then run the same command again; "
            "nothing half-written was kept.")


PART_SUFFIX = ".part"
STALE_PART_S = 600  # a download's temporary file untouched this long, and locked by no one, was left by a killed run


def _verified(target: Path, d: DatasetFile) -> bool:
    """`target` is a readable file with `d`'s published checksum (atomic.has_sha256)."""
    return has_sha256(target, d.sha256)


def _sweep_leftovers(target: Path) -> None:
    """Remove the temporary files killed downloads of `target` left beside it: those no live run holds locked
    (each run locks its own while it writes) and untouched for a while, and the fixed-name `NAME.part` of
    versions before the per-run names."""
    now = time.time()
    for path in [target.with_name(target.name + PART_SUFFIX),
                 *target.parent.glob(f".{glob.escape(target.name)}.*{PART_SUFFIX}")]:
        legacy = path.name == target.name + PART_SUFFIX
        try:
            if path.is_symlink() or not path.is_file():
                continue
            if not legacy and now - path.stat().st_mtime < STALE_PART_S:  # may be a run that has just begun
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live run's, still being written
            os.close(fd)
            continue
        try:
            path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def download(
    cache_dir: str | os.PathLike | None = None,
    base_url: str = DEFAULT_BASE_URL,
    keys: Iterable[str] | None = None,
    timeout: float = 60,
    retries: int = 2,
    log: Callable[[str], object] = print,
) -> dict[str, Path]:
    """Make sure each dataset file is in `cache_dir` with its checksum; return key -> path."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    scheme = urllib.parse.urlparse(base_url).scheme
    if scheme not in ("http", "https", "file"):
        raise UserError(f"--base_url {base_url!r} is not a URL this can download from: it must start with https://, "
                        "http:// or file:// (a mirror of the datasets' raw files).")
    out: dict[str, Path] = {}
    for d in _select(keys):
        target = root / d.relpath
        out[d.key] = target
        if _verified(target, d):
            log(f"{d.relpath}: already present with the right checksum, skipping")
            continue
        if target.is_file():
            log(f"{d.relpath}: present but its checksum differs (or it cannot be read), downloading again")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            where = "--cache_dir" if cache_dir is not None else "SARCASM_DPO_DATA (or --cache_dir)"
            raise UserError(f"Cannot create the data folder {target.parent}: {err.strerror or err}. Set {where} to a "
                            "writable folder.") from None
        log(f"{d.relpath}: downloading from {base_url}")
        _fetch(d, target, base_url, timeout, retries, log)
        log(f"{d.relpath}: ok (sha256 {d.sha256[:12]}...)")
    return out


def ensure_data_dir(
    data_dir: str | os.PathLike | None, keys: Iterable[str] | None = None, log=print,
    timeout: float = 60, retries: int = 2,
) -> Path:
    """The folder to read datasets from: `data_dir` as given (checked), else the first verified copy
    in $SARCASM_DPO_DATA_DIRS, else the download cache (downloading what it lacks)."""
    selected = _select(keys)
    if data_dir is None:
        for root in extra_data_dirs():
            if verified_copy(root, selected):
                log(f"data: {root} (from ${DATA_DIRS_ENV}, checksums verified)")
                return root
        root = default_cache_dir()
        # DEFAULT_BASE_URL is looked up now, not at import, so it can be pointed at a mirror.
        download(root, base_url=DEFAULT_BASE_URL, keys=[d.key for d in selected], log=log, timeout=timeout,
                 retries=retries)
        return root
    root = Path(data_dir).expanduser()
    missing = [root / d.relpath for d in selected if not (root / d.relpath).is_file()]
    if missing:
        layout = "\n".join(f"  {root / d.relpath}" for d in selected)
        raise UserError(
            f"--data_dir {root} is missing {', '.join(map(str, missing))}. "
            f"Expected layout:\n{layout}\n"
            "Or leave out --data_dir to download the datasets."
        )
    for d in selected:
        # Only a warning: a user's own copy (re-saved, newer upstream) may differ legitimately.
        actual = sha256_file(root / d.relpath)
        if actual != d.sha256:
            log(
                f"WARNING: {root / d.relpath} has sha256 {actual}, expected {d.sha256}; "
                "using it anyway, results may not match the reference numbers."
            )
    return root


def main() -> int:
    try:
        paths = download()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
