"""CFR's "concatenate" step: the axial slices of a 3D crop tiled into one square 2D canvas, and back.

A crop ``(X, Y, Z)`` (canonical RAS array; axial slices are ``crop[:, :, k]``, shape ``X x Y``)
becomes a ``g x g`` grid with ``g = ceil(sqrt(Z))``, filled row by row: slice ``k`` is the tile at grid
row ``k // g``, column ``k % g``, its pixel ``(i, j)`` at canvas pixel
``(row * (X + pad) + i, col * (Y + pad) + j)``. Tiles are ``pad`` pixels apart (default 1): the gap,
the unused tiles after the last slice and, for a non-square slice, the strip that makes the canvas
square are all filled with ``fill`` (images: 0 or a value you give; labels: 255 =
:data:`~fmabs_core.contract.UNLABELLED`, the CE loss's ignore index, so the model is never taught
"background" where there is no slice). :class:`TileLayout` keeps every number, so :func:`untile` is
the exact inverse (tested bit for bit).

Why a 1-pixel gap (the CFR authors' code has none: nine 112-px tiles side by side make 1008 px,
then padded to 1024): with tiles touching, the last row of one slice sits next to the first row of
an unrelated one (slice k+g above/below, or slice k+1 beside it), and nothing marks the seam; a
1-px ignore line marks it in the labels and keeps a 3x3 label dilation or a bilinear resize of the
label canvas from mixing two slices. ``pad=0`` reproduces the authors' layout.

Model frame (:class:`ModelFrame`). The LA example: 80 slices of 112 x 112 -> 9 x 9 grid, canvas
``9 * 112 + 8 = 1016`` px. For SAM (1024 px input) the canvas *fits*, so by default (``fit="pad"``)
it is padded bottom/right with ``fill`` to 1024: no resampling, one canvas pixel = one model pixel,
as in the authors' code (which pads 1008 to 1024). For LiteMedSAM (256 px input) it cannot fit and
is shrunk (antialiased bilinear for images; nearest for labels), about 4x: a 112-px slice becomes a
28-px tile, and 7 px in the decoder's 64-px low-resolution mask. Whether a 9 x 9 grid is still
usable at that scale, or a crop should be split into several canvases of fewer slices
(:func:`chunk_ranges`, ``grid=3`` -> 3 x 3 tiles of 85 px), has to be measured:
:func:`tile_scale` / :func:`tile_scales` print the numbers for each choice. ``fit="resize"`` always
resizes the (square) canvas to the model size, like SAM's predictor does with any image.

Everything works on numpy arrays and torch tensors alike, with any leading dimensions
(``(..., X, Y, Z)`` <-> ``(..., S, S)``), so a batch of crops, or class probabilities
``(C+1, S, S)`` coming out of the model, tile and untile in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError

ArrayLike = np.ndarray | torch.Tensor
Fit = Literal["pad", "resize"]
#: how many times smaller than the input the SAM-family mask decoder's output is (256 -> 64, 1024 -> 256)
DECODER_STRIDE = 4


def grid_for(depth: int) -> int:
    """Side ``g = ceil(sqrt(depth))`` of the smallest square grid holding ``depth`` slices."""
    if depth < 1:
        raise InputError(f"cannot tile {depth} slices; a crop needs at least one axial slice.")
    g = math.isqrt(depth)
    return g if g * g == depth else g + 1


@dataclass(frozen=True)
class TileLayout:
    """Where each axial slice of a ``(X, Y, Z)`` crop sits on the square canvas: enough to invert exactly."""

    volume_shape: tuple[int, int, int]  # (X, Y, Z) of the crop
    grid: int  # g: g x g tiles, filled row by row
    pad: int  # pixels between neighbouring tiles

    def __post_init__(self) -> None:
        x, y, z = self.volume_shape
        if min(x, y, z) < 1:
            raise InputError(f"cannot tile a crop of shape {self.volume_shape}: every axis needs at least one voxel.")
        if self.pad < 0:
            raise InputError(f"tile padding must be >= 0 pixels, got {self.pad}.")
        if self.grid < 1 or self.grid * self.grid < z:
            raise InputError(
                f"a {self.grid} x {self.grid} grid holds {self.grid ** 2} slices but the crop has {z}; use "
                f"grid >= {grid_for(z)}, or split the crop with chunk_ranges({z}, {self.grid})."
            )

    @classmethod
    def for_volume(cls, shape: Sequence[int], pad: int = 1, grid: int | None = None) -> "TileLayout":
        """Layout for a crop of ``shape`` (its last three axes are X, Y, Z); ``grid`` defaults to ceil(sqrt(Z))."""
        if len(shape) < 3:
            raise InputError(f"tiling needs a 3D crop (..., X, Y, Z), got shape {tuple(shape)}.")
        x, y, z = (int(s) for s in shape[-3:])
        return cls((x, y, z), grid_for(z) if grid is None else int(grid), int(pad))

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(X, Y): one axial slice."""
        return self.volume_shape[0], self.volume_shape[1]

    @property
    def content_shape(self) -> tuple[int, int]:
        """(rows, cols) covered by the grid: ``g * X + (g - 1) * pad`` by ``g * Y + (g - 1) * pad``."""
        x, y = self.tile_shape
        g, p = self.grid, self.pad
        return g * x + (g - 1) * p, g * y + (g - 1) * p

    @property
    def canvas_side(self) -> int:
        """Side of the square canvas (the longer grid side; a non-square slice leaves a filled strip)."""
        return max(self.content_shape)

    @property
    def canvas_shape(self) -> tuple[int, int]:
        return self.canvas_side, self.canvas_side

    def tile_origin(self, k: int) -> tuple[int, int]:
        """Canvas (row, col) of the top-left pixel of slice ``k``."""
        if not 0 <= k < self.volume_shape[2]:
            raise InputError(f"slice {k} is outside the crop's {self.volume_shape[2]} slices.")
        r, c = divmod(k, self.grid)
        return r * (self.tile_shape[0] + self.pad), c * (self.tile_shape[1] + self.pad)

    def slice_map(self) -> np.ndarray:
        """``(S, S)`` int array: the slice index each canvas pixel shows, -1 for padding (fill) pixels."""
        z = self.volume_shape[2]
        idx = np.broadcast_to(np.arange(z, dtype=np.int64), self.volume_shape)
        return np.asarray(tile(np.ascontiguousarray(idx), self, fill=-1))

    def describe(self) -> str:
        x, y, z = self.volume_shape
        rows, cols = self.content_shape
        extra = "" if rows == cols else f", filled to {self.canvas_side} x {self.canvas_side}"
        return (f"{z} slice{'s' if z != 1 else ''} of {x} x {y} -> {self.grid} x {self.grid} grid, {self.pad} px apart -> "
                f"canvas {rows} x {cols}{extra}")


