"""The one gate every input file passes: is it there, a regular file, readable, and (for text) UTF-8?

Data CSVs, predict's text files, YAML configs and preference-pair files all come through here, so
a symlink loop, a FIFO, a device such as /dev/stdin, an unreadable or binary file is reported the
same way everywhere: one paragraph naming the path and the cause (UserError, exit code 2).

    python -c "from sarcasm_dpo.inputs import read_input_text; print(read_input_text('README.md')[:40])"
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from .errors import UserError


def check_input_file(path: str | os.PathLike, what: str = "Input file", allow_empty: bool = False) -> Path:
    """`path` as a Path once it is known to be a non-empty regular file this process can read."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{what} {path} is a loop of symbolic links; give the real file.") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise UserError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist.") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UserError(f"{what} not found: {path}") from None
        raise UserError(f"{what} {path} cannot be read: {exc.strerror}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"Expected a file but {path} is a folder.")
    if not stat.S_ISREG(info.st_mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) \
            else "a device"
        raise UserError(f"{what} {path} is {kind}, not a regular file; it can be read only once, and every input is "
                        "checked before it is used. Save it to a file first (predict reads standard input when "
                        "--input is left out).")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read: {exc.strerror} (check its permissions).") from None
    if info.st_size == 0 and not allow_empty:
        raise UserError(f"{what} {path} is empty (0 bytes).")
    return path


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 text (a byte-order mark is dropped), or an error naming `where` and the first bad byte.

    A NUL byte is valid UTF-8 but never part of a text: it marks a binary file, or UTF-16 without its
    byte-order mark (every other byte of English text is NUL), which would otherwise be scored as text."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text: byte {raw[exc.start:exc.start + 1]!r} at position {exc.start} "
                        "cannot be decoded (a binary file, or text in another encoding). Re-save it as UTF-8.") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise UserError(f"{where} is not UTF-8 text: it holds a NUL byte (character {nul}), as a binary file or "
                        "UTF-16 text does. Re-save it as UTF-8.")
    return text


def read_input_text(path: str | os.PathLike, what: str = "Input file", allow_empty: bool = False) -> str:
    path = check_input_file(path, what, allow_empty=allow_empty)
    return decode_text(path.read_bytes(), f"{what} {path}")


def text_lines(text: str) -> list[str]:
    """A text's lines, ended by \\n, \\r\\n or \\r only: str.splitlines would also cut at a form feed, a
    vertical tab or U+2028, which can sit inside one text (or one JSON string)."""
    return re.split(r"\r\n|\r|\n", text)
