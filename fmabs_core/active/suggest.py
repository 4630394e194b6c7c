"""Which scans to cross-label next, and which three slices of each.

Scoring keeps only the probabilities of the current top-K scans in memory, so that scoring a large
unlabelled pool costs one prediction per scan and no more than K probability volumes.

A slice suggestion per view (what ``fmabs suggest`` prints and the ``suggestion`` event carries)::

    {"index": 40,                       # slice on the canonical RAS grid (= canonical_index)
     "canonical_index": 40, "canonical_axis": 2, "canonical_voxel": [55.5, 63.5, 40.0],
     "file_index": 47, "file_axis": 2,  "file_voxel": [55.5, 63.5, 47.0],   # the NIfTI file's own grid
     "ras": [x, y, z]}                  # world (RAS mm) of the slice's centre point

The centre point is the middle of the slice plane (in-plane voxel coordinate (n-1)/2), so a viewer
can jump there; ``ras = file affine @ file_voxel`` exactly.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import numpy as np

from fmabs_core.data import io
from fmabs_core.data.crosslabel import object_centre_slices
from fmabs_core.data.io import VIEW_AXIS, VIEWS
from fmabs_core.active.strategies import Strategy, normalised_entropy

log = logging.getLogger(__name__)

SliceMode = Literal["centre", "uncertain"]
SLICE_MODES = ("centre", "uncertain")


# ---- slices --------------------------------------------------------------------------------------
def predicted_centre_slices(probs: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, int]:
    """Per view, the slice through the centre of the predicted object's bounding box.

    The box centre can miss a non-convex object (two lobes); then the nearest slice that cuts the
    object is used, so the expert always sees it. No prediction, or no foreground: the scan's centre.
    """
    if probs is None:
        return {view: shape[VIEW_AXIS[view]] // 2 for view in VIEWS}
    mask = np.asarray(probs).argmax(0) > 0
    out = object_centre_slices(mask)
    if not mask.any():
        return out
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if out[view] not in hit:
            out[view] = int(hit[np.argmin(np.abs(hit - out[view]))])
    return out


def uncertain_slices(probs: np.ndarray) -> dict[str, int]:
    """Per view, the slice with the highest mean normalised entropy (first one on ties)."""
    ent = normalised_entropy(probs)
    out = {}
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        out[view] = int(np.argmax(ent.mean(axis=other)))
    return out


def choose_slices(probs: np.ndarray | None, shape: tuple[int, ...], mode: SliceMode = "centre") -> dict[str, int]:
    if mode == "centre":
        return predicted_centre_slices(probs, shape)
    if mode == "uncertain":
        if probs is None:
            return predicted_centre_slices(None, shape)
        return uncertain_slices(probs)
    raise ValueError(f"unknown slice placement '{mode}' (choose from {', '.join(SLICE_MODES)})")


def canonical_to_file(volume: io.Volume) -> np.ndarray:
    """4x4 map from canonical voxel coordinates to the file's voxel coordinates (a signed permutation)."""
    return np.linalg.inv(volume.source_affine) @ volume.affine


def slice_point(volume: io.Volume, view: str, index: int) -> dict[str, Any]:
    """Where a canonical slice is, on both voxel grids and in RAS (see the module docstring)."""
    if view not in VIEW_AXIS:
        raise ValueError(f"unknown view '{view}' (use axial, coronal or sagittal)")
    shape = volume.array.shape
    axis = VIEW_AXIS[view]
    if not 0 <= index < shape[axis]:
        raise ValueError(f"{view} slice {index} is outside the volume (size {shape[axis]} on that axis)")
    voxel = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    voxel[axis] = index
    to_file = canonical_to_file(volume)
    file_voxel = (to_file @ np.append(voxel, 1.0))[:3]
    file_axis = int(np.argmax(np.abs(to_file[:3, axis])))
    ras = (volume.affine @ np.append(voxel, 1.0))[:3]
    return {
        "index": int(index),
        "canonical_index": int(index),
        "canonical_axis": axis,
        "canonical_voxel": [round(float(v), 3) for v in voxel],
        "file_index": int(np.rint(file_voxel[file_axis])),
        "file_axis": file_axis,
        "file_voxel": [round(float(v), 3) for v in file_voxel],
        "ras": [round(float(v), 4) for v in ras],
    }


def suggest_slices(probs: np.ndarray | None, volume: io.Volume, mode: SliceMode = "centre") -> dict[str, dict[str, Any]]:
    """The axial, coronal and sagittal slice to label in one scan, located for a viewer."""
    picks = choose_slices(probs, volume.array.shape, mode)
    return {view: slice_point(volume, view, picks[view]) for view in VIEWS}


# ---- scoring and selection -------------------------------------------------------------------------
@dataclass
class Selection:
    """The outcome of scoring a pool: the chosen scans (best first) and every candidate's score."""

    cases: list[str]
    scores: dict[str, float]
    probs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # chosen scans only


def select(candidates: Iterable[str], k: int, strategy: Strategy, progress: float,
           predict: Callable[[str], np.ndarray], show: Callable[..., Iterable] | None = None) -> Selection:
    """Score every candidate and keep the top ``k`` (ties: the smaller case id, for reproducibility).

    ``predict(case_id)`` returns class probabilities; it is not called for strategies that need none.
    """
    candidates = sorted(candidates)
    if k < 0:
        raise ValueError(f"k must be >= 0 (got {k})")
    scores: dict[str, float] = {}
    kept: list[tuple[float, str]] = []  # min-heap of (score, negated-order key) of the best k so far
    probs_kept: dict[str, np.ndarray] = {}
    order = {cid: i for i, cid in enumerate(candidates)}
    iterator = show(candidates, desc=f"scoring ({strategy.name})", total=len(candidates)) if show else candidates
    for cid in iterator:
        probs = predict(cid) if strategy.needs_prediction else None
        score = float(strategy.score(probs, progress))
        if not np.isfinite(score):
            raise FloatingPointError(f"{strategy.name} score of '{cid}' is {score}; the prediction has NaN")
        scores[cid] = score
        if k == 0:
            continue
        item = (score, -order[cid])
        if len(kept) < k:
            heapq.heappush(kept, item)
        elif item > kept[0]:
            _, dropped = heapq.heapreplace(kept, item)
            probs_kept.pop(candidates[-dropped], None)
        else:
            continue
        if probs is not None:
            probs_kept[cid] = probs
    chosen = [candidates[-i] for _, i in sorted(kept, reverse=True)]
    for cid in list(probs_kept):
        if cid not in chosen:
            probs_kept.pop(cid)
    log.info("%s scores: %s; chosen: %s", strategy.name,
             ", ".join(f"{c}={s:.4f}" for c, s in sorted(scores.items(), key=lambda x: -x[1])), ", ".join(chosen))
    return Selection(chosen, scores, probs_kept)


def describe(selection: Selection, slices: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per chosen scan: case, score, rank and the three slices (the ``cases`` list of a suggestion)."""
    return [{"case": cid, "score": selection.scores[cid], "rank": rank, **slices[cid]}
            for rank, cid in enumerate(selection.cases, start=1)]


def format_request(cases: list[dict[str, Any]]) -> str:
    """Human-readable lines: which scans and slices to label (canonical slice index and RAS point)."""
    lines = []
    for item in cases:
        parts = []
        for view in VIEWS:
            s = item.get(view)
            if s:
                ras = ", ".join(f"{v:.1f}" for v in s["ras"])
                parts.append(f"{view} slice {s['index']} (file index {s['file_index']}, RAS {ras})")
        lines.append(f"  {item['case']}: " + "; ".join(parts))
    return "\n".join(lines)
