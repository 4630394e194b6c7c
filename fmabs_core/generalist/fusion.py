"""How a round turns the teacher and the generalist's three views into one pseudo-label.

FM-ABS fuses the three views' masks by vote (``mv``: 2 of 3, ``ua``: all 3) and ignores the teacher
that prompted them. Measured on LA (``fmabs bench teachers``, docs/pseudo-labels.md), that vote is
worse than the teacher once the teacher is decent: the generalist then adds its own errors (the
coronal view is weak on LA) where the teacher was already right. The other rules here let the
teacher take part:

- ``soft``: per voxel and class, ``w * P_teacher + (1 - w) * mean over views of P_view`` and the
  highest score wins. Where the teacher is confident its term alone decides (with ``w = 0.5`` a
  teacher at 0.9 needs the three views to average below 0.1 to be overruled); where it hesitates the
  generalist decides. ``w = 0`` is a soft vote of the views alone, ``w = 1`` the teacher's own mask.
- ``gate``: the teacher's label wherever its probability of its own class is at least ``confidence``,
  the views' majority vote elsewhere.
- ``staple``: SimpleITK's multi-label STAPLE over the teacher's mask and the three views (each rater's
  reliability estimated from the agreement, by EM); voxels STAPLE leaves undecided keep the teacher's label.
- ``auto`` (the default): each round, every rule above (several weights and thresholds) and the teacher's
  own mask are scored on the expert's drawn planes of the cross-labelled scans, and the best is used,
  provided it beats the teacher's mask there by :data:`AUTO_MARGIN`; else the round keeps the teacher's
  mask. :func:`choose_auto` also says, without the optimism of choosing and scoring on the same
  planes, what the choice gains.

On slices a view did not prompt (``--pseudo-max-slices``) the view holds the teacher's answer (see
:func:`fill_unprompted`), so a view that was not asked never votes for background.

:func:`plane_counts` scores a label on the expert's drawn planes of a cross-labelled scan (poolable
over scans): the only truth a round has, and the user's evidence of whether the generalist helps on
their data; :func:`choose_auto` uses it for ``--fusion auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fmabs_core.contract import FUSIONS, UNLABELLED, VIEW_AXIS, VIEWS
from fmabs_core.errors import InputError


@dataclass(frozen=True)
class FusionRule:
    """A fusion and its knobs, as a round and ``fmabs pseudo-label`` use it."""

    fusion: str = "mv"
    teacher_weight: float = 0.5  # soft
    confidence: float = 0.9  # gate

    def check(self) -> "FusionRule":
        if self.fusion not in FUSIONS:  # ("teacher" is a candidate of auto, not an option)
            raise InputError(f"--fusion {self.fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise InputError(f"--teacher-weight must be between 0 and 1 (got {self.teacher_weight})")
        if not 0.5 <= self.confidence <= 1.0:
            raise InputError(f"--gate-confidence must be between 0.5 and 1 (got {self.confidence})")
        return self

    @property
    def needs_probs(self) -> bool:
        """Whether the views' probabilities must be kept (the vote rules use only their labels)."""
        return self.fusion in ("soft", "auto")


