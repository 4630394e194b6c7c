"""Background training jobs: a run lock, detached launch, status (with crash detection) and cancel.

A job is ``python -m fmabs_core train ...`` in its own session, so closing the terminal or Slicer
does not stop it. The training process holds ``runs/<run>/.lock`` (``fcntl.flock``) for its whole
life: the kernel drops the lock when the process dies, even on ``kill -9``, so "status.json says
running but nobody holds the lock" means the job crashed. Everything here only reads the run folder
(and sends signals); the training process is the only writer of events, status and checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import FmabsError
from .events import read_status

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
JOB_FILE = "job.json"
LOG_FILE = "train.log"
FINAL_STATES = ("done", "failed", "cancelled")


class RunBusyError(FmabsError):
    """Another process is training this run."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """Exclusive ownership of a run folder by one training process, for that process's lifetime.

    The lock file also names its holder (pid, host, start time) so that a refused process can say
    who has the run. ``flock`` is advisory and local: on a network file system shared by several
    machines it may not exclude a process on another host.
    """

    def __init__(self, run_dir: Path, wait_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.wait_s = wait_s  # `fmabs jobs status` probes the lock for microseconds: retry briefly
        self._fh: Any = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> "RunLock":
        if self._fh is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.close()
                    holder = lock_holder(self.run_dir) or {}
                    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                    raise RunBusyError(
                        f"run '{self.run_dir.name}' ({self.run_dir}) is already being trained by {who}; "
                        f"cancel it first ('fmabs jobs cancel --project ... --run {self.run_dir.name}') "
                        "or choose another --run") from None
                time.sleep(0.05)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run's lock ({"pid", "host", "since"}), or None when nobody does."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                data = json.loads(fh.read() or "{}")
            except json.JSONDecodeError:
                data = {}
            return data if isinstance(data, dict) and data else {"pid": None}
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- launching ----------------------------------------------------------------------------------
@dataclass
class Job:
    pid: int
    run_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None


def start_job(run_dir: Path, train_argv: Sequence[str], python: str | None = None,
              env: dict[str, str] | None = None) -> Job:
    """Launch ``fmabs train <train_argv>`` detached (new session, output to train.log).

    Returns at once. Refuses when the run is locked by a live job. The caller is the parent: a
    long-lived caller should ``poll()`` the returned process now and then to reap it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunBusyError(f"run '{run_dir.name}' ({run_dir}) is already being trained by pid "
                           f"{holder.get('pid', '?')} on {holder.get('host', '?')}; "
                           "cancel it first or choose another --run")
    argv = [python or sys.executable, "-m", "fmabs_core.jobs", "train", *map(str, train_argv)]
    log_path = run_dir / LOG_FILE
    job_env = dict(os.environ if env is None else env)
    job_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=job_env)
    info = {"pid": proc.pid, "argv": argv, "started": time.time(), "host": socket.gethostname(), "log": str(log_path)}
    tmp = run_dir / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / JOB_FILE)
    log.info("started pid %d for %s (log %s)", proc.pid, run_dir, log_path)
    return Job(proc.pid, run_dir, log_path, proc)


