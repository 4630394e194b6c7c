"""A run's progress on disk: ``events.jsonl`` (append-only) and ``status.json`` (latest state).

The Slicer module and ``fmabs jobs`` only read these files, so they are flushed as they go and
``status.json`` is replaced atomically (a reader never sees half a file). Schema: docs/events.md.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .io import atomic_write_text

EVENT_TYPES = ("started", "progress", "validation", "pseudo_label", "suggestion", "checkpoint", "cancelled",
               "done", "failed")


class RunLog:
    """Writes events and status for one run; a no-op sink when ``enabled`` is False (non-zero DDP ranks)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.status: dict[str, Any] = {}
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def event(self, type_: str, **fields: Any) -> dict:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        record = {"type": type_, "time": time.time(), **fields}
        if self.enabled:
            line = json.dumps(record, default=_jsonable) + "\n"
            with open(self.events_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        return record

    def update_status(self, **fields: Any) -> None:
        self.status.update(fields)
        self.status.setdefault("pid", os.getpid())
        self.status.setdefault("host", socket.gethostname())
        self.status["updated"] = time.time()
        if self.enabled:
            atomic_write_text(self.status_path, json.dumps(self.status, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_events(run_dir: Path) -> list[dict]:
    """All complete events of a run; a partly written last line is ignored."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