def _full(like: ArrayLike, shape: tuple[int, ...], fill: float | int) -> ArrayLike:
    if isinstance(like, torch.Tensor):
        return like.new_full(shape, fill)
    return np.full(shape, fill, dtype=like.dtype)


def _check_fill(arr: ArrayLike, fill: float | int) -> None:
    """Refuse a fill value the array's dtype cannot hold (255 in int8, -1 in uint8, 0.5 in an int array)."""
    dtype = arr.dtype
    if isinstance(arr, torch.Tensor):
        if dtype == torch.bool:
            ok = fill in (0, 1)
        elif dtype.is_floating_point:
            ok = True
        else:
            info = torch.iinfo(dtype)
            ok = float(fill).is_integer() and info.min <= fill <= info.max
    elif np.issubdtype(dtype, np.bool_):
        ok = fill in (0, 1)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        ok = float(fill).is_integer() and info.min <= fill <= info.max
    else:
        ok = True
    if not ok:
        raise InputError(f"fill value {fill} does not fit the array's dtype {dtype}; cast the array first.")


def tile(volume: ArrayLike, layout: TileLayout | None = None, pad: int = 1, fill: float | int = 0,
         grid: int | None = None) -> ArrayLike:
    """``(..., X, Y, Z)`` crop -> ``(..., S, S)`` canvas (same type, dtype and device).

    ``layout``: reuse one (e.g. the image's, for its label); otherwise built from the shape, ``pad``
    and ``grid``. Padding and unused tiles hold ``fill``. Use :func:`tile_image` / :func:`tile_label`
    for the usual fill values, and :func:`untile` with the same layout to go back.
    """
    if volume.ndim < 3:
        raise InputError(f"tiling needs a 3D crop (..., X, Y, Z), got shape {tuple(volume.shape)}.")
    if layout is None:
        layout = TileLayout.for_volume(volume.shape, pad=pad, grid=grid)
    x, y, z = layout.volume_shape
    if tuple(volume.shape[-3:]) != (x, y, z):
        raise InputError(f"crop of shape {tuple(volume.shape[-3:])} does not match the layout's {layout.volume_shape}.")
    _check_fill(volume, fill)
    lead = tuple(volume.shape[:-3])
    g, p = layout.grid, layout.pad
    # every slice in a (X + p) x (Y + p) cell, the gap at its bottom/right; unused cells all fill
    cells = _full(volume, lead + (x + p, y + p, g * g), fill)
    cells[..., :x, :y, :z] = volume
    cells = cells.reshape(lead + (x + p, y + p, g, g))  # slice k = r * g + c -> (r, c): row by row
    n = len(lead)
    order = tuple(range(n)) + (n + 2, n, n + 3, n + 1)  # (..., r, X + p, c, Y + p)
    cells = cells.permute(order) if isinstance(cells, torch.Tensor) else cells.transpose(order)
    grid_img = cells.reshape(lead + (g * (x + p), g * (y + p)))
    rows, cols = layout.content_shape
    side = layout.canvas_side
    if (rows, cols) == (g * (x + p), g * (y + p)) == (side, side):  # pad == 0 and a square slice
        return grid_img  # a new buffer already (``cells`` was allocated above)
    canvas = _full(volume, lead + (side, side), fill)
    canvas[..., :rows, :cols] = grid_img[..., :rows, :cols]  # drop the gap after the last row/column
    return canvas


