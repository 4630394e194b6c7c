"""The run lock (filelock) and the process helpers (psutil), on real processes.

Every test starts real Python processes: a holder of a run lock in another process, a child that
spawns a sleeping grandchild, a zombie. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fmabs_core.contract import LOCK_FILE
from fmabs_core.runs import process
from fmabs_core.runs.lock import HOLDER_FILE, RunBusyError, RunLock, lock_holder, pid_alive

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, timeout=30.0, what="condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


HOLDER = """
    import sys, time
    from fmabs_core.runs.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_held_by_another_process(tmp_path):
    """A second trainer is refused naming the holder; kill -9 of the holder frees the run."""
    run = tmp_path / "runs" / "r"
    holder = _python(HOLDER, str(run))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        info = lock_holder(run)
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname() and info["since"] <= time.time()
        t0 = time.monotonic()
        with pytest.raises(RunBusyError, match=rf"run 'r' .* already being trained by pid {holder.pid} on "):
            RunLock(run, wait_s=0.3).acquire()
        assert 0.25 < time.monotonic() - t0 < 10  # it retried for wait_s before giving up
        assert process.pid_alive(holder.pid)
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder; the OS drops the lock
        holder.wait(30)
    assert (run / HOLDER_FILE).exists()  # the dead holder could not remove its note...
    assert lock_holder(run) is None  # ...but nobody holds the lock
    assert not process.pid_alive(holder.pid)
    with RunLock(run) as lock:
        assert lock.held and lock_holder(run)["pid"] == os.getpid()  # a fresh note, not the dead one's
    assert lock_holder(run) is None and not (run / HOLDER_FILE).exists()


def test_lock_in_process_and_holder_file(tmp_path):
    run = tmp_path / "run"
    assert lock_holder(run) is None  # no folder, no lock file
    lock = RunLock(run)
    lock.acquire()
    assert lock.acquire() is lock and lock.held  # re-acquiring a held lock is a no-op
    note = json.loads((run / HOLDER_FILE).read_text())
    assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
    assert (run / LOCK_FILE).exists()
    with pytest.raises(RunBusyError, match=f"pid {os.getpid()}"):
        RunLock(run, wait_s=0).acquire()  # a second lock object in the same process is refused too
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and lock_holder(run) is None


def test_kill_tree_kills_child_and_grandchild():
    """The PythonSlicer case: a launcher whose real work runs in a grandchild that ignores nothing."""
    parent = _python("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                  "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                                  "print(g.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        grandchild = child.stdout.readline().strip()
        print(child.pid, grandchild, flush=True)
        time.sleep(120)
    """)
    try:
        child, grandchild = map(int, parent.stdout.readline().split())
        for pid in (parent.pid, child, grandchild):
            assert process.pid_alive(pid)
        t0 = time.monotonic()
        assert process.kill_tree(parent.pid, timeout=10) == []
        assert time.monotonic() - t0 < 10  # SIGTERM was enough: no wait for the kill
        assert parent.wait(10) == -signal.SIGTERM  # our child's exit code was left for Popen to read
        _wait_for(lambda: not process.pid_alive(child) and not process.pid_alive(grandchild), 10, "the tree to go")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
    assert process.kill_tree(parent.pid) == []  # gone already: nothing to do


def test_kill_tree_kills_what_ignores_sigterm():
    stubborn = _python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        assert process.kill_tree(stubborn.pid, timeout=0.5) == []
        assert stubborn.wait(10) == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait(10)


def test_pid_alive_and_zombies():
    assert process.pid_alive(os.getpid()) and pid_alive(os.getpid())
    assert not process.pid_alive(None) and not process.pid_alive(0) and not process.pid_alive(-3)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # not reaped: a zombie until Popen.wait, which must still find its exit code
    _wait_for(lambda: not process.pid_alive(child.pid), 30, "the child to exit")
    assert child.wait(10) == 0
    assert not process.pid_alive(child.pid)
    assert not process.terminate(child.pid)  # no such process any more


def test_terminate_lets_the_process_clean_up():
    polite = _python("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("checkpointed", flush=True), sys.exit(130)))
        print("ready", flush=True)
        time.sleep(120)
    """)
    assert polite.stdout.readline().strip() == "ready"
    assert process.terminate(polite.pid)
    assert polite.wait(30) == 130 and polite.stdout.read().strip() == "checkpointed"


def test_detached_popen_kwargs():
    kwargs = process.detached_popen_kwargs()
    if os.name == "nt":  # pragma: no cover - Windows
        assert kwargs["creationflags"] & subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        assert kwargs == {"start_new_session": True}
