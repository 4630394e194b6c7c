"""Processes of background jobs on Linux, macOS and Windows: alive?, polite stop, kill a whole tree.

Everything goes through ``psutil`` rather than ``os.kill(pid, 0)`` (on Windows ``os.kill`` with any
signal but the two console events *terminates* the process) or ``/proc`` (Linux only).

Stopping a job politely differs per system:

- POSIX: SIGTERM. The trainer's handler finishes the step, checkpoints and exits with 130.
- Windows: there are no signals between processes. ``CTRL_BREAK_EVENT`` reaches a process only when
  it leads its own process group (``CREATE_NEW_PROCESS_GROUP``) *and* shares a console with the
  sender. A detached job (``CREATE_NO_WINDOW``, needed so that it outlives the terminal) has no
  console, the trainer under Slicer's launcher leads no group, and an event for an id that is no
  group of our console is not delivered to it (it may even reach the sender's own group), so
  :func:`terminate` uses ``TerminateProcess``: the job stops at once, the work since its last
  checkpoint is lost and a resume continues from that checkpoint.

Slicer starts jobs through ``PythonSlicer``, a launcher that runs the real interpreter as its
child and forwards no signal: signal the process that holds the run lock, or use
:func:`kill_tree` on the launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any, Sequence

import psutil

log = logging.getLogger(__name__)

WINDOWS = os.name == "nt"


def pid_alive(pid: int | None) -> bool:
    """True when a process with this id exists and has not exited (a zombie, exited but not yet
    reaped by its parent, counts as gone: it does no work and holds no lock)."""
    if not pid or int(pid) <= 0:
        return False
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # includes ZombieProcess on systems that raise it
        return False
    except psutil.AccessDenied:  # another user's live process
        return True


def created(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), or None when there is no such process."""
    try:
        return float(psutil.Process(int(pid)).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_process(pid: int | None, started: float | None) -> bool:
    """Whether ``pid`` is alive and still the process that was started at ``started`` (from :func:`created`).

    A process id is reused once its process has gone: a crashed job's recorded pid may name another user's
    program by now, which must never be signalled. Without a recorded start time only liveness is known."""
    if not pid_alive(pid):
        return False
    if started is None:
        return True
    now = created(int(pid))
    return now is not None and abs(now - float(started)) < 1.0


def terminate(pid: int) -> bool:
    """Ask one process to stop: SIGTERM on POSIX (the trainer checkpoints first), TerminateProcess on
    Windows (immediate; see the module docstring). Returns False when there was no such process."""
    try:
        proc = psutil.Process(int(pid))
        if WINDOWS:
            log.info("terminating pid %d (Windows: no checkpoint; a resume starts from the last one)", pid)
            proc.terminate()
        else:
            proc.send_signal(signal.SIGTERM)
        return True
    except psutil.NoSuchProcess:
        return False


def kill_tree(pid: int, timeout: float = 5.0, sig: int | None = None) -> list[int]:
    """Stop a process and all its descendants (children, grandchildren...); returns the pids still alive.

    The tree is listed first (children of a dead parent are re-parented and could no longer be
    found). Each process gets ``sig`` (default: ``terminate()``, i.e. SIGTERM / TerminateProcess);
    whatever still runs after ``timeout`` seconds is killed (SIGKILL / TerminateProcess).
    """
    try:
        parent = psutil.Process(int(pid))
    except psutil.NoSuchProcess:
        return []
    try:
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        procs = [parent]
    for proc in procs:
        try:
            if sig is None:
                proc.terminate()
            else:
                proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    alive = _wait_gone(procs, timeout)
    if alive:
        log.warning("killing %s: still running %.1f s after being asked to stop", [p.pid for p in alive], timeout)
        for proc in alive:
            try:
                proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        alive = _wait_gone(alive, 5.0)
    return [p.pid for p in alive]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running after up to ``timeout`` s. Polls rather than ``psutil.wait_procs``,
    which would reap our own children and so hide their exit code from ``subprocess.Popen``."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def detached_popen_kwargs() -> dict[str, Any]:
    """``subprocess.Popen`` options that detach a job from the caller's terminal and its Ctrl+C.

    POSIX: a new session. Windows: a new process group without a console window (the job outlives
    the terminal; see the module docstring for what that means for a polite cancel).
    """
    if WINDOWS:
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}
