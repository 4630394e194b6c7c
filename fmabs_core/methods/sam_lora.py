"""CFR stage 1 (Li et al., "Concatenate, Fine-tuning, Re-training"): LoRA fine-tuning of a SAM-family
generalist on tiled axial slices, trained by the one engine like any other network.

The network is :class:`~fmabs_core.generalist.tiled.TiledSegmenter`: each 3D crop of the patch
sampler is tiled into canvases, segmented by the generalist without prompts into C+1 masks and
untiled, so the engine's crops, validation (sliding windows) and checkpoints work unchanged. The
loss is 0.5 * (CE + Dice) on the labelled voxels (dense labels, or cross-labels with 255 ignored);
AdamW (weight decay 0.1) on the LoRA tensors, the mask decoder and the prompt encoder's "no mask"
embedding. The run ships a LoRA adapter (``model.pt``, :func:`~fmabs_core.generalist.lora.save_adapter`),
not a ``fmabs predict`` model: ``fmabs pseudo-label --adapter`` segments scans with it, and CFR's
re-training stage uses it to pseudo-label the unlabelled scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmabs_core.contract import LABEL_KINDS
from fmabs_core.errors import InputError
from fmabs_core.methods import losses, register
from fmabs_core.methods.base import Method, option
from fmabs_core.training.api import TrainContext



@dataclass
class SamLoraConfig:
    generalist: str = option("litemedsam", "SAM-family model: litemedsam (embedded), mobilesam, sam_vit_b, medsam")
    generalist_checkpoint: str | None = option(None, "weights file of the generalist (default: the cache)")
    rank: int = option(4, "LoRA rank on q and v of the generalist's image encoder (sam-lora)", low=1)
    grid: int | None = option(None, "slices per canvas side; a crop with more than grid^2 axial slices is split "
                                    "over several canvases (default: 4 for litemedsam, measured by fmabs tile-grid; "
                                    "one canvas per crop for SAM)", low=1)
    labels: str = option("dense", "labels to fine-tune on: dense (labels/) or cross (cross-labels, 255 ignored)")
    bezier: float = option(0.5, "probability of the Bezier intensity-curve augmentation of each crop", low=0, high=1)
    gradient_checkpointing: bool = option(True, "recompute the generalist's encoder blocks in the backward pass: "
                                                "memory stays bounded, each step takes longer (false: keep every activation)")

    def check(self) -> None:
        if self.labels not in LABEL_KINDS:
            raise InputError(f"--labels {self.labels!r}: choose {' or '.join(LABEL_KINDS)}")
        from fmabs_core.generalist.models import canonical_name

        canonical_name(self.generalist)  # an unknown name fails before any data is loaded


def _bezier_lut(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cubic Bezier intensity curve through (0, 0) and (1, 1) (Models Genesis' non-linear
    transformation): sorted x samples and their y values; half the time the curve is flipped
    (decreasing: the intensities are inverted), as in Models Genesis."""
    p1, p2 = torch.rand(2), torch.rand(2)
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    x = b1 * p1[0] + b2 * p2[0] + b3
    y = b1 * p1[1] + b2 * p2[1] + b3
    xs = torch.sort(x).values
    ys = torch.sort(y).values if torch.rand(()) < 0.5 else torch.flip(y, [0])
    return xs, ys


