"""The one intensity normalisation every stage shares (training, rounds, prediction, pseudo-label)."""

from __future__ import annotations

import numpy as np


def zscore(image: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Per-scan z-score normalisation (what the LA benchmark data already has; idempotent there).

    ``inplace`` (a float32 array the caller no longer needs raw): normalised in its own memory, the same values
    bit for bit, so that a 600-slice CT is not held twice (float32 arithmetic either way)."""
    std = float(image.std())
    mean = float(image.mean())
    scale = std if std > 0 else 1.0
    if image.dtype != np.float32:
        return ((image - mean) / scale).astype(np.float32)
    out = image if inplace else image.copy()
    out -= mean
    out /= scale
    return out
