"""Pseudo-labelling speed: the batched path vs a one-slice-at-a-time loop (the reference code's style).

Each mode runs in its own fresh (spawned) process, so that its peak memory is its own: on CPU the
process's peak resident set (``getrusage`` maxrss), on CUDA ``torch.cuda.max_memory_allocated``.
Model building and one warm-up slice are excluded from the timing in both modes (the reference code
also rebuilt SAM for every case and view; that cost is not counted against it here).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

#: where the LA 2018 scans live (design: ../shared/data/la2018 beside the repository)
LA_DIR_CANDIDATES = (
    os.environ.get("FMABS_LA_DIR", ""),
    str(Path(__file__).resolve().parents[3] / "shared" / "data" / "la2018"),
)


def _synthetic_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 160 x 128 x 88 noisy volume with a bright ellipsoid (when no real scan is available)."""
    rng = np.random.default_rng(seed)
    shape = (160, 128, 88)
    x, y, z = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    obj = (x / 40) ** 2 + (y / 30) ** 2 + (z / 20) ** 2 <= 1
    image = rng.normal(0, 0.3, shape).astype(np.float32) + 2.0 * obj
    return image, obj.astype(np.uint8)


def load_case(image: str | None = None, label: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, mask, description): the given files, else the first LA 2018 scan, else a synthetic one."""
    from fmabs_core.data import io

    if image:
        if not label:
            raise InputError("--image needs --label (the mask that gives the prompts).")
        return io.load_image(image).array, io.load_label(label).array, str(image)
    for d in LA_DIR_CANDIDATES:
        if d and (Path(d) / "imagesTr").is_dir():
            imgs = io.list_niftis(Path(d) / "imagesTr")
            if imgs:
                lab = Path(d) / "labelsTr" / imgs[0].name
                return io.load_image(imgs[0]).array, io.load_label(lab).array, str(imgs[0])
    img, lab = _synthetic_case()
    return img, lab, "synthetic 160x128x88 ellipsoid"


def load_la_cases(la_dir: Path | None, n: int,
                  ids: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(case, image, label) of the first ``n`` LA 2018 scans, or of the scans ``ids`` (canonical grid);
    one clear line if absent. Only the scans returned are read."""
    from fmabs_core.data import io
    from fmabs_core.errors import InputError

    dirs = [Path(la_dir)] if la_dir else [Path(d) for d in LA_DIR_CANDIDATES if d]
    for d in dirs:
        if (d / "imagesTr").is_dir():
            imgs = io.list_niftis(d / "imagesTr")
            if ids:
                missing = sorted(set(ids) - {io.case_id(p) for p in imgs})
                if missing:
                    raise InputError(f"--cases: {', '.join(missing)} not in --la's imagesTr/; give case ids as the "
                                     "file names without .nii.gz")
                imgs = [p for p in imgs if io.case_id(p) in ids]
            else:
                imgs = imgs[:n]
            return [(io.case_id(p), io.load_image(p).array, io.load_label(d / "labelsTr" / p.name).array)
                    for p in imgs]
    raise InputError(f"no LA scans found (looked in {', '.join(map(str, dirs))}); give --la DIR "
                     "(a folder with imagesTr/ and labelsTr/).")


def _worker(mode: str, name: str, device: str, checkpoint: str | None, batch_size: int | None,
            slices: np.ndarray, boxes: np.ndarray, window: tuple[float, float]) -> dict:
    import torch

    from fmabs_core.generalist import get_generalist

    g = get_generalist(name, device=device, checkpoint=checkpoint)
    cuda = g.device.type == "cuda"
    g.segment(slices[:1], boxes[:1], intensity_window=window)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    bs = g.batch_size(batch_size) if mode == "batched" else 1
    t0 = time.perf_counter()
    if mode == "naive":
        for i in range(slices.shape[0]):  # encode + decode one slice per call
            g.segment(slices[i : i + 1], boxes[i : i + 1], intensity_window=window)
    else:
        emb = g.encode(slices, intensity_window=window, batch_size=bs)
        g.decode(emb, boxes)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "GPU max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "process max RSS"
    return {"mode": mode, "batch_size": bs, "slices": int(slices.shape[0]), "seconds": dt,
            "slices_per_s": slices.shape[0] / dt, "peak_mb": peak, "peak_kind": peak_kind,
            "device": str(g.device), "threads": torch.get_num_threads()}


