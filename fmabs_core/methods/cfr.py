"""CFR stage 3 (Li et al., "Concatenate, Fine-tuning, Re-training"): re-train the 3D V-Net with the
fine-tuned generalist's pseudo-labels, inside a semi-supervised method.

The CFR pipeline (``fmabs_core.pipelines.cfr``, found through the class attribute ``pipeline``) first
fine-tunes the generalist (method ``sam-lora``, configured by this family's ``generalist``, ``rank``,
``grid``, ``labels`` and ``finetune_*`` options), then writes the tuned generalist's label of every
training scan as ``pseudo/<case>_generalist.nii.gz``, then trains one of these methods:

- ``cfr-mt`` (the authors' CFR_MT): ``0.5 (CE + Dice)`` on the labelled crops, plus ``pl_weight x
  0.5 (CE + Dice)`` of the student on the unlabelled crops against the pseudo-labels, plus
  ``consistency x sigmoid_rampup(t, T)`` times the softmax MSE between the student and the EMA teacher
  (input + Gaussian noise, clipped) on all crops.
- ``cfr-acmt`` (CFR_ACMT): the same, with the consistency only on ambiguous voxels: the teacher's
  normalised entropy at or above ``0.75 + (0.95 - 0.75) sigmoid_rampup(t, T)``, normalised by the mask.
- ``cfr-st`` (self-training): supervised plus pseudo-label loss, no teacher; with ``st_rounds`` > 1
  the network's own predictions replace the unlabelled scans' pseudo-labels at the start of each
  later round (written as ``pseudo/<case>_st<round>.nii.gz``).

Voxels labelled 255 (no label: cross-labels, padding) are ignored by the supervised and pseudo-label
terms. The labelled pool is the project's dense labels (``--labels dense``, the paper) or its
cross-labels (``--labels cross``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fmabs_core.contract import LABEL_KINDS, GENERALIST_LAYER, PSEUDO_DIR
from fmabs_core.errors import InputError
from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method, option
from fmabs_core.methods.mean_teacher import MeanTeacher, TeacherConfig, perturb_noise
from fmabs_core.training.api import TrainContext

log = logging.getLogger(__name__)

#: ACMT's ambiguity threshold on the normalised entropy rises from the first to the second value
ACMT_THRESHOLD = (0.75, 0.95)


@dataclass
class CFRConfig(TeacherConfig):
    labels: str = option("dense", "labels of the labelled pool, for fine-tuning and re-training: dense (labels/) "
                                  "or cross (cross-labels, 255 ignored)")
    generalist: str = option("litemedsam", "SAM-family model: litemedsam (embedded), mobilesam, sam_vit_b, medsam")
    generalist_checkpoint: str | None = option(None, "weights file of the generalist (default: the cache)")
    rank: int = option(4, "LoRA rank on q and v of the generalist's image encoder (sam-lora, CFR fine-tuning)", low=1)
    grid: int | None = option(None, "slices per canvas side; a crop with more than grid^2 axial slices is split "
                                    "over several canvases (default: 4 for litemedsam, measured by fmabs tile-grid; "
                                    "one canvas per crop for SAM)", low=1)
    gradient_checkpointing: bool = option(True, "CFR fine-tuning: recompute the generalist's encoder blocks in the "
                                                "backward pass (memory bounded, each step takes longer)")
    finetune_iterations: int = option(6000, "CFR: iterations of the generalist's fine-tuning stage", low=1)
    finetune_lr: float = option(1e-4, "CFR: AdamW learning rate of the fine-tuning stage (the authors: 1e-3, "
                                      "which collapses to background here; see docs/methods.md)", above=0)
    finetune_batch: int = option(2, "CFR: crops per batch of the fine-tuning stage", low=1)
    pl_weight: float = option(1.0, "CFR: weight of the pseudo-label loss on the unlabelled crops", low=0)
    st_rounds: int = option(1, "cfr-st: self-training rounds; after the first (the generalist's labels) the "
                               "network's own predictions replace the unlabelled scans' pseudo-labels", low=1)

    def check(self) -> None:
        if self.labels not in LABEL_KINDS:
            raise InputError(f"--labels {self.labels!r}: choose {' or '.join(LABEL_KINDS)}")


# ---- loss pieces ---------------------------------------------------------------------------------------
def pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """CFR's L_pl: 0.5 (CE + Dice) of the unlabelled crops against their pseudo-labels (255 ignored).

    Labelled crops take no part; 0 (with a gradient path) when no unlabelled crop has a pseudo-label.
    """
    unl = ~labelled
    if not bool(unl.any()):
        return logits.sum() * 0.0
    return losses.partial_dice_ce(logits[unl], pseudo[unl])


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over voxels and classes of (softmax(student) - teacher)^2 (SSL4MIS's ``softmax_mse_loss``, averaged)."""
    return ((torch.softmax(student_logits.float(), 1) - teacher_probs.detach().float()) ** 2).mean()


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p log p / log C per voxel: (B, 1, ...), 0 = certain, 1 = uniform."""
    c = probs.shape[1]
    return -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True) / math.log(c)


def ambiguity_threshold(it: float, iterations: float) -> float:
    """ACMT's threshold: 0.75 + (0.95 - 0.75) sigmoid_rampup(it, iterations) (stricter as training goes)."""
    lo, hi = ACMT_THRESHOLD
    return lo + (hi - lo) * losses.sigmoid_rampup(it, iterations)


