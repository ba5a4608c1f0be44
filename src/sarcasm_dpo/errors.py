"""The one exception type a user should ever see.

Anything raised as UserError is a problem with the input or the settings: the CLI prints its
message as one paragraph and exits with code 2, without a traceback. Everything else is a bug.
"""


class UserError(Exception):
    """Bad input or bad settings; the message says what was found and what to do."""

    exit_code = 2


# -- the CLI's error boundary ----------------------------------------------------------------------
# Failures of the machine or of the files a user pointed at (a full disk, a read-only folder, a
# truncated download) are not bugs: the CLI turns them into one paragraph and exit code 2 here, in
# one place, whichever stage met them. Anything not recognised keeps its traceback (cli.py).

import errno as _errno  # noqa: E402
import os  # noqa: E402

# errno -> what it means for the person at the keyboard, and what to do about it.
_OS_ERRORS = {
    _errno.ENOSPC: ("there is no space left on the device", "free some space or choose an output folder on "
                    "another disk, then run the same command again"),
    _errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another output folder"),
    _errno.EFBIG: ("the file grew past the size this process may write (ulimit -f)", "raise the limit or write "
                   "somewhere else"),
    _errno.EACCES: ("permission was denied", "check the permissions of the path, or choose another one"),
    _errno.EPERM: ("the operation is not permitted", "check the permissions of the path, or choose another one"),
    _errno.EROFS: ("it is on a read-only file system", "choose a writable location"),
    _errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
    _errno.ELOOP: ("it is a loop of symbolic links", "fix the link, or give the real path"),
    _errno.ENOTDIR: ("a part of the path that should be a folder is a file", "fix the path"),
    _errno.EISDIR: ("it is a folder where a file was expected", "give a file"),
    _errno.ENOENT: ("it does not exist (or is a link to nothing)", "fix the path"),
    _errno.EEXIST: ("something is already there (a file, or a link to nothing)", "remove it or choose another path"),
    _errno.EIO: ("the device reported an input/output error", "check the disk or the network file system"),
    _errno.EMFILE: ("too many files are open", "raise the limit (ulimit -n)"),
    _errno.ENXIO: ("no device or reader is behind it", "give a regular file"),
}


def _free_space(path) -> str:
    """Free space on the file system of `path` (or of the nearest folder above it that exists)."""
    import os
    import shutil

    folder = os.path.abspath(str(path)) if path else os.getcwd()
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" (free there now: {free / 2**20:.1f} MiB)"


def describe_failure(exc: BaseException) -> str | None:
    """One paragraph for an environment failure the user can fix, or None for what looks like a bug."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[exc.errno]
        where = exc.filename if exc.filename is not None else _filename_in_traceback(exc)
        place = f"{where}" + (f" -> {exc.filename2}" if exc.filename2 else "") if where else "a file"
        needed = getattr(exc, "bytes_needed", None)
        extra = ""
        if exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            extra = _free_space(where) + (f"; this write needed about {needed / 2**20:.1f} MiB" if needed else "")
        return (f"Could not use {place}: {what}{extra} ({exc.strerror or exc}). To fix: {fix}. Files written "
                "before this are whole (each is written atomically); a stage's folder is marked complete only "
                "when all its files are in place.")
    if isinstance(exc, UnicodeDecodeError):
        where = _filename_in_traceback(exc) or "an input"
        return (f"Could not read {where} as UTF-8 text: byte {exc.object[exc.start:exc.start + 1]!r} at position "
                f"{exc.start} is not valid UTF-8 (a binary file, or text in another encoding). Give a UTF-8 text "
                "file (re-save it as UTF-8).")
    import re

    os_error = re.search(r"os error (\d+)", str(exc))  # Rust I/O errors (safetensors, tokenizers) carry the errno
    if os_error and int(os_error.group(1)) in _OS_ERRORS:
        code = int(os_error.group(1))
        return describe_failure(OSError(code, os.strerror(code), _filename_in_traceback(exc)))
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):  # torch.save's zip writer, e.g. a full disk
        where = _filename_in_traceback(exc)
        return (f"Could not write {where or 'a PyTorch file'}: PyTorch's file writer failed "
                f"({str(exc).splitlines()[0][:200]}), which almost always means the disk filled up"
                f"{_free_space(where)}. Free some space or choose an output folder on another disk, then run the same "
                "command again (sft and dpo: with --resume).")
    if type(exc).__name__ == "SafetensorError":
        where = _filename_in_traceback(exc) or "a .safetensors file"
        return (f"Could not read {where}: {str(exc).splitlines()[0] if str(exc) else 'invalid safetensors data'}. "
                "The file is truncated or not a safetensors file (an interrupted copy or download); copy it "
                "again or retrain the adapter.")
    return None


def _filename_in_traceback(exc: BaseException) -> str | None:
    """The innermost file path a failing frame was working on (`path`, `filename`, ... locals), if any.

    Decode and safetensors errors do not carry the file's name; the frames that raised them do."""
    import os
    import re

    found = None
    tb = exc.__traceback__
    while tb is not None:
        for name in ("filename", "path", "file", "fname", "filepath", "weights", "p", "f"):
            value = tb.tb_frame.f_locals.get(name)
            text = str(value) if isinstance(value, (str, os.PathLike)) else ""
            if text and len(text) < 4096 and (isinstance(value, os.PathLike) or os.sep in text
                                               or re.search(r"\.[A-Za-z]\w*$", text)):
                found = text
                break
        tb = tb.tb_next
    return found
