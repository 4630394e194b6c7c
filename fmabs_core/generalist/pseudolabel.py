"""Multi-view generalist pseudo-labels (FM-ABS Sec. 2.2).

The in-training teacher's prediction (or any mask) prompts a frozen 2D generalist slice by slice in
each of the three views; the three 3D answers are fused by unanimous agreement (UA, all 3 views) or
majority vote (MV, >= 2 of 3). Slices where the prompt mask is empty get no generalist call and stay
background.

Cost model: each prompted slice is encoded once (the expensive part), in batches of slices on a GPU,
and all of its prompts (classes x connected components) are decoded from that one embedding.

Multi-class (C > 1): each class is prompted with its own binary mask, so the class-agnostic
generalist answers "this object" per class. Where, in one view, two classes' answers overlap, the
class with the higher generalist probability takes the pixel (the generalist's confidence is the only
evidence there; a fixed class order would bias towards one class). After that each view holds one
label per voxel, so UA/MV fusion cannot produce a tie: with 3 views at most one class can reach 2 votes.

Slice orientation: slices are shown to the generalist in radiological display orientation (rows
anterior->posterior or superior->inferior, patient right on the left), the orientation of the
medical slices LiteMedSAM/MedSAM were trained on; ``orientation="array"`` gives raw array order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError
from fmabs_core.generalist.base import Embeddings, Generalist, SliceGeometry, intensity_range
from fmabs_core.generalist.embcache import EmbeddingCache, encode_cached, scan_digest, slice_key
from fmabs_core.generalist.fusion import vote
from fmabs_core.generalist.prompts import Mode, slice_prompts
from fmabs_core.data.io import VIEW_AXIS, VIEWS, Volume, save_like

log = logging.getLogger(__name__)

Fusion = Literal["mv", "ua"]
Orientation = Literal["radiological", "array"]


def view_slices(volume: np.ndarray, view: str, orientation: Orientation = "radiological") -> np.ndarray:
    """Canonical XYZ volume -> ``N x H x W`` stack of ``view`` slices (a numpy view, no copy)."""
    if view not in VIEW_AXIS:
        raise InputError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}.")
    s = np.moveaxis(volume, VIEW_AXIS[view], 0)
    if orientation == "radiological":
        return s[:, ::-1, ::-1].transpose(0, 2, 1)
    if orientation == "array":
        return s
    raise InputError(f"orientation must be 'radiological' or 'array', got {orientation!r}.")


def from_view_slices(slices: np.ndarray, view: str, orientation: Orientation = "radiological") -> np.ndarray:
    """Inverse of :func:`view_slices`: ``N x H x W`` stack -> canonical XYZ volume (contiguous)."""
    s = slices.transpose(0, 2, 1)[:, ::-1, ::-1] if orientation == "radiological" else slices
    return np.ascontiguousarray(np.moveaxis(s, 0, VIEW_AXIS[view]))


def _classes(*labels: np.ndarray) -> list[int]:
    """The foreground classes (not 0, not :data:`UNLABELLED`) that occur in any of ``labels`` (uint8)."""
    found: set[int] = set()
    for v in labels:
        v = np.asarray(v)
        found.update(np.flatnonzero(np.bincount(v.ravel(), minlength=256)).tolist() if v.dtype == np.uint8
                     else np.unique(v).tolist())  # bincount: one pass, no sort, for the usual uint8 labels
    return sorted(int(c) for c in found - {0, UNLABELLED})


def fuse(views: Sequence[np.ndarray], fusion: Fusion = "mv") -> np.ndarray:
    """Fuse per-view label volumes by vote: UA = every view agrees on the class, MV = more than half agree.

    The rules that let the teacher take part are in :mod:`fmabs_core.generalist.fusion`."""
    if fusion not in ("mv", "ua"):
        raise InputError(f"fusion must be 'mv' or 'ua', got {fusion!r}.")
    return vote(views, fusion)


class PseudoLabels(dict):
    """``{'axial', 'coronal', 'sagittal', 'fused'} -> uint8 volume``, plus run facts as attributes."""

    slices: dict[str, np.ndarray]  # prompted slice indices per view
    prompts: int
    seconds: float
    fusion: str
    timing: dict[str, float]  # seconds encoding (cache look-ups included) and decoding, over the three views
    probs: dict[str, dict[int, np.ndarray]]  # view -> class -> generalist probability (with keep_probs)


def _pick(idx: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or idx.size <= limit:
        return idx
    if limit <= 0:
        return idx[:0]
    # centres of `limit` equal bins: evenly spaced and symmetric (limit=1 gives the middle slice)
    pos = np.floor((np.arange(limit) + 0.5) * idx.size / limit).astype(int)
    return idx[np.unique(pos)]


def view_pseudolabel(
    generalist: Generalist,
    image: np.ndarray,
    prompt_mask: np.ndarray,
    view: str,
    rng: np.random.Generator,
    intensity_window: tuple[float, float],
    box_jitter: int = 10,
    n_points: int | tuple[int, int] | None = None,
    max_slices: int | None = None,
    batch_size: int | None = None,
    prompt_mode: Mode = "component",
    min_component_px: int = 10,
    orientation: Orientation = "radiological",
    cache: EmbeddingCache | None = None,
    scan_id: str | None = None,
    timing: dict[str, float] | None = None,
    probs: dict[int, np.ndarray] | None = None,
    box_jitter_fraction: float | None = None,
    on_slices: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One view's 3D pseudo-label (XYZ uint8), the prompted slice indices and the number of prompts.

    ``probs``: if given, filled with class -> the generalist's probability of that class (XYZ float16; 0 on
    slices it was not asked about), for the soft fusions of :mod:`fmabs_core.generalist.fusion`.
    With ``cache`` (and ``scan_id``, the scan's content hash) slices encoded before are only decoded.
    ``timing``: seconds spent encoding (cache look-ups included) and decoding are added to its "encode" and
    "decode" entries (on a GPU after a synchronisation, so that the split says where a round's time goes).
    ``on_slices``: called with the number of slices just answered (a progress bar's ``update``).
    """
    timing = {} if timing is None else timing
    img_v = view_slices(image, view, orientation)
    pm_v = view_slices(prompt_mask, view, orientation)
    fg = (pm_v > 0) & (pm_v != UNLABELLED)
    idx = _pick(np.flatnonzero(fg.reshape(fg.shape[0], -1).any(axis=1)), max_slices)
    # which classes each slice holds, for the whole view at once (a np.unique per slice cost more)
    present = ({c: (pm_v == c).reshape(pm_v.shape[0], -1).any(axis=1) for c in _classes(prompt_mask)}
               if idx.size else {})
    out = np.zeros(pm_v.shape, np.uint8)
    soft = {c: np.zeros(pm_v.shape, np.float16) for c in present} if probs is not None else None
    n_pts = generalist.default_n_points if n_points is None else n_points
    bs = generalist.batch_size(batch_size)
    per_call = generalist.decode_slices(bs)
    n_prompts = 0
    for start in range(0, idx.size, per_call):
        chunk = idx[start : start + per_call]
        owners: list[tuple[int, int]] = []  # (position in chunk, class) per prompt
        boxes, points = [], []
        for j, k in enumerate(chunk):
            sl = pm_v[k]
            for c in [c for c, has in present.items() if has[k]]:
                for p in slice_prompts(sl == c, rng, box_jitter, n_pts, prompt_mode, min_component_px,
                                       box_jitter_fraction):
                    owners.append((j, int(c)))
                    boxes.append(p.box)
                    points.append(p.points)
        t_enc = time.perf_counter()
        if cache is None:
            emb = generalist.encode(np.ascontiguousarray(img_v[chunk]), intensity_window, batch_size=bs)
        else:
            keys = [slice_key(generalist.identity, scan_id or "", view, orientation, intensity_window, k) for k in chunk]
            feats = encode_cached(cache, lambda s: generalist.encode(s, intensity_window, batch_size=bs).features,
                                  img_v, chunk, keys)
            emb = Embeddings(feats, SliceGeometry.for_shape(img_v.shape[1], img_v.shape[2], generalist.image_size))
        _synchronize(generalist)
        t_dec = time.perf_counter()
        answers = generalist.decode(emb.select([o[0] for o in owners]), np.stack(boxes), points, return_probs=True)
        timing["encode"] = timing.get("encode", 0.0) + t_dec - t_enc
        timing["decode"] = timing.get("decode", 0.0) + time.perf_counter() - t_dec
        n_prompts += len(owners)
        for j, k in enumerate(chunk):
            best = np.full(out.shape[1:], 0.5, np.float32)  # a class needs p > 0.5 to claim a pixel
            lab = np.zeros(out.shape[1:], np.uint8)
            for c in sorted({c for (jj, c) in owners if jj == j}):
                pc = np.max(answers[[i for i, o in enumerate(owners) if o == (j, c)]], axis=0)  # union of parts
                if soft is not None:
                    soft[c][k] = pc
                win = pc > best
                lab[win] = c
                best[win] = pc[win]
            out[k] = lab
        if on_slices is not None:
            on_slices(len(chunk))
    if soft is not None:
        probs.update({c: from_view_slices(v, view, orientation) for c, v in soft.items()})
    return from_view_slices(out, view, orientation), idx, n_prompts