def untile(canvas: ArrayLike, layout: TileLayout) -> ArrayLike:
    """``(..., S, S)`` canvas -> ``(..., X, Y, Z)`` crop: the exact inverse of :func:`tile`."""
    side = layout.canvas_side
    if canvas.ndim < 2 or tuple(canvas.shape[-2:]) != (side, side):
        raise InputError(f"canvas of shape {tuple(canvas.shape)} does not end in the layout's {side} x {side}; "
                         f"({layout.describe()}).")
    x, y, z = layout.volume_shape
    g, p = layout.grid, layout.pad
    lead = tuple(canvas.shape[:-2])
    rows, cols = layout.content_shape
    grid_img = _full(canvas, lead + (g * (x + p), g * (y + p)), 0)
    grid_img[..., :rows, :cols] = canvas[..., :rows, :cols]
    cells = grid_img.reshape(lead + (g, x + p, g, y + p))
    n = len(lead)
    order = tuple(range(n)) + (n + 1, n + 3, n, n + 2)  # (..., X + p, Y + p, r, c)
    cells = cells.permute(order) if isinstance(cells, torch.Tensor) else cells.transpose(order)
    cells = cells.reshape(lead + (x + p, y + p, g * g))
    out = cells[..., :x, :y, :z]
    return out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)


def tile_image(volume: ArrayLike, layout: TileLayout | None = None, pad: int = 1, fill: float = 0.0,
               grid: int | None = None) -> ArrayLike:
    """Tile image intensities; padding holds ``fill`` (0: the CFR authors' zero padding; pass e.g. the
    scan's minimum or the background value of a normalised image instead)."""
    return tile(volume, layout, pad=pad, fill=fill, grid=grid)


def tile_label(volume: ArrayLike, layout: TileLayout | None = None, pad: int = 1, fill: int = UNLABELLED,
               grid: int | None = None) -> ArrayLike:
    """Tile a label map (0 background, 1..C classes, 255 unlabelled); padding holds 255 = ignore."""
    return tile(volume, layout, pad=pad, fill=fill, grid=grid)


