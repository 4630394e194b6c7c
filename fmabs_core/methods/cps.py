"""CPS, cross pseudo supervision (Chen et al., CVPR 2021): two networks teach each other.

Network A is the engine's network (validated and shipped); network B has the same architecture and
a different initialisation (drawn from a seed derived from ``--seed``), its own SGD optimiser with
the engine's settings (the engine sets its learning rate and steps it). Each network learns the
other's hard prediction (argmax, no gradient) with cross-entropy on every crop of the batch,
labelled and unlabelled, as in the paper; the weight is 0.1 x the sigmoid ramp of SSL4MIS's 3D CPS
code. Both networks also learn the cross-labels (the base method's partial cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method, option
from fmabs_core.training.api import TrainContext

#: network B's initialisation seed is ``--seed`` + this (A's is drawn from ``--seed`` itself)
SEED_OFFSET_B = 104729


@dataclass
class CPSConfig:
    cps_weight: float = option(0.1, "CPS: weight of the cross pseudo-supervision loss at the end of its ramp", low=0)
    rampup: float = option(1.0, "length of the consistency weight's sigmoid ramp, as a fraction of the iterations",
                           low=0)


def cross_pseudo_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """CE(A, argmax B) + CE(B, argmax A), each averaged over every voxel; the pseudo-labels carry no gradient."""
    pseudo_a = logits_a.detach().argmax(1)
    pseudo_b = logits_b.detach().argmax(1)
    return F.cross_entropy(logits_a.float(), pseudo_b) + F.cross_entropy(logits_b.float(), pseudo_a)


@register
class CPS(Method):
    """CPS: two differently initialised networks supervise each other with their hard pseudo-labels."""

    name = "cps"
    uses_unlabelled = True
    Config = CPSConfig

    def setup(self, tr: TrainContext) -> None:
        from fmabs_core.training.nets import build_network

        cfg = tr.cfg
        # B's own seed, in a forked RNG: the global stream (dropout, sampling...) is the same whether B
        # is built fresh or rebuilt on resume (where the engine has already restored the saved RNG states).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + SEED_OFFSET_B)
            net_b = build_network(cfg.net)
        self.net_b = net_b.to(tr.device)
        self.optimizer_b = torch.optim.SGD(self.net_b.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay)
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.net_b.load_state_dict(pending["net_b"])
            self.optimizer_b.load_state_dict(pending["optimizer_b"])
            self._pending = None
        self.train_b = tr.wrap(self.net_b)
        self.train_b.train()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer_b]

    def eval_model(self, tr: TrainContext) -> torch.nn.Module:
        return tr.net  # network A

    def train_step(self, tr, batch, it):
        with tr.autocast():
            logits_a = tr.train_net(batch["image"])
            logits_b = self.train_b(batch["image"])
        lab = batch["labelled"]
        sup_a = self.supervised_loss(logits_a[lab], batch["target"][lab])
        sup_b = self.supervised_loss(logits_b[lab], batch["target"][lab])
        cps = cross_pseudo_loss(logits_a, logits_b)
        lam = self.config.cps_weight * losses.sigmoid_rampup(it, self.config.rampup * tr.cfg.iterations)
        logs = {"loss_sup": float(sup_a.detach()), "loss_sup_b": float(sup_b.detach()),
                "loss_cps": float(cps.detach()), "lambda_cps": lam}
        return sup_a + sup_b + lam * cps, logs

    def state_dict(self) -> dict:
        return {"net_b": self.net_b.state_dict(), "optimizer_b": self.optimizer_b.state_dict()}

    def load_state_dict(self, state: dict, tr) -> None:
        if hasattr(self, "net_b"):
            self.net_b.load_state_dict(state["net_b"])
            self.optimizer_b.load_state_dict(state["optimizer_b"])
        else:
            self._pending = state
