"""Files that a crash mid-write never leaves half written: each is written beside its
target, synced and renamed over it (``os.replace`` is atomic), so the old file stays whole
until the new one is."""

import os
import re
from contextlib import contextmanager
from pathlib import Path

PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def one_line(text, limit=None):
    """``text`` on one line (runs of whitespace collapsed), cut to ``limit`` characters if
    given, for error messages that quote another library's (TensorFlow's and YAML's span
    lines)."""
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


PLAIN_NAME_RULE = "a plain name: letters, digits, '.', '_', '-' (not '.' or '..')"


def is_plain_name(name):
    """Whether ``name`` is a plain file name: letters, digits, '.', '_', '-', not '.' or '..'
    (so that it names a folder inside its parent and nothing else)."""
    return isinstance(name, str) and bool(PLAIN_NAME.fullmatch(name)) and name not in (".", "..")


@contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` with the same suffix (``.keras``, ``.npz``:
    writers that check it accept it); when the block ends without error, what was written
    there is synced and renamed to ``path``, else it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    """``Path(path).write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
