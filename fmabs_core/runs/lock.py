"""Exclusive ownership of a run folder by one training process, and who holds it.

The lock is ``filelock.FileLock`` on ``runs/<run>/.lock``: ``flock`` on Linux and macOS,
``msvcrt.locking`` on Windows. Either way the operating system drops it when the process dies, even
on ``kill -9`` / TerminateProcess, so "nobody holds the lock" means "no process trains this run".

Who holds it (pid, host, start time) is written beside it, in ``.lock.json``: a locked file cannot
be read by other processes on Windows, so the lock file itself carries nothing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fmabs_core.contract import LOCK_FILE
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.runs.process import pid_alive

__all__ = ["LOCK_FILE", "HOLDER_FILE", "RunBusyError", "RunLock", "lock_holder", "pid_alive", "read_json"]

#: the holder's {pid, host, since}, written after taking the lock and removed before letting go
HOLDER_FILE = LOCK_FILE + ".json"


class RunBusyError(FmabsError):
    """Another process is training this run."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_lock_file(path: Path) -> None:
    """A run's lock file must be a plain file (or absent): a folder or a link there is damage (or a trick), named
    with what to do rather than failing inside the lock library."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "not a plain file"
        raise InputError(f"{path}: the run's lock file is {kind}; the run folder is damaged. Remove {path} "
                         "(nothing else in the run is lost) and run the command again.")


class RunLock:
    """Exclusive ownership of a run folder by one training process, for that process's lifetime.

    ``.lock.json`` names the holder so that a refused process can say who has the run. The lock is
    advisory and local: on a network file system shared by several machines it may not exclude a
    process on another host.
    """

    def __init__(self, run_dir: Path, wait_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.holder_path = self.run_dir / HOLDER_FILE
        self.wait_s = wait_s  # `fmabs jobs status` probes the lock for microseconds: retry briefly
        self._lock: FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> "RunLock":
        if self._lock is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        check_lock_file(self.path)
        lock = FileLock(str(self.path), thread_local=False)
        try:
            lock.acquire(timeout=self.wait_s, poll_interval=0.05)
        except Timeout:
            holder = lock_holder(self.run_dir) or {}
            who = f"pid {holder.get('pid') or '?'} on {holder.get('host') or '?'}"
            raise RunBusyError(
                f"run '{self.run_dir.name}' ({self.run_dir}) is already being trained by {who}; "
                f"cancel it first ('fmabs jobs cancel --project ... --run {self.run_dir.name}') "
                "or choose another --run") from None
        except OSError as exc:  # e.g. a read-only run folder
            raise InputError(f"{self.path}: the run's lock file cannot be created ({exc.strerror}); make "
                             f"{self.run_dir} writable, or choose another --run") from None
        try:
            _write_json(self.holder_path, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            try:  # first: a reader that finds the lock free never needs it, one that finds it held may
                self.holder_path.unlink()
            except OSError:  # gone already, or being read on Windows: the next holder overwrites it
                pass
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run's lock ({"pid", "host", "since"}), or None when nobody does.

    Probes the lock without waiting (a trainer starting at that instant retries for ``wait_s``).
    While held, ``pid`` is None when the holder has not named itself yet.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    if not path.exists() and not path.is_symlink():
        return None
    check_lock_file(path)
    probe = FileLock(str(path), thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return _read_holder(run_dir / HOLDER_FILE)
    except OSError:  # e.g. a read-only run folder: we cannot tell, so do not claim a holder
        return None
    probe.release()
    return None


def _read_holder(path: Path, wait_s: float = 0.5) -> dict[str, Any]:
    """The holder file, waiting briefly for a fresh holder to write it (an old one may name a dead process)."""
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    while True:
        data = read_json(path)
        if data and (data.get("host") != host or pid_alive(data.get("pid"))):
            return data
        if time.monotonic() >= deadline:
            return {"pid": None}
        time.sleep(0.02)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new content, never half)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    for attempt in range(20):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:  # Windows: a reader has the old file open for a moment
            if attempt == 19:
                raise
            time.sleep(0.05)
