"""``fmabs bench command``: what the command a user runs costs, against a plain reference-style loop.

Whole processes, side by side on one scan: ``fmabs pseudo-label`` exactly as a user runs it (Python's
start, imports, the model's build, the NIfTI read, the three views, the files written) and
:mod:`fmabs_core.cli.reference_loop` (the model's own package, one slice per call, no tuning) over
as many slices of each view, chosen by the same rule. They alternate, ``repeats`` times each, so
that a change of machine load hits both; the ratio of their median wall times is the speed-up a user
gets. The reference is not charged for reading the NIfTI or writing results (its slices come ready in
an ``.npz``), so the ratio understates ours, if anything.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fmabs_core.errors import InputError


def _reference_inputs(image: np.ndarray, label: np.ndarray, max_slices: int | None, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The slices ``fmabs pseudo-label`` prompts (same views, same choice rule), padded to one shape, and a
    box per slice; with the count per view."""
    from fmabs_core.contract import VIEWS
    from fmabs_core.generalist.prompts import jitter_box, mask_box
    from fmabs_core.generalist.pseudolabel import _pick, view_slices

    rng = np.random.default_rng(seed)
    picked, counts = [], {}
    for view in VIEWS:
        img_v, lab_v = view_slices(image, view), view_slices(label, view)
        idx = _pick(np.flatnonzero((lab_v > 0).reshape(lab_v.shape[0], -1).any(axis=1)), max_slices)
        counts[view] = int(idx.size)
        for k in idx:
            box = jitter_box(mask_box(lab_v[k] > 0), lab_v.shape[1:], rng, 10)
            picked.append((np.asarray(img_v[k], np.float32), box))
    if not picked:
        raise InputError("the label is empty: nothing to prompt.")
    h = max(s.shape[0] for s, _ in picked)
    w = max(s.shape[1] for s, _ in picked)
    slices = np.zeros((len(picked), h, w), np.float32)
    for i, (s, _) in enumerate(picked):
        slices[i, : s.shape[0], : s.shape[1]] = s
    return slices, np.stack([b for _, b in picked]).astype(np.float32), counts


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({done.returncode}): {done.stderr[-800:]}")
    return seconds, done.stdout


def bench_command(image_path: str, label_path: str, max_slices: int | None, repeats: int = 2,
                  progress=lambda items, **kw: items) -> dict:
    """Median wall seconds of ``fmabs pseudo-label`` and of the reference loop over the same slices."""
    from fmabs_core.data import io

    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}.")
    image, label = io.load_image(image_path), io.load_label(label_path)
    problems = io.check_pair(image, label)
    if problems:
        raise InputError(" ".join(problems))
    slices, boxes, counts = _reference_inputs(image.array, label.array, max_slices)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    times: dict[str, list[float]] = {"fmabs pseudo-label": [], "reference loop": []}
    encoder = ""
    with tempfile.TemporaryDirectory(prefix="fmabs-bench-command-") as tmp:
        inputs = Path(tmp) / "slices.npz"
        np.savez(inputs, slices=slices, boxes=boxes)
        ours = [sys.executable, "-m", "fmabs_core", "pseudo-label", "--image", str(image_path), "--prompt-from",
                str(label_path), "--fusion", "mv", "--device", "cpu", "--output", str(Path(tmp) / "out"),
                "--overwrite"] + ([] if max_slices is None else ["--pseudo-max-slices", str(max_slices)])
        reference = [sys.executable, "-m", "fmabs_core.cli.reference_loop", str(inputs), str(Path(tmp) / "ref.npz")]
        for _ in progress(range(repeats), desc="repeats"):
            seconds, out = _timed(ours, env)
            times["fmabs pseudo-label"].append(seconds)
            found = re.search(r"^generalist: (.*)$", out, re.M)
            encoder = found.group(1) if found else encoder
            times["reference loop"].append(_timed(reference, env)[0])
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"image": str(image_path), "shape": list(image.array.shape), "slices_per_view": counts,
            "slices": int(slices.shape[0]), "max_slices": max_slices, "repeats": repeats, "seconds": times,
            "median_seconds": median, "speedup": median["reference loop"] / median["fmabs pseudo-label"],
            "encoder": encoder, "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}


def format_command(report: dict) -> str:
    lines = [f"{report['image']} {tuple(report['shape'])}: {report['slices']} prompted slices "
             f"({', '.join(f'{v} {n}' for v, n in report['slices_per_view'].items())}); cpus {report['cpu_count']}, "
             f"load {report['load_avg_1min']:.1f}",
             f"{'whole process':<22}{'median s':>10}  each run (s)"]
    for name, values in report["seconds"].items():
        lines.append(f"{name:<22}{report['median_seconds'][name]:>10.1f}  {' '.join(f'{v:.1f}' for v in values)}")
    lines.append(f"speed-up: {report['speedup']:.2f}x  (fmabs pseudo-label's encoder: {report['encoder'] or '?'})")
    return "\n".join(lines)
