"""File helpers used across layers: atomic writes (a crash never leaves half a file) and JSON
readers whose errors name the file and line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DataError


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path, error=DataError):
    """A JSON file's content; a missing file or bad JSON raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; bad JSON raises DataError naming file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from None
