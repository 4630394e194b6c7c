"""Which tile grid a small generalist should see: tile size against Dice, measured on labelled crops.

CFR tiles a crop's axial slices into one canvas. SAM (1024 px) holds 80 slices of 112 px in a
9 x 9 grid without resampling; LiteMedSAM (256 px) must shrink that canvas about 4x, and its mask
decoder works at a quarter of that again (a 112-px slice becomes 7 px of mask logits). A smaller
grid (fewer slices per canvas, several canvases per crop) keeps more pixels per slice but costs one
encoder pass per canvas. Which grid to use is a measurement, not a guess:

- ``prompted``: the *pretrained* generalist, given each tile's ground-truth box, segments every tile
  of the canvas; Dice over the crop. It measures what the image encoder still sees at that tile size
  and includes the decoder's resolution (the prompt-free tuned model decodes on the same grid).
- ``ceiling``: the ground truth pushed through the decoder's resolution and back (area-downsampled
  to the mask-logit grid, bilinear up, thresholded at 0.5): the best Dice any decoder could reach.
- ``canvases``: encoder passes per crop (time).

:func:`choose_grid` takes the fewest canvases whose prompted Dice is within ``tolerance`` of the
best grid's. The tuned model's Dice is not measured here (that needs a fine-tuning per grid); the
choice is the cheapest grid that loses nothing the pretrained model can see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError
from fmabs_core.generalist.base import Generalist
from fmabs_core.generalist.pseudolabel import dice
from fmabs_core.generalist.tiling import (DECODER_STRIDE, TileLayout, chunk_ranges, grid_for, tile_image, tile_label,
                                          tile_scale, untile)

log = logging.getLogger(__name__)

#: grids tried by default (80 slices: 1, 4, 5, 9 and 20 canvases per crop)
DEFAULT_GRIDS = (9, 5, 4, 3, 2)


@dataclass(frozen=True)
class GridTrial:
    """One grid measured on a set of crops (Dice averaged over crops and foreground classes)."""

    grid: int
    canvases_per_crop: float
    tile_px_model: float  # a slice's width in model pixels
    tile_px_mask: float  # ... and in mask-logit pixels
    prompted_dice: float
    ceiling_dice: float
    seconds_per_crop: float

    def row(self) -> str:
        return (f"{self.grid:>4}  {self.canvases_per_crop:>8.1f}  {self.tile_px_model:>7.1f}  {self.tile_px_mask:>6.1f}  "
                f"{self.prompted_dice:>8.3f}  {self.ceiling_dice:>7.3f}  {self.seconds_per_crop:>7.2f}")


TABLE_HEADER = "grid  canvases  tile px  mask px  prompted  ceiling  s/crop"


def foreground_crop(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` crop centred on the label's foreground (clipped to the scan; padded if the scan is smaller)."""
    fg = np.argwhere((label > 0) & (label != UNLABELLED))
    if fg.size == 0:
        raise InputError("a crop for the grid measurement needs a label with foreground; this one is empty.")
    centre = (fg.min(0) + fg.max(0)) // 2
    img, lab = image, label
    pads = [(0, max(0, int(s) - d)) for s, d in zip(size, image.shape)]
    if any(p[1] for p in pads):
        img = np.pad(image, pads, mode="constant", constant_values=float(image.min()))
        lab = np.pad(label, pads, mode="constant", constant_values=0)
    starts = [int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, size, img.shape)]
    sl = tuple(slice(a, a + int(s)) for a, s in zip(starts, size))
    return img[sl], lab[sl]