def teacher_probs_of(mask: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """One-hot ``(C+1, X, Y, Z)`` float32 probabilities of a label mask (a teacher known only by its mask)."""
    mask = np.asarray(mask)
    c = int(num_classes if num_classes is not None else max(1, int(mask[mask != UNLABELLED].max(initial=0))))
    out = np.zeros((c + 1, *mask.shape), np.float32)
    for k in range(c + 1):
        out[k] = mask == k
    out[0][mask == UNLABELLED] = 1.0
    return out


def vote(views: Sequence[np.ndarray], fusion: str = "mv") -> np.ndarray:
    """Fuse per-view label volumes: ``ua`` = every view agrees on the class, ``mv`` = more than half agree."""
    if fusion not in ("mv", "ua"):
        raise InputError(f"a vote is 'mv' or 'ua', got {fusion!r}.")
    if not views:
        raise InputError("fuse: no views given.")
    need = len(views) if fusion == "ua" else len(views) // 2 + 1
    out = np.zeros(views[0].shape, np.uint8)
    classes = set()
    for v in views:
        classes.update(np.flatnonzero(np.bincount(np.asarray(v, np.uint8).ravel(), minlength=256)).tolist())
    for c in sorted(classes - {0, UNLABELLED}):
        votes = np.zeros(views[0].shape, np.uint8)
        for v in views:
            votes += v == c
        out[votes >= need] = c
    return out


def soft_scores(view_probs: Mapping[str, Mapping[int, np.ndarray]], teacher_probs: np.ndarray,
                weight: float) -> np.ndarray:
    """``(C+1, X, Y, Z)`` scores ``w * P_teacher + (1 - w) * mean_views P_view`` (background = 1 - sum of classes)."""
    scores = teacher_probs.astype(np.float32) * weight
    n = len(view_probs)
    if n == 0 or weight >= 1.0:
        return scores
    share = (1.0 - weight) / n
    for probs in view_probs.values():
        fg = np.zeros(teacher_probs.shape[1:], np.float32)
        for c, p in probs.items():
            p32 = p.astype(np.float32)
            scores[c] += share * p32
            fg += p32
        scores[0] += share * np.clip(1.0 - fg, 0.0, 1.0)
    return scores


def combine(views: Mapping[str, np.ndarray], teacher_probs: np.ndarray, rule: FusionRule,
            view_probs: Mapping[str, Mapping[int, np.ndarray]] | None = None) -> np.ndarray:
    """The round's fused pseudo-label (uint8) under ``rule`` from the three views and the teacher."""
    labels = [views[v] for v in VIEWS if v in views]
    if rule.fusion in ("mv", "ua"):
        return vote(labels, rule.fusion)
    teacher = teacher_probs.argmax(0).astype(np.uint8)
    if rule.fusion == "teacher":  # a candidate of --fusion auto: the generalist does not help this round
        return teacher
    if rule.fusion == "soft":
        if view_probs is None:
            raise InputError("the soft fusion needs the views' probabilities (keep_probs=True).")
        return soft_scores(view_probs, teacher_probs, rule.teacher_weight).argmax(0).astype(np.uint8)
    if rule.fusion == "gate":
        sure = teacher_probs.max(0) >= rule.confidence
        return np.where(sure, teacher, vote(labels, "mv")).astype(np.uint8)
    if rule.fusion == "staple":
        return staple([teacher, *labels], undecided=teacher)
    if rule.fusion == "auto":
        raise InputError("--fusion auto is chosen per round (choose_rule) before fusing.")
    raise InputError(f"--fusion {rule.fusion!r}: choose one of {', '.join(FUSIONS)}")


def staple(raters: Sequence[np.ndarray], undecided: np.ndarray) -> np.ndarray:
    """SimpleITK's MultiLabelSTAPLE over label volumes; undecided voxels take ``undecided``'s label."""
    import SimpleITK as sitk

    flag = 254  # never a class (classes are 1..C < 255, and 255 is UNLABELLED)
    shape = np.shape(undecided)
    grid = shape if len(shape) in (2, 3) else (1, int(np.prod(shape)))  # SimpleITK images are 2D or 3D
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(flag)
    out = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(np.ascontiguousarray(r, np.uint8).reshape(grid))
                                            for r in raters])).reshape(shape)
    return np.where(out == flag, undecided, out).astype(np.uint8)


def fill_unprompted(result, teacher_probs: np.ndarray) -> None:
    """Where a view skipped foreground slices to save generalist calls, give it the teacher's answer there.

    Leaving them empty would outvote the object in every skipped slice; the teacher's mask (and its
    probabilities) is the best guess we have for them: it is what the generalist would have been shown.
    """
    teacher = teacher_probs.argmax(0).astype(np.uint8)
    probs = getattr(result, "probs", None) or {}
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        has_fg = np.flatnonzero((teacher > 0).any(axis=other))
        prompted = set(np.asarray(result.slices[view]).tolist()) if hasattr(result, "slices") else set()
        skipped = np.array([k for k in has_fg if int(k) not in prompted], int)
        if skipped.size == 0:
            continue
        vol = np.moveaxis(result[view], axis, 0)  # a view of the array: writes go through
        vol[skipped] = np.moveaxis(teacher, axis, 0)[skipped]
        if view in probs:
            for c in range(1, teacher_probs.shape[0]):
                p = probs[view].setdefault(c, np.zeros(teacher.shape, np.float16))
                np.moveaxis(p, axis, 0)[skipped] = np.moveaxis(teacher_probs[c], axis, 0)[skipped]


