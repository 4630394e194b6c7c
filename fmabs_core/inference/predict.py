"""Whole-scan inference with MONAI sliding windows, and loading a trained run's model."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from fmabs_core.contract import MODEL_FILE
from fmabs_core.data.components import largest_component
from fmabs_core.device import tune_cpu_allocator
from fmabs_core.runs.checkpoint import load_checkpoint
from fmabs_core.data.intensity import zscore
from fmabs_core.errors import InputError
from fmabs_core.training.nets import NetConfig, build_network

log = logging.getLogger(__name__)



Overlap = float | tuple[float, float, float]

#: the references' sliding-window stride on LA (UA-MT, FM-ABS, CFR: 18 x 18 x 4 voxels with 112x112x80 windows)
REFERENCE_STRIDE_LA = (18, 18, 4)
BLEND_MODES = ("constant", "gaussian")
#: number formats the windows' probabilities are averaged in (float32: the references)
ACCUMULATE = ("float32", "float16")


@dataclass
class InferenceConfig:
    patch_size: tuple[int, int, int] | None = None  # None: the patch the model was trained with
    overlap: Overlap = 0.5  # one fraction, or one per axis
    #: windows this many voxels apart per axis (the references: 18 18 4); overrides ``overlap``
    stride: tuple[int, int, int] | None = None
    #: how overlapping windows' probabilities are weighted: ``constant`` (plain mean, as the references) or
    #: ``gaussian`` (each window's centre counts more; MONAI's and nnU-Net's choice, not the references')
    mode: str = "constant"
    sw_batch_size: int = 2
    largest_component: bool = False
    #: ``float16`` halves the memory of the averaged windows (very large scans); ``float32`` is the references'
    accumulate: str = "float32"


def overlap_for_stride(patch_size: tuple[int, ...], stride: tuple[int, ...]) -> tuple[float, ...]:
    """Per-axis overlap that makes MONAI's sliding windows ``stride`` voxels apart.

    MONAI steps by ``int(roi * (1 - overlap))``; the exact fraction can land a hair below the integer
    (``int(17.999...) = 17``), so the overlap is nudged down by 1e-9 so that the step is ``stride`` itself.
    """
    if len(stride) != len(patch_size) or any(s < 1 or s > p for s, p in zip(stride, patch_size)):
        raise InputError(f"--stride {' '.join(map(str, stride))}: give {len(patch_size)} steps between 1 and the "
                         f"window size {' '.join(map(str, patch_size))}")
    return tuple(max(0.0, (p - s) / p - 1e-9) for p, s in zip(patch_size, stride))


def window_overlap(cfg: InferenceConfig, patch_size: tuple[int, int, int]) -> Overlap:
    """The overlap ``predict_proba`` gets from a config: from ``stride`` when given, else ``overlap``."""
    return overlap_for_stride(patch_size, cfg.stride) if cfg.stride else cfg.overlap


class _WindowProbabilities(torch.nn.Module):
    """A window's class probabilities: the network's softmax, taken per window before windows are blended."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.dtype = dtype  # MONAI accumulates the windows in the dtype they come in

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(window.float()).float(), dim=1).to(self.dtype)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, image: np.ndarray, patch_size: tuple[int, int, int], overlap: Overlap = 0.5,
                  device: str | torch.device = "cpu", sw_batch_size: int = 2, normalise: bool = True,
                  mode: str = "constant", accumulate: str = "float32", tune_allocator: bool = True) -> np.ndarray:
    """Class probabilities (C+1, X, Y, Z) for a canonical-grid scan, by sliding windows.

    Each window's logits are turned into probabilities first and the windows' probabilities are then
    averaged, as the references do (UA-MT's and FM-ABS's ``test_single_case``: ``softmax`` per window,
    summed into a score map, divided by the count). Averaging logits instead lets one confident window
    outvote the others. ``overlap``: one fraction or one per axis. ``mode``: ``constant`` takes the
    plain mean (the references), ``gaussian`` weights each window's centre more. ``accumulate``: ``float32`` (the
    references) or ``float16``: the scan, the averaged windows and the result (returned as float16) take half the
    memory, for scans too large for it, at the price of labels that may differ where two classes nearly tie (each
    window still runs the network in float32). ``tune_allocator=False`` leaves glibc's allocator as the caller set it
    (validation inside a run whose method trains with glibc's defaults: :attr:`Method.cpu_allocator_tuning`).
    """
    if mode not in BLEND_MODES:
        raise InputError(f"sliding-window mode '{mode}': choose {' or '.join(BLEND_MODES)}")
    if accumulate not in ACCUMULATE:
        raise InputError(f"--accumulate {accumulate}: choose {' or '.join(ACCUMULATE)}")
    if torch.device(device).type == "cpu" and tune_allocator:
        tune_cpu_allocator()  # measured 1.7x on a V-Net window: its 3D activations are no longer re-mapped each time
    was_training = model.training
    model.eval()
    arr = np.asarray(zscore(image) if normalise else image, dtype=getattr(np, accumulate))
    if not arr.flags.writeable:  # a memory-mapped scan of the store: torch wants memory it may write
        arr = arr.copy()
    x = torch.from_numpy(arr)[None, None].to(device)
    use_amp = torch.device(device).type == "cuda"
    ov = tuple(float(o) for o in overlap) if isinstance(overlap, (tuple, list)) else float(overlap)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
        probs = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                         predictor=_WindowProbabilities(model, getattr(torch, accumulate)), overlap=ov,
                                         mode=mode)
    out = probs[0].cpu().numpy()
    model.train(was_training)
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