def ambiguous_softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor, threshold: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(mask (p_s - p_t)^2) / (C sum(mask) + 1e-16), mask): the softmax MSE on the voxels where the
    teacher's normalised entropy is at least ``threshold`` (ACMT's ambiguity-masked consistency)."""
    mse = (torch.softmax(student_logits.float(), 1) - teacher_probs.detach().float()) ** 2
    mask = (normalised_entropy(teacher_probs.detach().float()) >= threshold).float()
    c = student_logits.shape[1]
    return (mask * mse).sum() / (c * mask.sum() + 1e-16), mask


# ---- the family ----------------------------------------------------------------------------------------
class CFRMethod(Method):
    """Re-training with the fine-tuned generalist's pseudo-labels (base of the CFR family; not registered)."""

    pipeline = "cfr"  # trained by fmabs_core.pipelines.cfr: fine-tune, pseudo-label, then this method
    uses_unlabelled = True
    Config = CFRConfig

    def __init__(self, config: CFRConfig | None = None):
        super().__init__(config)
        self.supervision = self.config.labels  # which labels the engine puts in the labelled pool

    # ---- pseudo-labels ------------------------------------------------------------------------------
    def pseudo_path(self, tr: TrainContext, case_id: str, layer: str = GENERALIST_LAYER):
        return tr.run_dir / PSEUDO_DIR / f"{case_id}_{layer}.nii.gz"

    def load_pseudolabels(self, tr: TrainContext, cases, layer: str = GENERALIST_LAYER, required=()) -> None:
        """``case.pseudo`` from ``pseudo/<case>_<layer>.nii.gz``; a missing file is an error for ``required`` ids."""
        from fmabs_core.data import io

        for case in cases:
            path = self.pseudo_path(tr, case.id, layer)
            if not path.exists():
                if case.id in required and layer == GENERALIST_LAYER:
                    raise InputError(
                        f"{path}: no pseudo-label of unlabelled scan '{case.id}'. Method '{self.name}' re-trains on "
                        f"the fine-tuned generalist's labels: run the CFR pipeline's pseudo-label stage first "
                        f"(fmabs train --method {self.name} runs it before re-training), or write that file.")
                if case.id in required:
                    raise InputError(f"{path}: the self-training labels of scan '{case.id}' this run wrote before "
                                     "are gone, so the run cannot resume; start a new --run.")
                continue
            array = io.load_label(path, tr.project.num_classes).array
            if array.shape != case.image.shape:
                raise InputError(f"{path}: pseudo-label of shape {array.shape}, but scan '{case.id}' has "
                                 f"{case.image.shape}; delete it and run the pseudo-label stage again.")
            case.pseudo = tr.hold_pseudolabel(case, array)

    def setup(self, tr: TrainContext) -> None:
        super().setup(tr)
        self.load_pseudolabels(tr, tr.train_cases, required={c.id for c in tr.unlabelled})
        if not tr.unlabelled:
            log.warning("%s: every training scan is in the labelled pool (--labels %s), so the pseudo-labels "
                        "are unused; choose the labelled scans with --labelled-cases", self.name, self.config.labels)

    # ---- losses -------------------------------------------------------------------------------------
    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # 0.5 (CE + Dice); equal to losses.dice_ce on dense crops, and it ignores 255 (cross-labels and
        # the padding of scans smaller than the patch, which dice_ce would not accept)
        return losses.partial_dice_ce(logits, target)

    def loss(self, tr, batch, logits, it):
        sup, logs = Method.loss(self, tr, batch, logits, it)  # not MeanTeacher's (its MAE consistency)
        pl = pseudo_label_loss(logits, batch["pseudo"], batch["labelled"])
        w = self.config.pl_weight
        logs.update(loss_pl=float(pl.detach()), pl_weight=w)
        return sup + w * pl, logs


