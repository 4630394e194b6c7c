"""Connected components of label masks: the one definition of "keep the largest part of each class".

Used after prediction (``fmabs predict --largest-component``) and on the teacher of a pseudo-label round
(``--largest-component``, fmabs): an in-training teacher's false positives are mostly small islands far
from the object; prompted with them, the generalist answers for them too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: 26-connectivity: voxels that touch by a corner belong to one part
CONNECTIVITY = np.ones((3, 3, 3), bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each foreground class (26-connectivity); the rest becomes 0."""
    out = np.zeros_like(mask)
    for c in np.unique(mask):
        if c == 0:
            continue
        lab, n = ndimage.label(mask == c, structure=CONNECTIVITY)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        out[lab == (int(np.argmax(sizes)) + 1)] = c
    return out


def keep_largest_probs(probs: np.ndarray) -> tuple[np.ndarray, int]:
    """``(C+1, X, Y, Z)`` class probabilities whose argmax is reduced to :func:`largest_component`: the voxels
    of the removed parts become certain background. Returns the new probabilities (a copy when anything is
    removed, else ``probs`` itself) and the number of voxels removed."""
    mask = probs.argmax(0)
    removed = (mask > 0) & (largest_component(mask) == 0)
    n = int(removed.sum())
    if n == 0:
        return probs, 0
    out = probs.copy()
    out[:, removed] = 0.0
    out[0, removed] = 1.0
    return out, n
