"""``fmabs bench ceiling``: how good can a generalist's pseudo-labels be on these scans?

FM-ABS prompts the generalist with the teacher's mask. Whether that helps depends on whether the
generalist's fused label is better than the mask it was prompted with. This prompts it, as a
pseudo-label round does, with the ground truth (the ceiling) and with the truth grown and shrunk by a
few voxels (a teacher whose boundary is off outwards or inwards), and reports each view's and the
fused label's Dice. Measured on LA with LiteMedSAM: about 0.90 fused with perfect prompts, and a
teacher grown by 2 voxels made worse. Use training scans: choosing a generalist on test scans is
choosing a model on test data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmabs_core.contract import VIEWS
from fmabs_core.errors import InputError

VIEWS_AND_FUSED = (*VIEWS, "fused")


def prompt_masks(truth: np.ndarray, margin: int) -> dict[str, np.ndarray]:
    """The truth, and the truth grown and shrunk by ``margin`` voxels (6-connected steps), per class."""
    from scipy import ndimage

    ball = ndimage.generate_binary_structure(3, 1)
    grown = np.zeros_like(truth)
    shrunk = np.zeros_like(truth)
    for c in sorted(set(np.unique(truth).tolist()) - {0}):
        m = truth == c
        grown[ndimage.binary_dilation(m, ball, iterations=margin) & (grown == 0)] = c
        shrunk[ndimage.binary_erosion(m, ball, iterations=margin)] = c
    return {"truth": truth, f"grown {margin}": grown, f"shrunk {margin}": shrunk}


def bench_ceiling(la_dir: str | None, scans: int = 2, generalist: str = "litemedsam", device: str = "cpu",
                  checkpoint: str | None = None, margin: int = 2, fusion: str = "mv", box_jitter: int = 10,
                  max_slices: int | None = None, seed: int = 0, case_ids: list[str] | None = None,
                  progress=lambda items, **kw: items) -> dict[str, Any]:
    """Pseudo-label Dice per scan, prompt and view; each slice is encoded once for the three prompts."""
    from fmabs_core.cli.bench import load_la_cases
    from fmabs_core.generalist import get_generalist
    from fmabs_core.generalist.embcache import EmbeddingCache
    from fmabs_core.generalist.pseudolabel import dice, multiview_pseudolabel, on_slices

    if scans < 1:
        raise InputError(f"--scans must be >= 1 (got {scans}).")
    if margin < 1:
        raise InputError(f"--margin must be >= 1 voxel (got {margin}).")
    cases = load_la_cases(Path(la_dir) if la_dir else None, scans, ids=case_ids)
    g = get_generalist(generalist, device=device, checkpoint=checkpoint)
    rows = []
    for case, image, truth in progress(cases, desc="scans"):
        cache = EmbeddingCache(g.device)  # per scan: its slices are reused by its three prompt masks only
        truth = truth.astype(np.uint8)
        for name, mask in prompt_masks(truth, margin).items():
            result = multiview_pseudolabel(g, image, mask, np.random.default_rng(seed), fusion=fusion,
                                           box_jitter=box_jitter, max_slices_per_view=max_slices, cache=cache)
            row = {"case": case, "prompt": name, "prompt_dice": dice(mask, truth), "seconds": result.seconds}
            if max_slices is None:
                row.update({v: dice(result[v], truth) for v in VIEWS_AND_FUSED})
            else:  # only some slices were prompted: each view on its prompted slices, no fused figure
                row.update({v: dice(result[v], truth, on_slices(truth.shape, v, result.slices[v])) for v in VIEWS})
                row["fused"] = float("nan")
            rows.append(row)
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    mean = {p: {k: _mean([r[k] for r in rows if r["prompt"] == p]) for k in ("prompt_dice", *VIEWS_AND_FUSED)}
            for p in prompts}
    return {"generalist": repr(g), "device": str(g.device), "fusion": fusion, "box_jitter": box_jitter,
            "max_slices_per_view": max_slices, "margin": margin, "rows": rows, "mean": mean}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def format_ceiling(report: dict[str, Any]) -> str:
    head = f"{'case':<22} {'prompt mask':<12} {'its Dice':>8} " + " ".join(f"{v:>9}" for v in VIEWS_AND_FUSED)
    lines = [f"{report['generalist']}, {report['fusion']} fusion, box jitter 0-{report['box_jitter']} px", head]
    if report["max_slices_per_view"] is not None:
        lines.insert(1, f"{report['max_slices_per_view']} slices per view: each view's Dice on its prompted slices "
                        "(the prompt mask's Dice is over the scan), no fused figure")
    for r in report["rows"]:
        lines.append(f"{r['case']:<22} {r['prompt']:<12} {r['prompt_dice']:8.4f} "
                     + " ".join(f"{r[v]:9.4f}" for v in VIEWS_AND_FUSED))
    for p, m in report["mean"].items():
        gain = "" if np.isnan(m["fused"]) else f"   fused - prompt {m['fused'] - m['prompt_dice']:+.4f}"
        lines.append(f"{'mean':<22} {p:<12} {m['prompt_dice']:8.4f} " + " ".join(f"{m[v]:9.4f}" for v in VIEWS_AND_FUSED)
                     + gain)
    return "\n".join(lines)
