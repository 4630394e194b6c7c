"""CFR's fine-tuning network: a 3D segmenter made of a 2D SAM-family model seeing tiled axial slices.

    net = build_tiled_segmenter("litemedsam", num_classes_plus_bg=2, checkpoint=None, rank=4, grid=None)
    logits = net(crop)                  # (B, 1, X, Y, Z) z-scored -> (B, C+1, X, Y, Z)

What one forward pass does, per crop of the batch:

1. **Concatenate** (:mod:`~fmabs_core.generalist.tiling`): the Z axial slices are tiled row by row on a
   ``g x g`` grid, 1 px apart (zero intensity between tiles and in unused tiles). ``g`` is the
   ``grid`` option; when the crop has more than ``g * g`` slices it is split into consecutive runs
   of at most ``g * g`` slices (:func:`~fmabs_core.generalist.tiling.chunk_ranges`), one canvas each,
   all encoded in one batch. ``grid=None`` means one canvas per crop, ``g = ceil(sqrt(Z))`` (CFR with
   SAM at 1024 px: 80 slices of 112 px -> 9 x 9 -> 1016 px, padded to 1024).
2. **Model frame**: SAM-size models (1024 px) get the canvas padded to their input (no resampling,
   the authors' layout; a larger canvas is shrunk); LiteMedSAM (256 px) gets it resized, so a slice
   keeps the same share of the input whatever the crop size. The canvas is copied to 3 channels.
   Intensities (``input_norm``): CFR's authors feed SAM the z-scored crop as it is (``zscore``), which
   sits near SAM's own ImageNet-normalised input. LiteMedSAM and MedSAM were trained on slices
   stretched to [0, 1], and z-scored input is far from that: each crop is min-max scaled to [0, 1]
   first (``unit``, their default; the gaps between tiles are black). Measured on a toy crop whose
   intensities are its label: LiteMedSAM's features vary 3x more across the canvas in [0, 1] than
   z-scored, and its decoder alone learns the toy better (Dice 0.958 against 0.896 after 60 AdamW
   steps at 1e-4; docs/methods.md, CFR).
3. **Encode** with the frozen image encoder plus LoRA on q and v (:func:`~fmabs_core.generalist.lora.add_lora`).
4. **Decode without prompts**: the prompt encoder is called with no points, boxes or masks (an empty
   sparse embedding; the dense one is its learnt "no mask" embedding), and the mask decoder has
   ``C + 1`` mask tokens, all used, one per class with background (SAMed's deterministic head, in
   place of SAM's ambiguity outputs). It is SAM's ``MaskDecoder(num_multimask_outputs=C)``: the
   pretrained two-way transformer and upscaling are kept. Every mask token, its hypernetwork MLP
   and IoU output start from the pretrained single-mask ones (``head_init="shared"``), so every
   class starts with the same logit and the first step sees uniform probabilities. Copying token
   ``i mod 4`` instead (``"cycled"``, the first version) gave logits 12 apart before any training:
   the first cross-entropy was about 10, AdamW's first steps swung the head to all background, and
   a run of 100 iterations on one LA scan ended empty on every scan.
5. The decoder's masks (256 x 256 for both SAM at 1024 and LiteMedSAM at 256: LiteMedSAM's masks
   are at its full input resolution) are brought back to the canvas (bilinear) and untiled to
   ``(B, C+1, X, Y, Z)`` logits; softmax over the channels gives the class probabilities.

Memory: with ``recompute=True`` (sam-lora's default) each adapted encoder block keeps only its input for the
backward pass and runs again there (``torch.utils.checkpoint``). Measured on 2 CPU cores, 48x48x32 crops,
batch 2 (4 canvases): resident memory 2.4 GiB flat over the steps, against 2.8 GiB growing to 5.3 GiB by
the fourth step without it; a step takes about 30 % longer (docs/methods.md, CFR).

Trained: the LoRA tensors, the mask decoder (but its IoU head, which no loss reaches) and the
prompt encoder's "no mask" embedding (the only prompt-encoder parameter a prompt-free pass uses;
its point, box and mask-input embeddings are frozen so that every trainable parameter gets a
gradient, which DistributedDataParallel requires). The image encoder stays in ``eval()`` mode even
when the network is put in training mode: TinyViT's BatchNorm statistics must not drift (and a
frozen encoder has no business with dropout).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmabs_core.errors import InputError, WeightsError
from fmabs_core.generalist import lora
from fmabs_core.generalist.tiling import Fit, ModelFrame, TileLayout, chunk_ranges, grid_for, tile_image, untile

log = logging.getLogger(__name__)

#: slices per canvas side by generalist (None: the whole crop on one canvas, ceil(sqrt(Z))). LiteMedSAM's
#: 4 was measured (`fmabs tile-grid --project <LA, 8 training scans> --cases 8 --grids 9 5 4 3`, box-
#: prompted Dice per tile on 112x112x80 crops): grid 9 0.790, 5 0.784, 4 0.850, 3 0.859 (1, 4, 5, 9 canvases
#: per crop); 4 is the fewest canvases within 0.02 of the best.
DEFAULT_GRID: dict[str, int | None] = {"litemedsam": 4}
#: memory of one training step on the CPU, by generalist: (GiB whatever the batch, GiB per canvas with
#: ``recompute``, GiB per canvas without), beyond the built network. LiteMedSAM measured 2026-12-07 on 2 cores
#: (peak RSS of two AdamW steps in a fresh process, 112x112x80 crops = 5 canvases of 256 px each, minus the
#: 0.90 GiB of the built network): with recompute 2.79 GiB for 1 crop, 4.15 GiB for 2; without, 6.30 GiB
#: for 1 crop (and growing). Other generalists are not measured: no estimate, no check.
STEP_MEMORY_GIB: dict[str, tuple[float, float, float]] = {"litemedsam": (1.43, 0.272, 1.26)}
#: pixels between tiles (CFR's authors: 0; see tiling.py for why 1)
DEFAULT_PAD = 1
#: pretrained SAM-family mask decoders have 4 mask tokens (1 single-mask + 3 multimask outputs)
_PRETRAINED_TOKENS = 4
HeadInit = Literal["shared", "cycled"]
HEAD_INITS: tuple[str, ...] = ("shared", "cycled")
InputNorm = Literal["unit", "zscore"]
INPUT_NORMS: tuple[str, ...] = ("unit", "zscore")
#: what an adapter whose metadata predates a key was trained with (it must be rebuilt the same way)
LEGACY_META = {"input_norm": "zscore", "head_init": "cycled"}


def default_fit(image_size: int) -> Fit:
    """Pad the canvas into a SAM-size input (no resampling); resize it to a small model's input."""
    return "pad" if image_size >= 1024 else "resize"