def _model_error(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}. Point --model at a model.pt written by 'fmabs train' (or at its run "
                      "folder), and keep a model file together with the configuration it was saved with.")


def _load_state(path: Path) -> object:
    """What a model file holds (weights only), or an InputError naming the file."""
    try:
        return load_checkpoint(path, map_location="cpu")
    except RuntimeError as exc:
        cause = exc.__cause__ or exc
        summary = " ".join(str(cause).split())[:160]
        raise _model_error(path, "not a readable model file: it is damaged, not a PyTorch file, or holds Python "
                                 "objects besides weights (never loaded, for safety) "
                                 f"({type(cause).__name__}: {summary})") from None


def read_model_file(path: Path, state: object | None = None) -> dict:
    """The checked contents of a model file: ``state_dict``, ``net`` (a NetConfig), ``patch_size``, ``classes``.

    ``state``: the file's contents when the caller has read them already. A training checkpoint
    (``checkpoints/*.pt``) takes its network from the run's ``config.json``. Anything else (a bare tensor,
    another architecture's description, a missing or damaged part) is an InputError naming the file and the part.
    """
    from dataclasses import asdict

    from fmabs_core.contract import CONFIG_FILE
    from fmabs_core.training.config import TrainConfig, from_dict

    if state is None:
        state = _load_state(path)
    if not isinstance(state, dict):
        raise _model_error(path, f"holds a {type(state).__name__}, not an FM-ABS model (a dict with 'state_dict', "
                                 "'net', 'patch_size')")
    where = str(path)
    if "net" not in state:
        if "eval_model" not in state:
            raise _model_error(path, f"not an FM-ABS model: it has no 'net' configuration (keys: "
                                     f"{', '.join(map(str, list(state)[:8])) or 'none'})")
        cfg_path = path.parent.parent / CONFIG_FILE  # a training checkpoint: runs/<run>/checkpoints/iter_*.pt
        if not cfg_path.is_file():
            raise _model_error(path, f"a training checkpoint without its run's configuration ({cfg_path} is "
                                     "missing): use the run's model.pt, or restore config.json")
        cfg = TrainConfig.load(cfg_path)  # refuses a damaged config.json by key
        state = {"state_dict": state["eval_model"], "net": asdict(cfg.net), "patch_size": list(cfg.patch_size),
                 "classes": {"1": "foreground"}}
        where = f"{path} (with {cfg_path})"
    for key in ("state_dict", "patch_size"):
        if key not in state:
            raise _model_error(path, f"has no '{key}'")
    weights = state["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise _model_error(path, "'state_dict' is not a dict of tensors")
    net = from_dict(NetConfig, state["net"], f"{where}: 'net'")
    checks = [(net.width >= 1, f"width {net.width} (must be >= 1)"),
              (net.in_channels >= 1, f"in_channels {net.in_channels} (must be >= 1)"),
              (net.out_channels >= 2, f"out_channels {net.out_channels} (must be >= 2)"),
              (0 <= net.dropout < 1, f"dropout {net.dropout} (must be in [0, 1))"),
              (net.norm in ("batch", "instance", "none"), f"norm {net.norm!r} (batch, instance or none)")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise _model_error(path, f"its 'net' configuration is unusable: {'; '.join(problems)}")
    patch = state["patch_size"]
    if (not isinstance(patch, (list, tuple)) or len(patch) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch)):
        raise _model_error(path, f"'patch_size' must be three positive integers, found {patch!r}")
    classes = state.get("classes", {"1": "foreground"})
    if not isinstance(classes, dict):
        raise _model_error(path, f"'classes' must be an object, found {type(classes).__name__}")
    return {"state_dict": weights, "net": net, "patch_size": tuple(patch), "classes": classes}


def load_model(model: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained specialist from a run folder or file; returns (model in eval mode, metadata).

    A 'sam-lora' run's LoRA adapter gives the tuned generalist instead. A file that does not describe a
    network matching its weights is an InputError naming the file.
    """
    from fmabs_core.generalist.lora import ADAPTER_FORMAT
    from fmabs_core.training.nets import size_divisor

    path = resolve_model_file(model)
    raw = _load_state(path)  # read once: a LoRA adapter (a 'sam-lora' run) or a 3D model
    if isinstance(raw, dict) and raw.get("format") == ADAPTER_FORMAT:
        return _load_tuned_generalist(path, device)
    state = read_model_file(path, raw)
    cfg = state["net"]
    try:
        net = build_network(cfg)
    except Exception as exc:  # noqa: BLE001 - unknown name, impossible sizes
        raise _model_error(path, f"its 'net' configuration ({cfg.name}, width {cfg.width}) cannot be built "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
    try:
        net.load_state_dict(state["state_dict"])
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys, size mismatches
        first = " ".join(str(exc).split())[:300].rstrip(".")
        raise _model_error(path, f"its weights do not match the network it describes ({cfg.name}, width "
                                 f"{cfg.width}, {cfg.in_channels} in / {cfg.out_channels} out channels): {first}") from None
    net.to(device).eval()
    meta = {"patch_size": tuple(state["patch_size"]), "classes": state["classes"], "path": str(path),
            "divisor": size_divisor(cfg), "network": cfg.name}
    return net, meta


def _load_tuned_generalist(path: Path, device: str | torch.device) -> tuple[torch.nn.Module, dict]:
    """A CFR fine-tuned generalist segments like a 3D model: tiled axial slices of each sliding window
    (prompt-free), so ``fmabs predict`` and the Slicer Segment panel take a 'sam-lora' run's model.pt."""
    from fmabs_core.generalist.tiled import load_tuned

    net = load_tuned(path, device=device)  # checks the digest and the base weights' sha256; weights only
    meta = net.adapter_meta
    patch = meta.get("patch_size")
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(v, int) and v > 0 for v in patch)):
        raise _model_error(path, f"this adapter's metadata has no usable 'patch_size' (found {patch!r}); pass "
                                 "--patch-size X Y Z")
    classes = meta.get("classes") or {str(c): f"class_{c}" for c in range(1, int(meta["num_classes"]))}
    return net, {"patch_size": tuple(patch), "classes": classes, "path": str(path), "divisor": 1,
                 "network": f"tuned {meta['generalist']} (tiled, LoRA rank {net.rank})"}


