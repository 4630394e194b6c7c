"""Checkpoints: written atomically (temp file, fsync, rename), the last N kept plus the best.

A checkpoint is an untrusted file: it is loaded with ``weights_only=True``. A corrupt or truncated
newest checkpoint is detected on load and the previous one is used, with a warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^iter_(\d+)\.pt$")


def save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a clear error for files that are not checkpoints."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


class CheckpointStore:
    """The ``checkpoints/`` folder of a run."""

    def __init__(self, folder: Path, keep_last: int = 3):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def iteration_files(self) -> list[tuple[int, Path]]:
        if not self.folder.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def save(self, state: dict, iteration: int) -> Path:
        path = self.folder / f"iter_{iteration:07d}.pt"
        save_atomic(state, path)
        for _, old in self.iteration_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict) -> Path:
        path = self.folder / "best.pt"
        save_atomic(state, path)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """Newest loadable checkpoint, skipping corrupt ones with a warning; None when there is none."""
        for iteration, path in reversed(self.iteration_files()):
            try:
                state = load_checkpoint(path, map_location)
                if not isinstance(state, dict) or "iteration" not in state:
                    raise RuntimeError("no 'iteration' entry")
                return state
            except Exception as exc:
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, exc)
        return None