def _interp(v: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``np.interp(v, xs, ys)`` for increasing ``xs`` (values outside the range take the end values)."""
    idx = torch.searchsorted(xs, v.contiguous()).clamp(1, xs.numel() - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    w = ((v - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


def bezier_augment(images: torch.Tensor, p: float) -> torch.Tensor:
    """Each crop of ``images`` (B, ...) mapped, with probability ``p``, through its own random Bezier
    intensity curve: intensities are min-max scaled to [0, 1] per crop, transformed, and scaled back
    to the crop's original range. Uses torch's global generator (seeded and checkpointed by the engine)."""
    if p <= 0:
        return images
    out = images.clone()
    for i in range(images.shape[0]):
        if float(torch.rand(())) >= p:
            continue
        img = images[i].detach().double()
        lo, hi = float(img.min()), float(img.max())
        xs, ys = _bezier_lut()  # drawn even for a flat crop: the random stream does not depend on the data
        if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo <= 1e-8:
            continue
        u = _interp(((img - lo) / (hi - lo)).reshape(-1), xs.to(img.device), ys.to(img.device)).reshape(img.shape)
        out[i] = (lo + u * (hi - lo)).to(out.dtype)
    return out


@register
class SamLora(Method):
    """CFR stage 1: fine-tune a SAM-family generalist with LoRA on tiled slices of the labelled scans."""

    name = "sam-lora"
    supervision = "dense"  # the default of the 'labels' option; each instance takes its own
    uses_unlabelled = False
    Config = SamLoraConfig
    #: glibc's default allocator: with the heap keeping its peak, two steps at the default options (2 crops of
    #: 112x112x80, 10 canvases, recompute on) peaked at 11.75 GiB and grew step by step, against 5.05 GiB
    #: (measured 2026-12-07, one process each, 2 cores; docs/methods.md, CFR)
    cpu_allocator_tuning = False

    def __init__(self, config: SamLoraConfig | None = None):
        super().__init__(config)
        self.supervision = self.config.labels
        self.base_sha256: str | None = None

    def build_network(self, tr: TrainContext) -> nn.Module:
        from fmabs_core.generalist import lora
        from fmabs_core.generalist.tiled import build_tiled_segmenter

        cfg = self.config
        net = build_tiled_segmenter(cfg.generalist, tr.project.num_classes + 1, cfg.generalist_checkpoint,
                                    cfg.rank, cfg.grid, recompute=cfg.gradient_checkpointing)
        # hashed now: the adapter must name the weights actually trained on, and a bad file fails at start
        self.base_sha256 = lora.base_sha256(net.generalist, cfg.generalist_checkpoint)
        return net

    def step_memory(self, tr: TrainContext) -> int | None:
        """The tiled generalist's measured memory per canvas (:data:`~fmabs_core.generalist.tiled.STEP_MEMORY_GIB`):
        without it, 4 crops of 112x112x80 (20 canvases, no recompute) were killed by the kernel on 24 GB."""
        return tr.net.step_memory(tr.patch, tr.cfg.batch_size)

    def memory_terms(self, tr: TrainContext) -> str:
        per_crop = tr.net.canvases(tr.patch)
        return (f"{tr.option('batch_size')} {tr.cfg.batch_size} crops of {'x'.join(map(str, tr.patch))}, {per_crop} canvas(es) "
                f"each, --gradient-checkpointing {str(tr.net.recompute).lower()}")

    def memory_advice(self, tr: TrainContext) -> str:
        slices = tr.net.grid_for_depth(int(tr.patch[2])) ** 2
        advice = (f"Lower {tr.option('batch_size')}, or the crop's depth (the third --patch-size: one canvas per {slices} "
                  f"slices)")
        if not tr.net.recompute:
            advice += ", turn --gradient-checkpointing true"
        return advice + ", or close other programs."

    def build_optimizer(self, tr: TrainContext, net: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in net.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=tr.cfg.lr, weight_decay=0.1)

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.partial_dice_ce(logits, target)

    def train_step(self, tr: TrainContext, batch: dict[str, torch.Tensor], it: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.config.bezier > 0:
            batch = {**batch, "image": bezier_augment(batch["image"], self.config.bezier)}
        return super().train_step(tr, batch, it)

    def export(self, tr: TrainContext, path: Path) -> None:
        """The run's ``model.pt`` is a LoRA adapter (only the trained tensors, with the base weights' sha256)."""
        from fmabs_core.generalist import lora

        net = self.eval_model(tr)
        cfg = self.config
        sha = self.base_sha256 or lora.base_sha256(net.generalist, cfg.generalist_checkpoint)
        meta = {**net.meta(), "classes": {str(k): v for k, v in tr.project.classes.items()},
                "patch_size": [int(p) for p in tr.patch], "labels": cfg.labels, "iterations": tr.cfg.iterations,
                "method": self.name}
        lora.save_adapter(path, net, net.generalist, sha, extra_meta=meta)