def _run_isolated(*args) -> dict:
    return _run_isolated_fn(_worker, *args)


def _run_isolated_fn(fn, *args) -> dict:
    """``fn(*args)`` in a fresh spawned process: its own peak memory, allocator and thread state."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def bench_pseudolabel(
    generalist: str = "litemedsam",
    n_slices: int = 8,
    device: str = "auto",
    batch_size: int | None = None,
    image: str | None = None,
    label: str | None = None,
    checkpoint: str | None = None,
    isolate: bool = True,
) -> dict:
    """Time ``n_slices`` axial foreground slices both ways; extrapolate to a whole scan (3 views)."""
    from fmabs_core.generalist import intensity_range
    from fmabs_core.generalist.models import canonical_name, resolve_device
    from fmabs_core.generalist.prompts import jitter_box, mask_box
    from fmabs_core.generalist.pseudolabel import view_slices

    if n_slices < 1:
        raise InputError(f"--slices must be >= 1, got {n_slices}.")
    name = canonical_name(generalist)
    dev = str(resolve_device(device))
    img, lab, source = load_case(image, label)
    window = intensity_range(img)
    per_view = {}
    for view in ("axial", "coronal", "sagittal"):
        lv = view_slices(lab, view)
        per_view[view] = int(lv.reshape(lv.shape[0], -1).any(axis=1).sum())
    iv, lv = view_slices(img, "axial"), view_slices(lab, "axial")
    idx = np.flatnonzero(lv.reshape(lv.shape[0], -1).any(axis=1))
    if idx.size == 0:
        raise InputError(f"{source}: the mask is empty; nothing to prompt.")
    idx = idx[np.round(np.linspace(0, idx.size - 1, min(n_slices, idx.size))).astype(int)]
    rng = np.random.default_rng(0)
    slices = np.ascontiguousarray(iv[idx]).astype(np.float32)
    boxes = np.stack([jitter_box(mask_box(lv[k] > 0), lv.shape[1:], rng, 10) for k in idx])
    run = _run_isolated if isolate else _worker
    rows = [run(mode, name, dev, checkpoint, batch_size, slices, boxes, window) for mode in ("naive", "batched")]
    scan_slices = sum(per_view.values())
    for r in rows:
        r["seconds_per_scan"] = scan_slices / r["slices_per_s"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"generalist": name, "device": dev, "source": source, "slice_shape": list(slices.shape[1:]),
            "scan_fg_slices": per_view, "rows": rows, "speedup": rows[1]["slices_per_s"] / rows[0]["slices_per_s"],
            "cpu_count": os.cpu_count(), "load_avg_1min": load, "python": sys.version.split()[0],
            "machine": platform.processor() or platform.machine()}


def format_table(report: dict) -> str:
    """The report as a small text table."""
    lines = [
        f"generalist {report['generalist']} on {report['device']} | {report['source']} | slice "
        f"{report['slice_shape'][0]}x{report['slice_shape'][1]} | foreground slices per scan "
        f"{report['scan_fg_slices']} | cpus {report['cpu_count']}, load {report['load_avg_1min']:.1f}",
        f"{'mode':<8} {'batch':>5} {'slices':>6} {'seconds':>8} {'slices/s':>9} {'s/scan':>8} {'peak MiB':>9}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['mode']:<8} {r['batch_size']:>5} {r['slices']:>6} {r['seconds']:>8.2f} {r['slices_per_s']:>9.3f} "
            f"{r['seconds_per_scan']:>8.1f} {r['peak_mb']:>9.0f}"
        )
    lines.append(f"speed-up batched / naive: {report['speedup']:.2f}x   (peak = {report['rows'][0]['peak_kind']})")
    return "\n".join(lines)


@dataclass(frozen=True)
class PrecisionConfig:
    """One way of running the generalist, as ``fmabs bench precision`` compares them."""

    dtype: str
    layout: str = "auto"
    store: str | None = None  # cached embeddings' storage dtype (None: no cache)
    runtime: str = "torch"
    tuned: bool = True  # False: FMABS_CPU_TUNING=0, the encoder as it ran before the CPU tuning


#: the first is the reference: fp32 as the speed issue measured it (contiguous, no CPU tuning)
PRECISION_CONFIGS: dict[str, PrecisionConfig] = {
    "fp32-before": PrecisionConfig("float32", "contiguous", tuned=False),
    "fp32+cl-before": PrecisionConfig("float32", "channels_last", tuned=False),
    "fp32": PrecisionConfig("float32"),
    "fp32+fp16cache": PrecisionConfig("float32", store="float16"),
    "fp32+openvino": PrecisionConfig("float32", runtime="openvino"),
    "bf16": PrecisionConfig("bfloat16"),  # the CUDA default (its Dice against fp32 never measured on a GPU yet)
    "bf16+cl": PrecisionConfig("bfloat16", "channels_last"),
    "bf16+openvino": PrecisionConfig("bfloat16", runtime="openvino"),
}


def default_precision_configs() -> tuple[str, ...]:
    """Every config this machine can run (the OpenVINO ones need ``pip install openvino``)."""
    import importlib.util

    has_ov = importlib.util.find_spec("openvino") is not None
    return tuple(c for c, pc in PRECISION_CONFIGS.items() if pc.runtime != "openvino" or has_ov)


def _precision_worker(name: str, device: str, la_dir: str | None, scans: int, slices: int,
                      encoder_slices: int) -> dict:
    """One config in a fresh process: the CPU tuning is process-wide and cannot be undone in place."""
    from fmabs_core.device import ENV_CPU_TUNING
    from fmabs_core.data.io import VIEWS
    from fmabs_core.generalist import get_generalist, intensity_range
    from fmabs_core.generalist.embcache import EmbeddingCache
    from fmabs_core.generalist.pseudolabel import dice, multiview_pseudolabel, on_slices, view_slices

    pc = PRECISION_CONFIGS[name]
    os.environ[ENV_CPU_TUNING] = "1" if pc.tuned else "0"
    cases = load_la_cases(Path(la_dir) if la_dir else None, scans)
    t0 = time.perf_counter()
    g = get_generalist("litemedsam", device=device, dtype=pc.dtype, layout=pc.layout, runtime=pc.runtime)
    g.encode(np.zeros((1, 64, 64), np.float32), (0.0, 1.0))  # warm-up: conversion, oneDNN primitives
    setup = time.perf_counter() - t0
    # the encoder alone: the same axial slices of the first scan, one call per slice
    image = cases[0][1]
    axial = view_slices(image, "axial")
    pick = np.linspace(axial.shape[0] // 4, 3 * axial.shape[0] // 4, encoder_slices).astype(int)
    window = intensity_range(image)
    g.encode(axial[pick], window)
    t0 = time.perf_counter()
    g.encode(axial[pick], window)  # in the generalist's own batches
    encoder_s = (time.perf_counter() - t0) / len(pick)
    rows, masks = [], {}
    for i, (cid, image, label) in enumerate(cases):
        cache = EmbeddingCache(g.device, tier="host", dtype=pc.store) if pc.store else None
        t0 = time.perf_counter()
        res = multiview_pseudolabel(g, image, label, np.random.default_rng([7, i]), max_slices_per_view=slices,
                                    cache=cache)
        seconds = time.perf_counter() - t0
        for view in VIEWS:
            mask = on_slices(label.shape, view, res.slices[view])  # the prompted slices
            rows.append({"case": cid, "config": name, "view": view, "dice": dice(res[view], label, mask),
                         "seconds": seconds, "slices": int(len(res.slices[view]))})
            masks[(cid, view)] = (np.packbits(res[view][mask]), np.packbits(mask))
    return {"config": name, "generalist": repr(g), "rows": rows, "masks": masks, "setup_seconds": setup,
            "encoder_ms_per_slice": 1000 * encoder_s, "threads": torch_threads()}


def bench_precision(scans: int = 2, slices: int = 4, device: str = "cpu", la_dir: str | None = None,
                    configs: tuple[str, ...] | None = None, encoder_slices: int = 6,
                    progress=lambda items, **kw: items) -> dict:
    """Pseudo-label Dice and time of the generalist in each precision, layout and runtime, on the same prompts.

    Why: a faster encoder (or a cheaper stored embedding) is only a default if it changes the
    pseudo-labels by less than 0.005 Dice. Each of ``scans`` LA scans is prompted by its ground
    truth on ``slices`` evenly spaced slices per view, with the same random box jitter in every
    configuration; Dice against the ground truth on those slices, and against the first config.
    Each config runs in its own fresh process, one after the other; the encoder alone is also timed
    on ``encoder_slices`` axial slices of the first scan.
    """
    from fmabs_core.generalist.models import resolve_device
    from fmabs_core.generalist.pseudolabel import dice

    configs = tuple(configs) if configs else default_precision_configs()
    if scans < 1 or slices < 1 or encoder_slices < 1:
        raise InputError(f"--scans, --slices and --encoder-slices must be >= 1 (got {scans}, {slices}, {encoder_slices}).")
    unknown = [c for c in configs if c not in PRECISION_CONFIGS]
    if unknown:
        raise InputError(f"unknown precision config(s) {', '.join(unknown)}; choose from {', '.join(PRECISION_CONFIGS)}.")
    dev = str(resolve_device(device))
    load_la_cases(Path(la_dir) if la_dir else None, 1)  # a missing folder fails here, with one line
    results = [_run_isolated_fn(_precision_worker, c, dev, la_dir, scans, slices, encoder_slices)
               for c in progress(configs, desc="configurations")]
    ref = results[0]
    rows = []
    for r in results:
        for row in r["rows"]:
            pred, mask = (np.unpackbits(a) for a in r["masks"][(row["case"], row["view"])])
            ref_pred = np.unpackbits(ref["masks"][(row["case"], row["view"])][0])
            n = int(mask.sum())
            row["agreement"] = dice(pred[:n].astype(bool), ref_pred[:n].astype(bool))
            rows.append(row)
    out: dict = {"device": dev, "generalists": {r["config"]: r["generalist"] for r in results}, "rows": rows,
                 "threads": ref["threads"], "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    by = {(r["case"], r["view"], r["config"]): r["dice"] for r in rows}
    out["mean_dice"] = {c: float(np.mean([r["dice"] for r in rows if r["config"] == c])) for c in configs}
    out["max_abs_dice_diff"] = {c: max(abs(by[(k[0], k[1], c)] - by[k]) for k in by if k[2] == configs[0])
                                for c in configs}
    t = {c: sum({r["case"]: r["seconds"] for r in rows if r["config"] == c}.values()) for c in configs}
    out["seconds"] = t
    out["speedup"] = {c: t[configs[0]] / t[c] for c in configs}
    out["setup_seconds"] = {r["config"]: r["setup_seconds"] for r in results}
    out["encoder_ms_per_slice"] = {r["config"]: r["encoder_ms_per_slice"] for r in results}
    out["encoder_speedup"] = {c: out["encoder_ms_per_slice"][configs[0]] / out["encoder_ms_per_slice"][c]
                              for c in configs}
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_precision(report: dict) -> str:
    configs = list(report["mean_dice"])
    lines = [f"pseudo-label precision on {report['device']} ({report['threads']} threads, load "
             f"{report['load_avg_1min']}); Dice vs ground truth on the prompted slices",
             f"{'case':<22} {'view':<9} " + " ".join(f"{c:>18}" for c in configs)]
    by: dict = {}
    for r in report["rows"]:
        by.setdefault((r["case"], r["view"]), {})[r["config"]] = r["dice"]
    for (case, view), d in by.items():
        lines.append(f"{case:<22} {view:<9} " + " ".join(f"{d[c]:18.4f}" for c in configs))
    lines.append(f"{'mean Dice':<32} " + " ".join(f"{report['mean_dice'][c]:18.4f}" for c in configs))
    lines.append(f"{'max |dDice| vs ' + configs[0]:<32} " + " ".join(f"{report['max_abs_dice_diff'][c]:18.4f}"
                                                                      for c in configs))
    lines.append(f"{'seconds':<32} " + " ".join(f"{report['seconds'][c]:18.1f}" for c in configs))
    lines.append(f"{'speed-up vs ' + configs[0]:<32} " + " ".join(f"{report['speedup'][c]:17.2f}x" for c in configs))
    lines.append(f"{'encoder ms per slice':<32} " + " ".join(f"{report['encoder_ms_per_slice'][c]:18.0f}"
                                                               for c in configs))
    lines.append(f"{'encoder speed-up':<32} " + " ".join(f"{report['encoder_speedup'][c]:17.2f}x" for c in configs))
    lines.append(f"{'setup seconds (once)':<32} " + " ".join(f"{report['setup_seconds'][c]:18.1f}" for c in configs))
    for c, g in report["generalists"].items():
        lines.append(f"  {c}: {g}")
    return "\n".join(lines)
