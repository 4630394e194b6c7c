"""Active-selection scores: one number per unlabelled scan, higher = more worth cross-labelling.

Every strategy maps a class-probability volume ``(C+1, X, Y, Z)`` (sliding-window prediction of the
in-training specialist) to a float, oriented so that selection is always "take the top K". A new
strategy is one small subclass of :class:`Strategy` decorated with :func:`register`.

FM-ABS (sec. 2.3) defines LC, HE and HER; the concrete constants are in docs/methods.md.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import numpy as np

#: HER's entropy threshold is ramped between these values over training (FM-ABS: 0.5 -> 0.75)
HER_BETA_START = 0.5
HER_BETA_END = 0.75
_EPS = 1e-8


def gaussian_rampup(progress: float) -> float:
    """The usual Gaussian ramp-up ``exp(-5 (1 - t/T)^2)``, with ``progress = t/T`` clipped to [0, 1]."""
    t = min(max(float(progress), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def her_threshold(progress: float, start: float = HER_BETA_START, end: float = HER_BETA_END) -> float:
    """HER's beta at a point of training: ``start`` at t=0 (up to exp(-5)), ``end`` at t=T."""
    return start + (end - start) * gaussian_rampup(progress)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[0] < 2:
        raise ValueError(f"expected class probabilities of shape (C+1, X, Y, Z) with C+1 >= 2, got {probs.shape}")
    return probs


def confidence(probs: np.ndarray) -> np.ndarray:
    """Per-voxel confidence: the maximum class probability."""
    return _check_probs(probs).max(axis=0)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Per-voxel ``-sum_c p log p / log(n_channels)`` in [0, 1] (n_channels = C+1, background included)."""
    probs = _check_probs(probs)
    p = np.clip(probs, _EPS, 1.0)
    ent = -(probs * np.log(p)).sum(axis=0)
    return np.clip(ent / math.log(probs.shape[0]), 0.0, 1.0)


class Strategy:
    """Scores a probability volume; ``needs_prediction`` False lets callers skip inference."""

    name: ClassVar[str] = ""
    needs_prediction: ClassVar[bool] = True

    def __init__(self, seed: int | Sequence[int] | None = None):
        self.seed = seed

    def score(self, probs: np.ndarray | None, progress: float) -> float:
        """Informativeness of one scan; ``progress`` = iteration / total iterations in [0, 1]."""
        raise NotImplementedError


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, seed: int | Sequence[int] | None = None) -> Strategy:
    try:
        return STRATEGIES[name](seed)
    except KeyError:
        raise ValueError(f"unknown active strategy '{name}' (choose from {', '.join(sorted(STRATEGIES))})") from None


@register
class RandomStrategy(Strategy):
    """Uniform random scores from a seeded generator: the baseline, and FM-ABS's warm-up."""

    name = "random"
    needs_prediction = False

    def __init__(self, seed: int | Sequence[int] | None = None):
        super().__init__(seed)
        self.rng = np.random.default_rng(seed)

    def score(self, probs: np.ndarray | None, progress: float) -> float:
        return float(self.rng.random())


@register
class LeastConfidence(Strategy):
    """LC: 1 - mean of the lowest quartile of voxel confidences.

    The bottom quartile rather than the whole volume, because most voxels are easy background and
    would drown the uncertain boundary; 1 - x so that less confident = higher score.
    """

    name = "lc"
    quantile = 0.25

    def score(self, probs: np.ndarray | None, progress: float) -> float:
        conf = confidence(probs).ravel()
        k = max(1, int(conf.size * self.quantile))
        lowest = np.partition(conf, k - 1)[:k]
        return float(1.0 - lowest.mean())


@register
class HighestEntropy(Strategy):
    """HE: mean normalised entropy over all voxels."""

    name = "he"

    def score(self, probs: np.ndarray | None, progress: float) -> float:
        return float(normalised_entropy(probs).mean())


@register
class HighestEntropyRatio(Strategy):
    """HER: fraction of voxels whose normalised entropy exceeds beta(t).

    A ratio of clearly uncertain voxels separates scans better than HE's mean, where many slightly
    uncertain voxels can outweigh a few badly segmented regions; beta rises over training because a
    maturing model is more confident overall.
    """

    name = "her"

    def score(self, probs: np.ndarray | None, progress: float) -> float:
        beta = her_threshold(progress)
        return float((normalised_entropy(probs) > beta).mean())
