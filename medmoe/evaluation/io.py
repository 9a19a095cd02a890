"""Small file helpers: atomic writes and an append-only JSONL log that survives interruption."""

from __future__ import annotations

import json
import os

from ..files import atomic_write_bytes


def write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path, rows: list[dict]) -> None:
    """Append whole lines and fsync, so a crash loses at most the batch being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
