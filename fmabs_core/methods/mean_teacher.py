"""Mean teacher: an EMA copy of the network teaches the student under input perturbations.

The FM-ABS form: MAE consistency between the student's softmax and the teacher's under Gaussian
noise and under a random contrast (gamma) change, weighted 0.1 x the sigmoid ramp; the EMA rate
follows UA-MT's ramp (a young teacher tracks the student closely). ``ema_update`` and the
perturbations are shared by the mean-teacher family (fmabs, ua-mt).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method, option
from fmabs_core.training.api import TrainContext



@dataclass
class TeacherConfig:
    """The options every EMA-teacher method shares (one ``fmabs train`` option each: mt, fmabs, ua-mt, cfr-*)."""

    ema: float = option(0.99, "EMA rate of the teacher (after UA-MT's ramp)", low=0, high=1)
    consistency: float = option(0.1, "weight of the consistency loss at the end of its ramp", low=0)
    noise_std: float = option(0.1, "std of the Gaussian noise added to the teacher's input", low=0)
    noise_clip: float = option(0.2, "clip of that noise", low=0)


@dataclass
class MeanTeacherConfig(TeacherConfig):
    log_gamma: float = option(0.3, "contrast perturbation: gamma = exp(U(-log_gamma, log_gamma))", low=0)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, for parameters and float BN buffers alike."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
        else:
            t.copy_(s)


def perturb_noise(x: torch.Tensor, std: float, clip: float, gen: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) * std
    return x + noise.clamp(-clip, clip)


def perturb_contrast(x: torch.Tensor, log_gamma: float) -> torch.Tensor:
    """Random gamma per sample on min-max rescaled intensities, mapped back to the input range."""
    b = x.shape[0]
    dims = tuple(range(1, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    gamma = torch.exp((torch.rand(b, device=x.device) * 2 - 1) * log_gamma).view(b, *([1] * (x.ndim - 1)))
    unit = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return unit.pow(gamma) * (hi - lo) + lo


@register
class MeanTeacher(Method):
    """Mean teacher with MAE consistency under noise and contrast perturbations (FM-ABS's MT)."""

    name = "mt"
    uses_unlabelled = True
    Config = MeanTeacherConfig

    def setup(self, tr: TrainContext) -> None:
        self.teacher = copy.deepcopy(tr.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if getattr(self, "_pending_teacher", None) is not None:
            self.teacher.load_state_dict(self._pending_teacher)
            self._pending_teacher = None

    def consistency(self, tr: TrainContext, batch: dict[str, torch.Tensor], probs: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = batch["image"]
        with torch.no_grad(), tr.autocast():
            self.teacher.train()  # dropout/BN as in the literature's MT: teacher in train mode, no grad
            t_noise = torch.softmax(self.teacher(perturb_noise(x, cfg.noise_std, cfg.noise_clip)).float(), 1)
            t_contrast = torch.softmax(self.teacher(perturb_contrast(x, cfg.log_gamma)).float(), 1)
        return losses.consistency_mae(probs, [t_noise, t_contrast])

    def loss(self, tr, batch, logits, it):
        sup, logs = super().loss(tr, batch, logits, it)
        probs = torch.softmax(logits.float(), 1)
        lam_c = losses.lambda_consistency(it, tr.cfg.iterations, self.config.consistency)
        cons = self.consistency(tr, batch, probs)
        logs.update(loss_cons=float(cons.detach()), lambda_c=lam_c)
        return sup + lam_c * cons, logs

    def after_step(self, tr, it):
        # The UA-MT ramp of the EMA rate: a young teacher follows the student closely.
        alpha = min(1 - 1 / (it + 2), self.config.ema)
        ema_update(self.teacher, tr.net, alpha)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict, tr) -> None:
        if hasattr(self, "teacher"):
            self.teacher.load_state_dict(state["teacher"])
        else:
            self._pending_teacher = state["teacher"]
