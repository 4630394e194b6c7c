"""Background training jobs: a run lock, detached launch, status (with crash detection) and cancel.

A job is ``python -m fmabs_core train ...`` detached from the caller (its own session on POSIX,
its own process group without a console on Windows), so closing the terminal or Slicer does not
stop it. The training process holds ``runs/<run>/.lock`` (:mod:`fmabs_core.runs.lock`) for its
whole life: the operating system drops the lock when the process dies, even on ``kill -9``, so
"status.json says running but nobody holds the lock" means the job crashed. Everything here only
reads the run folder (and stops processes); the training process is the only writer of events,
status and checkpoints. Processes are handled with psutil (:mod:`fmabs_core.runs.process`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fmabs_core.contract import (CRASHED, EVENTS_FILE, FINAL_STATES, JOB_FILE, LOCK_FILE, LOG_FILE, RUNNING, RUNS_DIR,
                                 STARTING, fmabs_argv, planes_line)
from fmabs_core.errors import FmabsError
from fmabs_core.runs import process
from fmabs_core.runs.events import read_status
from fmabs_core.runs.lock import RunBusyError, RunLock, lock_holder, pid_alive, read_json

__all__ = ["CRASHED", "FINAL_STATES", "JOB_FILE", "LOCK_FILE", "LOG_FILE", "Job", "RunBusyError", "RunLock",
           "cancel_job", "job_status", "list_runs", "lock_holder", "pid_alive", "planes_rounds", "resume_hint",
           "start_job", "summary_line"]

log = logging.getLogger(__name__)


# ---- launching ----------------------------------------------------------------------------------
@dataclass
class Job:
    pid: int
    run_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None


def start_job(run_dir: Path, train_argv: Sequence[str], python: str | None = None,
              env: dict[str, str] | None = None) -> Job:
    """Launch ``fmabs train <train_argv>`` detached (output to train.log; see the module docstring).

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
    argv = fmabs_argv(["train", *map(str, train_argv)], python or sys.executable)
    log_path = run_dir / LOG_FILE
    job_env = dict(os.environ if env is None else env)
    job_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                close_fds=True, env=job_env, **process.detached_popen_kwargs())
    info = {"pid": proc.pid, "argv": argv, "started": time.time(), "host": socket.gethostname(), "log": str(log_path),
            "created": process.created(proc.pid)}  # with the pid, names this very process (pids are reused)
    tmp = run_dir / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / JOB_FILE)
    log.info("started pid %d for %s (log %s)", proc.pid, run_dir, log_path)
    return Job(proc.pid, run_dir, log_path, proc)


