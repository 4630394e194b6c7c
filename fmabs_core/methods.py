"""Training methods as plug-ins of the one engine: each adds loss terms and hooks, never a loop.

- ``sup``: partial cross-entropy on cross-labels ("Sup (cross)").
- ``sup-dense``: Dice + CE on dense labels (the upper bound).
- ``mt``: mean teacher: EMA teacher, MAE consistency under noise and contrast perturbations.
- ``fmabs``: mean teacher + noise-tolerant Dice on multi-view generalist pseudo-labels (FM-ABS).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from . import losses
from .crosslabel import UNLABELLED

if TYPE_CHECKING:
    from .engine import Trainer

log = logging.getLogger(__name__)


class Method:
    """Base: supervised loss only. Subclasses override the hooks they need."""

    name: ClassVar[str] = "sup"
    supervision: ClassVar[str] = "cross"  # which labels the labelled pool uses: cross | dense
    uses_unlabelled: ClassVar[bool] = False

    def setup(self, tr: "Trainer") -> None:
        """Called once before the first step (after resume state is known)."""

    def before_step(self, tr: "Trainer", it: int) -> None:
        """Called before drawing the batch of iteration ``it`` (pseudo-label rounds live here)."""

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.partial_cross_entropy(logits, target)

    def loss(self, tr: "Trainer", batch: dict[str, torch.Tensor], logits: torch.Tensor, it: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        lab = batch["labelled"]
        sup = self.supervised_loss(logits[lab], batch["target"][lab])
        return sup, {"loss_sup": float(sup.detach())}

    def after_step(self, tr: "Trainer", it: int) -> None:
        """Called after the optimiser step (EMA updates live here)."""

    def eval_model(self, tr: "Trainer") -> nn.Module:
        """The network validated, saved as the run's model and used for pseudo-labels/suggestions."""
        return tr.net

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, tr: "Trainer") -> None:
        pass


class SupCross(Method):
    name = "sup"


class SupDense(Method):
    name = "sup-dense"
    supervision = "dense"

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.dice_ce(logits, target)


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


class MeanTeacher(Method):
    name = "mt"
    uses_unlabelled = True

    def setup(self, tr: "Trainer") -> None:
        self.teacher = copy.deepcopy(tr.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if getattr(self, "_pending_teacher", None) is not None:
            self.teacher.load_state_dict(self._pending_teacher)
            self._pending_teacher = None

    def consistency(self, tr: "Trainer", batch: dict[str, torch.Tensor], probs: torch.Tensor) -> torch.Tensor:
        cfg = tr.cfg
        x = batch["image"]
        with torch.no_grad(), tr.autocast():
            self.teacher.train()  # dropout/BN as in the literature's MT: teacher in train mode, no grad
            t_noise = torch.softmax(self.teacher(perturb_noise(x, cfg.noise_std, cfg.noise_clip)).float(), 1)
            t_contrast = torch.softmax(self.teacher(perturb_contrast(x, cfg.log_gamma)).float(), 1)
        return losses.consistency_mae(probs, [t_noise, t_contrast])

    def loss(self, tr, batch, logits, it):
        sup, logs = super().loss(tr, batch, logits, it)
        probs = torch.softmax(logits.float(), 1)
        lam_c = losses.lambda_consistency(it, tr.cfg.iterations, tr.cfg.consistency)
        cons = self.consistency(tr, batch, probs)
        logs.update(loss_cons=float(cons.detach()), lambda_c=lam_c)
        return sup + lam_c * cons, logs

    def after_step(self, tr, it):
        # The UA-MT ramp of the EMA rate: a young teacher follows the student closely.
        alpha = min(1 - 1 / (it + 2), tr.cfg.ema)
        ema_update(self.teacher, tr.net, alpha)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict, tr) -> None:
        if hasattr(self, "teacher"):
            self.teacher.load_state_dict(state["teacher"])
        else:
            self._pending_teacher = state["teacher"]


