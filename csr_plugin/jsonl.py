"""JSON Lines on disk: append-only, flushed per record, resumable after a kill.

A process killed mid-write leaves at most one torn last line (no newline yet):
opening the file for append cuts it off, so the record is redone, never
half-read and never duplicated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, record or None, error) for each non-blank line.

    Read as bytes and decoded line by line: one line that is not UTF-8 is an invalid
    line like any other, not the end of the whole file.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, None, f"line {number} is not valid JSON ({exc.msg})"
                continue
            if not isinstance(record, dict):
                yield number, None, f"line {number} is not a JSON object"
                continue
            yield number, record, ""


def load_records(path: str | Path) -> list[dict]:
    """All records of a file written by :class:`JsonlAppender` (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    return [record for _, record, _ in read_jsonl(path) if record is not None]


class JsonlAppender:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = self._repair_torn_tail()
        self.records = load_records(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair_torn_tail(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
            data = f.seek(0) or f.read()
            f.truncate(data.rfind(b"\n") + 1)
        return True

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """Write a whole file at once: readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
