"""Loss terms the methods combine. Targets are integer label volumes (B, X, Y, Z); 255 = not labelled."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from fmabs_core.contract import UNLABELLED


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over labelled voxels only ("Sup (cross)"); 0 when none is labelled."""
    labelled = target != UNLABELLED
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), ignore_index=UNLABELLED)


_dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (soft Dice + CE) on a dense label, the usual fully supervised loss."""
    ce = F.cross_entropy(logits.float(), target.long())
    return 0.5 * (ce + _dice(logits.float(), target.long().unsqueeze(1)))


def noise_tolerant_dice(probs: torch.Tensor, onehot: torch.Tensor, gamma: float = 1.5, eps: float = 1e-5) -> torch.Tensor:
    """FM-ABS's noise-robust Dice: sum|P - Y|^gamma / (sum P^2 + sum Y^2 + eps), mean over classes.

    gamma = 2 gives 1 - Dice (with squared denominators); gamma < 2 weighs confident disagreements
    less, which tolerates the generalist's label noise.
    """
    dims = (0, *range(2, probs.ndim))
    num = (probs - onehot).abs().pow(gamma).sum(dims)
    den = probs.pow(2).sum(dims) + onehot.pow(2).sum(dims) + eps
    return (num / den).mean()


def soft_dice_squared(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - Dice with squared denominators (V-Net's form), per class then averaged; for tests and reference."""
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    den = probs.pow(2).sum(dims) + onehot.pow(2).sum(dims) + eps
    return (1 - 2 * inter / den).mean()


def one_hot(target: torch.Tensor, num_channels: int) -> torch.Tensor:
    return F.one_hot(target.long().clamp(0, num_channels - 1), num_channels).movedim(-1, 1).float()


def consistency_mae(student_probs: torch.Tensor, teacher_probs: list[torch.Tensor]) -> torch.Tensor:
    """Mean absolute error between student softmax and each perturbed teacher softmax, averaged."""
    return torch.stack([(student_probs - t.detach()).abs().mean() for t in teacher_probs]).mean()


def sigmoid_rampup(t: float, t_max: float) -> float:
    """exp(-5 (1 - t/t_max)^2), the ramp of the semi-supervised literature; 1 past t_max."""
    if t_max <= 0:
        return 1.0
    phase = 1.0 - min(max(t, 0.0), t_max) / t_max
    return float(math.exp(-5.0 * phase * phase))


def lambda_sam(t: float, t_max: float, scale: float = 0.5) -> float:
    """Weight of the SAM pseudo-label loss: 0.5 (1 - ramp), decaying to 0 at t_max."""
    return scale * (1.0 - sigmoid_rampup(t, t_max))


def lambda_consistency(t: float, t_max: float, scale: float = 0.1) -> float:
    """Weight of the consistency loss: 0.1 ramp, rising to 0.1 at t_max."""
    return scale * sigmoid_rampup(t, t_max)


def partial_dice_ce(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """0.5 * (CE + soft Dice) over the labelled voxels only (255 = not labelled, ignored by both terms).

    CFR's fine-tuning and pseudo-label loss, usable with cross-labels. The Dice is MONAI's
    ``DiceLoss(softmax=True, include_background=True)`` restricted to the labelled voxels: per scan
    and class ``1 - (2 sum p y + s) / (sum p + sum y + s)``, averaged, so on a fully labelled target
    this equals :func:`dice_ce`. 0 (with a gradient path) when nothing is labelled.
    """
    valid = target != UNLABELLED
    if not valid.any():
        return logits.sum() * 0.0
    logits = logits.float()
    ce = F.cross_entropy(logits, target.long(), ignore_index=UNLABELLED)
    probs = torch.softmax(logits, 1)
    mask = valid.unsqueeze(1).to(probs.dtype)
    onehot = one_hot(target.masked_fill(~valid, 0), probs.shape[1]) * mask
    probs = probs * mask
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    den = probs.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (den + smooth)
    return 0.5 * (ce + dice.mean())