class FMABS(MeanTeacher):
    name = "fmabs"

    def setup(self, tr: "Trainer") -> None:
        super().setup(tr)
        cfg = tr.cfg
        n = cfg.iterations
        self.warmup = int(round(cfg.pseudo_warmup * n))
        self.every = max(1, int(round(cfg.pseudo_every * n)))
        self.stop = int(round(cfg.pseudo_stop * n))
        self.rounds_done = getattr(self, "rounds_done", 0)
        self._generalist = None
        self.generalist(tr)  # fail at start, not at the first round, when weights are missing
        if self.rounds_done:
            tr.restore_pseudolabels()

    def round_due(self, it: int) -> bool:
        return it >= self.warmup and it < self.stop and (it - self.warmup) % self.every == 0

    def generalist(self, tr: "Trainer"):
        if self._generalist is None:
            from .generalist import get_generalist

            from . import pseudolabel  # noqa: F401  (imported with the model: a round must not fail on import)

            self._generalist = get_generalist(tr.cfg.generalist, device=tr.device,
                                              checkpoint=tr.cfg.generalist_checkpoint)
        return self._generalist

    def before_step(self, tr, it):
        if not self.round_due(it):
            return
        from . import distributed
        from .metrics import dice_jaccard
        from .pseudolabel import multiview_pseudolabel

        cfg = tr.cfg
        cases = tr.train_cases
        if cfg.pseudo_max_cases is not None and len(cases) > cfg.pseudo_max_cases:
            # drawn before sharding: every rank's sampler has the same seed, so all pick the same scans
            idx = tr.sampler.rng.choice(len(cases), cfg.pseudo_max_cases, replace=False)
            cases = [cases[i] for i in sorted(idx)]
        distributed.broadcast_module(self.teacher)  # BN statistics drift per rank: prompt from rank 0's teacher
        start = time.time()
        mine: dict[str, tuple[np.ndarray, tuple[float, float] | None]] = {}
        shard = distributed.shard(list(enumerate(cases)))
        for i, case in tr.progress(shard, desc=f"pseudo-labels (round {self.rounds_done + 1})"):
            rng = np.random.default_rng([cfg.seed, it, i])  # per scan: results do not depend on the rank count
            prompt = tr.predict(self.teacher, case.image).argmax(0).astype(np.uint8)
            result = multiview_pseudolabel(
                self.generalist(tr), case.image, prompt, rng, fusion=cfg.fusion, box_jitter=cfg.box_jitter,
                n_points=cfg.n_points, max_slices_per_view=cfg.pseudo_max_slices)
            if cfg.pseudo_max_slices is not None:
                fill_unprompted(result, prompt, cfg.fusion)
            tr.save_pseudolabels(case, result)  # each rank writes the scans it labelled (distinct files)
            label = case.extra.get("label")
            scores = None if label is None else (dice_jaccard(prompt, label)[0], dice_jaccard(result["fused"], label)[0])
            mine[case.id] = (result["fused"].astype(np.uint8), scores)
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        for case in cases:
            case.pseudo = merged[case.id][0]
        self.rounds_done += 1
        info = {"round": self.rounds_done, "iteration": it, "cases": len(cases), "seconds": time.time() - start}
        dices = np.array([v[1] for v in merged.values() if v[1] is not None])
        if len(dices):
            info.update(teacher_dice=float(dices[:, 0].mean()), pseudo_dice=float(dices[:, 1].mean()))
        tr.runlog.event("pseudo_label", **info)
        log.info("pseudo-label round %d: %s", self.rounds_done, info)

    def loss(self, tr, batch, logits, it):
        total, logs = super().loss(tr, batch, logits, it)
        pseudo = batch["pseudo"]
        valid = pseudo != UNLABELLED
        if valid.any():
            probs = torch.softmax(logits.float(), 1)
            onehot = losses.one_hot(pseudo.masked_fill(~valid, 0), probs.shape[1])
            mask = valid.unsqueeze(1).float()
            l_sam = losses.noise_tolerant_dice(probs * mask, onehot * mask, gamma=tr.cfg.nt_gamma)
            lam = losses.lambda_sam(it, tr.cfg.iterations, tr.cfg.sam_weight)
            total = total + lam * l_sam
            logs.update(loss_sam=float(l_sam.detach()), lambda_sam=lam)
        return total, logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict, tr) -> None:
        super().load_state_dict(state, tr)
        self.rounds_done = int(state.get("rounds_done", 0))


def fill_unprompted(result: dict, prompt: np.ndarray, fusion: str) -> None:
    """Where slices were skipped to save generalist calls, keep the teacher's own mask there, then re-fuse.

    Leaving skipped foreground slices empty would teach the student that the object stops there; the
    teacher's mask is the best guess we have for them (it is what the generalist would have been shown).
    """
    from .io import VIEW_AXIS, VIEWS
    from .pseudolabel import fuse

    for view in VIEWS:
        axis = VIEW_AXIS[view]
        other = tuple(a for a in range(3) if a != axis)
        has_fg = np.flatnonzero((prompt > 0).any(axis=other))
        prompted = set(np.asarray(result.slices[view]).tolist()) if hasattr(result, "slices") else set()
        vol = np.moveaxis(result[view], axis, 0)  # a view: writes go through
        src = np.moveaxis(prompt, axis, 0)
        for k in has_fg:
            if int(k) not in prompted:
                vol[k] = src[k]
    result["fused"] = fuse([result[v] for v in VIEWS], fusion)


METHODS: dict[str, type[Method]] = {m.name: m for m in (SupCross, SupDense, MeanTeacher, FMABS)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown method '{name}' (choose from {', '.join(METHODS)})") from None
