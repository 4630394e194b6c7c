"""Cross-labels: one labelled axial, coronal and sagittal slice per scan, 255 everywhere else.

A simulated expert makes them from dense labels, so that the papers' protocol runs unattended.
"""

from __future__ import annotations

from typing import Literal, Mapping

import numpy as np

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError
from fmabs_core.data.io import VIEW_AXIS, VIEWS

Placement = Literal["centre", "random"]


def object_centre_slices(mask: np.ndarray) -> dict[str, int]:
    """Per view, the slice through the centre of the foreground bounding box (volume centre if empty)."""
    fg = np.argwhere(mask > 0)
    out = {}
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        if len(fg):
            lo, hi = fg[:, axis].min(), fg[:, axis].max()
            out[view] = int((lo + hi) // 2)
        else:
            out[view] = mask.shape[axis] // 2
    return out


def random_object_slices(mask: np.ndarray, rng: np.random.Generator) -> dict[str, int]:
    """Per view, a random slice that cuts the foreground (volume centre if empty)."""
    out = {}
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other)) if mask.any() else np.array([])
        out[view] = int(rng.choice(hit)) if len(hit) else mask.shape[axis] // 2
    return out


def make_crosslabel(dense: np.ndarray, slices: Mapping[str, int]) -> np.ndarray:
    """Copy the dense label on the given slices (view -> index); everything else is 255."""
    cross = np.full(dense.shape, UNLABELLED, dtype=np.uint8)
    for view, index in slices.items():
        axis = VIEW_AXIS[view]
        if not 0 <= index < dense.shape[axis]:
            raise InputError(f"{view} slice {index} is outside the volume (size {dense.shape[axis]} on that axis)")
        sl = [slice(None)] * 3
        sl[axis] = index
        cross[tuple(sl)] = dense[tuple(sl)]
    return cross


def simulate(
    dense: np.ndarray, placement: Placement = "centre", rng: np.random.Generator | None = None
) -> tuple[np.ndarray, dict[str, int]]:
    """A simulated expert's cross-label from a dense label; returns (cross-label, slices used)."""
    if placement == "centre":
        slices = object_centre_slices(dense)
    elif placement == "random":
        slices = random_object_slices(dense, rng or np.random.default_rng())
    else:
        raise ValueError(f"unknown placement '{placement}' (use 'centre' or 'random')")
    return make_crosslabel(dense, slices), slices


def labelled_planes(cross: np.ndarray) -> dict[str, list[int]]:
    """Which slices of each view carry labels (for checks and the GUI's warnings)."""
    labelled = cross != UNLABELLED
    out = {}
    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        full = labelled.all(axis=other)
        out[view] = np.flatnonzero(full).tolist()
    return out