def _synchronize(generalist: Generalist) -> None:
    device = getattr(generalist, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def multiview_pseudolabel(
    generalist: Generalist,
    image: np.ndarray,
    prompt_mask: np.ndarray,
    rng: np.random.Generator,
    fusion: Fusion = "mv",
    box_jitter: int = 10,
    n_points: int | tuple[int, int] | None = None,
    max_slices_per_view: int | None = None,
    batch_size: int | None = None,
    prompt_mode: Mode = "component",
    min_component_px: int = 10,
    orientation: Orientation = "radiological",
    intensity_window: tuple[float, float] | None = None,
    cache: EmbeddingCache | None = None,
    scan_id: str | None = None,
    keep_probs: bool = False,
    box_jitter_fraction: float | None = None,
    on_slices: Callable[[int], object] | None = None,
) -> PseudoLabels:
    """Axial, coronal and sagittal generalist pseudo-labels of one scan, and their fusion.

    ``image``: canonical XYZ float32 intensities; ``prompt_mask``: XYZ uint8 (0 background, 1..C;
    255 counts as background). ``n_points``: positive points per box (None: the generalist's default,
    0 for LiteMedSAM which was trained with boxes only). ``max_slices_per_view``: prompt only that
    many foreground slices per view, evenly spaced (a CPU-time knob for checks: the others stay
    background, so the result under-segments). ``batch_size``: slices per encoder call (None: the
    generalist's default, 1 on CPU where batching measured slower, larger on CUDA). ``cache``:
    embeddings kept across calls (rounds) under ``scan_id`` (default: the image's content hash).
    ``box_jitter_fraction``: each box enlarged by up to that share of its longer side instead of ``box_jitter``
    pixels. ``keep_probs``: also keep each view's per-class probabilities (``result.probs[view][class]``, float16),
    which the soft fusions need. ``on_slices``: called with each batch's number of slices answered (a progress bar
    over :func:`planned_slices`).
    """
    image = np.asarray(image)
    prompt_mask = np.asarray(prompt_mask)
    if image.ndim != 3 or image.shape != prompt_mask.shape:
        raise InputError(
            f"image {image.shape} and prompt mask {prompt_mask.shape} must be 3D volumes of the same shape."
        )
    if fusion not in ("mv", "ua"):
        raise InputError(f"fusion must be 'mv' or 'ua', got {fusion!r}.")
    window = intensity_window or intensity_range(image)
    if cache is not None and scan_id is None:
        scan_id = scan_digest(image)
    t0 = time.perf_counter()
    result = PseudoLabels()
    result.slices, result.prompts, result.fusion = {}, 0, fusion
    result.timing = {"encode": 0.0, "decode": 0.0}
    result.probs = {}
    for view in VIEWS:
        tv = time.perf_counter()
        vol, idx, n = view_pseudolabel(
            generalist, image, prompt_mask, view, rng, window, box_jitter, n_points, max_slices_per_view,
            batch_size, prompt_mode, min_component_px, orientation, cache, scan_id, result.timing,
            result.probs.setdefault(view, {}) if keep_probs else None, box_jitter_fraction, on_slices,
        )
        result[view], result.slices[view] = vol, idx
        result.prompts += n
        log.info("%s: %d slices, %d prompts, %.1f s", view, idx.size, n, time.perf_counter() - tv)
    result["fused"] = fuse([result[v] for v in VIEWS], fusion)
    result.seconds = time.perf_counter() - t0
    return result


def save_pseudolabels(
    result: dict, reference: Volume, out_dir: str | Path, case: str, protect: tuple[Path, ...] = ()
) -> dict[str, Path]:
    """Write ``<case>_{axial,coronal,sagittal,fused}.nii.gz`` on ``reference``'s grid (atomically).

    ``protect``: input files that must never be overwritten (besides the reference's own file).
    """
    out_dir = Path(out_dir)
    return {
        key: save_like(result[key], reference, out_dir / f"{case}_{key}.nii.gz", np.uint8, protect=protect)
        for key in (*VIEWS, "fused")
    }


def on_slices(shape: tuple[int, ...], view: str, index: np.ndarray) -> np.ndarray:
    """A boolean volume that is True on ``view``'s slices ``index`` (e.g. :attr:`PseudoLabels.slices`)."""
    mask = np.zeros(shape, bool)
    sel: list = [slice(None)] * len(shape)
    sel[VIEW_AXIS[view]] = index
    mask[tuple(sel)] = True
    return mask


def planned_slices(prompt_mask: np.ndarray, max_slices_per_view: int | None = None) -> int:
    """How many slices :func:`multiview_pseudolabel` will prompt for ``prompt_mask``: the foreground slices of each
    view, at most ``max_slices_per_view`` each (the total of a progress bar)."""
    fg = (np.asarray(prompt_mask) > 0) & (np.asarray(prompt_mask) != UNLABELLED)
    total = 0
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        n = int(fg.any(axis=tuple(a for a in range(3) if a != axis)).sum())
        total += n if max_slices_per_view is None else min(n, max_slices_per_view)
    return total


def prompted_slices_bound(shape: tuple[int, ...], max_slices_per_view: int | None) -> int:
    """Most slices a three-view pseudo-label of a scan of ``shape`` prompts (all, or the cap per view)."""
    return sum(min(n, max_slices_per_view or n) for n in shape)


def dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Foreground Dice (mean over the reference's classes); ``mask`` restricts the voxels counted.

    NaN when both are empty. Used for the CLI's quick report; the project's metrics module is the
    reference for evaluation.
    """
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    classes = sorted(set(np.unique(ref).tolist()) - {0, UNLABELLED}) or [1]
    scores = []
    for c in classes:
        p, r = pred == c, ref == c
        s = p.sum() + r.sum()
        scores.append(float(2 * (p & r).sum() / s) if s else float("nan"))
    return float(np.mean(scores))
