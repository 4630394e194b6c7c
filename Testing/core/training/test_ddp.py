"""Data-parallel training: helpers without a process group, and a two-process gloo run on the CPU.

The two-process run (``torchrun --nproc_per_node 2``) trains with the same global batch as one
process: both plan the same patches from one sampler seed and each rank trains on half. With
augmentation off (it would match too: it is drawn from the shared sampler) and instance
normalisation (BatchNorm over a rank's half differs from BatchNorm over the whole batch; on CUDA
the engine uses SyncBatchNorm instead) and no dropout (each rank draws its own masks), the loss and gradients decompose exactly over samples, so
per-step losses agree to 1e-5 relative (measured 7e-7) and weights after 3 steps to 5e-5 absolute
(measured 5.5e-6): only the order of floating-point sums differs (gradient all-reduce, per-rank means).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmabs_core.training import distributed
from fmabs_core.data.project import Project, import_folder
from fmabs_core.training.engine import Trainer
from fmabs_core.errors import InputError
from fmabs_core.runs.events import read_events, read_status


pytestmark = pytest.mark.slow  # trains, starts processes or runs LiteMedSAM


def test_helpers_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.info() == distributed.DistInfo(1, 0, 0)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.split_batch(4, 2) == ([0, 1, 2, 3], 2)
    assert distributed.any_true(True) and not distributed.any_true(False)
    net = torch.nn.Linear(2, 2)
    assert distributed.unwrap(distributed.wrap(net, torch.device("cpu"))) is net


def test_split_and_shard_by_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert distributed.shard(list("abcde")) == ["b", "d"]
    # rank 1 of 2: the second labelled patch and the second unlabelled one of the global batch
    assert distributed.split_batch(4, 2) == ([1, 3], 1)
    assert distributed.split_batch(6, 2) == ([1, 4, 5], 1)
    with pytest.raises(InputError, match="multiples of 2"):
        distributed.split_batch(3, 3)
    assert distributed.mean_dicts([{"a": 1.0, "b": 4.0}, {"a": 3.0}]) == {"a": 2.0, "b": 4.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory, phantom_data) -> Project:
    root = tmp_path_factory.mktemp("ddp") / "proj"
    project, problems = import_folder(phantom_data, root, val_fraction=0.2, seed=0)
    assert not problems
    return project


# --dropout 0: dropout masks come from each process's own torch generator, so two ranks cannot draw the
# masks one process draws for the whole batch (the default, 0.5, is the papers')
ARGS = ["--method", "sup-dense", "--iterations", "3", "--batch-size", "2", "--labelled-batch-size", "2",
        "--patch-size", "32", "32", "32", "--width", "4", "--norm", "instance", "--no-augment", "--dropout", "0",
        "--device", "cpu",
        "--val-every", "100", "--ckpt-every", "100", "--max-val-cases", "1", "--seed", "11"]


def test_two_process_gloo_matches_one_process(project):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fmabs_core", "train",
           "--project", str(project.root), "--run-name", "ddp", *ARGS]  # see train_cmds
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]

    from fmabs_core.cli import build_parser
    from fmabs_core.cli.train_cmds import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--project", str(project.root), "--run", "one", *ARGS]),
                           project)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(project, "one", cfg).train()
    finally:
        torch.set_num_threads(before)

    run = project.run_dir("ddp")
    assert read_status(run)["world_size"] == 2 and read_status(run)["state"] == "done"
    started = [e for e in read_events(run) if e["type"] == "started"]
    assert len(started) == 1, "only rank 0 writes events"
    two = [e["loss"] for e in read_events(run) if e["type"] == "progress"]
    one = [e["loss"] for e in read_events(project.run_dir("one")) if e["type"] == "progress"]
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-5)
    a = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(project.run_dir("one") / "model.pt", weights_only=True)["state_dict"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 5e-5, f"largest weight difference {worst}"  # measured: 5.5e-6 after 3 steps
    ck = torch.load(run / "checkpoints" / "iter_0000003.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2  # each rank's RNG state, for an exact resume


def _rank_pids(parent: int, timeout: float = 60.0) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, read from their environments (Linux)."""
    import time

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for child in psutil.Process(parent).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.Error, OSError):
                continue
            if "RANK" in env and "LOCAL_RANK" in env:
                found[int(env["RANK"])] = child.pid
        if len(found) == 2:
            return found
        time.sleep(0.5)
    raise AssertionError("torchrun's two workers did not appear")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the workers' environments from /proc")
def test_a_cancel_seen_by_one_rank_stops_both_inside_a_round(project, tmp_path):
    """SIGTERM to rank 1 only, during an FM-ABS round under torchrun: both ranks stop after their current
    scan, rank 0's checkpoint holds the scans both have done, and a resumed torchrun run finishes the round."""
    import signal
    import time

    from fmabs_core.cli.project_cmds import simulate_crosslabels

    root = tmp_path / "proj"
    shutil.copytree(project.root, root)
    proj = Project(root)
    simulate_crosslabels(proj, proj.split("train"), "centre", 0)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fmabs_core", "train", "--project", str(root),
           "--run-name", "fm", "--method", "fmabs", "--iterations", "4", "--batch-size", "2",
           "--labelled-batch-size", "1", "--patch-size", "32", "32", "32", "--width", "4", "--norm", "instance",
           "--device", "cpu", "--val-every", "100", "--ckpt-every", "100", "--seed", "3", "--pseudo-warmup", "0.5",
           "--pseudo-every", "0.5", "--pseudo-max-slices", "4", "--box-jitter", "2"]
    run = root / "runs" / "fm"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ranks = _rank_pids(proc.pid)
        deadline = time.time() + 180
        while not any(e["type"] == "checkpoint" and e["iteration"] == 2 for e in read_events(run)):
            assert proc.poll() is None and time.time() < deadline, "the round never started"
            time.sleep(0.2)
        os.kill(ranks[1], signal.SIGTERM)  # only rank 1 sees the cancel
        proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = read_events(run)
    assert events[-1]["type"] == "cancelled" and not any(e["type"] == "pseudo_label" for e in events)
    state = torch.load(run / "checkpoints" / "iter_0000002.pt", weights_only=True)
    partial = state["method"]["partial_round"]
    n_cases = len(partial["cases"])
    assert n_cases >= 4 and 2 <= len(partial["done"]) < n_cases  # both ranks' first scans, not the whole round

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rounds = [e for e in read_events(run) if e["type"] == "pseudo_label"]
    assert rounds[0]["round"] == 1 and rounds[0]["resumed_after"] == len(partial["done"])
    assert rounds[0]["cases"] == n_cases and read_status(run)["state"] == "done"