def confirm_started(job: Job, timeout_s: float = 30.0, poll_s: float = 0.2) -> str | None:
    """Wait until a job just started holds its run's lock (or ``timeout_s`` passes); a message naming the exit code
    and the end of its log when it exited with an error first (a broken environment, a missing package), else
    None. So ``fmabs jobs start`` says "started" only for a job that did not die at once."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        code = job.process.poll() if job.process is not None else None
        if code is not None:
            if code == 0:
                return None  # already finished: a run with nothing left to do
            try:
                tail = job.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            except OSError:
                tail = []
            return (f"the job exited at once with code {code}; the end of its log {job.log_path}:\n  "
                    + "\n  ".join(tail))
        if lock_holder(job.run_dir) is not None:
            return None
        time.sleep(poll_s)
    return None


# ---- status -------------------------------------------------------------------------------------
def resume_hint(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    return f"fmabs jobs start --project {run_dir.parent.parent} --run {run_dir.name}"


def job_status(run_dir: Path) -> dict[str, Any]:
    """status.json plus what a reader can infer: ``state`` becomes ``CRASHED`` when the file says
    starting/running but no process holds the run (killed, out of memory, machine restarted), and
    "starting" while a just-launched job has not written its status yet."""
    run_dir = Path(run_dir)
    status = dict(read_status(run_dir))
    job = read_json(run_dir / JOB_FILE)
    holder = lock_holder(run_dir)
    state = status.get("state")
    if holder is not None:
        status["pid"] = holder.get("pid", status.get("pid"))
        if state not in (STARTING, RUNNING):
            state = STARTING  # a fresh process owns the run but has not written its status yet
    elif job and float(job.get("started", 0)) > float(status.get("updated", 0)):
        # launched after the last status write and not holding the lock (yet, or any more)
        if _is_job(job):
            state, status["pid"] = STARTING, job.get("pid")
        elif state not in FINAL_STATES or state is None:
            state = CRASHED
            status.setdefault("error", f"the job (pid {job.get('pid')}) exited before training started; "
                              f"see {run_dir / LOG_FILE}")
    elif state in (STARTING, RUNNING):
        if status.get("host") not in (None, socket.gethostname()):
            status["note"] = f"running on {status['host']}: cannot check the process from here"
        else:
            state = CRASHED
    status["state"] = state or "not started"
    status["run"] = status.get("run", run_dir.name)
    if status["state"] == CRASHED:
        status["resume"] = resume_hint(run_dir)
    return status


def summary_line(status: dict[str, Any]) -> str:
    """One line for humans: state, progress, ETA, last loss and validation Dice."""
    parts = [f"{status.get('run', '?')}: {status['state']}"]
    if status.get("iteration") is not None and status.get("iterations"):
        parts.append(f"iteration {status['iteration']}/{status['iterations']}")
    if status["state"] == RUNNING and status.get("eta_s") is not None:
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
    if status["state"] == CRASHED:
        line += f"\n  the process is gone without a final state; resume with: {status['resume']}"
    if status.get("note"):
        line += f"\n  note: {status['note']}"
    return line


#: what ``fmabs jobs status --json`` keeps of a pseudo_label event that scored the expert's drawn planes
PLANES_FIELDS = ("round", "iteration", "planes_scans", "planes_teacher_dice", "planes_pseudo_dice", "planes_gain",
                 "fusion", "planes_gain_heldout", "teacher_cut", "teacher_voxels_removed", "warning")


def planes_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The pseudo-label rounds of a run that scored the expert's drawn slices, oldest first.

    Each is :data:`PLANES_FIELDS` of its ``pseudo_label`` event plus ``line``, the user-facing sentence
    (:func:`fmabs_core.contract.planes_line`). A round written again after a resume replaces the earlier
    one. Cheap on a long events.jsonl: only the lines that mention ``pseudo_label`` are parsed.
    """
    rounds: dict[Any, dict[str, Any]] = {}
    try:
        with open(Path(run_dir) / EVENTS_FILE, "rb") as fh:
            for raw in fh:
                if b'"pseudo_label"' not in raw:
                    continue
                try:
                    event = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    continue  # a line cut short by a killed writer, or one being written now
                if not isinstance(event, dict) or event.get("type") != "pseudo_label":
                    continue
                line = planes_line(event)
                if line is None:
                    continue
                key = event.get("round")
                key = key if isinstance(key, (int, str)) else len(rounds)
                rounds[key] = {**{k: event.get(k) for k in PLANES_FIELDS if k in event}, "line": line}
    except FileNotFoundError:
        return []
    except OSError as exc:  # unreadable events: the status itself is still worth showing
        log.warning("%s: cannot read the pseudo-label rounds: %s", run_dir, exc)
    return list(rounds.values())


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def list_runs(project_root: Path) -> list[dict[str, Any]]:
    """job_status of every run folder of a project, oldest first."""
    runs = Path(project_root) / RUNS_DIR
    if not runs.is_dir():
        return []
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    return [job_status(d) for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]


# ---- cancelling ---------------------------------------------------------------------------------
def _is_job(job: dict[str, Any]) -> bool:
    """Whether job.json's pid is still the job it launched (not a later process that got the same id)."""
    return process.is_process(job.get("pid"), job.get("created"))


def cancel_job(run_dir: Path, timeout_s: float = 60.0, kill_after: bool = False) -> dict[str, Any]:
    """Ask the process that holds the run to stop, then wait for it to checkpoint and let go of the run.

    POSIX: SIGTERM. Windows: TerminateProcess (no checkpoint: a resume continues from the last
    periodic one; see :mod:`fmabs_core.runs.process` for why no console event is used).
    Returns the final job_status. With ``kill_after``, a job still running after ``timeout_s`` is
    killed with all its child processes (the work since its last checkpoint is lost); otherwise a
    TimeoutError is raised.
    """
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir)
    pid = (holder or {}).get("pid")
    if holder is None:
        job = read_json(run_dir / JOB_FILE)
        if job and _is_job(job):
            pid = job["pid"]  # launched but not yet holding the lock
        else:
            status = job_status(run_dir)
            log.info("%s is not running (state %s)", run_dir.name, status["state"])
            return status
    if not pid:
        raise FmabsError(f"{run_dir}: the run is locked but names no process (yet); try again in a moment")
    if holder is not None and holder.get("host") not in (None, socket.gethostname()):
        raise FmabsError(f"run '{run_dir.name}' is trained on {holder['host']} (pid {pid}): cancel it there")
    pid = int(pid)
    log.info("asking pid %d to stop (%s)", pid, run_dir.name)
    process.terminate(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Done when the job has let go of the run (a resume may start now) with a final state;
        # the interpreter's own exit may take a moment longer and does not matter to the run.
        if lock_holder(run_dir) is None:
            status = job_status(run_dir)
            if status["state"] in FINAL_STATES or not pid_alive(pid):
                return status
        time.sleep(0.05)
    if kill_after:
        log.warning("pid %d did not stop within %.0f s: killing it and its child processes", pid, timeout_s)
        process.kill_tree(pid, timeout=0.0)
        deadline = time.monotonic() + 10.0
        while lock_holder(run_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        return job_status(run_dir)
    raise TimeoutError(f"pid {pid} did not stop within {timeout_s:.0f} s (it finishes the current step and "
                       "checkpoints first); wait longer or use --kill")
