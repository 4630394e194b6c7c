"""``fmabs bench memory``: peak memory of import and training as the number of scans grows, and of prediction.

Synthetic scans of the size given (generated, not shipped) are imported into a project per count, then
``fmabs train`` runs on each project twice, with ``--scan-store ram`` (every scan read into memory) and
``--scan-store disk`` (preprocessed once into memory-mapped files, the default). Each command runs in its
own wrapper process that reports the command's peak resident memory (``getrusage`` of its children), so
the figures are the commands' own, not this process's. Steps per second come from the runs' events (the
median step, startup and preprocessing excluded).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fmabs_core.contract import fmabs_argv

#: runs the command given as JSON and prints its peak RSS in bytes (Linux reports ru_maxrss in KiB)
_WRAPPER = ("import json, resource, subprocess, sys\n"
            "done = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "sys.stderr.write(done.stderr.decode(errors='replace')[-4000:] if done.returncode else '')\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
            "sys.exit(done.returncode)\n")


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """Run ``argv``; (its peak resident memory in bytes, its seconds). Raises with its error output if it fails."""
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(argv)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1]), time.time() - t0


def median_step(run_dir: Path) -> float:
    """The median seconds per training step of a run (its progress events)."""
    steps = []
    for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("type") == "progress" and event.get("step_s") is not None:
            steps.append(float(event["step_s"]))
    return statistics.median(steps[1:] or steps)  # the first step warms up


def bench_memory(work: Path, counts: list[int], shape: tuple[int, int, int], iterations: int, device: str,
                 patch: tuple[int, int, int] = (96, 96, 64), width: int = 8, stores: tuple[str, ...] = ("ram", "disk"),
                 progress: Callable[[str], None] = lambda _m: None,
                 predict_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Rows (scans, step, store): peak RSS and seconds; see the module doc."""
    from fmabs_core.data.phantom import write_dataset

    work = Path(work)
    rows = []
    for n in sorted(counts):
        data = work / f"data-{n}"
        if not (data / "labelsTr").is_dir() or len(list((data / "labelsTr").glob("*.nii.gz"))) < n:
            progress(f"{n} scans: generating {n} synthetic scans of {shape[0]}x{shape[1]}x{shape[2]}")
            write_dataset(data, n_cases=n, shape=shape, seed=n)
        project = work / f"project-{n}"
        if not (project / "fmabs.json").exists():
            progress(f"{n} scans: fmabs import")
            rss, seconds = peak_rss(fmabs_argv(["import", str(data), "--project", str(project), "--val-fraction", "0"],
                                               sys.executable))
            rows.append({"scans": n, "step": "import", "store": "", "peak_rss_gb": rss / 1e9, "seconds": seconds})
            peak_rss(fmabs_argv(["crosslabel", "simulate", "--project", str(project), "--count", str(max(1, n // 5))],
                                sys.executable))
        for store in stores:
            run = f"mem-{store}-{time.strftime('%Y%m%d-%H%M%S')}"  # a new run each time: nothing is overwritten
            progress(f"{n} scans: fmabs train --scan-store {store}")
            rss, seconds = peak_rss(fmabs_argv(
                ["train", "--project", str(project), "--run", run, "--method", "mt", "--iterations", str(iterations),
                 "--patch-size", *map(str, patch), "--width", str(width), "--batch-size", "2",
                 "--labelled-batch-size", "1", "--val-every", str(10 * iterations), "--ckpt-every", str(iterations),
                 "--device", device, "--scan-store", store], sys.executable))
            rows.append({"scans": n, "step": "train", "store": store, "peak_rss_gb": rss / 1e9, "seconds": seconds,
                         "step_s": median_step(project / "runs" / run)})
    if predict_shape is not None:
        rows.append(_predict_row(work, predict_shape, patch, width, device, progress))
    return {"shape": list(shape), "voxels_per_scan": shape[0] * shape[1] * shape[2], "iterations": iterations,
            "patch": list(patch), "device": device, "rows": rows}


def _predict_row(work: Path, shape: tuple[int, int, int], patch: tuple[int, int, int], width: int, device: str,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """``fmabs predict`` of one synthetic scan of ``shape`` with a model trained for 2 iterations (its size, not its
    quality, matters), windows side by side (overlap 0: the memory is the scan's, the time the fewest windows)."""
    from fmabs_core.data.phantom import write_dataset

    tag = "x".join(map(str, shape))
    scan = work / f"predict-{tag}"
    if not (scan / "imagesTr").is_dir():
        progress(f"predict: generating one synthetic scan of {tag}")
        write_dataset(scan, n_cases=1, shape=shape, seed=1)
    project = work / "predict-model"
    if not (project / "runs" / "m" / "model.pt").exists():
        small = work / "predict-model-data"
        write_dataset(small, n_cases=2, shape=tuple(max(p, 16) for p in patch), seed=2)
        peak_rss(fmabs_argv(["import", str(small), "--project", str(project), "--val-fraction", "0"], sys.executable))
        peak_rss(fmabs_argv(["train", "--project", str(project), "--run", "m", "--method", "sup-dense", "--iterations",
                             "2", "--patch-size", *map(str, patch), "--width", str(width), "--batch-size", "2",
                             "--labelled-batch-size", "2", "--device", device], sys.executable))
    out = work / f"predict-out-{time.strftime('%Y%m%d-%H%M%S')}"  # a new folder each time: nothing is overwritten
    progress(f"predict: fmabs predict on {tag}")
    rss, seconds = peak_rss(fmabs_argv(["predict", "--model", str(project / "runs" / "m"), "--input",
                                        str(scan / "imagesTr"), "--output", str(out), "--overlap", "0",
                                        "--device", device], sys.executable))
    model_mb = (project / "runs" / "m" / "model.pt").stat().st_size / 1e6
    return {"scans": 1, "step": "predict", "store": "", "peak_rss_gb": rss / 1e9, "seconds": seconds,
            "shape": list(shape), "model_mb": model_mb}


def format_memory(report: dict[str, Any]) -> str:
    lines = [f"synthetic scans of {'x'.join(map(str, report['shape']))} voxels; fmabs train: mt, "
             f"{report['iterations']} iterations, patch {'x'.join(map(str, report['patch']))}, {report['device']}",
             f"{'scans':>6} {'command':<8} {'store':<5} {'peak RSS GB':>11} {'seconds':>8} {'s/step':>7}"]
    for r in report["rows"]:
        step = f"{r['step_s']:7.3f}" if "step_s" in r else f"{'':>7}"
        lines.append(f"{r['scans']:>6} {r['step']:<8} {r['store']:<5} {r['peak_rss_gb']:11.2f} {r['seconds']:8.1f} {step}"
                     + (f"  one scan of {'x'.join(map(str, r['shape']))}, model {r['model_mb']:.0f} MB"
                        if r["step"] == "predict" else ""))
    return "\n".join(lines)