def _boxes(tile_lab: np.ndarray, origins: list[tuple[int, int]], shape: tuple[int, int], cls: int
           ) -> tuple[list[int], np.ndarray]:
    """Ground-truth box (x0, y0, x1, y1 on the canvas: x = column) of class ``cls`` in each tile that has it."""
    which, boxes = [], []
    x, y = shape
    for k, (r, c) in enumerate(origins):
        m = tile_lab[r:r + x, c:c + y] == cls
        if not m.any():
            continue
        rows, cols = np.nonzero(m)
        which.append(k)
        boxes.append((c + cols.min(), r + rows.min(), c + cols.max(), r + rows.max()))
    return which, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _ceiling(tile_lab: np.ndarray, layout: TileLayout, cls: int, model_size: int) -> np.ndarray:
    """The class mask after the decoder's resolution: canvas -> mask grid (area) -> canvas (bilinear) > 0.5."""
    side = layout.canvas_side
    mask_side = model_size // DECODER_STRIDE  # the canvas is resized to the model's input, as in the prompted run
    m = torch.from_numpy((tile_lab == cls).astype(np.float32))[None, None]
    low = F.interpolate(m, (mask_side, mask_side), mode="area")
    back = F.interpolate(low, (side, side), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
    return np.asarray(untile(back, layout))


def measure_crop(generalist: Generalist, image: np.ndarray, label: np.ndarray, grid: int, pad: int = 1
                 ) -> tuple[float, float]:
    """(prompted Dice, ceiling Dice) of one crop ``(X, Y, Z)`` tiled ``grid`` x ``grid``."""
    x, y, z = image.shape
    classes = [int(c) for c in np.unique(label) if c not in (0, UNLABELLED)]
    ranges = chunk_ranges(z, grid)
    window = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.5)))
    fill = float(image.min())
    pred = {c: np.zeros(label.shape, bool) for c in classes}
    ceil = {c: np.zeros(label.shape, bool) for c in classes}
    for a, b in ranges:
        layout = TileLayout((x, y, b - a), grid, pad)
        canvas = np.asarray(tile_image(np.ascontiguousarray(image[..., a:b], dtype=np.float32), layout, fill=fill))
        lab_canvas = np.asarray(tile_label(np.ascontiguousarray(label[..., a:b]), layout))
        origins = [layout.tile_origin(k) for k in range(b - a)]
        emb = None
        for c in classes:
            ceil[c][..., a:b] = _ceiling(lab_canvas, layout, c, generalist.image_size)
            which, boxes = _boxes(lab_canvas, origins, (x, y), c)
            if not which:
                continue
            if emb is None:
                emb = generalist.encode(canvas[None], intensity_window=window)
            masks = generalist.decode(emb.select([0] * len(which)), boxes)
            out = np.zeros(canvas.shape, bool)
            for k, m in zip(which, masks):  # each box's mask counts inside its own tile only
                r, cc = origins[k]
                out[r:r + x, cc:cc + y] |= m[r:r + x, cc:cc + y]
            pred[c][..., a:b] = np.asarray(untile(out, layout))
    # per class on binary masks (the classes' predictions may overlap); every class is in the crop's label
    prompted = float(np.mean([dice(pred[c].astype(np.uint8), (label == c).astype(np.uint8)) for c in classes]))
    ceiling = float(np.mean([dice(ceil[c].astype(np.uint8), (label == c).astype(np.uint8)) for c in classes]))
    return prompted, ceiling


def measure_grids(generalist: Generalist, crops: Sequence[tuple[np.ndarray, np.ndarray]],
                  grids: Sequence[int] = DEFAULT_GRIDS, pad: int = 1) -> list[GridTrial]:
    """Each grid in ``grids`` on every ``(image, label)`` crop (all crops of one shape ``(X, Y, Z)``)."""
    if not crops:
        raise InputError("the grid measurement needs at least one labelled crop.")
    shape = crops[0][0].shape
    if any(img.shape != shape or lab.shape != shape for img, lab in crops):
        raise InputError("every crop of the grid measurement must have the same shape.")
    z = shape[2]
    trials = []
    for g in sorted({int(g) for g in grids if int(g) >= 1 and int(g) <= grid_for(z)}, reverse=True):
        t0 = time.perf_counter()
        res = [measure_crop(generalist, img, lab, g, pad) for img, lab in crops]
        dt = (time.perf_counter() - t0) / len(crops)
        scale = tile_scale(shape, generalist.image_size, g, pad, fit="resize")  # as Generalist.encode resizes
        trials.append(GridTrial(g, float(scale.canvases), max(scale.tile_model_px), max(scale.tile_mask_px),
                                float(np.mean([r[0] for r in res])), float(np.mean([r[1] for r in res])), dt))
        log.info("grid %d: %s", g, asdict(trials[-1]))
    if not trials:
        raise InputError(f"no grid to try: grids must lie in 1..{grid_for(z)} for crops of {z} slices.")
    return trials


def choose_grid(trials: Sequence[GridTrial], tolerance: float = 0.02) -> GridTrial:
    """The grid with the fewest canvases per crop whose prompted Dice is within ``tolerance`` of the best."""
    best = max(t.prompted_dice for t in trials)
    ok = [t for t in trials if t.prompted_dice >= best - tolerance]
    return min(ok, key=lambda t: (t.canvases_per_crop, -t.prompted_dice))