def check_patch(patch: tuple[int, ...], divisor: int, network: str, option: str = "--patch-size") -> tuple[int, int, int]:
    """Sliding windows the network can take: three positive multiples of its size divisor."""
    patch = tuple(patch)
    if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 or p % divisor for p in patch):
        good = " ".join(str(max(divisor, (int(p) + divisor - 1) // divisor * divisor) if isinstance(p, int) else divisor)
                        for p in patch[:3])
        raise InputError(f"{option} {' '.join(map(str, patch))}: the {network} network needs three positive multiples "
                         f"of {divisor} (e.g. {good})")
    return patch  # type: ignore[return-value]


def check_inference_config(cfg: InferenceConfig) -> InferenceConfig:
    overlaps = cfg.overlap if isinstance(cfg.overlap, (tuple, list)) else (cfg.overlap,)
    if (len(overlaps) not in (1, 3) or not all(isinstance(o, (int, float)) and not isinstance(o, bool)
                                               and math.isfinite(o) and 0 <= o < 1 for o in overlaps)):
        raise InputError(f"--overlap must be one number or three numbers in [0, 1) (got {cfg.overlap})")
    if cfg.mode not in BLEND_MODES:
        raise InputError(f"--blend {cfg.mode}: choose {' or '.join(BLEND_MODES)}")
    if cfg.accumulate not in ACCUMULATE:
        raise InputError(f"--accumulate {cfg.accumulate}: choose {' or '.join(ACCUMULATE)}")
    if cfg.stride is not None and (len(cfg.stride) != 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v >= 1 for v in cfg.stride)):
        raise InputError(f"--stride must be three positive integers (got {cfg.stride})")
    if isinstance(cfg.sw_batch_size, bool) or not isinstance(cfg.sw_batch_size, int) or cfg.sw_batch_size < 1:
        raise InputError(f"--sw-batch-size must be at least 1 (got {cfg.sw_batch_size})")
    return cfg


def plan_outputs(inputs: list[Path], output: Path, save_probabilities: bool, overwrite: bool,
                 ours: Callable[[Path, Path], bool] | None = None) -> list[Path]:
    """The files ``predict_files`` will write, checked before any work: refuses a file ``--output``, one
    that is a folder of the inputs, two inputs with one case id, outputs landing on an input, and
    outputs that exist (unless ``overwrite``, or ``ours(output, input)`` says this command began it before);
    a missing parent folder or a read-only one."""
    from fmabs_core.data import io

    output = Path(output)
    if output.exists() and not output.is_dir():
        same = any(output.resolve() == Path(p).resolve() for p in inputs)
        raise InputError(f"--output {output}: is {'an input ' if same else 'a '}file; give a folder for the "
                         "segmentations.")
    if any(output.resolve() == Path(p).parent.resolve() for p in inputs):
        raise InputError(f"--output {output}: is the folder of the input scans; choose another folder, so that "
                         "nothing is written among your scans.")
    if not output.exists() and not output.parent.is_dir():
        raise InputError(f"--output {output}: its parent folder {output.parent} does not exist; create it or choose "
                         "another --output.")
    seen: dict[str, Path] = {}
    planned: list[Path] = []
    source: dict[Path, Path] = {}
    for path in inputs:
        cid = io.case_id(path)
        if cid in seen:
            raise InputError(f"--input: {seen[cid]} and {path} are the same case '{cid}' and would be written to one "
                             "output; keep one of them.")
        seen[cid] = Path(path)
        outs = outputs_of(path, output, save_probabilities)
        planned.extend(outs)
        source.update(dict.fromkeys(outs, Path(path)))
    inputs_resolved = {Path(p).resolve() for p in inputs}
    onto = [p for p in planned if p.resolve() in inputs_resolved]
    if onto:
        raise InputError(f"--output {output}: would overwrite the input(s) {', '.join(map(str, onto))}; choose "
                         "another folder.")
    if len(set(planned)) != len(planned):
        dup = sorted({str(p) for p in planned if planned.count(p) > 1})
        raise InputError(f"--input: two outputs would be written to {', '.join(dup)}; rename a scan.")
    exist = [p for p in planned if (p.exists() or p.is_symlink()) and not (ours is not None and ours(p, source[p]))]
    if exist and not overwrite:
        names = ", ".join(p.name for p in exist[:10]) + (f" and {len(exist) - 10} more" if len(exist) > 10 else "")
        raise InputError(f"--output {output}: {names} exist(s) already; refusing to overwrite. Choose another "
                         "--output, or add --overwrite.")
    folders = [p for p in exist if p.is_dir()]
    if folders:
        raise InputError(f"--output {output}: {', '.join(map(str, folders))} is a folder; remove it or choose another "
                         "--output.")
    return planned


def predict_files(model: str | Path, inputs: list[Path], output: Path, cfg: InferenceConfig | None = None,
                  device: str | torch.device = "cpu", save_probabilities: bool = False,
                  progress=lambda items, **kw: items, overwrite: bool = False) -> list[Path]:
    """Segment scans with a trained model; each output has its input's shape and affine.

    Outputs go to ``output/<case>.nii.gz`` (and ``<case>_probs.nii.gz``, float32 foreground
    probabilities per class, when asked). Everything is checked before the first scan is segmented
    (see :func:`plan_outputs`): input files are never overwritten, and existing outputs only with
    ``overwrite``. The output folder is created when its parent exists. The same command run again after an
    interruption keeps the outputs it finished and does the rest (see :mod:`fmabs_core.inference.record`).
    """
    from fmabs_core.data import io
    from fmabs_core.data.store import sha256_of
    from fmabs_core.inference.record import PredictRecord, folder_lock

    cfg = check_inference_config(cfg or InferenceConfig())
    inputs = [Path(p) for p in inputs]
    for path in inputs:
        io.read_header(path)
    output = Path(output)
    record = PredictRecord(output, sha256_of(resolve_model_file(model)),
                           {**json_safe(asdict(cfg)), "probabilities": bool(save_probabilities)})
    done = None if overwrite else record.is_done
    planned = plan_outputs(inputs, output, save_probabilities, overwrite, None if overwrite else record.is_ours)
    net, meta = load_model(model, device)
    patch = check_patch(tuple(cfg.patch_size or meta["patch_size"]), meta["divisor"], meta["network"],
                        "--patch-size" if cfg.patch_size else f"{meta['path']}: 'patch_size'")
    try:
        output.mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"--output {output}: cannot create this folder ({exc.strerror or exc}); choose another "
                         "place.") from None
    io.check_writable(output, f"--output {output}")
    overlap = window_overlap(cfg, patch)
    written = []
    lock = folder_lock(output)
    try:
        if sum(io.remove_stale_temporaries(p) for p in (*planned, record.path)):
            log.info("removed temporary files an interrupted fmabs predict left in %s", output)
        for path in progress(inputs, desc="segmenting"):
            outs = outputs_of(path, output, save_probabilities)
            if done is not None and all(done(p, path) for p in outs):
                log.info("%s: written by this command before; kept", outs[0])
                written.append(outs[0])
                continue
            record.begin(outs, path)
            written.append(_predict_one(net, path, output, patch, overlap, device, cfg, save_probabilities, inputs))
            record.add(outs, path)
    finally:
        lock.release()
    return written


