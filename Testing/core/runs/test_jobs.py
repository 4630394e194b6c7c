"""Background jobs: detached start, status, cancel (SIGTERM -> checkpoint), the run lock, crash detection."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from fmabs_core.runs import jobs
from fmabs_core.cli import build_parser, main
from fmabs_core.cli.jobs_cmds import train_argv
from fmabs_core.training.config import TrainConfig
from fmabs_core.data.project import Project
from fmabs_core.training.engine import Trainer
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.nets import NetConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_opts(project: Project, run: str, iterations: int = 400) -> list[str]:
    return ["--project", str(project.root), "--run", run, "--iterations", str(iterations), "--patch-size", "16", "16",
            "16", "--width", "4", "--batch-size", "2", "--ckpt-every", "1000", "--val-every", "1000", "--device", "cpu"]


@pytest.mark.slow
def test_start_status_lock_cancel(project, monkeypatch, capsys):
    """A real detached job: status while it runs, a second job refused, cancel leaves a loadable checkpoint."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["jobs", "start", *_train_opts(project, "bg")]) == 0
    out = capsys.readouterr().out
    assert "started pid" in out and str(project.run_dir("bg")) in out
    run = project.run_dir("bg")
    deadline = time.time() + 120
    stale = []
    while time.time() < deadline:
        status = read_status(run)
        if status.get("state") == "running":
            stale.append(time.time() - status["updated"])
            if status.get("iteration", 0) >= 3:
                break
        assert jobs.job_status(run)["state"] in ("starting", "running", "not started"), (run / "train.log").read_text()
        time.sleep(0.05)
    assert read_status(run).get("iteration", 0) >= 3, (run / "train.log").read_text()[-3000:]
    pid = read_status(run)["pid"]

    # the lock: a second job on the same run is refused, naming the run and the pid
    assert main(["jobs", "start", *_train_opts(project, "bg")]) == 2
    err = capsys.readouterr().err
    assert "'bg'" in err and f"pid {pid}" in err
    cfg = TrainConfig.load(run / "config.json")
    with pytest.raises(jobs.RunBusyError, match=f"pid {pid}"):
        Trainer(project, "bg", cfg).train()
    assert read_status(run)["state"] == "running"  # the refused trainer wrote nothing

    assert main(["jobs", "status", "--project", str(project.root), "--run", "bg"]) == 0
    assert "bg: running" in capsys.readouterr().out

    t0 = time.time()
    final = jobs.cancel_job(run, timeout_s=60)
    cancel_s = time.time() - t0
    events = read_events(run)
    step_s = max(e["step_s"] for e in events if e["type"] == "progress")
    with capsys.disabled():
        print(f"\ncancel took {cancel_s:.2f} s (slowest step {step_s:.2f} s); "
              f"status.json staleness max {max(stale):.2f} s")
    assert final["state"] == "cancelled"
    assert cancel_s < step_s + 5 + 10  # one step + checkpoint + interpreter exit, with slack for a loaded machine
    assert events[-1]["type"] == "cancelled" and events[-1]["signal"] == 15
    state = torch.load(events[-1]["checkpoint"], weights_only=True)
    assert state["iteration"] == events[-1]["iteration"] == read_status(run)["iteration"]
    assert jobs.lock_holder(run) is None
    assert main(["jobs", "list", "--project", str(project.root)]) == 0
    assert "bg: cancelled" in capsys.readouterr().out


@pytest.mark.slow
def test_lock_rejects_second_trainer(project):
    cfg = TrainConfig(iterations=2, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                      net=NetConfig(width=4, out_channels=2))
    run = project.run_dir("locked")
    with jobs.RunLock(run):
        with pytest.raises(jobs.RunBusyError, match=rf"run 'locked' .* pid {os.getpid()}"):
            Trainer(project, "locked", cfg).train()
        with pytest.raises(jobs.RunBusyError, match=f"pid {os.getpid()}"):
            jobs.start_job(run, ["--project", str(project.root), "--run", "locked"])
        assert not (run / "status.json").exists() and not (run / "events.jsonl").exists()
        assert jobs.lock_holder(run)["pid"] == os.getpid()
    assert jobs.lock_holder(run) is None


def test_crashed_job_detected(project, capsys):
    run = project.run_dir("dead")
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "iteration": 7, "iterations": 10, "pid": 2**22 + 7,
                                                 "host": socket.gethostname(), "updated": time.time()}))
    status = jobs.job_status(run)
    assert status["state"] == "crashed" and status["resume"].endswith("--run dead")
    assert main(["jobs", "status", "--project", str(project.root), "--run", "dead"]) == 1
    assert "resume with: fmabs jobs start" in capsys.readouterr().out
    # cancelling a crashed job is a no-op that reports the state
    assert jobs.cancel_job(run, timeout_s=1)["state"] == "crashed"


