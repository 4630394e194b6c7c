"""Resuming after a crash gives the model an uninterrupted run gives (same seed, CPU).

What is bitwise equal (torch.equal) after kill + resume: the final weights and BatchNorm statistics
(model.pt, the last checkpoint's student, teacher and optimiser momentum) and best.pt's weights,
including with validation and mean-teacher dropout/noise in between. What is not: timing fields
(``time``, ``eta_s``, ``step_s``, ``updated``, ``seconds``), and events.jsonl, which keeps the killed
attempt's progress lines after its last checkpoint before the resumed attempt's ``started`` line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmabs_core.training.config import TrainConfig
from fmabs_core.data.project import Project
from fmabs_core.training.engine import Trainer
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.nets import NetConfig
from killing import Killed, KillAt


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def mt_config(**kw) -> TrainConfig:
    base = dict(method="mt", iterations=7, seed=5, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                labelled_bs=1, net=NetConfig(width=4, dropout=0.2, out_channels=2), val_every=3, ckpt_every=2,
                max_val_cases=1)
    base.update(kw)
    return TrainConfig(**base)


def _states_equal(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_kill_then_resume_equals_uninterrupted(project):
    cfg = mt_config()
    ref_model = Trainer(project, "ref", cfg).train().model

    killed = Trainer(project, "crash", cfg)
    killed.hooks.append(KillAt(5))  # after the step that made iteration 5; last checkpoint: 4
    with pytest.raises(Killed):
        killed.train()
    assert read_status(project.run_dir("crash"))["state"] == "failed"
    assert killed.ckpts.iteration_files()[-1][0] == 4

    resumed_model = Trainer(project, "crash", cfg).train().model
    ref = torch.load(ref_model, weights_only=True)["state_dict"]
    out = torch.load(resumed_model, weights_only=True)["state_dict"]
    assert not _states_equal(ref, out), "the resumed model differs"
    ref_ck = torch.load(project.run_dir("ref") / "checkpoints" / "iter_0000007.pt", weights_only=True)
    out_ck = torch.load(project.run_dir("crash") / "checkpoints" / "iter_0000007.pt", weights_only=True)
    assert not _states_equal(ref_ck["model"], out_ck["model"])
    assert not _states_equal(ref_ck["method"]["teacher"], out_ck["method"]["teacher"])
    for p_ref, p_out in zip(ref_ck["optimizer"]["state"].values(), out_ck["optimizer"]["state"].values()):
        assert torch.equal(p_ref["momentum_buffer"], p_out["momentum_buffer"])
    best_ref = torch.load(project.run_dir("ref") / "checkpoints" / "best.pt", weights_only=True)
    best_out = torch.load(project.run_dir("crash") / "checkpoints" / "best.pt", weights_only=True)
    assert best_ref["iteration"] == best_out["iteration"] and not _states_equal(best_ref["model"], best_out["model"])

    events = read_events(project.run_dir("crash"))
    starts = [e for e in events if e["type"] == "started"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["iteration"] == 4
    losses = {e["iteration"]: e["loss"] for e in read_events(project.run_dir("ref")) if e["type"] == "progress"}
    after = [e for e in events[events.index(starts[1]):] if e["type"] == "progress"]
    assert [e["loss"] for e in after] == [losses[e["iteration"]] for e in after]


def test_truncated_checkpoint_resumes_from_previous(project, caplog):
    cfg = mt_config(method="sup", iterations=6, val_every=100, net=NetConfig(width=4, out_channels=2))
    ref_model = Trainer(project, "ref", cfg).train().model
    killed = Trainer(project, "trunc", cfg)
    killed.hooks.append(KillAt(5))
    with pytest.raises(Killed):
        killed.train()
    newest = killed.ckpts.path_for(4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # a torn write
    with caplog.at_level("WARNING", logger="fmabs_core.runs.checkpoint"):
        resumed_model = Trainer(project, "trunc", cfg).train().model
    assert any("unreadable" in r.message for r in caplog.records)
    assert (killed.ckpts.folder / "iter_0000004.pt.corrupt").exists()
    started = [e for e in read_events(project.run_dir("trunc")) if e["type"] == "started"]
    assert started[-1]["iteration"] == 2
    ref = torch.load(ref_model, weights_only=True)["state_dict"]
    assert not _states_equal(ref, torch.load(resumed_model, weights_only=True)["state_dict"])


def _cli(project: Path, run: str, iterations: int) -> list[str]:
    return [sys.executable, "-m", "fmabs_core", "train", "--project", str(project), "--run", run, "--method", "sup",
            "--iterations", str(iterations), "--patch-size", "16", "16", "16", "--width", "4", "--batch-size", "2",
            "--ckpt-every", "2", "--val-every", "100", "--device", "cpu", "--seed", "3"]


def test_real_kill9_then_resume(project):
    """A real SIGKILL of a training process at an arbitrary step; the resumed run ends where an
    uninterrupted one does. (Reference and resume run in-process: starting Python with torch and
    MONAI costs many seconds on a loaded machine.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    n = 10
    proc = subprocess.Popen(_cli(project.root, "k9", n), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = project.run_dir("k9")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and read_status(run).get("iteration", 0) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    status = read_status(run)
    assert status["state"] == "running" and 3 <= status["iteration"] < n
    cfg = TrainConfig.load(run / "config.json")
    ref_model = Trainer(project, "ref", cfg).train().model
    model = Trainer(project, "k9", cfg).train().model
    a = torch.load(ref_model, weights_only=True)["state_dict"]
    b = torch.load(model, weights_only=True)["state_dict"]
    assert not _states_equal(a, b)
    started = [e for e in read_events(run) if e["type"] == "started"]
    assert started[-1]["resumed"] and status["iteration"] - 2 <= started[-1]["iteration"] <= status["iteration"]
