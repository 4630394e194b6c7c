"""The job watcher and launcher on real files and real child processes (no MRML, no torch)."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import pytest

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


def test_failed_and_stale_runs(tmp_path):
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
    assert status.state == "stale" and "without a final status" in status.error


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_parse_suggestions_forms():
    out = jobs.parse_suggestions('{"cases": [{"case": "a", "score": 1.5, "axial": {"index": 3, "ras": [0, 0, 1]}}]}')
    assert out[0].case == "a" and out[0].score == 1.5 and out[0].slices == {"axial": {"index": 3, "ras": [0, 0, 1]}}
    out = jobs.parse_suggestions([{"name": "b", "slices": {"coronal": 4}}, "c", 7])
    assert [s.case for s in out] == ["b", "c"] and out[0].slices["coronal"] == {"index": 4, "ras": None}
    assert jobs.parse_suggestions({"suggestions": []}) == []


def test_train_args_and_status_spellings():
    args = jobs.train_args("/p", "run1", "fmabs", 200, "cpu", "litemedsam", "her", 6)
    assert args == ["train", "--project", "/p", "--method", "fmabs", "--iterations", "200", "--run", "run1",
                    "--device", "cpu", "--generalist", "litemedsam", "--active", "her", "--budget", "6"]
    assert "--active" not in jobs.train_args("/p", "r", "sup", 5, active="none", budget=3)
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="not a valid folder name"):
            jobs.train_args("/p", bad, "sup", 5)
    with pytest.raises(ValueError, match="positive"):
        jobs.train_args("/p", "r", "sup", 0)
    s = jobs.status_from_dict({"status": "Finished", "iter": "7", "total_iterations": 10, "metrics": {"val/dice": 0.5}})
    assert (s.state, s.iteration, s.total, s.val_dice) == ("done", 7, 10, 0.5)
    assert jobs.format_eta(3725) == "1h 02m" and jobs.format_eta(None) == "unknown" and jobs.format_eta(9) == "9s"


FAKE_CLI = textwrap.dedent('''
    """A stand-in for `python -m fmabs_core train`: writes the run files like the real engine, fast."""
    import json, os, signal, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    project, run = Path(args[args.index("--project") + 1]), args[args.index("--run") + 1]
    total = int(args[args.index("--iterations") + 1])
    run_dir = project / "runs" / run
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

    def status(**kw):
        kw.setdefault("pid", os.getpid())
        tmp = run_dir / ".status.tmp"
        tmp.write_text(json.dumps(kw))
        os.replace(tmp, run_dir / "status.json")

    def event(**kw):
        with open(run_dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps(kw) + "\\n")

    print("argv:", " ".join(args), flush=True)
    for it in range(1, total + 1):
        if stop:
            status(state="cancelled", iteration=it - 1, iterations=total)
            event(type="cancelled", iteration=it - 1)
            sys.exit(130)
        time.sleep(0.05)
        event(type="progress", iteration=it, lr=0.01, eta_s=(total - it) * 0.05)
        status(state="running", iteration=it, iterations=total, eta_s=(total - it) * 0.05)
    event(type="validation", iteration=total, dice=0.75)
    status(state="done", iteration=total, iterations=total, eta_s=0, val_dice=0.75, model=str(run_dir / "model.pt"))
    event(type="done", iteration=total)
''')


@pytest.fixture
def fake_core(tmp_path, monkeypatch):
    """A fake ``fmabs_core`` package on the job's PYTHONPATH (the real one would train with torch)."""
    pkg = tmp_path / "fake" / "fmabs_core"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_CLI)
    return tmp_path / "fake"


def _logic_without_scene(tmp_path, fake_core, monkeypatch):
    pytest.importorskip("nibabel")
    from fmabs_core.datastore import Project
    from SlicerFMABSLib import logic as logic_mod

    lg = logic_mod.FMABSLogic.__new__(logic_mod.FMABSLogic)  # the job part needs no scene
    lg.project = Project.create(tmp_path / "proj")
    lg.train_job = lg.watcher = lg.suggest_job = lg.prediction = None
    lg.python = sys.executable
    monkeypatch.setattr(lg, "job_pythonpath", lambda: [str(fake_core)], raising=False)
    return lg


def _poll_until(lg, pred, timeout=20.0):
    lines = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        status, new = lg.poll_training()
        lines += new
        if pred(status):
            return status, lines
        time.sleep(0.05)
    raise AssertionError(f"timed out; last status {status}")


def test_training_job_runs_in_background(tmp_path, fake_core, monkeypatch):
    lg = _logic_without_scene(tmp_path, fake_core, monkeypatch)
    t0 = time.time()
    lg.start_training("run1", "fmabs", 12, device="auto", generalist="litemedsam", active="her", budget=4,
                      expert="human")
    assert time.time() - t0 < 2.0  # returns at once: the GUI never blocks
    status, lines = _poll_until(lg, lambda s: s.finished)
    assert status.state == "done" and status.val_dice == 0.75 and status.iteration == 12
    assert sum("progress" in line for line in lines) == 12
    log_text = (lg.project.run_dir("run1") / "slicer-job.log").read_text()
    assert "--active her --budget 4 --expert human" in log_text and "--device" not in log_text


def test_cancel_sends_sigterm(tmp_path, fake_core, monkeypatch):
    lg = _logic_without_scene(tmp_path, fake_core, monkeypatch)
    lg.start_training("run2", "sup", 400, device="cpu")
    _poll_until(lg, lambda s: (s.iteration or 0) >= 2)
    assert lg.cancel_training()
    status, _ = _poll_until(lg, lambda s: s.finished)
    assert status.state == "cancelled"
    assert lg.train_job.wait(10) == 130  # the job handled SIGTERM and stopped cleanly
    assert not lg.cancel_training()  # nothing left to cancel


def test_crashing_job_is_reported(tmp_path, fake_core, monkeypatch):
    (fake_core / "fmabs_core" / "__main__.py").write_text("raise SystemExit('fmabs: error: no cross-labels yet')")
    lg = _logic_without_scene(tmp_path, fake_core, monkeypatch)
    lg.start_training("run3", "sup", 5)
    status, _ = _poll_until(lg, lambda s: s.finished)
    assert status.state == "failed" and "no cross-labels yet" in status.error


def test_run_waiting_for_the_expert(tmp_path, fake_core, monkeypatch):
    """Active learning with a human expert: the job stops with exit code 3 after suggesting scans."""
    s = jobs.status_from_dict({"state": "waiting_for_labels", "waiting_for_labels": ["la_3", "la_9"], "iteration": 40})
    assert s.state == jobs.WAITING and s.finished and s.waiting_for == ["la_3", "la_9"]
    (fake_core / "fmabs_core" / "__main__.py").write_text(textwrap.dedent('''
        import json, sys
        from pathlib import Path
        args = sys.argv[1:]
        run = Path(args[args.index("--project") + 1]) / "runs" / args[args.index("--run") + 1]
        (run / "status.json").write_text(json.dumps({"state": "cancelled", "iteration": 40, "iterations": 100}))
        sys.exit(3)
    '''))
    lg = _logic_without_scene(tmp_path, fake_core, monkeypatch)
    lg.start_training("run4", "fmabs", 100, active="her", budget=4, expert="human")
    status, _ = _poll_until(lg, lambda st: st.finished)
    assert status.state == jobs.WAITING


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