def drawn_planes(crosslabel: np.ndarray) -> np.ndarray:
    """The voxels the expert labelled (not :data:`UNLABELLED`) of a cross-label, as a boolean volume."""
    return np.asarray(crosslabel) != UNLABELLED


def plane_dice(pred: np.ndarray, crosslabel: np.ndarray) -> float:
    """Foreground Dice (mean over the classes drawn) of ``pred`` on the drawn planes; NaN if nothing is drawn."""
    return counts_dice(plane_counts(pred, crosslabel))


@dataclass
class PlaneSample:
    """What the calibration needs of one cross-labelled scan: everything restricted to its drawn planes."""

    truth: np.ndarray  # uint8, the drawn voxels' labels
    teacher: np.ndarray  # (C+1, n) float32
    views: dict[str, np.ndarray]  # view -> uint8 (n,)
    view_probs: dict[str, dict[int, np.ndarray]]  # view -> class -> float16 (n,)


def plane_sample(crosslabel: np.ndarray, teacher_probs: np.ndarray, views: Mapping[str, np.ndarray],
                 view_probs: Mapping[str, Mapping[int, np.ndarray]] | None = None) -> PlaneSample:
    """The drawn planes' voxels of a scan's round inputs (a few thousand voxels: cheap to keep per round)."""
    drawn = drawn_planes(crosslabel)
    return PlaneSample(crosslabel[drawn].astype(np.uint8), teacher_probs[:, drawn].astype(np.float32),
                       {v: np.asarray(m)[drawn] for v, m in views.items()},
                       {v: {c: p[drawn] for c, p in ps.items()} for v, ps in (view_probs or {}).items()})


#: the rules ``--fusion auto`` chooses from, in order of preference on equal scores ("teacher": its own mask)
AUTO_CANDIDATES: dict[str, FusionRule] = {
    "teacher": FusionRule("teacher"),
    "soft 0.75": FusionRule("soft", teacher_weight=0.75),
    "soft 0.5": FusionRule("soft", teacher_weight=0.5),
    "soft 0.25": FusionRule("soft", teacher_weight=0.25),
    "soft 0": FusionRule("soft", teacher_weight=0.0),
    "gate 0.9": FusionRule("gate", confidence=0.9),
    "gate 0.7": FusionRule("gate", confidence=0.7),
    "mv": FusionRule("mv"),
    "ua": FusionRule("ua"),
    "staple": FusionRule("staple"),
}
#: how much better than the teacher's own mask (pooled Dice on the drawn planes) a rule must be to be chosen
AUTO_MARGIN = 0.01


def _candidate_counts(samples: Sequence[PlaneSample], candidates: Mapping[str, FusionRule]
                      ) -> dict[str, list[dict[str, list[int]]]]:
    """Each candidate's :func:`plane_counts` on each sample: every choice below is sums of these."""
    return {name: [plane_counts(combine(s.views, s.teacher, rule, s.view_probs), s.truth) for s in samples]
            for name, rule in candidates.items()}


def _choose(counts: Mapping[str, list], use: Sequence[int], margin: float) -> tuple[str, dict[str, float]]:
    """The best candidate on the samples ``use`` (pooled), if it beats "teacher" by ``margin``; and every score."""
    scores = {name: counts_dice(merge_counts([per[i] for i in use])) for name, per in counts.items()}
    finite = {k: v for k, v in scores.items() if not np.isnan(v)}
    if not finite:
        return "teacher", scores
    order = list(counts)
    best = max(finite, key=lambda k: (round(finite[k], 6), -order.index(k)))
    base = finite.get("teacher", float("-inf"))
    return (best if finite[best] >= base + margin else "teacher"), scores


@dataclass
class AutoChoice:
    """``--fusion auto``'s decision for a round: the rule, every candidate's pooled Dice on the drawn planes, and
    the held-out estimate of the gain over the teacher (NaN with fewer than two scans)."""

    rule: str
    scores: dict[str, float]
    heldout_gain: float
    #: per sample, the rule its own drawn planes choose (the same margin over its own teacher), for ``per_scan``
    per_scan: list[str] = field(default_factory=list)
    #: pooled Dice on the drawn planes with each sample fused by its own rule (NaN when not asked)
    per_scan_score: float = float("nan")


