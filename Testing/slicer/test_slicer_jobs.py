"""The job watcher and launcher on real files and real child processes (no MRML).

REAL PROCESSES: the training tests below make the module's logic launch the real
``python -m fmabs_core train`` in a child process on a tiny real project (six 32^3 phantom scans,
a width-4 network, a few iterations on the CPU) and watch its real run folder, as the Train panel
does in Slicer. There is no stand-in ``fmabs_core``: the library runs here, so the tests run it
(a mock is only for what cannot run here, the Slicer application's Qt GUI; see test_widget_mock.py).
Each test takes a few seconds to ~20 s on a quiet 2-core machine (mostly the child's torch import).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slicer_helpers import TINY_TRAIN
from SlicerFMABSLib import jobs


def test_watcher_tolerates_missing_partial_and_bad_lines(tmp_path):
    run = tmp_path / "runs" / "r1"
    watcher = jobs.RunWatcher(run)
    status, lines = watcher.poll()  # no folder yet
    assert status.state == "not started" and lines == []

    run.mkdir(parents=True)
    (run / "status.json").write_text('{"state": "running", "iter')  # half-written
    events = run / "events.jsonl"
    events.write_text(
        json.dumps({"type": "started", "iteration": 0, "iterations": 100}) + "\n"
        + json.dumps({"type": "progress", "iteration": 10, "lr": 0.01, "loss": 0.5, "eta_s": 125}) + "\n"
        + "not json at all\n"
        + '{"type": "validation", "iteration": 10, "di'  # partial last line
    )
    status, lines = watcher.poll(process_running=True)
    assert status.iteration == 10 and status.eta_s == 125 and status.state == "running"
    assert len(lines) == 2 and "progress" in lines[1] and "ETA 2m 05s" in lines[1]
    assert status.val_dice is None

    with open(events, "a") as fh:  # the job finishes its line
        fh.write('ce": 0.8123, "per_case": {"a": 0.8}}\n')
    (run / "status.json").write_text(json.dumps(
        {"state": "running", "iteration": 20, "iterations": 100, "eta_s": 60.0, "val_dice": 0.8123, "pid": os.getpid()}))
    status, lines = watcher.poll()
    assert lines == ["[10] validation Dice 0.8123"]
    assert status.iteration == 20 and status.total == 100 and abs(status.fraction - 0.2) < 1e-9
    assert status.val_dice == pytest.approx(0.8123) and status.eta_text == "1m 00s"
    assert watcher.poll()[1] == []  # nothing new: nothing re-read

    with open(events, "a") as fh:
        fh.write(json.dumps({"type": "suggestion", "iteration": 30, "cases": [
            {"case": "la_007", "score": 0.41, "axial": {"index": 40, "ras": [1.0, 2.0, 3.0]},
             "coronal": {"index": 50, "ras": [1.0, 2.0, 3.0]}, "sagittal": {"index": 60, "ras": [1.0, 2.0, 3.0]}}]}) + "\n")
        fh.write(json.dumps({"type": "done", "iteration": 100, "model": "m.pt", "best_val_dice": 0.85}) + "\n")
    (run / "status.json").write_text(json.dumps({"state": "done", "iteration": 100, "iterations": 100, "eta_s": 0}))
    status, lines = watcher.poll()
    assert status.state == "done" and status.finished and status.fraction == 1.0
    assert status.val_dice == pytest.approx(0.8123)  # kept from the validation event
    assert "la_007" in lines[0] and lines[1] == "[100] done"
    assert jobs.parse_suggestions(watcher.last_suggestion)[0].slices["axial"] == {"index": 40, "ras": [1.0, 2.0, 3.0]}


def test_failed_and_crashed_runs(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "events.jsonl").write_text(json.dumps({"type": "failed", "iteration": 3, "message": "CUDA out of memory"}) + "\n")
    status, lines = jobs.RunWatcher(run).poll()
    assert status.state == "failed" and "CUDA out of memory" in status.error and "FAILED" in lines[0]

    run2 = tmp_path / "r2"
    run2.mkdir()
    dead = _dead_pid()
    (run2 / "status.json").write_text(json.dumps({"state": "running", "iteration": 5, "iterations": 9, "pid": dead}))
    status, _ = jobs.RunWatcher(run2).poll()
    assert status.state == jobs.CRASHED and status.finished and "without a final status" in status.error


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_parse_suggestions_forms():
    out = jobs.parse_suggestions('{"cases": [{"case": "a", "score": 1.5, "axial": {"index": 3, "ras": [0, 0, 1]}}]}')
    assert out[0].case == "a" and out[0].score == 1.5 and out[0].slices == {"axial": {"index": 3, "ras": [0, 0, 1]}}
    out = jobs.parse_suggestions([{"case": "b", "slices": {"coronal": 4}}, "c", 7, {"name": "no case key"}])
    assert [s.case for s in out] == ["b", "c"] and out[0].slices["coronal"] == {"index": 4, "ras": None}
    assert jobs.parse_suggestions({"suggestions": []}) == []


def test_contract_argv_and_status_spellings():
    """The module builds its command lines with fmabs_core.contract, like the CLI and the web front-end."""
    args = jobs.contract.train_args("/p", "run1", "fmabs", {"iterations": 200, "device": "cpu", "active": None})
    assert args == ["train", "--project", "/p", "--run", "run1", "--method", "fmabs", "--iterations", "200",
                    "--device", "cpu"]
    assert jobs.fmabs_argv(args, "/py")[:3] == ["/py", "-m", "fmabs_core"]
    assert jobs.fmabs_argv(["x"])[0] == jobs.python_executable()
    for bad in ("", "a/b", "..", ".hidden"):
        with pytest.raises(ValueError, match="not usable as a folder name"):
            jobs.contract.train_args("/p", bad, "sup")
    assert jobs.STRATEGIES[0] == "none" and set(jobs.STRATEGIES[1:]) == set(jobs.contract.STRATEGIES)
    assert jobs.EXPERTS[0] == "human" and set(jobs.EXPERTS) == set(jobs.contract.EXPERTS)
    assert jobs.GENERALISTS == jobs.contract.GENERALISTS and set(jobs.FINAL_STATES) >= {jobs.WAITING, jobs.CRASHED}
    assert jobs.format_event({"type": "waiting_for_labels", "iteration": 4, "cases": ["a", "b"]}) == \
        "[4] waiting for the expert's cross-labels: a, b"
    s = jobs.status_from_dict({"state": "done", "iteration": "7", "iterations": 10, "metrics": {"val_dice": 0.5}})
    assert (s.state, s.iteration, s.total, s.val_dice) == ("done", 7, 10, 0.5)
    s = jobs.status_from_dict({"state": "running", "stage": "finetune", "iteration": 3, "iterations": 60})
    assert s.stage_title == "fine-tuning the generalist" and s.fraction == 0.05
    assert jobs.status_from_dict({"state": "starting", "eta_s": "nan"}).state == "running"
    assert jobs.format_event({"type": "stage", "iteration": 0, "stage": "retrain", "stages": ["a", "b", "c"]}) == \
        "[0] stage retrain of 3: re-training"
    assert jobs.format_eta(3725) == "1h 02m" and jobs.format_eta(None) == "unknown" and jobs.format_eta(9) == "9s"


#: the watcher's polling is generous: the child imports torch and may share a busy CPU
TIMEOUT = 180.0


@pytest.fixture
def make_logic():
    """make_logic(project_root): the module's logic without a scene (the job part needs none).

    Jobs run with this interpreter (the one with fmabs_core installed; Slicer uses PythonSlicer),
    and the logic's own PYTHONPATH (the folder of the real fmabs_core). Any job still running at
    the end of a test is killed: a failed test must not leave a 2000-iteration training behind.
    """
    from fmabs_core.data.project import Project
    from SlicerFMABSLib import logic as logic_mod

    made = []

    def make(root):
        lg = logic_mod.FMABSLogic.__new__(logic_mod.FMABSLogic)
        lg.scene = lg.seg_logic = None
        lg.project = Project(root)
        lg.train_job = lg.watcher = lg.suggest_job = lg.suggest_output = lg.prediction = None
        lg.python = sys.executable
        lg.launcher = lg.train_launcher = lg.train_job_run = None
        made.append(lg)
        return lg

    yield make
    for lg in made:
        if lg.train_job is not None and lg.train_job.running:
            lg.train_job.process.kill()
            lg.train_job.wait(30)


def _poll_until(lg, pred, timeout=TIMEOUT):
    """Poll like the Train panel's timer; returns (status, log lines, every state seen)."""
    lines, states = [], []
    t0 = time.time()
    while time.time() - t0 < timeout:
        status, new = lg.poll_training()
        lines += new
        states.append(status.state)
        if pred(status):
            if status.finished and lg.train_job is not None:
                # the job writes status.json before its last event: once it has exited, one more poll
                # (the panel's next tick) reads the lines still missing
                lg.train_job.wait(30)
                status, new = lg.poll_training()
                lines += new
            return status, lines, states
        time.sleep(0.1)
    tail = lg.train_job.log_tail(1500) if lg.train_job is not None else ""
    raise AssertionError(f"timed out; last status {status}; job log:\n{tail}")