def multiclass_decoder(decoder: nn.Module, num_masks: int, init: HeadInit = "shared") -> nn.Module:
    """A copy of a pretrained SAM ``MaskDecoder`` with ``num_masks`` mask outputs (C + 1).

    The same module as ``MaskDecoder(num_multimask_outputs=num_masks - 1)``, built by resizing a
    deep copy: the transformer, output upscaling and IoU token are the pretrained ones; mask token
    ``i``, hypernetwork MLP ``i`` and IoU output ``i`` are copied from pretrained index 0 (``init``
    "shared": every class starts with the same logit) or ``i mod n`` ("cycled").
    """
    if num_masks < 2:
        raise InputError(f"a multi-class head needs at least 2 masks (background + 1 class), got {num_masks}.")
    if init not in HEAD_INITS:
        raise InputError(f"head initialisation {init!r}: choose {' or '.join(HEAD_INITS)}.")
    src = decoder
    n_old = int(src.num_mask_tokens)
    dec = copy.deepcopy(src)
    dim = src.mask_tokens.weight.shape[1]
    idx = [0] * num_masks if init == "shared" else [i % n_old for i in range(num_masks)]
    dec.num_multimask_outputs = num_masks - 1
    dec.num_mask_tokens = num_masks
    dec.mask_tokens = nn.Embedding(num_masks, dim).to(src.mask_tokens.weight)
    with torch.no_grad():
        dec.mask_tokens.weight.copy_(src.mask_tokens.weight[idx])
    dec.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(src.output_hypernetworks_mlps[i]) for i in idx)
    last = src.iou_prediction_head.layers[-1]
    new_last = nn.Linear(last.in_features, num_masks, bias=last.bias is not None).to(last.weight)
    with torch.no_grad():
        new_last.weight.copy_(last.weight[idx])
        if last.bias is not None:
            new_last.bias.copy_(last.bias[idx])
    dec.iou_prediction_head.layers[-1] = new_last
    return dec


