"""Dice, Jaccard, 95 % Hausdorff and average surface distance, in voxels and in mm, by two definitions.

- ``hd95_vox``/``asd_vox`` (and ``_mm``): MONAI's, the larger of the two directional 95th percentiles
  and the symmetric mean surface distance.
- ``hd95_pooled_vox``/``asd_pred_vox`` (and ``_mm``): medpy's, which the papers' tables report (UA-MT's
  ``test_util.py``): the 95th percentile of the surface distances of *both* directions pooled together,
  and the mean distance from the prediction's surface to the truth's (one direction). Surfaces are the
  mask minus its erosion by the 6-connected structuring element; computed here with scipy, as medpy
  does, so that medpy is not needed.

Dice and Jaccard are medpy's ``dc``/``jc`` except for two empty masks, scored 1 here (medpy: 0).

Several classes (labels 1..C): each class present in the truth or the prediction is scored on its own
(``classes`` of a case, keyed by the class id), and the case's metrics are the mean over those classes;
merging the classes (``label > 0``) would score a scar painted as atrium as right.
An empty prediction (or empty ground truth) has no surface: its distances are reported as NaN with
``failed=True`` and counted separately, never as 0 (the reference code's HD = 0 flatters failures).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance


@dataclass
class CaseScores:
    case: str
    dice: float
    jaccard: float
    hd95_vox: float
    asd_vox: float
    hd95_mm: float
    asd_mm: float
    failed: bool
    # medpy's definitions (the papers' tables): both directions pooled; prediction -> truth
    hd95_pooled_vox: float = math.nan
    asd_pred_vox: float = math.nan
    hd95_pooled_mm: float = math.nan
    asd_pred_mm: float = math.nan
    #: several classes: class id -> that class's metrics (``failed`` included); empty for one class
    classes: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def dice_jaccard(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    p, g = pred.astype(bool), gt.astype(bool)
    inter = np.logical_and(p, g).sum()
    total = p.sum() + g.sum()
    union = np.logical_or(p, g).sum()
    if total == 0:
        return 1.0, 1.0  # both empty: perfect agreement
    return float(2 * inter / total), float(inter / union)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[float, float]:
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(p, g, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, g, symmetric=True, spacing=spacing)
    return float(hd.item()), float(asd.item())


def score_case(case: str, pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
               classes: list[int] | None = None) -> CaseScores:
    """Scores of a label map against the truth: per class when more than one class is present (or asked
    for with ``classes``), their mean as the case's metrics; one class (or none): foreground against background."""
    if pred.shape != gt.shape:
        raise ValueError(f"{case}: prediction shape {pred.shape} differs from label shape {gt.shape}")
    if classes is None:
        classes = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
    if len(classes) <= 1:
        return _score_binary(case, pred > 0, gt > 0, spacing)
    per_class = {c: _score_binary(case, pred == c, gt == c, spacing) for c in classes}
    mean = {key: _nanmean([getattr(s, key) for s in per_class.values()]) for key in METRIC_KEYS}
    return CaseScores(case, failed=any(s.failed for s in per_class.values()), **mean,
                      classes={str(c): {k: v for k, v in s.as_dict().items() if k not in ("case", "classes")}
                               for c, s in per_class.items()})


def _nanmean(values: list[float]) -> float:
    vals = np.array(values, dtype=float)
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else math.nan


def _score_binary(case: str, pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float]) -> CaseScores:
    dice, jac = dice_jaccard(pred, gt)
    if not pred.any() or not gt.any():
        return CaseScores(case, dice, jac, math.nan, math.nan, math.nan, math.nan, failed=True)
    hd_v, asd_v = _surface_distances(pred, gt, None)
    hd_mm, asd_mm = _surface_distances(pred, gt, spacing)
    medpy_v = medpy_distances(pred, gt, None)
    medpy_mm = medpy_distances(pred, gt, spacing)
    return CaseScores(case, dice, jac, hd_v, asd_v, hd_mm, asd_mm, failed=False,
                      hd95_pooled_vox=medpy_v[0], asd_pred_vox=medpy_v[1],
                      hd95_pooled_mm=medpy_mm[0], asd_pred_mm=medpy_mm[1])


def surface(mask: np.ndarray) -> np.ndarray:
    """medpy's surface: the mask minus its erosion by the 6-connected element (voxels on the array's edge count)."""
    mask = mask.astype(bool)
    return mask ^ ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Distance from each surface voxel of ``a`` to the nearest surface voxel of ``b`` (medpy's ``__surface_distances``)."""
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        raise ValueError("a mask without foreground has no surface")
    return ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]


def medpy_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None
                    ) -> tuple[float, float]:
    """(95HD with both directions pooled, ASD from prediction to truth): medpy's ``hd95`` and ``asd``."""
    forward = surface_distances(pred, gt, spacing)
    backward = surface_distances(gt, pred, spacing)
    return float(np.percentile(np.hstack((forward, backward)), 95)), float(forward.mean())


METRIC_KEYS = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm",
               "hd95_pooled_vox", "asd_pred_vox", "hd95_pooled_mm", "asd_pred_mm")

#: what each key means, for tables and reports
METRIC_DEFINITIONS = {
    "dice": "Dice (medpy dc)",
    "jaccard": "Jaccard (medpy jc)",
    "hd95_vox": "95HD, voxels: max of the two directional 95th percentiles (MONAI)",
    "asd_vox": "ASD, voxels: symmetric mean surface distance (MONAI)",
    "hd95_mm": "95HD, mm: max of the two directional 95th percentiles (MONAI)",
    "asd_mm": "ASD, mm: symmetric mean surface distance (MONAI)",
    "hd95_pooled_vox": "95HD, voxels: 95th percentile of both directions pooled (medpy hd95, the papers')",
    "asd_pred_vox": "ASD, voxels: mean distance prediction -> truth surface (medpy asd, the papers')",
    "hd95_pooled_mm": "95HD, mm: 95th percentile of both directions pooled (medpy hd95)",
    "asd_pred_mm": "ASD, mm: mean distance prediction -> truth surface (medpy asd)",
}