def test_method_facts_come_from_fmabs_methods():
    """The Train panel's per-method facts, read from the job's `fmabs methods --json` (a real process)."""
    assert jobs.default_iterations("fmabs") == 20000 and jobs.default_iterations("cfr-mt") == 6000
    assert jobs.default_iterations("no-such-method") is None
    assert jobs.method_takes("fmabs", "generalist") and not jobs.method_takes("sup", "generalist")
    assert jobs.method_takes("no-such-method", "generalist")  # unknown here: fmabs train decides


def test_train_arguments(tmp_path, make_logic):
    from fmabs_core.data.project import Project

    lg = make_logic(Project.create(tmp_path / "p").root)
    args = lg.train_arguments("r", "fmabs", 12, device="auto", generalist="litemedsam", active="her", budget=4,
                              expert="human", options=["--width", 4])
    assert args == ["train", "--project", str(lg.project.root), "--run", "r", "--method", "fmabs", "--iterations", "12",
                    "--generalist", "litemedsam", "--active", "her", "--budget", "4", "--expert", "human",
                    "--width", "4"]  # device "auto": no --device, the job picks CUDA when there is one
    args = lg.train_arguments("r", "sup", 5, device="cpu", active="none", budget=3, expert="human")
    assert args[-2:] == ["--device", "cpu"] and "--expert" not in args and "--active" not in args
    assert "--budget" not in args
    with pytest.raises(ValueError, match="positive"):
        lg.train_arguments("r", "sup", 0)
    with pytest.raises(ValueError, match="not usable as a folder name"):
        lg.train_arguments("../r", "sup", 5)


