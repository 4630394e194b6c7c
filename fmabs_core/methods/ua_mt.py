"""UA-MT (Yu et al., MICCAI 2019): a mean teacher that teaches only where it is certain.

As in the reference code (github.com/yulequan/UA-MT, ``train_LA_meanteacher_certainty_unlabel.py``):
the teacher runs T = 8 stochastic passes (train mode, so dropout is active; input + Gaussian noise
std 0.1 clipped to +-0.2; two noisy copies of the unlabelled crops per pass, T/2 passes); the
uncertainty is the entropy of the mean softmax. The student matches the teacher's softmax on a noisy
copy of the unlabelled crops with a voxelwise MSE, kept where the uncertainty is below
(0.75 + 0.25 ramp(t)) ln C and normalised as sum(mask mse) / (C sum(mask)) (C = 2 in the paper); its
weight is 0.1 x the sigmoid ramp. Supervision is the base method's partial cross-entropy on the
cross-labels. The reference V-Net has dropout 0.5 (``--dropout 0.5``); with ``--dropout 0`` the MC
passes differ by their input noise only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method, option
from fmabs_core.methods.mean_teacher import MeanTeacher, TeacherConfig, perturb_noise
from fmabs_core.training.api import TrainContext

log = logging.getLogger(__name__)


@dataclass
class UAMTConfig(TeacherConfig):
    # MT's contrast perturbation (log_gamma) is not part of UA-MT, hence TeacherConfig, not MeanTeacherConfig
    mc_passes: int = option(8, "UA-MT: stochastic teacher passes (T) for the uncertainty", low=1)
    rampup: float = option(1.0, "length of the consistency weight's sigmoid ramp, as a fraction of the iterations",
                           low=0)


def mc_uncertainty(teacher: torch.nn.Module, x: torch.Tensor, passes: int, std: float, clip: float
                   ) -> torch.Tensor:
    """Entropy (nats) of the mean softmax of ``passes`` noisy teacher passes: (B, 1, X, Y, Z).

    Batched as the reference: the input repeated twice, one noise draw per copy, T/2 forward passes
    (an odd T ends with a single-copy pass). The caller sets train mode and no_grad.
    """
    b = x.shape[0]
    total = None
    done = 0
    while done < passes:
        copies = min(2, passes - done)
        xr = x.repeat(copies, *([1] * (x.ndim - 1)))
        probs = torch.softmax(teacher(perturb_noise(xr, std, clip)).float(), 1)
        probs = probs.reshape(copies, b, *probs.shape[1:]).sum(0)
        total = probs if total is None else total + probs
        done += copies
    mean = total / passes
    return -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)


def uncertainty_threshold(it: float, iterations: float, num_classes: int) -> float:
    """(0.75 + 0.25 sigmoid_rampup(it, iterations)) ln C: from 0.75 to 1 times the largest entropy."""
    return (0.75 + 0.25 * losses.sigmoid_rampup(it, iterations)) * math.log(num_classes)


def masked_softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor, uncertainty: torch.Tensor,
                       threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(mask (p_s - p_t)^2) / (C sum(mask) + 1e-16), mask): UA-MT's consistency where certain."""
    mse = (torch.softmax(student_logits.float(), 1) - teacher_probs.detach().float()) ** 2
    mask = (uncertainty < threshold).float()
    c = student_logits.shape[1]
    return (mask * mse).sum() / (c * mask.sum() + 1e-16), mask


@register
class UAMT(MeanTeacher):
    """UA-MT: mean teacher with MSE consistency only where the teacher's MC-dropout uncertainty is low."""

    name = "ua-mt"
    Config = UAMTConfig

    def setup(self, tr: TrainContext) -> None:
        if self.config.mc_passes < 1:
            from fmabs_core.errors import InputError

            raise InputError(f"--mc-passes must be at least 1 (got {self.config.mc_passes})")
        super().setup(tr)
        if not getattr(tr.cfg.net, "dropout", 0.0):
            log.info("ua-mt without dropout (--dropout 0): the teacher's passes differ by input noise only; "
                     "the reference uses --dropout 0.5")

    def loss(self, tr, batch, logits, it):
        cfg = self.config
        sup, logs = Method.loss(self, tr, batch, logits, it)
        unl = ~batch["labelled"]
        n = tr.cfg.iterations
        lam_c = cfg.consistency * losses.sigmoid_rampup(it, cfg.rampup * n)
        threshold = uncertainty_threshold(it, n, logits.shape[1])
        if unl.any():
            x = batch["image"][unl]
            with torch.no_grad(), tr.autocast():
                self.teacher.train()  # the reference's teacher is in train mode: dropout active
                t_probs = torch.softmax(self.teacher(perturb_noise(x, cfg.noise_std, cfg.noise_clip)).float(), 1)
                unc = mc_uncertainty(self.teacher, x, cfg.mc_passes, cfg.noise_std, cfg.noise_clip)
            cons, mask = masked_softmax_mse(logits[unl], t_probs, unc, threshold)
            logs["certain"] = float(mask.mean())  # fraction of unlabelled voxels that are taught
        else:  # no unlabelled crop in this batch (or this rank's share of it): nothing to teach
            cons = logits.sum() * 0.0
        logs.update(loss_cons=float(cons.detach()), lambda_c=lam_c, threshold=threshold)
        return sup + lam_c * cons, logs
