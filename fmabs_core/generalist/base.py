"""One interface over the SAM family: ``encode(slices)`` once, ``decode(embeddings, prompts)`` many times.

Why split encode and decode: the image encoder is >95 % of a generalist's cost (about 1.5 s per
256 px slice for LiteMedSAM on 2 CPU cores, ~100x the decoder), while a slice may need several
prompts (one per class, one per connected component). Encoding each slice once and decoding all of
its prompts from the cached embedding keeps pseudo-labelling cost at one encoder pass per slice.

Coordinates. A *slice* is a 2D array ``H x W`` (rows, columns). Boxes are ``(x0, y0, x1, y1)`` and
points ``(x, y)`` in that slice's pixel-index grid (x = column, y = row; pixel ``(r, c)`` has its
centre at ``(c, r)``), the convention of SAM's predictor. The model sees the slice resized so that
its longest side is ``image_size`` and zero-padded bottom/right to a square. SAM's prompt encoder
adds 0.5 to every coordinate ("shift to centre of pixel"), so a slice coordinate ``u`` maps to the
model frame as ``(u + 0.5) * s - 0.5`` with ``s = new / old`` per axis: pixel centres land exactly
on the centres of the resized image (bilinear, ``align_corners=False``). SAM's own
``ResizeLongestSide.apply_coords`` uses ``u * s``, up to ``(s - 1) / 2`` model pixels off; harmless at
1024 px but not at 256 px with 2x upsampling, so we use the exact map. Masks go back by the exact
inverse: crop the padding, then bilinear-resize to ``H x W``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmabs_core.errors import InputError
from fmabs_core.generalist import precision
from fmabs_core.generalist.decoder import decode_batched
from fmabs_core.generalist.runtime import make_encoder, resolve_runtime

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
#: intensity percentiles clipped before scaling to [0, 1]; MedSAM's own MR preprocessing
DEFAULT_PERCENTILES = (0.5, 99.5)


def intensity_range(volume: ArrayLike, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """Robust ``(low, high)`` intensity window of a whole scan.

    Why per volume and percentiles: MRI has no absolute scale and a few very bright voxels (fat,
    flow artefacts, the LGE-enhanced wall) would squash a plain min-max window, leaving the atrium
    in a few grey levels. MedSAM/LiteMedSAM were trained on MR slices clipped at the 0.5/99.5
    percentiles of the volume, so the same window keeps the input in their training distribution.
    Computing it once per scan keeps contrast consistent across slices and the three views.
    """
    arr = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    flat = arr.reshape(-1)
    if flat.size > 2_000_000:  # a strided subsample gives the same percentiles to ~1e-3
        flat = flat[:: flat.size // 1_000_000]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise InputError("intensity_range: the volume holds no finite value.")
    lo, hi = np.percentile(flat, percentiles)
    if not hi > lo:  # (near-)constant image: fall back to the full range
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


@dataclass(frozen=True)
class SliceGeometry:
    """How slices of ``original_size`` (H, W) sit in the square model input of side ``image_size``."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]  # (h, w) after the longest-side resize, before padding
    image_size: int

    @classmethod
    def for_shape(cls, height: int, width: int, image_size: int) -> "SliceGeometry":
        # same rounding as segment_anything's ResizeLongestSide.get_preprocess_shape
        scale = image_size / max(height, width)
        h, w = int(height * scale + 0.5), int(width * scale + 0.5)
        return cls((int(height), int(width)), (h, w), int(image_size))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Per-axis scale (x = columns, y = rows); they differ slightly because of rounding."""
        return self.input_size[1] / self.original_size[1], self.input_size[0] / self.original_size[0]

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """Slice pixel coordinates ``(..., 2)`` (x, y) -> model-frame coordinates."""
        sx, sy = self.scale_xy
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
        out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
        return out

    def points_from_model(self, points: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`points_to_model`."""
        sx, sy = self.scale_xy
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] = (out[..., 0] + 0.5) / sx - 0.5
        out[..., 1] = (out[..., 1] + 0.5) / sy - 0.5
        return out

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.points_to_model(boxes.reshape(-1, 2, 2)).reshape(boxes.shape)

    def boxes_from_model(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.points_from_model(boxes.reshape(-1, 2, 2)).reshape(boxes.shape)

    def image_to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``N x C x H x W`` to the input size (no padding). Antialias only matters when shrinking."""
        shrink = self.input_size[0] < self.original_size[0] or self.input_size[1] < self.original_size[1]
        return F.interpolate(images, self.input_size, mode="bilinear", align_corners=False, antialias=shrink)

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        return F.pad(images, (0, self.image_size - w, 0, self.image_size - h))

    def masks_to_original(self, masks: torch.Tensor) -> torch.Tensor:
        """Model-frame masks/logits ``N x 1 x L x L`` (any L) -> ``N x H x W`` on the slice grid.

        Upsample to the padded input frame, drop the padding, resize to the slice: the exact inverse
        of :meth:`image_to_model` + :meth:`pad` for pixel centres (bilinear, ``align_corners=False``).
        """
        if masks.shape[-1] != self.image_size or masks.shape[-2] != self.image_size:
            masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : self.input_size[0], : self.input_size[1]]
        masks = F.interpolate(masks, self.original_size, mode="bilinear", align_corners=False)
        return masks[:, 0]


@dataclass
class Embeddings:
    """Image embeddings of N slices of one shape, kept on the generalist's device."""

    features: torch.Tensor  # N x C x h x w
    geometry: SliceGeometry

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def select(self, index: Sequence[int] | np.ndarray) -> "Embeddings":
        """Embeddings for ``index`` (repeats allowed: one entry per prompt of a multi-prompt slice)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.features.device)
        return Embeddings(self.features.index_select(0, idx), self.geometry)


PointsArg = Sequence[np.ndarray | None] | np.ndarray | None


class Generalist:
    """A frozen promptable 2D model (SAM family) behind ``encode`` / ``decode`` / ``segment``.

    Build with :func:`fmabs_core.generalist.get_generalist` (cached: build once, reuse). Subclasses
    only fix the model and its conventions (input size, normalisation, single- or multi-mask output).
    """

    name: str = "generalist"
    #: square encoder input side; slices are resized so their longest side is this
    image_size: int = 1024
    #: "unit": per-slice min-max to [0, 1] after resizing (MedSAM, LiteMedSAM training);
    #: "sam": 0..255 then SAM's ImageNet pixel mean/std (SAM, MobileSAM)
    normalization: Literal["unit", "sam"] = "sam"
    #: ask for 3 masks and keep the highest predicted IoU (SAM default for ambiguous prompts)
    multimask: bool = True
    #: default number of positive points added to each box prompt
    default_n_points: int = 3
    #: default number of slices per encoder call on CPU / CUDA (CPU: batching measured slower)
    default_batch_cpu: int = 1
    default_batch_cuda: int = 32
    #: slices whose prompts decode in one call on the CPU: 8 measured 1.2x one at a time (larger GEMMs)
    decode_slices_cpu: int = 8
    #: decode with the projections folded into the prompt tokens (:mod:`~fmabs_core.generalist.decoder`);
    #: False runs SAM's stock decoder (the benchmark's side-by-side baseline)
    folded_decoder: bool = True

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", dtype: str = "auto",
                 layout: str = "auto", runtime: str = "auto") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.amp_dtype = precision.amp_dtype(self.device, dtype)
        self.runtime = resolve_runtime(runtime, self.device)
        self._encoder = make_encoder(self.model.image_encoder, self.device, self.runtime, self.image_size,
                                     self.amp_dtype)
        self.channels_last = self.runtime == "torch" and precision.use_channels_last(self.device, layout)
        if self.channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)
        self.precision = precision.describe(self.device, self.amp_dtype, self.channels_last)
        if self.runtime != "torch":
            self.precision += f" ({self.runtime})"
        #: what changes the embeddings besides the input (cache keys): set by get_generalist
        self.identity = f"{self.name}|{self.precision}"
        self.decoder_calls = 0  # number of prompts decoded (tests check no call on empty slices)
        self.encoded_slices = 0
        if self.normalization == "sam":
            self._mean = torch.tensor([123.675, 116.28, 103.53], device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor([58.395, 57.12, 57.375], device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.precision})"

    # ------------------------------------------------------------------ helpers
    def batch_size(self, requested: int | None = None) -> int:
        if requested is not None:
            if requested < 1:
                raise InputError(f"batch size must be >= 1, got {requested}.")
            return int(requested)
        if self.device.type == "cuda":
            return self.default_batch_cuda
        return getattr(self._encoder, "batch_slices", self.default_batch_cpu)

    def decode_slices(self, encode_batch: int) -> int:
        """Slices a pseudo-label pass groups per decoder call: at least the encoder's batch, so that
        warm rounds (embeddings cached, nothing to encode) still decode several slices at once."""
        return max(int(encode_batch), self.default_batch_cuda if self.device.type == "cuda" else self.decode_slices_cpu)

    def _autocast(self, decoder: bool = False) -> contextlib.AbstractContextManager:
        """The encoder's autocast; the decoder keeps fp32 on the CPU, where it is cheap and where bf16
        logits flipped boundary pixels (the mask is the sign of the logit)."""
        if self.amp_dtype is None or (decoder and self.device.type == "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @staticmethod
    def _as_slices(slices: ArrayLike) -> torch.Tensor:
        t = slices if isinstance(slices, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(slices))
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise InputError(f"slices must be N x H x W (or H x W), got shape {tuple(t.shape)}.")
        if min(t.shape[1:]) < 2:
            raise InputError(f"slices of shape {tuple(t.shape[1:])} are too small to segment.")
        return t.float()

    def preprocess(
        self, slices: ArrayLike, intensity_window: tuple[float, float] | None = None
    ) -> tuple[torch.Tensor, SliceGeometry]:
        """Raw-intensity slices ``N x H x W`` -> model input ``N x 3 x S x S`` on the device.

        ``intensity_window`` (low, high): pass :func:`intensity_range` of the whole scan so that all
        slices and views share one window; when omitted it is computed from ``slices``.
        """
        t = self._as_slices(slices)
        if intensity_window is None:
            intensity_window = intensity_range(t)
        lo, hi = intensity_window
        geom = SliceGeometry.for_shape(t.shape[1], t.shape[2], self.image_size)
        x = t.to(self.device)
        x = ((x.clamp(lo, hi) - lo) / max(hi - lo, 1e-8))[:, None]
        x = geom.image_to_model(x).clamp_(0.0, 1.0)
        if self.normalization == "unit":
            # LiteMedSAM/MedSAM: each resized slice re-stretched to [0, 1] (their training pipeline)
            mn = x.amin(dim=(1, 2, 3), keepdim=True)
            mx = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - mn) / (mx - mn).clamp_min(1e-8)
            x = x.expand(-1, 3, -1, -1)
        else:
            x = (x.expand(-1, 3, -1, -1) * 255.0 - self._mean) / self._std
        return geom.pad(x).contiguous(), geom

    # ------------------------------------------------------------------ API
    @torch.inference_mode()
    def encode(
        self,
        slices: ArrayLike,
        intensity_window: tuple[float, float] | None = None,
        batch_size: int | None = None,
    ) -> Embeddings:
        """Embed ``N x H x W`` raw-intensity slices of one scan, ``batch_size`` slices per encoder call."""
        t = self._as_slices(slices)
        if t.shape[0] == 0:
            raise InputError("encode: no slices given (N = 0); skip the call instead.")
        if intensity_window is None:
            intensity_window = intensity_range(t)
        bs = self.batch_size(batch_size)
        feats = []
        geom = None
        for start in range(0, t.shape[0], bs):
            x, geom = self.preprocess(t[start : start + bs], intensity_window)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast() if self.runtime == "torch" else contextlib.nullcontext():
                f = self._encoder(x)
            feats.append(f.float().contiguous())
        self.encoded_slices += int(t.shape[0])
        assert geom is not None
        return Embeddings(torch.cat(feats, 0), geom)

    @torch.inference_mode()
    def decode(
        self,
        embeddings: Embeddings,
        boxes: np.ndarray,
        points: PointsArg = None,
        return_probs: bool = False,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Masks for one prompt per embedding: ``boxes`` ``N x 4`` (x0, y0, x1, y1) on the slice grid,
        ``points`` N arrays of ``P_i x 2`` positive (x, y) points (or None).

        Returns bool ``N x H x W`` masks, or float32 probabilities if ``return_probs``.
        To prompt one slice several times, ``embeddings.select([i, i, ...])``.
        """
        n = len(embeddings)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if boxes.shape[0] != n:
            raise InputError(f"decode: {n} embeddings but {boxes.shape[0]} boxes; give one box per slice.")
        geom = embeddings.geometry
        model_boxes = geom.boxes_to_model(boxes)
        coords, labels = _pack_points(points, n, geom)
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            emb = embeddings.features[sl]
            b = torch.as_tensor(model_boxes[sl], dtype=torch.float32, device=self.device)[:, None, :]
            pts = None
            if coords is not None:
                pts = (
                    torch.as_tensor(coords[sl], dtype=torch.float32, device=self.device),
                    torch.as_tensor(labels[sl], dtype=torch.int64, device=self.device),
                )
            with self._autocast(decoder=True):
                sparse, dense = self.model.prompt_encoder(points=pts, boxes=b, masks=None)
                logits, iou = decode_batched(
                    self.model.mask_decoder,
                    emb,
                    self.model.prompt_encoder.get_dense_pe(),
                    sparse,
                    dense,
                    fast=self.folded_decoder,
                )
            logits, iou = logits.float(), iou.float()
            if self.multimask:
                best = iou[:, 1:].argmax(dim=1) + 1
            else:
                best = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), best][:, None]
            full = geom.masks_to_original(logits)
            out.append((torch.sigmoid(full) if return_probs else full > 0).cpu().numpy())
        self.decoder_calls += n
        if not out:
            h, w = geom.original_size
            return np.zeros((0, h, w), np.float32 if return_probs else bool)
        return np.concatenate(out, 0)

    def segment(
        self,
        slices: ArrayLike,
        boxes: np.ndarray,
        points: PointsArg = None,
        intensity_window: tuple[float, float] | None = None,
        batch_size: int | None = None,
        return_probs: bool = False,
    ) -> np.ndarray:
        """Encode and decode in one go: one box (and optional points) per slice."""
        emb = self.encode(slices, intensity_window=intensity_window, batch_size=batch_size)
        return self.decode(emb, boxes, points, return_probs=return_probs)


def _pack_points(points: PointsArg, n: int, geom: SliceGeometry) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Variable-length point lists -> padded ``N x P x 2`` model coordinates and labels.

    Missing points are padded with label -1, SAM's "not a point" token, so slices with fewer points
    batch with the rest exactly as if decoded alone.
    """
    if points is None:
        return None, None
    if isinstance(points, np.ndarray) and points.ndim == 3:
        points = list(points)
    if len(points) != n:
        raise InputError(f"decode: {n} embeddings but {len(points)} point lists; give one per slice (or None).")
    p_max = max((0 if p is None else len(p)) for p in points)
    if p_max == 0:
        return None, None
    coords = np.zeros((n, p_max, 2), np.float64)
    labels = -np.ones((n, p_max), np.int64)
    for i, p in enumerate(points):
        if p is None or len(p) == 0:
            continue
        p = np.asarray(p, np.float64).reshape(-1, 2)
        coords[i, : len(p)] = geom.points_to_model(p)
        labels[i, : len(p)] = 1
    return coords, labels