def class_map(probs: np.ndarray, slab: int = 16) -> np.ndarray:
    """``probs.argmax(0)`` as uint8, slab by slab along the last axis: numpy's argmax is int64, 8 bytes a voxel,
    which for a 600-slice CT is more than the probabilities themselves."""
    out = np.empty(probs.shape[1:], np.uint8)
    for z in range(0, probs.shape[-1], slab):
        out[..., z:z + slab] = probs[..., z:z + slab].argmax(0)
    return out


def outputs_of(path: Path, output: Path, save_probabilities: bool) -> list[Path]:
    """The files one input becomes in ``output``: its mask, then (when asked) its probabilities."""
    from fmabs_core.data import io

    cid = io.case_id(path)
    return [output / f"{cid}.nii.gz", *([output / f"{cid}_probs.nii.gz"] if save_probabilities else [])]


def json_safe(d: dict) -> dict:
    """A config as JSON would give it back (tuples as lists), so a record compares equal after reading."""
    import json

    return json.loads(json.dumps(d))


def _predict_one(net, path: Path, output: Path, patch, overlap, device, cfg: InferenceConfig,
                 save_probabilities: bool, inputs: list[Path]) -> Path:
    """One scan: sliding windows, argmax (and the largest part), written atomically beside its probabilities."""
    from fmabs_core.data import io

    vol = io.load_image(path)
    image = zscore(vol.array, inplace=True)  # the raw voxels are not needed again: one copy of the scan, not two
    if cfg.accumulate == "float16":  # MONAI averages in the input's format: the scan goes float16 too
        image = image.astype(np.float16)
    vol = vol.grid()  # what writing the outputs needs, without the voxels
    probs = predict_proba(net, image, patch, overlap, device, cfg.sw_batch_size, normalise=False, mode=cfg.mode,
                          accumulate=cfg.accumulate)
    del image
    mask = class_map(probs)
    if cfg.largest_component:
        mask = largest_component(mask)
    out = output / f"{io.case_id(path)}.nii.gz"
    io.save_like(mask, vol, out, np.uint8, protect=tuple(inputs))
    if save_probabilities:
        fg = probs[1] if probs.shape[0] == 2 else np.moveaxis(probs[1:], 0, -1)
        io.save_like(fg, vol, output / f"{io.case_id(path)}_probs.nii.gz", np.float32, protect=tuple(inputs))
    log.info("wrote %s", out)
    return out