@pytest.mark.slow
def test_training_job_runs_in_background(labelled_project, make_logic):
    lg = make_logic(labelled_project)
    t0 = time.time()
    lg.start_training("run1", "sup", 6, device="cpu", options=[*TINY_TRAIN, "--val-every", "3"])
    assert time.time() - t0 < 2.0  # returns at once: the GUI never blocks
    assert lg.train_job.argv[:3] == [sys.executable, "-m", "fmabs_core"]
    status, lines, states = _poll_until(lg, lambda s: s.finished)
    assert status.state == "done", lg.train_job.log_tail()
    assert status.iteration == status.total == 6 and status.fraction == 1.0
    assert status.val_dice is not None and 0.0 <= status.val_dice <= 1.0
    assert "running" in states and states.index("running") < states.index("done")  # progress, then done
    progress = [line for line in lines if "progress" in line]
    assert progress and progress[-1].startswith("[6] progress: loss")
    assert lines[0].startswith("[0] started (6 iterations on cpu)") and lines[-1] == "[6] done"
    assert any(line.startswith("[3] validation Dice") for line in lines)
    assert lg.train_job.wait(10) == 0
    run = lg.project.run_dir("run1")
    assert (run / "model.pt").is_file() and "model: " in (run / "slicer-job.log").read_text()
    assert lg.trained_runs() == ["run1"]


