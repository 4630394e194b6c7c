"""Training data in memory, patch sampling and weak augmentation.

All randomness comes from one ``numpy.random.Generator`` owned by the sampler, so that its state can
be checkpointed and a resumed run draws exactly the patches an uninterrupted run would have drawn.
MONAI's array transforms do the cropping, padding, flipping and rotating with parameters we draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import SpatialCrop, SpatialPad

from fmabs_core.data.crosslabel import UNLABELLED

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One training scan on the canonical grid, with whatever supervision it has."""

    id: str
    image: np.ndarray  # float32, z-scored
    target: np.ndarray | None = None  # uint8, 255 = not labelled (cross) or dense
    pseudo: np.ndarray | None = None  # uint8, fused generalist pseudo-label
    extra: dict = field(default_factory=dict)


def effective_patch(patch: tuple[int, int, int], shapes: list[tuple[int, ...]], divisor: int) -> tuple[int, int, int]:
    """Clamp the patch to the smallest scan on each axis, keeping it a multiple of the network's divisor."""
    out = []
    for axis, p in enumerate(patch):
        smallest = min(s[axis] for s in shapes) if shapes else p
        q = min(p, max(divisor, (smallest // divisor) * divisor))
        out.append(int(q))
    if tuple(out) != tuple(patch):
        log.info("patch size clamped from %s to %s to fit the smallest scan", tuple(patch), tuple(out))
    return tuple(out)  # type: ignore[return-value]


class PatchSampler:
    """Draws batches of patches: ``labelled_bs`` from supervised cases, the rest from unlabelled ones."""

    #: uniform draws tried before falling back to a crop anchored on a labelled voxel (a scan whose labels
    #: are a tiny part of it would otherwise loop for long)
    MAX_REDRAWS = 200

    def __init__(self, labelled: list[Case], unlabelled: list[Case], patch: tuple[int, int, int],
                 batch_size: int, labelled_bs: int, seed: int, augment: bool = True,
                 flip_axes: tuple[int, ...] = (0, 1), crop: str = "uniform"):
        if not labelled:
            raise ValueError("no labelled scan to train on: make cross-labels first (fmabs crosslabel simulate)")
        self.labelled = labelled
        self.unlabelled = unlabelled
        self.patch = tuple(patch)
        self.batch_size = batch_size
        self.labelled_bs = labelled_bs if unlabelled else batch_size
        self.augment = augment
        self.flip_axes = tuple(flip_axes)
        if crop not in ("uniform", "anchored"):
            raise ValueError(f"crop '{crop}': choose uniform or anchored")
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        #: indices of the global batch this process trains on (None: all); set by distributed runs,
        #: which share one generator seed so that every rank plans the same global batch
        self.keep: list[int] | None = None
        self._pad = SpatialPad(self.patch, mode="constant")

    # -- state for checkpoints --
    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    # -- sampling --
    def _crop_start(self, shape: tuple[int, ...], must_contain: np.ndarray | None) -> list[int]:
        """Random crop start; if ``must_contain`` (voxel index) is given, the crop includes it."""
        starts = []
        for axis in range(3):
            room = shape[axis] - self.patch[axis]
            if must_contain is None:
                starts.append(int(self.rng.integers(0, room + 1)))
            else:
                lo = max(0, int(must_contain[axis]) - self.patch[axis] + 1)
                hi = min(room, int(must_contain[axis]))
                starts.append(int(self.rng.integers(lo, hi + 1)))
        return starts

    def _padded(self, array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        return np.asarray(self._pad(array[None].astype(np.int16), value=UNLABELLED))  # type: ignore[call-arg]

    def _plan(self, case: Case, supervised: bool) -> dict:
        """Draw everything random about one patch (crop start, augmentation) without touching voxels.

        The draws are exactly those of cropping and augmenting the padded arrays, so that a rank of
        a distributed run can plan the whole global batch (keeping the shared generator in step) and
        only cut out its own patches.
        """
        shape = tuple(max(s, p) for s, p in zip(case.image.shape, self.patch))
        offset = [(p - s) // 2 for s, p in zip(case.image.shape, shape)]  # SpatialPad's symmetric padding
        target = case.target if supervised else None
        start = self._crop_start(shape, None)
        if target is not None and (self.crop == "anchored" or not self._holds_label(target, start, offset)):
            start = self._labelled_start(target, shape, offset, start)
        plan: dict = {"case": case, "supervised": supervised, "start": start}
        if self.augment:
            square = self.patch[0] == self.patch[1]
            plan["k"] = int(self.rng.integers(0, 4)) if square else 2 * int(self.rng.integers(0, 2))
            # None: no flip (only reachable with flip_axes=()), else one of the allowed axes
            plan["axis"] = int(self.flip_axes[int(self.rng.integers(0, len(self.flip_axes)))]) if self.flip_axes else None
        return plan

    def _holds_label(self, target: np.ndarray, start: list[int], offset: list[int]) -> bool:
        """Whether the crop at ``start`` (padded coordinates) covers a labelled voxel of ``target``."""
        window = tuple(slice(max(0, s - o), max(0, s - o + p)) for s, o, p in zip(start, offset, self.patch))
        return bool((target[window] != UNLABELLED).any())

    def _labelled_start(self, target: np.ndarray, shape: tuple[int, ...], offset: list[int],
                        first: list[int]) -> list[int]:
        """A crop start whose crop holds a labelled voxel.

        ``uniform`` (the references): uniform starts redrawn until the crop holds a label, so every
        admissible crop is equally likely. ``anchored``: the crop contains a random labelled voxel, which
        favours crops near the volume's borders (a voxel near a border has fewer crops containing it, each
        of them drawn more often). Padding only adds unlabelled voxels.
        """
        if self.crop == "uniform":
            for _ in range(self.MAX_REDRAWS):
                start = self._crop_start(shape, None)
                if self._holds_label(target, start, offset):
                    return start
            log.debug("no labelled voxel in %d uniform crops: anchoring this one on a labelled voxel",
                      self.MAX_REDRAWS)
        labelled = np.flatnonzero(target != UNLABELLED)
        if not len(labelled):
            return first
        anchor = np.array(np.unravel_index(int(self.rng.choice(labelled)), target.shape)) + offset
        return self._crop_start(shape, anchor)

    def _materialise(self, plan: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        case, start = plan["case"], plan["start"]
        if all(s >= p for s, p in zip(case.image.shape, self.patch)):
            # no padding needed: slice views of the scan instead of padding (copying) whole volumes
            window = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            unlabelled = np.full(self.patch, UNLABELLED, dtype=np.int16)
            target = case.target if plan["supervised"] else None
            img = case.image[window][None]
            tgt = (unlabelled if target is None else target[window].astype(np.int16))[None]
            pse = (unlabelled if case.pseudo is None else case.pseudo[window].astype(np.int16))[None]
            if self.augment:
                img, tgt, pse = self._augment(plan["k"], plan["axis"], img, tgt, pse)
            return np.ascontiguousarray(img), tgt[0], pse[0]
        image = np.asarray(self._pad(case.image[None]))
        target = self._padded(case.target if plan["supervised"] else None)
        pseudo = self._padded(case.pseudo)
        crop = SpatialCrop(roi_start=start, roi_end=[s + p for s, p in zip(start, self.patch)])
        unlabelled = np.full((1, *self.patch), UNLABELLED, dtype=np.int16)
        img = np.asarray(crop(image))
        tgt = unlabelled if target is None else np.asarray(crop(target))
        pse = unlabelled if pseudo is None else np.asarray(crop(pseudo))
        if self.augment:
            img, tgt, pse = self._augment(plan["k"], plan["axis"], img, tgt, pse)
        return img, tgt[0], pse[0]

    @staticmethod
    def _augment(k: int, axis: int | None, *arrays: np.ndarray) -> list[np.ndarray]:
        """Rot90 (``k`` quarter turns) in the axial plane then a flip on ``axis`` (UA-MT's RandomRotFlip)."""
        # numpy views, one copy: MONAI's Rotate90/Flip give the same arrays but cost ~60 ms a patch in
        # MetaTensor bookkeeping, which would dominate a GPU step (checked equal in the tests)
        rotated = [np.rot90(a, k, axes=(1, 2)) for a in arrays]
        return [np.ascontiguousarray(a if axis is None else np.flip(a, axis=axis + 1)) for a in rotated]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch; with ``keep`` set (distributed runs) only those indices of the global batch."""
        plans = []
        for i in range(self.batch_size):
            supervised = i < self.labelled_bs
            pool = self.labelled if supervised else self.unlabelled
            case = pool[int(self.rng.integers(0, len(pool)))]
            plans.append(self._plan(case, supervised))
        if self.keep is not None:
            plans = [plans[i] for i in self.keep]
        images, targets, pseudos, is_lab = [], [], [], []
        for plan in plans:
            img, tgt, pse = self._materialise(plan)
            images.append(img)
            targets.append(tgt)
            pseudos.append(pse)
            is_lab.append(plan["supervised"])
        return {
            "image": torch.from_numpy(np.stack(images).astype(np.float32)),
            "target": torch.from_numpy(np.stack(targets).astype(np.int64)),
            "pseudo": torch.from_numpy(np.stack(pseudos).astype(np.int64)),
            "labelled": torch.tensor(is_lab),
        }
