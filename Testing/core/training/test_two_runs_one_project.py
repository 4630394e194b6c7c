"""Two people (or the Slicer module and a terminal) train two runs of one project at the same moment: the
project's shared scan store (preprocessed/) is built once under its lock while both read it, and each run ends
with the weights it gets when trained alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from faults import ENV, TINY, fmabs, leftovers  # noqa: E402

pytestmark = pytest.mark.slow  # two training processes


def _argv(project: Path, run: str, method: str) -> list[str]:
    return fmabs("train", "--project", str(project), "--run", run, "--method", method, "--iterations", "8",
                 "--ckpt-every", "4", *TINY)


def _weights(project: Path, run: str) -> dict:
    return torch.load(project / "runs" / run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_two_runs_at_once_equal_each_run_alone(template, tmp_path):
    together = tmp_path / "together"
    shutil.copytree(template, together)
    assert not (together / "preprocessed").exists()  # both processes find the store to build
    procs = [subprocess.Popen(_argv(together, run, method), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for run, method in (("a", "mt"), ("b", "sup"))]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    for run, method in (("a", "mt"), ("b", "sup")):
        alone = tmp_path / f"alone-{run}"
        shutil.copytree(template, alone)
        done = subprocess.run(_argv(alone, run, method), env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        a, b = _weights(together, run), _weights(alone, run)
        assert all(torch.equal(a[k], b[k]) for k in a), f"run {run} trained beside another differs from alone"
    manifest = json.loads((together / "preprocessed" / "manifest.json").read_text())
    assert manifest and not leftovers(together)
    json.loads((together / "fmabs.json").read_text())