# ---- status -------------------------------------------------------------------------------------
def resume_hint(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    return f"fmabs jobs start --project {run_dir.parent.parent} --run {run_dir.name}"


def job_status(run_dir: Path) -> dict[str, Any]:
    """status.json plus what a reader can infer: ``state`` becomes "crashed" when the file says
    starting/running but no process holds the run (killed, out of memory, machine restarted), and
    "starting" while a just-launched job has not written its status yet."""
    run_dir = Path(run_dir)
    status = dict(read_status(run_dir))
    job = _read_json(run_dir / JOB_FILE)
    holder = lock_holder(run_dir)
    state = status.get("state")
    if holder is not None:
        status["pid"] = holder.get("pid", status.get("pid"))
        if state not in ("starting", "running"):
            state = "starting"  # a fresh process owns the run but has not written its status yet
    elif job and float(job.get("started", 0)) > float(status.get("updated", 0)):
        # launched after the last status write and not holding the lock (yet, or any more)
        if pid_alive(job.get("pid")) and not _is_zombie(job.get("pid")):
            state, status["pid"] = "starting", job.get("pid")
        elif state not in FINAL_STATES or state is None:
            state = "crashed"
            status.setdefault("error", f"the job (pid {job.get('pid')}) exited before training started; "
                              f"see {run_dir / LOG_FILE}")
    elif state in ("starting", "running"):
        if status.get("host") not in (None, socket.gethostname()):
            status["note"] = f"running on {status['host']}: cannot check the process from here"
        else:
            state = "crashed"
    status["state"] = state or "not started"
    status["run"] = status.get("run", run_dir.name)
    if status["state"] == "crashed":
        status["resume"] = resume_hint(run_dir)
    return status


def _is_zombie(pid: int | None) -> bool:
    """A child that exited but was not reaped yet (its parent is still alive)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def summary_line(status: dict[str, Any]) -> str:
    """One line for humans: state, progress, ETA, last loss and validation Dice."""
    parts = [f"{status.get('run', '?')}: {status['state']}"]
    if status.get("iteration") is not None and status.get("iterations"):
        parts.append(f"iteration {status['iteration']}/{status['iterations']}")
    if status["state"] == "running" and status.get("eta_s") is not None:
        parts.append(f"ETA {_fmt_s(float(status['eta_s']))}")
    losses = status.get("losses") or {}
    if "loss" in losses:
        parts.append(f"loss {float(losses['loss']):.4f}")
    metrics = status.get("metrics") or {}
    if metrics.get("val_dice") is not None:
        parts.append(f"val Dice {float(metrics['val_dice']):.4f}")
    if status.get("updated"):
        parts.append(f"updated {_fmt_s(time.time() - float(status['updated']))} ago")
    line = ", ".join(parts)
    if status["state"] == "failed" and status.get("error"):
        line += f"\n  error: {status['error']}"
    if status["state"] == "crashed":
        line += f"\n  the process is gone without a final state; resume with: {status['resume']}"
    if status.get("note"):
        line += f"\n  note: {status['note']}"
    return line


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def list_runs(project_root: Path) -> list[dict[str, Any]]:
    """job_status of every run folder of a project, oldest first."""
    runs = Path(project_root) / "runs"
    if not runs.is_dir():
        return []
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    return [job_status(d) for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]


# ---- cancelling ---------------------------------------------------------------------------------
def cancel_job(run_dir: Path, timeout_s: float = 60.0, kill_after: bool = False) -> dict[str, Any]:
    """SIGTERM the process that holds the run, then wait for it to checkpoint and let go of the run.

    Returns the final job_status. With ``kill_after``, a job still running after ``timeout_s`` is
    killed (SIGKILL: the work since its last checkpoint is lost); otherwise a TimeoutError is raised.
    """
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir)
    pid = (holder or {}).get("pid")
    if holder is None:
        job = _read_json(run_dir / JOB_FILE)
        if job and pid_alive(job.get("pid")) and not _is_zombie(job.get("pid")):
            pid = job["pid"]  # launched but not yet holding the lock
        else:
            status = job_status(run_dir)
            log.info("%s is not running (state %s)", run_dir.name, status["state"])
            return status
    if not pid:
        raise FmabsError(f"{run_dir}: the run is locked but its lock file names no process")
    log.info("sending SIGTERM to pid %d (%s)", pid, run_dir.name)
    os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Done when the job has let go of the run (a resume may start now) with a final state;
        # the interpreter's own exit may take a moment longer and does not matter to the run.
        if lock_holder(run_dir) is None:
            status = job_status(run_dir)
            if status["state"] in (*FINAL_STATES, "crashed") or not pid_alive(int(pid)) or _is_zombie(int(pid)):
                return status
        time.sleep(0.05)
    if kill_after:
        log.warning("pid %d did not stop within %.0f s: killing it", pid, timeout_s)
        os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        return job_status(run_dir)
    raise TimeoutError(f"pid {pid} did not stop within {timeout_s:.0f} s (it finishes the current step and "
                       "checkpoints first); wait longer or use --kill")


def _job_main(argv: list[str]) -> None:
    """Entry point of detached jobs (``python -m fmabs_core.jobs train ...``).

    Runs the CLI, then leaves with ``os._exit``: the interpreter's teardown with torch and MONAI
    loaded takes 2-5 s on a busy machine and a finished job has nothing left to clean up, so
    ``jobs cancel`` sees the process gone about as soon as the run is cancelled.
    """
    from .cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then leave
        import traceback

        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _job_main(sys.argv[1:])