def chunk_ranges(depth: int, grid: int) -> list[tuple[int, int]]:
    """Split ``depth`` slices into consecutive ``(start, stop)`` runs of at most ``grid ** 2`` slices, as
    even as possible (80 slices, grid 3 -> 9 runs of 8 or 9), for a model too small to show a whole
    crop on one canvas. Each run is tiled on its own canvas: ``tile(crop[..., start:stop], grid=grid)``."""
    if depth < 1 or grid < 1:
        raise InputError(f"chunk_ranges needs depth >= 1 and grid >= 1, got depth={depth}, grid={grid}.")
    n = -(-depth // (grid * grid))
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


# --------------------------------------------------------------------------------- model frame
@dataclass(frozen=True)
class ModelFrame:
    """How a square canvas of ``canvas_side`` px sits in the model's square input of ``model_size`` px.

    ``fit="pad"``: a canvas that fits is padded bottom/right (no resampling, scale 1); a larger one is
    resized down to ``model_size``. ``fit="resize"``: always resized to ``model_size`` (up or down).
    """

    canvas_side: int
    model_size: int
    fit: Fit = "pad"

    def __post_init__(self) -> None:
        if self.fit not in ("pad", "resize"):
            raise InputError(f"fit must be 'pad' or 'resize', got {self.fit!r}.")
        if self.canvas_side < 1 or self.model_size < 1:
            raise InputError(f"canvas side {self.canvas_side} and model size {self.model_size} must be positive.")

    @classmethod
    def for_layout(cls, layout: TileLayout, model_size: int, fit: Fit = "pad") -> "ModelFrame":
        return cls(layout.canvas_side, int(model_size), fit)

    @property
    def resized(self) -> bool:
        """True when the canvas is resampled; False when it is only padded (or already the model size)."""
        return not (self.canvas_side == self.model_size or (self.fit == "pad" and self.canvas_side < self.model_size))

    @property
    def scale(self) -> float:
        """Model pixels per canvas pixel."""
        return self.model_size / self.canvas_side if self.resized else 1.0

    @property
    def content_side(self) -> int:
        """Model pixels covered by the canvas (the rest, if any, is padding)."""
        return self.model_size if self.resized else self.canvas_side

    def to_model(self, canvas: ArrayLike, kind: Literal["image", "label"] = "image", fill: float | int | None = None
                 ) -> torch.Tensor:
        """``(..., S, S)`` canvas -> ``(..., M, M)`` model input (a torch tensor; numpy is converted).

        Images: bilinear, antialiased when shrinking; padding holds ``fill`` (default 0).
        Labels: nearest (``nearest-exact``: pixel centres, no half-pixel shift), padding ``fill``
        (default 255, ignored by the loss); the dtype is kept.
        """
        t = _as_tensor(canvas)
        self._check_side(t, self.canvas_side, "canvas")
        if fill is None:
            fill = UNLABELLED if kind == "label" else 0
        if not self.resized:
            if self.canvas_side == self.model_size:
                return t
            out = t.new_full(tuple(t.shape[:-2]) + (self.model_size, self.model_size), fill)
            out[..., : self.canvas_side, : self.canvas_side] = t
            return out
        return _resize(t, self.model_size, kind, shrink=self.model_size < self.canvas_side)

    def from_model(self, out: ArrayLike, kind: Literal["probs", "label"] = "probs") -> torch.Tensor:
        """``(..., L, L)`` model output (any L: the full input size, or the decoder's ``M / 4`` masks) ->
        ``(..., S, S)`` on the canvas. Probabilities/logits: bilinear; labels: nearest.

        The exact inverse of :meth:`to_model` when the canvas was only padded and ``L = M``; after a
        resize, interpolation (up to a pixel at tile edges)."""
        t = _as_tensor(out)
        if t.ndim < 2 or t.shape[-1] != t.shape[-2]:
            raise InputError(f"model output must end in a square L x L, got shape {tuple(t.shape)}.")
        mode = "label" if kind == "label" else "probs"
        if t.shape[-1] != self.model_size:
            t = _resize(t, self.model_size, mode, shrink=t.shape[-1] > self.model_size)
        if not self.resized:
            return t[..., : self.canvas_side, : self.canvas_side]
        return _resize(t, self.canvas_side, mode, shrink=self.canvas_side < self.model_size)

    @staticmethod
    def _check_side(t: torch.Tensor, side: int, what: str) -> None:
        if t.ndim < 2 or tuple(t.shape[-2:]) != (side, side):
            raise InputError(f"{what} of shape {tuple(t.shape)} does not end in {side} x {side}.")


def _as_tensor(a: ArrayLike) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _resize(t: torch.Tensor, size: int, kind: str, shrink: bool) -> torch.Tensor:
    """Resize the last two (square) axes to ``size``: nearest for labels (dtype kept), bilinear otherwise."""
    lead = tuple(t.shape[:-2])
    flat = t.reshape((-1, 1) + tuple(t.shape[-2:]))
    if kind == "label":
        r = F.interpolate(flat.float(), (size, size), mode="nearest-exact")
        r = r.round().to(t.dtype) if not t.dtype.is_floating_point else r.to(t.dtype)
    else:
        src = flat if flat.dtype.is_floating_point else flat.float()
        r = F.interpolate(src, (size, size), mode="bilinear", align_corners=False, antialias=bool(shrink and kind == "image"))
    return r.reshape(lead + (size, size))


@dataclass(frozen=True)
class TileScale:
    """How big one slice ends up in model pixels, for choosing a grid (see :func:`tile_scale`)."""

    layout: TileLayout
    frame: ModelFrame
    canvases: int  # canvases needed for the whole crop (> 1 when the grid holds fewer slices than the crop)

    @property
    def tile_model_px(self) -> tuple[float, float]:
        """(X, Y) of one slice on the model's input, in model pixels."""
        s = self.frame.scale
        return self.layout.tile_shape[0] * s, self.layout.tile_shape[1] * s

    @property
    def tile_mask_px(self) -> tuple[float, float]:
        """(X, Y) of one slice on the mask decoder's low-resolution output (input / 4)."""
        tx, ty = self.tile_model_px
        return tx / DECODER_STRIDE, ty / DECODER_STRIDE

    def describe(self) -> str:
        f = self.frame
        tx, ty = self.tile_model_px
        mx, my = self.tile_mask_px
        if not f.resized:
            how = "as is" if f.canvas_side == f.model_size else f"padded to {f.model_size}"
        else:
            how = f"resized to {f.model_size} (x{f.scale:.3f})"
        n = f"{self.canvases} canvases of " if self.canvases > 1 else ""
        return (f"{n}{self.layout.describe()} -> {how}: a slice is {tx:.1f} x {ty:.1f} model px, "
                f"{mx:.1f} x {my:.1f} px of the {f.model_size // DECODER_STRIDE}-px decoder mask")


def tile_scale(crop_shape: Sequence[int], model_size: int, grid: int | None = None, pad: int = 1,
               fit: Fit = "pad") -> TileScale:
    """Tile size in model pixels for a crop ``(X, Y, Z)`` on a ``grid`` (default ceil(sqrt(Z))).

    >>> print(tile_scale((112, 112, 80), 256).describe())   # doctest: +NORMALIZE_WHITESPACE
    80 slices of 112 x 112 -> 9 x 9 grid, 1 px apart -> canvas 1016 x 1016 -> resized to 256 (x0.252):
    a slice is 28.2 x 28.2 model px, 7.1 x 7.1 px of the 64-px decoder mask
    """
    x, y, z = (int(s) for s in crop_shape[-3:])
    g = grid_for(z) if grid is None else int(grid)
    chunks = chunk_ranges(z, g)
    longest = max(b - a for a, b in chunks)
    layout = TileLayout((x, y, longest), g, int(pad))
    return TileScale(layout, ModelFrame.for_layout(layout, model_size, fit), len(chunks))


def tile_scales(crop_shape: Sequence[int], model_size: int, pad: int = 1, fit: Fit = "pad") -> list[TileScale]:
    """:func:`tile_scale` for every grid from ceil(sqrt(Z)) (one canvas) down to 1 (one slice per canvas)."""
    z = int(crop_shape[-1])
    return [tile_scale(crop_shape, model_size, g, pad, fit) for g in range(grid_for(z), 0, -1)]