def choose_auto(samples: Sequence[PlaneSample], candidates: Mapping[str, FusionRule] | None = None,
                margin: float = AUTO_MARGIN, per_scan: bool = False) -> AutoChoice:
    """``--fusion auto``: the candidate whose fused labels score best on the drawn planes of ``samples`` pooled,
    kept only if it beats the teacher's own mask by ``margin``, else "teacher".

    The held-out gain scores each scan with the rule chosen on the *other* scans, pooled: the chosen rule's own
    score is optimistic, since it was picked on those planes. Each candidate is fused once per scan.

    ``per_scan`` (``--fusion-per-scan``): also choose for each sample on its own planes alone, by the same rule and
    margin. A cross-labelled scan whose teacher under-segments gains from the generalist while the pooled choice
    keeps the teacher for the others (docs/pseudo-labels.md has the bench)."""
    counts = _candidate_counts(samples, AUTO_CANDIDATES if candidates is None else candidates)
    n = len(samples)
    rule, scores = _choose(counts, range(n), margin)
    own: list[str] = []
    own_score = float("nan")
    if per_scan and n:
        own = [_choose(counts, [k], margin)[0] for k in range(n)]
        own_score = counts_dice(merge_counts([counts[name][k] for k, name in enumerate(own)]))
    held = float("nan")
    if n >= 2 and "teacher" in counts:
        fused, teacher = [], []
        for k in range(n):
            name = _choose(counts, [j for j in range(n) if j != k], margin)[0]
            fused.append(counts[name][k])
            teacher.append(counts["teacher"][k])
        held = counts_dice(merge_counts(fused)) - counts_dice(merge_counts(teacher))
    return AutoChoice(rule, scores, held, own, own_score)


def choose_rule(samples: Sequence[PlaneSample], candidates: Mapping[str, FusionRule] | None = None,
                margin: float = AUTO_MARGIN) -> tuple[str, dict[str, float]]:
    """The rule :func:`choose_auto` picks, and every candidate's score."""
    choice = choose_auto(samples, candidates, margin)
    return choice.rule, choice.scores


def heldout_gain(samples: Sequence[PlaneSample], margin: float = AUTO_MARGIN) -> float:
    """The held-out estimate of :func:`choose_auto` (NaN with fewer than two scans)."""
    return choose_auto(samples, margin=margin).heldout_gain


def quantise_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities on the 1/255 steps they are stored with (uint8 in ``<case>_teacher.nii.gz``), as float32.

    A round fuses with the quantised teacher, so the file it writes is exactly what it used."""
    return (np.rint(np.clip(probs, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def probs_to_uint8(probs: np.ndarray) -> np.ndarray:
    """``(C+1, X, Y, Z)`` probabilities -> ``X, Y, Z, C+1`` uint8 (255 = 1.0), the layout of the teacher file."""
    return np.moveaxis(np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8), 0, -1)


def probs_from_uint8(stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`probs_to_uint8` (equal to :func:`quantise_probs` of the original)."""
    return (np.moveaxis(np.asarray(stored), -1, 0).astype(np.float32) / 255.0).astype(np.float32)


def plane_counts(pred: np.ndarray, crosslabel: np.ndarray) -> dict[str, list[int]]:
    """Per drawn class: [voxels in both, voxels in pred, voxels in the drawing] on the drawn planes (poolable)."""
    drawn = drawn_planes(crosslabel)
    p, t = np.asarray(pred)[drawn], np.asarray(crosslabel)[drawn]
    return {str(c): [int(((p == c) & (t == c)).sum()), int((p == c).sum()), int((t == c).sum())]
            for c in sorted(set(np.unique(t).tolist()) - {0})}


def merge_counts(parts: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Sum :func:`plane_counts` of several scans (voxels pooled)."""
    out: dict[str, list[int]] = {}
    for part in parts:
        for c, v in part.items():
            acc = out.setdefault(c, [0, 0, 0])
            for k in range(3):
                acc[k] += int(v[k])
    return out


def counts_dice(counts: Mapping[str, Sequence[int]]) -> float:
    """Mean over classes of the Dice of pooled :func:`plane_counts`; NaN when nothing is drawn."""
    scores = [2.0 * v[0] / (v[1] + v[2]) for v in counts.values() if v[1] + v[2] > 0]
    return float(np.mean(scores)) if scores else float("nan")
