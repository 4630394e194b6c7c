"""Checkpoints: written atomically (temp file, fsync, rename), the last N kept plus the best.

A checkpoint is an untrusted file: it is loaded with ``weights_only=True``. A corrupt or truncated
newest checkpoint is detected on load, renamed to ``*.corrupt`` (kept for inspection, out of the
rotation) and the previous one is used, with a warning. A process killed while writing leaves only
a hidden temporary file, which the next owner of the run removes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fmabs_core.errors import disk_full

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^iter_(\d+)\.pt$")
_TMP_PREFIX = "."


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a hidden temporary file beside ``path``, fsync, then rename over ``path``.

    Serialised in memory first and written with plain writes, so that a full disk is the system's "no space"
    error (a :class:`DiskFull` naming the file) rather than torch's opaque "unexpected pos" from its zip writer."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        full = disk_full(path, exc)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a clear error for files that are not checkpoints."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


class CheckpointStore:
    """The ``checkpoints/`` folder of a run: ``iter_NNNNNNN.pt`` (the last ``keep_last``) and ``best.pt``."""

    def __init__(self, folder: Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def iteration_files(self) -> list[tuple[int, Path]]:
        if not self.folder.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def path_for(self, iteration: int) -> Path:
        return self.folder / f"iter_{iteration:07d}.pt"

    def save(self, state: dict, iteration: int) -> Path:
        """Write the checkpoint of ``iteration``, then drop all but the newest ``keep_last``."""
        path = self.path_for(iteration)
        save_atomic(state, path)
        for _, old in self.iteration_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict) -> Path:
        path = self.folder / "best.pt"
        save_atomic(state, path)
        return path

    def clean_temporary(self) -> int:
        """Remove temporary files left by a writer that was killed; only the run's owner may call this."""
        if not self.folder.exists():
            return 0
        stale = [p for p in self.folder.iterdir() if p.name.startswith(_TMP_PREFIX) and p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted checkpoint in %s", len(stale), self.folder)
        return len(stale)

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """Newest loadable checkpoint; unreadable ones are set aside as ``*.corrupt`` with a warning.

        Returns None when there is no usable checkpoint (a fresh run).
        """
        for _, path in reversed(self.iteration_files()):
            try:
                state = load_checkpoint(path, map_location)
                if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
                    raise RuntimeError("not a training checkpoint (no 'iteration' or 'model' entry)")
                return state
            except Exception as exc:  # noqa: BLE001 - any failure means: use the previous one
                aside = path.with_name(path.name + ".corrupt")
                log.warning("checkpoint %s is unreadable (%s); set aside as %s, falling back to the previous one",
                            path, exc, aside.name)
                try:
                    os.replace(path, aside)
                except OSError:
                    pass
        return None