@pytest.mark.slow
def test_cancel_sends_sigterm(labelled_project, make_logic):
    lg = make_logic(labelled_project)
    lg.start_training("run2", "sup", 2000, device="cpu", options=TINY_TRAIN)
    _poll_until(lg, lambda s: (s.iteration or 0) >= 1)
    assert lg.cancel_training()
    status, lines, _ = _poll_until(lg, lambda s: s.finished, timeout=60.0)
    assert status.state == "cancelled" and status.iteration < 2000
    assert lg.train_job.wait(30) == 130  # the job handled SIGTERM: checkpoint, then a clean exit
    assert any("cancelled (resume" in line for line in lines)
    saved = jobs.read_json(lg.project.run_dir("run2") / "status.json")
    assert Path(saved["checkpoint"]).is_file() and saved["checkpoint_iteration"] == status.iteration
    assert not lg.cancel_training()  # nothing left to cancel
    assert lg.trained_runs() == ["run2"]  # the checkpoint is a model to segment with


def _launcher_script(tmp_path) -> Path:
    """A stand-in for PythonSlicer: a launcher that runs the real interpreter as its child, forwards no signal
    and passes on the child's exit code."""
    launcher = tmp_path / "PythonLauncher"
    launcher.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                        f"sys.exit(subprocess.call([{sys.executable!r}, *sys.argv[1:]]))\n")
    launcher.chmod(0o755)
    return launcher


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="the stand-in launcher is a script with a #! line")
@pytest.mark.parametrize("launch", ["launch_slicer", "launch_popen"])
def test_cancel_through_a_launcher_then_resume(labelled_project, make_logic, tmp_path, launch, slicer_mod):
    """Slicer runs jobs with PythonSlicer, a launcher whose child is the real interpreter and which forwards
    no signal; inside Slicer the module launches it with launchConsoleProcess (slicer-core's, real, here).
    Cancel must reach the trainer (the holder of the run lock), which checkpoints; no process is left behind;
    Start on the same run resumes from the checkpoint."""
    from fmabs_core.runs.lock import lock_holder

    lg = make_logic(labelled_project)
    lg.python = str(_launcher_script(tmp_path))
    lg.train_launcher = getattr(jobs, launch)
    lg.start_training("run5", "sup", 2000, device="cpu", options=TINY_TRAIN)
    assert lg.train_job.launched_by == launch
    _poll_until(lg, lambda s: (s.iteration or 0) >= 1)
    run = lg.project.run_dir("run5")
    trainer = lock_holder(run)["pid"]
    launcher_pid = lg.train_job.pid
    assert trainer != launcher_pid  # the launcher is not the trainer
    assert lg.cancel_training()
    status, lines, _ = _poll_until(lg, lambda s: s.finished, timeout=60.0)
    assert status.state == "cancelled" and status.iteration < 2000
    assert lg.train_job.wait(30) == 130
    assert any("cancelled (resume" in line for line in lines)
    assert not jobs.pid_alive(trainer) and not jobs.pid_alive(launcher_pid)  # nothing left behind
    assert "cancel" in (run / "slicer-job.log").read_text().lower()  # the job's output reached its log file
    checkpoint = jobs.read_json(run / "status.json")["checkpoint_iteration"]
    assert checkpoint == status.iteration

    lg.start_training("run5", "sup", 2000, device="cpu", options=TINY_TRAIN)  # Start again: resume
    status, lines, _ = _poll_until(lg, lambda s: (s.iteration or 0) > checkpoint)
    assert lines[0].startswith(f"[{checkpoint}] started (2000 iterations on cpu)"), lines[:3]
    trainer = lock_holder(run)["pid"]
    assert lg.cancel_training()
    status, _, _ = _poll_until(lg, lambda s: s.finished, timeout=60.0)
    assert status.state == "cancelled" and status.iteration > checkpoint
    assert lg.train_job.wait(30) == 130 and not jobs.pid_alive(trainer)