def _recomputed(forward: Any, block: nn.Module, *args: Any) -> Any:
    """``forward(block, *args)``, recomputed in the backward pass when gradients are being recorded."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False)
    return forward(block, *args)


def recompute_adapted_blocks(encoder: nn.Module) -> int:
    """Make every encoder block with a LoRA attention recompute its activations in the backward pass.

    The block's own ``forward`` is replaced on the instance, so the module tree and the state-dict keys
    (the adapter's) stay the same. Returns how many blocks."""
    n = 0
    for block in encoder.modules():
        if isinstance(getattr(getattr(block, "attn", None), "qkv", None), lora.LoRAQKV):
            block.forward = functools.partial(_recomputed, type(block).forward, block)
            n += 1
    return n


class TiledSegmenter(nn.Module):
    """A 3D segmenter ``(B, 1, X, Y, Z) -> (B, C+1, X, Y, Z)`` logits from a 2D SAM-family model on
    tiled axial slices (see the module docstring). Build it with :func:`build_tiled_segmenter`."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 num_classes: int, generalist: str, rank: int = 4, grid: int | None = None,
                 pad: int = DEFAULT_PAD, fit: Fit | None = None, alpha: float | None = None,
                 input_norm: InputNorm = "zscore", head_init: HeadInit = "shared", recompute: bool = False) -> None:
        super().__init__()
        if grid is not None and int(grid) < 1:
            raise InputError(f"grid must be >= 1 slice per canvas side (or None: one canvas per crop), got {grid}.")
        if int(rank) < 1:
            raise InputError(f"LoRA rank must be >= 1, got {rank}.")
        if input_norm not in INPUT_NORMS:
            raise InputError(f"input normalisation {input_norm!r}: choose {' or '.join(INPUT_NORMS)}.")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = multiclass_decoder(mask_decoder, int(num_classes), head_init)
        self.input_norm: InputNorm = input_norm
        self.head_init: HeadInit = head_init
        self.num_classes = int(num_classes)  # C + 1 output channels
        self.generalist = generalist
        self.grid = None if grid is None else int(grid)
        self.pad = int(pad)
        self.image_size = int(prompt_encoder.input_image_size[0])
        self.fit: Fit = fit or default_fit(self.image_size)
        self.rank = int(rank)
        lora.add_lora(self.image_encoder, self.rank, alpha)  # freezes the encoder's own weights
        self.recompute = bool(recompute) and recompute_adapted_blocks(self.image_encoder) > 0
        for p in self.prompt_encoder.parameters():
            p.requires_grad_(False)
        self.prompt_encoder.no_mask_embed.weight.requires_grad_(True)
        for p in self.mask_decoder.parameters():
            p.requires_grad_(True)
        for p in self.mask_decoder.iou_prediction_head.parameters():
            p.requires_grad_(False)
        self.image_encoder.eval()

    # ------------------------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> "TiledSegmenter":
        """Heads follow ``mode``; the image encoder always stays in eval (BatchNorm statistics frozen)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def grid_for_depth(self, depth: int) -> int:
        return grid_for(depth) if self.grid is None else self.grid

    def layouts(self, shape: tuple[int, int, int]) -> list[tuple[int, int, TileLayout]]:
        """``(start, stop, layout)`` of each canvas of a crop of ``shape`` (X, Y, Z)."""
        x, y, z = (int(s) for s in shape)
        g = self.grid_for_depth(z)
        ranges = chunk_ranges(z, g) if g * g < z else [(0, z)]
        return [(a, b, TileLayout((x, y, b - a), g, self.pad)) for a, b in ranges]

    def canvases(self, shape: Sequence[int]) -> int:
        """How many canvases one crop of ``shape`` (X, Y, Z) is encoded as."""
        return len(self.layouts(tuple(int(v) for v in shape)))

    def step_memory(self, shape: Sequence[int], batch: int) -> int | None:
        """Bytes one training step on ``batch`` crops of ``shape`` needs on the CPU beyond the built network
        (:data:`STEP_MEMORY_GIB`), or None for a generalist that was not measured."""
        figures = STEP_MEMORY_GIB.get(self.generalist)
        if figures is None:
            return None
        fixed, with_recompute, without = figures
        per_canvas = with_recompute if self.recompute else without
        return int((fixed + per_canvas * batch * self.canvases(shape)) * 2**30)

    def meta(self) -> dict[str, Any]:
        """What :func:`load_tuned` needs to rebuild this network (kept in the adapter file)."""
        return {"generalist": self.generalist, "num_classes": self.num_classes, "rank": self.rank,
                "grid": self.grid, "pad": self.pad, "fit": self.fit, "image_size": self.image_size,
                "input_norm": self.input_norm, "head_init": self.head_init}

    def extra_repr(self) -> str:
        return (f"generalist={self.generalist!r}, classes={self.num_classes}, rank={self.rank}, "
                f"grid={self.grid}, pad={self.pad}, fit={self.fit!r}, image_size={self.image_size}, "
                f"input_norm={self.input_norm!r}, head_init={self.head_init!r}")

    # ------------------------------------------------------------------------------------ forward
    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, 256, h, w)`` -> ``(N, C+1, 4h, 4w)`` mask logits, without prompts."""
        n = embeddings.shape[0]
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = sparse.to(embeddings.dtype).expand(n, -1, -1)  # (N, 0, 256): no prompt token
        dense = dense.to(embeddings.dtype)
        masks, _iou = self.mask_decoder.predict_masks(
            image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe().to(embeddings.dtype),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"TiledSegmenter takes (B, 1, X, Y, Z) crops, got shape {tuple(x.shape)}.")
        b, _, sx, sy, sz = x.shape
        if self.input_norm == "unit":  # each crop to [0, 1], as LiteMedSAM/MedSAM were trained
            lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
            x = (x - lo) / (x.amax(dim=(1, 2, 3, 4), keepdim=True) - lo).clamp_min(1e-6)
        plan = self.layouts((sx, sy, sz))
        frame = ModelFrame.for_layout(plan[0][2], self.image_size, self.fit)  # one canvas side for all chunks
        canvases = torch.cat([tile_image(x[:, 0, :, :, a:e], layout, fill=0.0) for a, e, layout in plan])
        inp = frame.to_model(canvases, "image", fill=0.0)  # (n * B, M, M), chunk-major
        inp = inp[:, None].expand(-1, 3, -1, -1).contiguous()
        emb = self.image_encoder(inp)
        masks = frame.from_model(self.decode(emb), "probs")  # (n * B, C+1, S, S)
        parts = [untile(masks[i * b:(i + 1) * b], layout) for i, (_a, _e, layout) in enumerate(plan)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------- building
def build_tiled_segmenter(generalist: str, num_classes_plus_bg: int, checkpoint: str | os.PathLike | None = None,
                          rank: int = 4, grid: int | None = None, *, alpha: float | None = None,
                          fit: Fit | None = None, pad: int = DEFAULT_PAD, use_default_grid: bool = True,
                          input_norm: InputNorm | None = None, head_init: HeadInit = "shared",
                          recompute: bool = False) -> TiledSegmenter:
    """A fresh :class:`TiledSegmenter` on the CPU from the pretrained ``generalist`` weights.

    ``grid=None`` takes the generalist's default (:data:`DEFAULT_GRID`: 4 for LiteMedSAM, else one
    canvas per crop) unless ``use_default_grid=False`` (then None means one canvas per crop).
    ``input_norm=None`` takes the generalist's own convention: ``unit`` for models trained on [0, 1]
    slices (LiteMedSAM, MedSAM), ``zscore`` (CFR's authors) for SAM-normalised ones.
    The model is built afresh (not the cached frozen one of ``get_generalist``, which other code shares).
    """
    from fmabs_core.generalist.models import GENERALISTS, canonical_name

    name = canonical_name(generalist)
    if grid is None and use_default_grid:
        grid = DEFAULT_GRID.get(name)
    cls, build = GENERALISTS[name]
    if input_norm is None:
        input_norm = "unit" if cls.normalization == "unit" else "zscore"
    sam = build(str(checkpoint) if checkpoint else None, True)
    net = TiledSegmenter(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, num_classes_plus_bg, name,
                         rank=rank, grid=grid, pad=pad, fit=fit, alpha=alpha, input_norm=input_norm,
                         head_init=head_init, recompute=recompute)
    log.info("tiled %s: %d classes, LoRA rank %d, grid %s, %s to %d px; %d trainable parameters", name,
             net.num_classes, net.rank, net.grid or "ceil(sqrt(Z))", net.fit, net.image_size,
             sum(p.numel() for p in net.trainable_parameters()))
    return net


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter file's header (base name, rank, alpha) and ``meta`` dict, checked (digest) but not loaded."""
    payload = lora._read_adapter(Path(path))
    meta = json.loads(payload["meta"])  # an object: checked by _read_adapter
    missing = [k for k in ("generalist", "num_classes") if k not in meta]
    if missing:
        raise WeightsError(f"{path}: this LoRA adapter was not written by a tiled (CFR) fine-tuning run: its metadata "
                           f"lacks {', '.join(missing)}.")
    kinds = {"generalist": (str,), "num_classes": (int,), "grid": (int, type(None)), "pad": (int,),
             "patch_size": (list, type(None)), "input_norm": (str,), "head_init": (str,)}
    for key, allowed in kinds.items():
        value = meta.get(key)
        if key in meta and (isinstance(value, bool) or not isinstance(value, allowed)):
            raise WeightsError(f"{path}: adapter metadata {key!r} is {value!r}, not a "
                               f"{' or '.join(t.__name__ for t in allowed)}; the file is damaged.")
    for key, allowed in (("input_norm", INPUT_NORMS), ("head_init", HEAD_INITS)):
        if key in meta and meta[key] not in allowed:
            raise WeightsError(f"{path}: adapter metadata {key!r} is {meta[key]!r}, not one of {', '.join(allowed)}; "
                               "the file is damaged or from a newer version.")
    if meta["num_classes"] < 1 or (meta.get("grid") is not None and meta["grid"] < 1):
        raise WeightsError(f"{path}: adapter metadata num_classes {meta['num_classes']} / grid {meta.get('grid')} "
                           "must be at least 1; the file is damaged.")
    return {"base_name": payload["base_name"], "rank": payload["rank"], "alpha": payload["alpha"], "meta": meta}


def load_tuned(adapter_path: str | os.PathLike, device: str | torch.device = "cpu",
               checkpoint: str | os.PathLike | None = None) -> TiledSegmenter:
    """The fine-tuned :class:`TiledSegmenter` of an adapter written by the ``sam-lora`` method, in eval mode.

    The adapter's metadata names the generalist, the classes, the LoRA rank and the grid; the base
    weights are the bundled/cached file (or ``checkpoint``) and must have the sha256 the adapter was
    tuned on (checked by :func:`~fmabs_core.generalist.lora.load_adapter`; loading is weights-only).
    ``model.adapter_meta`` keeps the metadata (e.g. the training patch size).
    """
    head = read_adapter_meta(adapter_path)
    meta = head["meta"]
    trained_as = {k: meta.get(k, v) for k, v in LEGACY_META.items()}  # an older adapter lacks the keys
    net = build_tiled_segmenter(meta["generalist"], int(meta["num_classes"]), checkpoint, int(head["rank"]),
                                meta.get("grid"), alpha=float(head["alpha"]), fit=meta.get("fit"),
                                pad=int(meta.get("pad", DEFAULT_PAD)), use_default_grid=False,
                                input_norm=trained_as["input_norm"], head_init=trained_as["head_init"])
    sha = lora.base_sha256(net.generalist, checkpoint)
    lora.load_adapter(adapter_path, net, net.generalist, sha)
    net.adapter_meta = meta
    return net.to(torch.device(device)).eval()
