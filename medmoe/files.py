"""File helpers used across layers: atomic writes (a crash never leaves half a file), JSON
readers whose errors name the file and line, and a cheap fingerprint of a model folder's weights."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process at a time is the user's to keep
    fcntl = None

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


@contextmanager
def file_lock(path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing): processes that build the
    same cache entry take turns, and the second finds the first one's result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def weights_fingerprint(folder, samples: int = 64, chunk: int = 1 << 16) -> str | None:
    """A short hash of a model folder's weight files: names, sizes and `samples` chunks spread
    evenly over each file (the whole file when it is small), so that retrained weights saved under
    the same name are told apart without reading gigabytes. None when `folder` holds no weights."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as handle:
            if size <= samples * chunk:
                digest.update(handle.read())
                continue
            for i in range(samples):
                handle.seek((size - chunk) * i // (samples - 1))
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def read_json(path, error=DataError):
    """A JSON file's content; a missing file or bad JSON raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def folder_config(folder) -> dict | None:
    """A model folder's config.json as a dict, or None when it is missing, unreadable or not an
    object (for telling folder formats apart, where a bad file is not this format's)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


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
