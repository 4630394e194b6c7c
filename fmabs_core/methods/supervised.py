"""Supervised baselines: what the labels alone give (the lower and upper bounds of the papers' tables)."""

from __future__ import annotations

import torch

from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method


@register
class SupCross(Method):
    """Partial cross-entropy on the cross-labels only ("Sup (cross)", the lower bound)."""

    name = "sup"


@register
class SupDense(Method):
    """Dice + cross-entropy on dense labels ("Sup (dense)", the upper bound)."""

    name = "sup-dense"
    supervision = "dense"

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.dice_ce(logits, target)
