"""Whole-scan inference with MONAI sliding windows, and loading a trained run's model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from fmabs_core.contract import MODEL_FILE
from fmabs_core.runs.checkpoint import load_checkpoint
from fmabs_core.training.sampler import zscore
from fmabs_core.errors import InputError
from fmabs_core.training.nets import NetConfig, build_network

log = logging.getLogger(__name__)



@dataclass
class InferenceConfig:
    patch_size: tuple[int, int, int] | None = None  # None: the patch the model was trained with
    overlap: float = 0.5
    sw_batch_size: int = 2
    largest_component: bool = False


@torch.no_grad()
def predict_proba(model: torch.nn.Module, image: np.ndarray, patch_size: tuple[int, int, int], overlap: float = 0.5,
                  device: str | torch.device = "cpu", sw_batch_size: int = 2, normalise: bool = True) -> np.ndarray:
    """Class probabilities (C+1, X, Y, Z) for a canonical-grid scan, by Gaussian-weighted sliding windows."""
    was_training = model.training
    model.eval()
    x = torch.from_numpy(zscore(image) if normalise else image.astype(np.float32))[None, None].to(device)
    use_amp = torch.device(device).type == "cuda"
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
        logits = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                          predictor=model, overlap=overlap, mode="gaussian")
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    model.train(was_training)
    return probs


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each foreground class (26-connectivity)."""
    out = np.zeros_like(mask)
    for c in np.unique(mask):
        if c == 0:
            continue
        lab, n = ndimage.label(mask == c, structure=np.ones((3, 3, 3)))
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        out[lab == (int(np.argmax(sizes)) + 1)] = c
    return out


def save_model(path: Path, state_dict: dict, net: NetConfig, patch_size: tuple[int, int, int], classes: dict) -> None:
    """The shipped model: weights plus what ``predict`` needs to rebuild and run it."""
    from dataclasses import asdict

    from fmabs_core.runs.checkpoint import save_atomic

    save_atomic({"state_dict": state_dict, "net": asdict(net), "patch_size": list(patch_size),
                 "classes": {str(k): v for k, v in classes.items()}}, path)


def resolve_model_file(model: str | Path) -> Path:
    """A run folder (uses its model.pt, else best/latest checkpoint) or a model file."""
    model = Path(model)
    if model.is_dir():
        for cand in (model / MODEL_FILE, model / "checkpoints" / "best.pt"):
            if cand.exists():
                return cand
        ckpts = sorted((model / "checkpoints").glob("iter_*.pt")) if (model / "checkpoints").exists() else []
        if ckpts:
            return ckpts[-1]
        raise InputError(f"{model}: no trained model in this run folder (no {MODEL_FILE} or checkpoints). "
                         "Train first, or point --model at a model file.")
    if not model.exists():
        raise InputError(f"{model}: no such model file or run folder.")
    return model


def load_model(model: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained specialist from a run folder or file; returns (model in eval mode, metadata)."""
    path = resolve_model_file(model)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except RuntimeError as exc:
        raise InputError(str(exc)) from exc
    if "net" not in state:  # a training checkpoint: the net config lives in the run's config.json
        cfg_path = path.parent.parent / "config.json"
        cfg = json.loads(cfg_path.read_text())
        state = {"state_dict": state["eval_model"], "net": cfg["net"], "patch_size": cfg["patch_size"],
                 "classes": cfg.get("classes", {"1": "foreground"})}
    net = build_network(NetConfig(**state["net"]))
    net.load_state_dict(state["state_dict"])
    net.to(device).eval()
    meta = {"patch_size": tuple(state["patch_size"]), "classes": state["classes"], "path": str(path)}
    return net, meta


def predict_files(model: str | Path, inputs: list[Path], output: Path, cfg: InferenceConfig | None = None,
                  device: str | torch.device = "cpu", save_probabilities: bool = False,
                  progress=lambda items, **kw: items) -> list[Path]:
    """Segment scans with a trained model; each output has its input's shape and affine.

    Outputs go to ``output/<case>.nii.gz`` (and ``<case>_probs.nii.gz``, float32 foreground
    probabilities per class, when asked). Input files are never overwritten.
    """
    from fmabs_core.data import io

    net, meta = load_model(model, device)
    cfg = cfg or InferenceConfig()
    patch = tuple(cfg.patch_size or meta["patch_size"])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in progress(inputs, desc="segmenting"):
        vol = io.load_image(path)
        probs = predict_proba(net, vol.array, patch, cfg.overlap, device, cfg.sw_batch_size)
        mask = probs.argmax(0).astype(np.uint8)
        if cfg.largest_component:
            mask = largest_component(mask)
        out = output / f"{io.case_id(path)}.nii.gz"
        io.save_like(mask, vol, out, np.uint8, protect=tuple(inputs))
        if save_probabilities:
            fg = probs[1] if probs.shape[0] == 2 else np.moveaxis(probs[1:], 0, -1)
            io.save_like(fg, vol, output / f"{io.case_id(path)}_probs.nii.gz", np.float32, protect=tuple(inputs))
        written.append(out)
        log.info("wrote %s", out)
    return written
