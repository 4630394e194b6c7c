"""No POSIX-only module on the paths a Windows user takes: the module, the jobs, the locks, the project.

REAL PROCESSES: a fresh interpreter in which ``fcntl`` cannot be imported (as on Windows) imports the
Slicer module's logic and jobs and fmabs_core's jobs, lock and project modules, then takes and is
refused a run lock and updates a project on real files. ``filelock`` falls back to its portable
lock there (on Windows it uses ``msvcrt``); nothing else is replaced.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CODE = textwrap.dedent("""
    import os, sys, warnings
    sys.modules["fcntl"] = None  # "import fcntl" raises ImportError from here on, as on Windows
    sys.path[:0] = [{repo!r}, {module!r}]
    warnings.simplefilter("ignore")  # filelock says it falls back to a soft lock
    import json
    from pathlib import Path

    from SlicerFMABSLib import jobs as slicer_jobs, logic  # noqa: F401
    from fmabs_core.data.project import Project
    from fmabs_core.runs import jobs
    from fmabs_core.runs.lock import RunBusyError, RunLock, lock_holder

    assert "fcntl" not in [m for m, v in sys.modules.items() if v is not None]
    root = Path(sys.argv[1])
    run = root / "runs" / "r"
    out = {{}}
    with RunLock(run) as lock:
        out["held"] = lock.held
        out["holder"] = lock_holder(run)["pid"] == os.getpid()
        try:
            RunLock(run, wait_s=0.2).acquire()
            out["refused"] = False
        except RunBusyError as exc:
            out["refused"] = str(exc)
        out["status_locked"] = jobs.job_status(run)["state"]
    out["free"] = lock_holder(run) is None
    out["reacquired"] = RunLock(run).acquire().held

    project = Project.create(root / "project", {{1: "x"}})
    project.update(lambda meta: meta.update(budget=7))
    out["budget"] = Project(root / "project").read()["budget"]
    out["alive"] = slicer_jobs.pid_alive(os.getpid())
    print(json.dumps(out))
""")


def test_modules_work_without_fcntl(tmp_path):
    """Needs VTK (slicer-core, in the test extra): a missing one fails under FMABS_STRICT_SKIPS."""
    pytest.importorskip("vtk", reason="SlicerFMABSLib.logic needs VTK (slicer-core)")
    code = CODE.format(repo=str(REPO), module=str(REPO / "SlicerFMABS"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["held"] and out["holder"] and out["free"] and out["reacquired"]
    assert "run 'r'" in out["refused"] and "already being trained by pid" in out["refused"]
    assert out["status_locked"] == "starting"  # held, no status.json yet: a job that is starting
    assert out["budget"] == 7 and out["alive"]