def test_slicer_launcher_writes_the_log_and_cancel_stops_its_tree(tmp_path, slicer_mod):
    """launch_slicer: slicer.util.launchConsoleProcess (slicer-core's, real) with the job's environment changes;
    the output pipe reaches the log file (bytes that are not UTF-8 included); cancel stops the grandchild too."""
    code = ("import os, subprocess, sys, time; sys.stdout.buffer.write(b'latin-1: \\xe9\\n'); "
            "print('env', os.environ.get('FMABS_TEST_MARK'), flush=True); "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', g.pid, flush=True); time.sleep(60)")
    env = jobs.job_environment()
    env["FMABS_TEST_MARK"] = "marked"
    assert jobs.environment_changes(env)["FMABS_TEST_MARK"] == "marked"
    proc = jobs.BackgroundProcess([sys.executable, "-c", code], tmp_path / "log.txt", env, cwd=tmp_path,
                                  launcher=jobs.launch_slicer)
    for _ in range(200):
        if "grandchild" in proc.log_tail():
            break
        time.sleep(0.05)
    text = proc.log_tail()
    assert "env marked" in text and "latin-1: \ufffd" in text  # the raw byte is in the file, shown replaced
    assert b"\xe9" in (tmp_path / "log.txt").read_bytes()
    grandchild = int(text.split()[-1])
    assert jobs.pid_alive(grandchild)
    proc.cancel()
    assert proc.cancelled and proc.wait(10) == -signal.SIGTERM
    for _ in range(200):
        if not jobs.pid_alive(grandchild):
            break
        time.sleep(0.05)
    assert not jobs.pid_alive(grandchild)
    assert proc.poll() is not None and not proc._pump.is_alive()  # the log is complete once the job has ended


def test_jobs_use_launch_console_process_inside_slicer(tmp_path, slicer_mod, monkeypatch):
    """Inside the application (``slicer.app`` exists: the only fake here) a job is launched with
    launchConsoleProcess; in a plain Python with Popen. The command line is the same."""
    argv = [sys.executable, "-c", "print('hello', flush=True)"]
    plain = jobs.BackgroundProcess(argv, tmp_path / "plain.log")
    assert not jobs.in_slicer_application() and plain.launched_by == "launch_popen"
    calls = []
    real = slicer_mod.util.launchConsoleProcess

    def recording(args, **kwargs):
        calls.append((list(args), kwargs))
        return real(args, **kwargs)

    monkeypatch.setattr(slicer_mod, "app", object(), raising=False)
    monkeypatch.setattr(slicer_mod.util, "launchConsoleProcess", recording)
    assert jobs.in_slicer_application()
    inside = jobs.BackgroundProcess(argv, tmp_path / "inside.log", jobs.job_environment(["/extra/path"]), cwd=tmp_path)
    assert inside.launched_by == "launch_slicer" and calls[0][0] == argv
    assert calls[0][1]["useStartupEnvironment"] is False and calls[0][1]["cwd"] == str(tmp_path)
    assert calls[0][1]["updateEnvironment"]["PYTHONPATH"].startswith("/extra/path")
    for job in (plain, inside):
        assert job.wait(30) == 0
        assert job.log_tail().strip() == "hello"


@pytest.mark.slow
def test_crashing_job_is_reported(bare_project, make_logic):
    """The real CLI refuses to train without cross-labels (exit code 2); the panel says why."""
    lg = make_logic(bare_project)
    lg.start_training("run3", "sup", 5, device="cpu", options=TINY_TRAIN)
    status, lines, _ = _poll_until(lg, lambda s: s.finished)
    assert lg.train_job.wait(10) == 2
    assert status.state == "failed" and "no training scan has cross-labels" in status.error
    assert any(line.startswith("[0] FAILED") and "no training scan has cross-labels" in line for line in lines)


@pytest.mark.slow
def test_run_waiting_for_the_expert(bare_project, make_logic):
    """Active learning with a human expert: the warm-up asks for cross-labels, the job stops with exit code 3."""
    s = jobs.status_from_dict({"state": "waiting_for_labels", "waiting_for_labels": ["la_3", "la_9"], "iteration": 40})
    assert s.state == jobs.WAITING and s.finished and s.waiting_for == ["la_3", "la_9"]
    lg = make_logic(bare_project)
    lg.start_training("run4", "sup", 100, device="cpu", active="her", budget=5, expert="human", options=TINY_TRAIN)
    status, _, _ = _poll_until(lg, lambda st: st.finished)
    assert lg.train_job.wait(10) == jobs.EXIT_NEEDS_LABELS
    assert status.state == jobs.WAITING
    assert status.waiting_for and set(status.waiting_for) <= set(lg.project.split("train"))
    assert "waiting for the expert" in lg.train_job.log_tail()


def test_background_process_cancel_stops_its_tree(tmp_path):
    """cancel() stops the job and what it started (a launcher's child), and leaves the exit code to poll()."""
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', g.pid, flush=True); time.sleep(60)")
    proc = jobs.BackgroundProcess([sys.executable, "-c", code], tmp_path / "log.txt")
    for _ in range(200):
        if "grandchild" in proc.log_tail():
            break
        time.sleep(0.05)
    grandchild = int(proc.log_tail().split()[-1])
    assert jobs.pid_alive(grandchild)
    proc.cancel()
    assert proc.cancelled and proc.wait(10) == -signal.SIGTERM
    for _ in range(200):
        if not jobs.pid_alive(grandchild):
            break
        time.sleep(0.05)
    assert not jobs.pid_alive(grandchild)


def test_available_methods_come_from_the_catalog_without_a_process(monkeypatch):
    """The Train panel's method list: fmabs_core's catalog, read without starting a process or importing torch
    (the panel used to wait for `fmabs methods --json`, up to 120 s)."""
    def no_process(*args, **kwargs):
        raise AssertionError("available_methods started a process")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    methods = jobs.available_methods()
    assert all({"name", "description", "supervision", "iterations", "options"} <= set(m) for m in methods)
    assert {"sup", "fmabs", "cfr-mt"} <= {m["name"] for m in methods}
    assert jobs.method_names() == tuple(m["name"] for m in methods)
    assert jobs.default_iterations("fmabs") == 20000 and jobs.method_takes("fmabs", "generalist")
    assert not jobs.method_takes("sup", "generalist")


def test_background_process_sigterm(tmp_path):
    proc = jobs.BackgroundProcess([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(30)"],
                                  tmp_path / "log.txt")
    for _ in range(100):
        if "hi" in proc.log_tail():
            break
        time.sleep(0.05)
    assert proc.running
    proc.cancel()
    assert proc.wait(10) == -signal.SIGTERM
    assert "hi" in proc.log_tail()


def test_watcher_keeps_waiting_state_after_the_pause_event(tmp_path):
    """A run paused for the expert ends with a 'cancelled' event; status.json's waiting state must win."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "waiting_for_labels", "iteration": 3,
                                                 "waiting_for_labels": ["a", "b"]}))
    (run / "events.jsonl").write_text(json.dumps({"type": "started", "time": 1.0, "iteration": 0}) + "\n"
                                      + json.dumps({"type": "cancelled", "time": 2.0, "iteration": 3}) + "\n")
    status, _ = jobs.RunWatcher(run).poll(process_running=False)
    assert status.state == jobs.WAITING and status.waiting_for == ["a", "b"]


def test_pseudo_label_rounds_on_the_drawn_slices(tmp_path):
    """A pseudo_label event's line says how many scans were refreshed (``cases``: a count, or a list in older runs)
    and, when the round scored the expert's drawn slices, contract.planes_line; the watcher keeps every round's
    line (newest last) and the latest round's warning for the Train panel."""
    plain = {"type": "pseudo_label", "iteration": 36, "round": 1, "cases": 4}
    assert jobs.format_event(plain) == "[36] SAM pseudo-labels refreshed for 4 scans"
    assert jobs.format_event({**plain, "cases": ["a", "b"]}) == "[36] SAM pseudo-labels refreshed for 2 scans"
    scored = {**plain, "planes_scans": 4, "planes_teacher_dice": 0.828, "planes_pseudo_dice": 0.84, "planes_gain": 0.012}
    assert jobs.format_event(scored) == ("[36] SAM pseudo-labels refreshed for 4 scans; round 1: pseudo-labels vs "
                                         "teacher on your drawn slices: +1.2 Dice (84.0 vs 82.8, 4 scans)")
    worse = {**scored, "iteration": 72, "round": 2, "planes_pseudo_dice": 0.75, "planes_teacher_dice": 0.8,
             "planes_gain": -0.05, "warning": "the pseudo-labels are worse than the teacher"}
    assert jobs.format_event(worse).endswith("; WARNING: the pseudo-labels are worse than the teacher")
    assert jobs.contract.planes_line(worse) in jobs.format_event(worse)  # one wording, the contract's

    run = tmp_path / "run"
    run.mkdir()
    events = run / "events.jsonl"
    events.write_text(json.dumps(plain) + "\n" + json.dumps(scored) + "\n")
    watcher = jobs.RunWatcher(run)
    status, lines = watcher.poll(process_running=True)
    assert status.planes == [jobs.contract.planes_line(scored)] and status.planes_warning is None
    assert jobs.planes_text(status) == jobs.contract.planes_line(scored) and jobs.planes_style(status) == ""
    with open(events, "a") as fh:
        fh.write(json.dumps(worse) + "\n")
    (run / "status.json").write_text(json.dumps({"state": "running", "iteration": 80, "iterations": 100}))
    status, lines = watcher.poll(process_running=True)  # status.json read: the rounds are kept
    assert status.planes == [jobs.contract.planes_line(scored), jobs.contract.planes_line(worse)]
    assert jobs.planes_text(status).startswith("round 2:") and "WARNING" in jobs.planes_text(status)
    assert status.planes_warning and jobs.planes_style(status) == jobs.WARNING_STYLE
    with open(events, "a") as fh:  # round 2 again after a resume, better this time: it replaces its line
        fh.write(json.dumps({**scored, "round": 2, "iteration": 72}) + "\n")
    status, _ = watcher.poll(process_running=True)
    assert len(status.planes) == 2 and status.planes[-1].startswith("round 2:") and "WARNING" not in status.planes[-1]
    assert status.planes_warning is None and jobs.planes_style(status) == ""
    assert jobs.planes_text(jobs.JobStatus()) == ""


def test_watch_run_follows_the_watched_run_not_an_earlier_job(labelled_project, make_logic, tmp_path):
    """A job of this session (here one that has ended) says nothing about another run: watching a live run
    started elsewhere shows it running, not crashed."""
    lg = make_logic(labelled_project)
    earlier = lg.project.run_dir("earlier")
    earlier.mkdir(parents=True)
    lg.train_job = jobs.BackgroundProcess([sys.executable, "-c", "pass"], earlier / "slicer-job.log")
    lg.train_job_run = earlier
    assert lg.train_job.wait(30) == 0
    live = lg.project.run_dir("live")
    live.mkdir(parents=True)
    (live / "status.json").write_text(json.dumps({"state": "running", "iteration": 5, "iterations": 100,
                                                  "pid": os.getpid()}))
    lg.watch_run("live")
    status, _ = lg.poll_training()
    assert status.state == "running" and status.iteration == 5
    assert lg.watched_job() is None
    lg.watch_run("earlier")  # its own run: the job this session started for it is what tells its state
    assert lg.watched_job() is lg.train_job


_CHILD = ("import sys, time, pathlib\n"
          "time.sleep(2.0)  # the parent is gone by now\n"
          "for i in range(200):\n"
          "    print('after the parent', i, flush=True)\n"
          "pathlib.Path(sys.argv[1]).write_text('finished')\n")

_PARENT = ("import os, signal, sys\n"
           "sys.path[:0] = [{lib!r}]\n"
           "from SlicerFMABSLib import jobs\n"
           "job = jobs.BackgroundProcess([sys.executable, '-c', {child!r}, {marker!r}], {log!r},\n"
           "                             launcher=getattr(jobs, {launcher!r}))\n"
           "print(job.pid, flush=True)\n"
           "os.kill(os.getpid(), signal.SIGKILL)  # Slicer killed, or closed\n")


def _job_after_parent_dies(tmp_path, launcher: str) -> tuple[bool, str]:
    marker, log = tmp_path / f"{launcher}.done", tmp_path / f"{launcher}.log"
    code = _PARENT.format(lib=str(Path(jobs.__file__).parent.parent), child=_CHILD, marker=str(marker),
                          log=str(log), launcher=launcher)
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    for _ in range(300):
        if not jobs.pid_alive(child):
            break
        time.sleep(0.05)
    return marker.exists(), log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.skipif(os.name != "posix", reason="kills the parent with SIGKILL")
def test_a_training_job_outlives_the_process_that_started_it(tmp_path, slicer_mod):
    """Training is launched detached: its parent (Slicer) killed, it finishes and its log is complete. A job
    whose output goes through a pipe its parent owns (launchConsoleProcess, slicer-core's, real) dies at its
    next write: why training never uses one."""
    finished, text = _job_after_parent_dies(tmp_path, "launch_detached")
    assert finished and "after the parent 199" in text
    finished, _ = _job_after_parent_dies(tmp_path, "launch_slicer")
    assert not finished


def test_training_is_launched_detached_even_inside_slicer(labelled_project, make_logic, monkeypatch, slicer_mod):
    """Inside the application (``slicer.app`` exists: the only fake here) short jobs use launchConsoleProcess,
    but training uses launch_detached (no pipe that Slicer owns)."""
    monkeypatch.setattr(slicer_mod, "app", object(), raising=False)
    assert jobs.in_slicer_application()
    lg = make_logic(labelled_project)
    lg.start_training("detached", "sup", 2000, device="cpu", options=TINY_TRAIN)
    assert lg.train_job.launched_by == "launch_detached" and lg.train_job._pump is None
    assert lg.train_job_run == lg.project.run_dir("detached")
    lg.train_job.process.kill()
    lg.train_job.wait(30)


def test_poll_and_cancel_never_wait_on_the_gui_thread(tmp_path, slicer_mod):
    """The Train and Segment panels' timer calls poll() and the Cancel button cancel(): neither may wait, even
    for a job whose grandchild keeps its output pipe open (poll used to join for 5 s) or that ignores SIGTERM
    (cancel used to wait 2 s before the kill)."""
    keeps_pipe = ("import subprocess, sys\n"
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(4)'])  # ends by itself\n"
                  "print('child done', flush=True)\n")
    job = jobs.BackgroundProcess([sys.executable, "-c", keeps_pipe], tmp_path / "pipe.log", launcher=jobs.launch_slicer)
    job.process.wait(30)
    t0 = time.perf_counter()
    assert job.poll() == 0
    assert time.perf_counter() - t0 < 1.0  # not the pump's 5 s join
    ignores = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "print('ready', flush=True)\ntime.sleep(30)\n")
    stubborn = jobs.BackgroundProcess([sys.executable, "-c", ignores], tmp_path / "stubborn.log")
    for _ in range(200):
        if "ready" in stubborn.log_tail():
            break
        time.sleep(0.05)
    t0 = time.perf_counter()
    stubborn.cancel(timeout_s=2.0)
    assert time.perf_counter() - t0 < 1.0 and stubborn.cancelled
    assert stubborn.wait(20) == -signal.SIGKILL  # killed by the background thread after the timeout