def _mean_std(values: list[float]) -> dict:
    vals = np.array(values, dtype=float)
    vals = vals[~np.isnan(vals)]
    return {"mean": float(vals.mean()) if len(vals) else math.nan, "std": float(vals.std()) if len(vals) else math.nan}


def summarise(scores: list[CaseScores]) -> dict:
    """Mean and std per metric; distances over non-failed cases only, failures counted. With several
    classes, ``classes`` holds the same per class (over the cases where the class is present)."""
    out: dict = {"n_cases": len(scores), "n_failed": sum(s.failed for s in scores)}
    for key in METRIC_KEYS:
        out[key] = _mean_std([getattr(s, key) for s in scores])
    ids = sorted({c for s in scores for c in s.classes}, key=int)
    if ids:
        out["classes"] = {}
        for c in ids:
            rows = [s.classes[c] for s in scores if c in s.classes]
            out["classes"][c] = {"n_cases": len(rows), "n_failed": sum(bool(r["failed"]) for r in rows),
                                 **{key: _mean_std([r[key] for r in rows]) for key in METRIC_KEYS}}
    return out


def format_table(scores: list[CaseScores], summary: dict, class_names: dict | None = None) -> str:
    head = (f"{'case':<28}{'Dice':>8}{'Jacc':>8}{'95HD vx':>9}{'ASD vx':>8}{'95HD mm':>9}{'ASD mm':>8}"
            f"{'95HDp vx':>10}{'ASDp vx':>9}{'95HDp mm':>10}{'ASDp mm':>9}")
    lines = [head, "-" * len(head)]

    def fmt(v: float, w: int) -> str:
        return f"{'nan':>{w}}" if math.isnan(v) else f"{v:>{w}.3f}"

    for s in scores:
        lines.append(f"{s.case[:27]:<28}" + fmt(s.dice, 8) + fmt(s.jaccard, 8) + fmt(s.hd95_vox, 9)
                     + fmt(s.asd_vox, 8) + fmt(s.hd95_mm, 9) + fmt(s.asd_mm, 8) + fmt(s.hd95_pooled_vox, 10)
                     + fmt(s.asd_pred_vox, 9) + fmt(s.hd95_pooled_mm, 10) + fmt(s.asd_pred_mm, 9)
                     + ("  FAILED (empty)" if s.failed else ""))
    lines.append("-" * len(head))
    means = [summary[k]["mean"] for k in METRIC_KEYS]
    stds = [summary[k]["std"] for k in METRIC_KEYS]
    widths = (8, 8, 9, 8, 9, 8, 10, 9, 10, 9)
    lines.append(f"{'mean':<28}" + "".join(fmt(m, w) for m, w in zip(means, widths)))
    lines.append(f"{'std':<28}" + "".join(fmt(m, w) for m, w in zip(stds, widths)))
    for c, per in summary.get("classes", {}).items():
        name = f"class {c}" + (f" {class_names[c]}" if class_names and c in class_names else "")
        lines.append(f"{name[:27]:<28}" + "".join(fmt(per[k]["mean"], w) for k, w in zip(METRIC_KEYS, widths))
                     + f"  ({per['n_cases']} cases, {per['n_failed']} failed)")
    if summary.get("classes"):
        lines.append("several classes: each case's row is the mean over its classes; 'class N' rows are the means "
                     "per class")
    lines.append(f"{summary['n_failed']} of {summary['n_cases']} cases failed (empty prediction or label"
                 f"{' of a class' if summary.get('classes') else ''}); their distances are excluded from the means")
    lines.append("95HD/ASD: MONAI's (max of directional 95th percentiles; symmetric mean). 95HDp/ASDp: medpy's, "
                 "as the papers report (95th percentile of both directions pooled; prediction -> truth)")
    return "\n".join(lines)


def evaluate_folders(pred_dir, label_dir, num_classes: int | None = None) -> tuple[list[CaseScores], dict]:
    """Score every prediction in ``pred_dir`` that has a same-named label in ``label_dir``, per class when
    the labels hold several (see :func:`score_case`)."""
    from fmabs_core.data import io
    from fmabs_core.errors import InputError

    preds = _by_case([p for p in io.list_niftis(pred_dir) if not io.case_id(p).endswith("_probs")], "--pred")
    labels = _by_case(io.list_niftis(label_dir), "--labels")
    common = sorted(set(preds) & set(labels))
    if not common:
        raise InputError(f"no prediction in {pred_dir} has a label of the same name in {label_dir}")
    scores = []
    for cid in common:
        pred = io.load_label(preds[cid], num_classes)
        gt = io.load_label(labels[cid], num_classes)
        problems = io.check_pair(gt, pred)
        if problems:
            raise InputError("; ".join(problems))
        scores.append(score_case(cid, pred.array, gt.array, gt.spacing))
    return scores, summarise(scores)


def _by_case(paths: list, option: str) -> dict:
    """case id -> file; two files of one case (``a.nii`` and ``a.nii.gz``) are an error, never a silent pick."""
    from fmabs_core.data import io
    from fmabs_core.errors import InputError

    out: dict = {}
    for p in paths:
        cid = io.case_id(p)
        if cid in out:
            raise InputError(f"{option}: {out[cid]} and {p} are both case '{cid}'; keep one of them.")
        out[cid] = p
    return out
