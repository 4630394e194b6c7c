"""Fault injection: kill a long ``fmabs`` command with SIGKILL at random moments, run the same command again, and
check that the end result equals an uninterrupted run's, with nothing half-written left or used.

Each :class:`Scenario` prepares its inputs in a folder, gives the command line (the same for the reference run and
for the run that is killed), says when the command is "at work" (by event: a new training step on record, a new
output file), and compares the two results. :func:`kill_and_rerun` starts the command, waits for it to be at work,
waits a further random moment, sends SIGKILL, and starts it again, ``kills`` times; the last start runs to the end.
A process that ends before its moment is the finish: the report counts only the kills that hit a live process.

``Testing/core/test_faults.py`` runs every scenario with a few kills; run this file for the counts in the notes::

    python Testing/faults.py --kills 20                # every scenario
    python Testing/faults.py --kills 20 -k predict     # scenarios whose name contains "predict"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TINY = ["--patch-size", "16", "16", "16", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
        "--device", "cpu", "--seed", "3", "--val-every", "1000"]


@dataclass
class FaultReport:
    scenario: str
    kills: int = 0  # SIGKILLs that hit a live process
    starts: int = 0  # processes started, the finishing one included
    returncode: int | None = None  # of the start that finished
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # differences from the uninterrupted run; empty when correct


def fmabs(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmabs_core", *args]


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)


def kill_and_rerun(argv: list[str], kills: int, rng: np.random.Generator, at_work: Callable[[], Callable[[], bool]],
                   max_delay: float = 1.0, whole_run: float = 5.0, timeout: float = 600) -> FaultReport:
    """Start ``argv`` and SIGKILL it, ``kills`` times, then let a last start finish. Each kill is at a random moment,
    half of them by event: 0 to ``max_delay`` s after ``at_work()``'s test first holds (``at_work`` is called
    before each start, so that its test can compare with the state the start found); half by time: 0 to
    ``whole_run`` s (an uninterrupted run's length) after the start, start-up and clean-up included."""
    report = FaultReport(" ".join(argv[3:5]))
    t0 = time.monotonic()
    for _ in range(kills):
        busy = at_work() if rng.random() < 0.5 else (lambda: True)
        # by time: within the first 60 % of an uninterrupted run's length, as each start has less left to do
        delay = max_delay if busy() is False else 0.6 * whole_run
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        report.starts += 1
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        moment = time.monotonic() + float(rng.uniform(0.0, delay))
        while proc.poll() is None and time.monotonic() < moment:
            time.sleep(0.005)
        if proc.poll() is not None:  # it ended first: that was the finishing start
            report.returncode = proc.returncode
            if proc.returncode:
                report.problems.append(f"exit {proc.returncode}: {proc.stderr.read()[-1500:]}")
            report.seconds = time.monotonic() - t0
            return report
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        report.kills += 1
    done = run(argv, timeout)
    report.starts += 1
    report.returncode = done.returncode
    if done.returncode:
        report.problems.append(f"exit {done.returncode} after {report.kills} kills: {done.stderr[-1500:]}")
    report.seconds = time.monotonic() - t0
    return report


def leftovers(folder: Path) -> list[str]:
    """Temporary files a killed command left behind (never to be used; they should be gone after the finish)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if ".tmp" in p.name)


def _status_iteration(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "status.json").read_text()).get("iteration", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _model_state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same_state(a: dict, b: dict) -> list[str]:
    import torch

    return [k for k in a if k not in b or not torch.equal(a[k], b[k])] + [k for k in b if k not in a]


class Scenario:
    name = ""
    max_delay = 1.0  # seconds after the command is at work within which it is killed

    def prepare(self, work: Path) -> None:
        """Inputs shared by the reference and the faulted run."""

    def argv(self, work: Path, which: str) -> list[str]:
        raise NotImplementedError

    def at_work(self, work: Path) -> Callable[[], bool]:
        raise NotImplementedError

    def compare(self, work: Path) -> list[str]:
        raise NotImplementedError


def _phantom_project(work: Path, crosslabels: int = 3) -> Path:
    from fmabs_core.data.phantom import write_dataset

    data = write_dataset(work / "phantom", n_cases=6, shape=(24, 24, 24), seed=3)
    project = work / "project"
    for argv in (fmabs("import", str(data), "--project", str(project)),
                 fmabs("crosslabel", "simulate", "--project", str(project), "--count", str(crosslabels), "--seed", "1")):
        done = run(argv)
        assert done.returncode == 0, done.stderr
    return project


class TrainScenario(Scenario):
    """``fmabs train``: the final weights of the killed and resumed run equal the uninterrupted run's, bit for bit."""

    max_delay = 0.3  # a tiny step takes milliseconds: a kill soon after a step, or the run is over

    def __init__(self, method: str, iterations: int, extra: tuple[str, ...] = ()):
        self.method, self.iterations, self.extra = method, iterations, extra
        self.name = f"train-{method}"

    def prepare(self, work: Path) -> None:
        _phantom_project(work)

    def argv(self, work: Path, which: str) -> list[str]:
        return fmabs("train", "--project", str(work / "project"), "--run", which, "--method", self.method,
                     "--iterations", str(self.iterations), "--ckpt-every", "2", *TINY, *self.extra)

    def at_work(self, work: Path) -> Callable[[], bool]:
        run_dir = work / "project" / "runs" / "faulted"
        start = _status_iteration(run_dir)
        return lambda: _status_iteration(run_dir) > start

    def compare(self, work: Path) -> list[str]:
        runs = work / "project" / "runs"
        problems = [f"left behind: {p}" for p in leftovers(runs / "faulted")]
        status = json.loads((runs / "faulted" / "status.json").read_text())
        from fmabs_core.contract import DONE

        if status.get("state") != DONE:
            problems.append(f"state {status.get('state')}")
        differ = _same_state(_model_state(runs / "reference" / "model.pt"), _model_state(runs / "faulted" / "model.pt"))
        if differ:
            problems.append(f"weights differ from the uninterrupted run: {differ[:5]}")
        if self.method == "fmabs":
            for ref in sorted((runs / "reference" / "pseudo").glob("*_fused.nii.gz")):
                got = runs / "faulted" / "pseudo" / ref.name
                if not got.is_file() or not np.array_equal(_voxels(ref), _voxels(got)):
                    problems.append(f"pseudo-label {ref.name} differs")
        from fmabs_core.runs.lock import lock_holder

        if lock_holder(runs / "faulted"):
            problems.append("the run's lock is still held")
        return problems


class CfrScenario(TrainScenario):
    """``fmabs train --method cfr-mt``, killed in any of its three stages (LoRA fine-tuning, the tuned generalist's
    pseudo-labels, the re-training): the adapter, every pseudo-label and the final weights equal the uninterrupted
    run's, bit for bit."""

    max_delay = 1.0  # a fine-tuning step of the tiled LiteMedSAM takes about a second

    def __init__(self, finetune: int = 4, iterations: int = 8):
        super().__init__("cfr-mt", iterations, ("--labels", "cross", "--finetune-iterations", str(finetune),
                                                "--finetune-batch", "1", "--grid", "6"))
        self.name = "train-cfr"
        self.finetune = finetune

    def at_work(self, work: Path) -> Callable[[], bool]:
        """At work: a step of either training stage, or a new pseudo-label file, since this start."""
        run_dir = work / "project" / "runs" / "faulted"

        def progress() -> tuple[int, int, int]:
            stage = 0
            try:
                stage = {"finetune": 0, "pseudo": 1, "retrain": 2}.get(
                    json.loads((run_dir / "status.json").read_text()).get("stage"), 0)
            except (OSError, ValueError, AttributeError):
                pass
            return stage, _status_iteration(run_dir), len(list((run_dir / "pseudo").glob("*_generalist.nii.gz")))

        start = progress()
        return lambda: progress() > start

    def compare(self, work: Path) -> list[str]:
        from fmabs_core.contract import ADAPTER_FILE

        problems = super().compare(work)
        runs = work / "project" / "runs"
        ref, got = (torch_load(runs / r / ADAPTER_FILE) for r in ("reference", "faulted"))
        if ref is None or got is None or _same_state(ref["state"], got["state"]):
            problems.append("the tuned generalist's adapter differs from the uninterrupted run's")
        for p in sorted((runs / "reference" / "pseudo").glob("*_generalist.nii.gz")):
            q = runs / "faulted" / "pseudo" / p.name
            if not q.is_file() or not np.array_equal(_voxels(p), _voxels(q)):
                problems.append(f"pseudo-label {p.name} differs or is missing")
        return problems


def torch_load(path: Path) -> dict | None:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _voxels(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


class ImportScenario(Scenario):
    """``fmabs import``: the project equals one imported without a kill (cases, files, split), and checks clean."""

    name = "import"
    max_delay = 0.05  # an import of these scans takes about a second

    def prepare(self, work: Path) -> None:
        from fmabs_core.data.phantom import write_dataset

        write_dataset(work / "phantom", n_cases=24, shape=(96, 96, 64), seed=5)

    def argv(self, work: Path, which: str) -> list[str]:
        return fmabs("import", str(work / "phantom"), "--project", str(work / which))

    def at_work(self, work: Path) -> Callable[[], bool]:
        images = work / "faulted" / "images"
        start = len(list(images.glob("*.nii.gz"))) if images.is_dir() else 0
        return lambda: images.is_dir() and len(list(images.glob("*.nii.gz"))) > start

    def compare(self, work: Path) -> list[str]:
        problems = [f"left behind: {p}" for p in leftovers(work / "faulted")]
        ref, got = (json.loads((work / w / "fmabs.json").read_text()) for w in ("reference", "faulted"))
        for key in ("cases", "split", "classes"):
            if ref.get(key) != got.get(key):
                problems.append(f"fmabs.json '{key}' differs from the uninterrupted import")
        for sub in ("images", "labels"):
            for p in sorted((work / "reference" / sub).glob("*.nii.gz")):
                q = work / "faulted" / sub / p.name
                if not q.is_file() or not np.array_equal(_voxels(p), _voxels(q)):
                    problems.append(f"{sub}/{p.name} differs or is missing")
        check = run(fmabs("check", "--project", str(work / "faulted")))
        if check.returncode:
            problems.append(f"fmabs check: {check.stdout[-800:]}{check.stderr[-800:]}")
        return problems


class PredictScenario(Scenario):
    """``fmabs predict`` on a folder: the same outputs as an uninterrupted run, none half-written."""

    name = "predict"
    max_delay = 0.3  # a scan takes about a second

    def __init__(self, scans: int = 16, shape: tuple[int, int, int] = (64, 64, 48), overlap: str = "0.75"):
        self.scans, self.shape, self.overlap = scans, shape, overlap

    def prepare(self, work: Path) -> None:
        from fmabs_core.data.phantom import write_dataset

        project = _phantom_project(work)
        done = run(fmabs("train", "--project", str(project), "--run", "m", "--method", "sup", "--iterations", "2",
                         *TINY))
        assert done.returncode == 0, done.stderr
        write_dataset(work / "scans", n_cases=self.scans, shape=self.shape, seed=9)

    def argv(self, work: Path, which: str) -> list[str]:
        return fmabs("predict", "--model", str(work / "project" / "runs" / "m"), "--input",
                     str(work / "scans" / "imagesTr"), "--output", str(work / which), "--probabilities",
                     "--overlap", self.overlap, "--device", "cpu")

    def at_work(self, work: Path) -> Callable[[], bool]:
        out = work / "faulted"
        start = len(list(out.glob("*.nii.gz"))) if out.is_dir() else 0
        return lambda: out.is_dir() and len(list(out.glob("*.nii.gz"))) > start

    def compare(self, work: Path) -> list[str]:
        problems = [f"left behind: {p}" for p in leftovers(work / "faulted")]
        ref = sorted(p.name for p in (work / "reference").glob("*.nii.gz"))
        got = sorted(p.name for p in (work / "faulted").glob("*.nii.gz"))
        if ref != got:
            problems.append(f"outputs {got} differ from {ref}")
        for name in ref:
            if name in got and not np.array_equal(_voxels(work / "reference" / name), _voxels(work / "faulted" / name)):
                problems.append(f"{name} differs")
        return problems


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "train-sup": lambda: TrainScenario("sup", 60),
    "train-mt": lambda: TrainScenario("mt", 60),
    "train-fmabs": lambda: TrainScenario("fmabs", 16, ("--pseudo-warmup", "0.25", "--pseudo-every", "0.25",
                                                       "--pseudo-max-slices", "1")),
    "train-cfr": CfrScenario,
    "import": ImportScenario,
    "predict": PredictScenario,
}


#: smaller work for the test suite (each start of a command is a new Python with torch): fewer kills land
QUICK: dict[str, Callable[[], Scenario]] = {
    "train-fmabs": lambda: TrainScenario("fmabs", 8, ("--pseudo-warmup", "0.25", "--pseudo-every", "0.5",
                                                      "--pseudo-max-slices", "1")),
    "predict": lambda: PredictScenario(6, (48, 48, 40), "0.5"),
}


def run_scenario(name: str, kills: int, seed: int = 0, root: Path | None = None, quick: bool = False) -> FaultReport:
    """Prepare, run once uninterrupted, run again under ``kills`` SIGKILLs, and compare (``quick``: the smaller
    work of :data:`QUICK` where it has one)."""
    scenario = (QUICK.get(name, SCENARIOS[name]) if quick else SCENARIOS[name])()
    work = Path(tempfile.mkdtemp(prefix=f"faults-{name}-", dir=root))
    try:
        scenario.prepare(work)
        t = time.monotonic()
        ref = run(scenario.argv(work, "reference"))
        if ref.returncode:
            raise RuntimeError(f"{name}: the uninterrupted run failed: {ref.stderr[-2000:]}")
        report = kill_and_rerun(scenario.argv(work, "faulted"), kills, np.random.default_rng(seed),
                                lambda: scenario.at_work(work), scenario.max_delay, time.monotonic() - t)
        report.scenario = name
        if not report.problems:
            report.problems = scenario.compare(work)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = ap.parse_args(argv)
    failed = 0
    print(f"{'scenario':<14}{'kills':>6}{'starts':>7}{'seconds':>9}  result")
    for name in SCENARIOS:
        if args.k in name:
            r = run_scenario(name, args.kills, args.seed)
            failed += bool(r.problems)
            print(f"{name:<14}{r.kills:>6}{r.starts:>7}{r.seconds:>9.1f}  {'; '.join(r.problems) or 'same as uninterrupted'}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