class _CFRTeacher(CFRMethod, MeanTeacher):
    """CFR with an EMA teacher (MeanTeacher's setup, EMA update and state; CFR's losses)."""

    def teacher_probs(self, tr: TrainContext, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.no_grad(), tr.autocast():
            self.teacher.train()  # as the reference MT codes: teacher in train mode (dropout), no gradient
            return torch.softmax(self.teacher(perturb_noise(x, cfg.noise_std, cfg.noise_clip)).float(), 1)

    def consistency_loss(self, tr, batch, logits, it) -> tuple[torch.Tensor, dict[str, float]]:
        return softmax_mse(logits, self.teacher_probs(tr, batch["image"])), {}

    def loss(self, tr, batch, logits, it):
        total, logs = CFRMethod.loss(self, tr, batch, logits, it)
        lam_c = losses.lambda_consistency(it, tr.cfg.iterations, self.config.consistency)
        cons, extra = self.consistency_loss(tr, batch, logits, it)
        logs.update(loss_cons=float(cons.detach()), lambda_c=lam_c, **extra)
        return total + lam_c * cons, logs


@register
class CFRMT(_CFRTeacher):
    """CFR_MT: mean teacher re-trained with the fine-tuned generalist's pseudo-labels (CFR stage 3)."""

    name = "cfr-mt"


@register
class CFRACMT(_CFRTeacher):
    """CFR_ACMT: ambiguity-consensus mean teacher re-trained with the fine-tuned generalist's pseudo-labels."""

    name = "cfr-acmt"

    def consistency_loss(self, tr, batch, logits, it):
        threshold = ambiguity_threshold(it, tr.cfg.iterations)
        cons, mask = ambiguous_softmax_mse(logits, self.teacher_probs(tr, batch["image"]), threshold)
        return cons, {"threshold": threshold, "ambiguous": float(mask.mean())}


@register
class CFRST(CFRMethod):
    """CFR self-training: supervised + pseudo-label loss; later rounds learn the network's own predictions."""

    name = "cfr-st"

    def __init__(self, config: CFRConfig | None = None):
        super().__init__(config)
        self.rounds_done = 0  # rounds after the first whose pseudo-labels were made (restored on resume)

    def round_start(self, r: int, iterations: int) -> int:
        """First iteration of round ``r`` (0-based; round 0 starts at 0 with the generalist's labels)."""
        return int(round(r * iterations / self.config.st_rounds))

    @staticmethod
    def layer(r: int) -> str:
        return f"st{r}"

    def setup(self, tr: TrainContext) -> None:
        super().setup(tr)
        if self.rounds_done:  # a resume: the last round's labels, as written (uint8, lossless)
            self.load_pseudolabels(tr, tr.unlabelled, self.layer(self.rounds_done),
                                   required={c.id for c in tr.unlabelled})

    def before_step(self, tr, it):
        due = [r for r in range(self.rounds_done + 1, self.config.st_rounds)
               if self.round_start(r, tr.cfg.iterations) <= it]
        if not due:
            return
        from fmabs_core.training import distributed

        r = due[-1]  # rounds that start at the same iteration would label with the same network
        start = time.time()
        cases = list(tr.unlabelled)
        mine: dict[str, np.ndarray | None] = {}
        for case in tr.progress(distributed.shard(cases), desc=f"self-training labels (round {r + 1})"):
            label = tr.predict(tr.net, case.image).argmax(0).astype(np.uint8)
            tr.save_pseudolabels(case, {self.layer(r): label})  # each rank writes the scans it labelled
            mine[case.id] = tr.pseudolabel_to_send(tr.hold_pseudolabel(case, label))
        merged = {k: v for part in distributed.all_gather_object(mine) for k, v in part.items()}
        for case in cases:
            case.pseudo = tr.pseudolabel_received(case, merged[case.id])
        self.rounds_done = r
        info = {"round": r + 1, "iteration": it, "cases": len(cases), "seconds": time.time() - start,
                "layer": self.layer(r)}
        tr.runlog.event("pseudo_label", **info)
        log.info("self-training round %d: %s", r + 1, info)

    def loss(self, tr, batch, logits, it):
        total, logs = super().loss(tr, batch, logits, it)
        logs["st_round"] = float(self.rounds_done + 1)
        return total, logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict, tr) -> None:
        super().load_state_dict(state, tr)
        self.rounds_done = int(state.get("rounds_done", 0))