def test_train_argv_round_trip(project):
    opts = _train_opts(project, "x") + ["--no-augment", "--pseudo-warmup", "0.1", "--pseudo-stop", "0.5"]
    args = build_parser().parse_args(["jobs", "start", *opts])
    again = build_parser().parse_args(["train", *train_argv(args)])
    for key, value in vars(args).items():
        if key not in ("func", "command", "jobs_command"):
            assert getattr(again, key) == value, key


@pytest.mark.slow
def test_cancel_in_process_checkpoints(project):
    """request_cancel (what the SIGTERM handler does) mid-run: checkpoint, cancelled state, resumable."""
    from fmabs_core.training.api import Hook

    class CancelAt(Hook):
        def before_step(self, tr, it):
            if it == 2:
                tr.request_cancel()

    cfg = TrainConfig(iterations=6, device="cpu", patch_size=(16, 16, 16), batch_size=2, val_every=3, ckpt_every=100,
                      net=NetConfig(width=4, out_channels=2), max_val_cases=1)
    tr = Trainer(project, "c", cfg)
    tr.hooks.append(CancelAt())
    outcome = tr.train()
    assert outcome.state == "cancelled" and outcome.exit_code == 130 and outcome.iteration == 3
    run = project.run_dir("c")
    last = read_events(run)[-1]
    assert last["type"] == "cancelled" and last["iteration"] == 3 and last["signal"] is None
    assert "validation" not in [e["type"] for e in read_events(run)]  # skipped at 3: a cancel does not wait for it
    assert torch.load(last["checkpoint"], weights_only=True)["iteration"] == 3
    assert read_status(run)["state"] == "cancelled" and jobs.lock_holder(run) is None
    Trainer(project, "c", cfg).train()
    assert read_status(run)["state"] == "done"
    assert [e["iteration"] for e in read_events(run) if e["type"] == "started"] == [0, 3]


def test_start_refuses_a_finished_run(project, capsys):
    """`fmabs jobs start` on a finished run says so and starts nothing (it printed "started" and exited 0,
    and the job had nothing to do)."""
    opts = _train_opts(project, "finished", iterations=2)
    assert main(["train", *opts]) == 0
    capsys.readouterr()
    assert main(["jobs", "start", *opts]) == 2
    err = capsys.readouterr().err
    assert "has finished" in err and "--run" in err
    assert not (project.run_dir("finished") / "job.json").exists()


def test_cancel_never_signals_a_process_that_reused_the_jobs_pid(project):
    """A crashed job's pid now names another live process (pids are reused): cancel reports the crash and
    leaves that process alone. (Before: it sent the process SIGTERM, with --kill its whole tree.)"""
    import subprocess

    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run = project.run_dir("reused")
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": "running", "iteration": 3, "iterations": 10,
                                                     "pid": bystander.pid, "host": socket.gethostname(),
                                                     "updated": time.time() - 100}))
        # the job was launched (and died) long before the bystander started, under the pid it has now
        (run / "job.json").write_text(json.dumps({"pid": bystander.pid, "started": time.time(), "argv": ["fmabs"],
                                                  "host": socket.gethostname(), "log": str(run / "train.log"),
                                                  "created": time.time() - 3600}))
        assert jobs.job_status(run)["state"] == "crashed"
        assert jobs.cancel_job(run, timeout_s=1, kill_after=True)["state"] == "crashed"
        time.sleep(0.2)
        assert bystander.poll() is None, "the unrelated process was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_start_says_so_when_the_job_dies_at_once(project, monkeypatch, tmp_path, capsys):
    """A job whose interpreter fails before training (here a stand-in that prints an import error and exits 3,
    as a broken environment would) is reported with its exit code and the end of its log, and the command
    fails; before, `fmabs jobs start` printed "started pid N" and returned 0."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 3\n")
    broken.chmod(0o755)
    real = jobs.start_job
    monkeypatch.setattr(jobs, "start_job", lambda run_dir, argv, **kw: real(run_dir, argv, python=str(broken)))
    assert main(["jobs", "start", *_train_opts(project, "dies")]) == 1
    captured = capsys.readouterr()
    assert "started pid" not in captured.out
    assert "exited at once with code 3" in captured.err and "No module named 'torch'" in captured.err
    assert "train.log" in captured.err and jobs.job_status(project.run_dir("dies"))["state"] == "crashed"
