"""A run's progress on disk: ``events.jsonl`` (append-only) and ``status.json`` (latest state).

The Slicer module and ``fmabs jobs`` only read these files, so lines are flushed as they are
written and ``status.json`` is replaced by rename (a reader never sees half a file). Schema and
durability rules: docs/events.md.

Durability is tiered to keep the cost per step low (measured: an fsync costs about 3-10 ms on the
development machine, a flushed append about 0.01 ms): ``progress`` lines are flushed to the OS on
every step (readers on the same machine see them at once) and fsynced at most every
``FSYNC_INTERVAL_S``; every other event is fsynced at once; ``status.json`` is renamed into place
every step without fsync (it is rewritten next step anyway; after a power cut it may be older).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fmabs_core.contract import COMMON_EVENT_FIELDS, EVENT_FIELDS, EVENT_TYPES, STATES
from fmabs_core.data.io import atomic_write_text

#: event types and their fields, and the run states, are defined once, in the contract
COMMON_FIELDS, REQUIRED_FIELDS = COMMON_EVENT_FIELDS, EVENT_FIELDS
__all__ = ["EVENT_TYPES", "COMMON_FIELDS", "REQUIRED_FIELDS", "STATES", "RunLog", "read_events", "read_status"]

FSYNC_INTERVAL_S = 10.0
_LAZY = ("progress",)


class RunLog:
    """Writes events and status for one run; a no-op sink when ``enabled`` is False (non-zero DDP ranks)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.status: dict[str, Any] = {}
        self._last_fsync = 0.0
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def repair(self) -> None:
        """End a line cut short by a killed writer, so the next event does not glue onto it.

        Called once by the process that owns the run (it holds the run lock), before it appends.
        """
        if not self.enabled or not self.events_path.exists():
            return
        with open(self.events_path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")

    def event(self, type_: str, **fields: Any) -> dict:
        """Append one event line; ``iteration`` defaults to the last one in the status."""
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        record = {"type": type_, "time": time.time(), "iteration": self.status.get("iteration", 0), **fields}
        if self.enabled:
            line = json.dumps(record, default=_jsonable) + "\n"
            with open(self.events_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                now = time.monotonic()
                if type_ not in _LAZY or now - self._last_fsync >= FSYNC_INTERVAL_S:
                    os.fsync(fh.fileno())
                    self._last_fsync = now
        return record

    def update_status(self, durable: bool = False, **fields: Any) -> None:
        """Merge ``fields`` into status.json and replace the file; ``durable`` also fsyncs it (final states)."""
        self.status.update(fields)
        self.status.setdefault("pid", os.getpid())
        self.status.setdefault("host", socket.gethostname())
        self.status["updated"] = time.time()
        if not self.enabled:
            return
        text = json.dumps(self.status, indent=2, default=_jsonable)
        if durable:
            atomic_write_text(self.status_path, text)
        else:
            # One writer per run (it holds the run lock), so a fixed temporary name is safe.
            tmp = self.run_dir / ".status.json.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.status_path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
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
    """status.json as a dict; {} while it does not exist yet."""
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
