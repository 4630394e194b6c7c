"""The one intensity normalisation every stage shares (training, rounds, prediction, pseudo-label)."""

from __future__ import annotations

import numpy as np


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-scan z-score normalisation (what the LA benchmark data already has; idempotent there)."""
    std = float(image.std())
    return ((image - float(image.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
