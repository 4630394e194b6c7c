"""LoRA on the image encoder's attention (CFR's fine-tuning stage, SAMed-style): q and v only.

What is added. Every attention block of a SAM-family image encoder computes q, k and v with ONE
fused ``nn.Linear`` (``attn.qkv``). SAMed, whose recipe CFR follows, adds a rank-``r`` update
``B @ A`` to the q part and another to the v part of that output, and leaves k alone:

    qkv(x) = W x + b,    q += s * B_q A_q x,    v += s * B_v A_v x

``A`` (r x in) is Kaiming-uniform initialised (a = sqrt(5), as ``nn.Linear``), ``B`` (out/3 x r) is
zero, so a freshly added adapter changes nothing (tested: the encoder output is bit-identical).
``s = alpha / r``; SAMed uses no scaling, so the default is ``alpha = r`` (s = 1). The base weights
are frozen (``requires_grad = False``) and untouched by training (tested after an AdamW step).

Where q and v live in the fused output differs by encoder, so :class:`LoRAQKV` takes the list of
output channels of each:

* SAM / MedSAM ViT (``segment_anything`` ``Attention``): ``qkv(x).reshape(B, N, 3, heads, hd)``:
  q = channels ``[0, C)``, k = ``[C, 2C)``, v = ``[2C, 3C)`` (contiguous thirds).
* TinyViT (LiteMedSAM, MobileSAM): ``qkv(x).view(B, N, heads, -1).split([kd, kd, d])``: the channels
  are grouped *per head*, ``[q_h | k_h | v_h]`` for each head ``h`` in turn. Adding the delta to the
  first and last thirds, as SAMed's code does for SAM, would here update q, k and v of the first
  third of the heads and none of the others. (LiteMedSAM: 10 attention blocks in stages 1-3, key
  dim 32, ``attn_ratio`` 1, so q, k, v are each a third of the output.)

Why not ``peft``. Hugging Face ``peft`` (0.21 on PyPI, maintained) was tried: its LoRA wraps a whole
``nn.Linear`` (``target_modules=["qkv"]`` gives one ``A`` (r x in) and one ``B`` (3C x r) shared by
q, k and v: a rank-r update of k too, and q and v sharing one rank-r subspace), and it has no option
to adapt chosen output channels of a fused layer (the old ``MergedLinear``/``enable_lora`` of
``loralib`` did this for contiguous thirds only, and is gone from ``peft``). It would also bring
``transformers`` and ``accelerate`` as dependencies and rename the base weights
(``qkv.base_layer.weight``). The ~80 lines of :class:`LoRAQKV` do exactly SAMed's update, for both
layouts, with the base parameters kept under their own names.

Adapters on disk (:func:`save_adapter` / :func:`load_adapter`) hold only what was trained: the LoRA
tensors and, when they were trained, the prompt encoder's and mask decoder's state (CFR trains both;
its mask decoder gives C+1 masks), plus the base model's name and the sha256 of its checkpoint
(an adapter is meaningless on other base weights) and a sha256 of the content (a flipped byte is
caught even where the zip reader does not check CRCs). Loading uses ``torch.load(weights_only=True)``:
an adapter is untrusted input and a pickle could otherwise run code. The content hash detects
corruption, not a deliberate forgery: the file is not signed.

Train with the encoder in ``eval()`` mode: TinyViT has BatchNorm layers whose running statistics
would otherwise drift, and LoRA needs no train-mode behaviour (no dropout here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmabs_core.errors import InputError, WeightsError
from fmabs_core.runs.checkpoint import save_atomic

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "fmabs.lora_adapter"
ADAPTER_VERSION = 1
#: the model's sub-modules that CFR trains besides the LoRA tensors
HEADS = ("prompt_encoder", "mask_decoder")
_LORA_NAMES = ("lora_q_A", "lora_q_B", "lora_v_A", "lora_v_B")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class LoRAQKV(nn.Module):
    """A fused qkv ``nn.Linear`` with rank-``r`` updates on its q and v output channels only.

    The base ``weight``/``bias`` are the original layer's own (frozen) parameters, kept under the
    same names, so the model's other state-dict keys do not change; :func:`remove_lora` puts the
    original layer back.
    """

    def __init__(self, base: nn.Linear, rank: int, q_index: Sequence[int] | torch.Tensor,
                 v_index: Sequence[int] | torch.Tensor, alpha: float | None = None, layout: str = "") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InputError(f"LoRAQKV wraps an nn.Linear, got {type(base).__name__}.")
        if int(rank) < 1:
            raise InputError(f"LoRA rank must be >= 1, got {rank}.")
        q_index = torch.as_tensor(q_index, dtype=torch.long).flatten()
        v_index = torch.as_tensor(v_index, dtype=torch.long).flatten()
        qv = torch.cat([q_index, v_index])
        if qv.numel() == 0 or qv.min() < 0 or qv.max() >= base.out_features or qv.unique().numel() != qv.numel():
            raise InputError(f"q/v channels must be distinct indices into the {base.out_features} outputs of qkv.")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.layout = layout
        self.weight = base.weight
        self.bias = base.bias
        self._base = [base]  # a list: not registered as a sub-module (no duplicate state-dict keys)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_q_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=dev, dtype=dt))
        self.lora_q_B = nn.Parameter(torch.zeros(q_index.numel(), self.rank, device=dev, dtype=dt))
        self.lora_v_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=dev, dtype=dt))
        self.lora_v_B = nn.Parameter(torch.zeros(v_index.numel(), self.rank, device=dev, dtype=dt))
        for a in (self.lora_q_A, self.lora_v_A):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.register_buffer("qv_index", qv.to(dev), persistent=False)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_q_A, self.lora_q_B, self.lora_v_A, self.lora_v_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dq = F.linear(F.linear(x, self.lora_q_A), self.lora_q_B)
        dv = F.linear(F.linear(x, self.lora_v_A), self.lora_v_B)
        delta = torch.cat([dq, dv], dim=-1)
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return out.index_add(-1, self.qv_index, delta.to(out.dtype))

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``out x in`` update that LoRA adds to ``weight`` (zero rows for k)."""
        d = torch.zeros_like(self.weight)
        d[self.qv_index] = torch.cat([self.lora_q_B @ self.lora_q_A, self.lora_v_B @ self.lora_v_A]) * self.scaling
        return d

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``weight + delta``: one plain Linear computing the same (up to rounding), for export/inference."""
        return self.weight + self.delta_weight()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"q={self.lora_q_B.shape[0]}, v={self.lora_v_B.shape[0]}, layout={self.layout!r}")


def qv_channels(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(q channels, v channels, layout name) of the fused ``attn.qkv`` output of one attention block."""
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        raise InputError(f"{type(attn).__name__} has no fused nn.Linear named 'qkv'.")
    out = qkv.out_features
    if all(hasattr(attn, a) for a in ("key_dim", "d", "num_heads")):  # TinyViT: [q_h | k_h | v_h] per head
        kd, d, heads = int(attn.key_dim), int(attn.d), int(attn.num_heads)
        per = 2 * kd + d
        if heads * per != out:
            raise InputError(f"TinyViT attention with {heads} heads x (2 * {kd} + {d}) != {out} qkv outputs.")
        start = torch.arange(heads) * per
        q = (start[:, None] + torch.arange(kd)).flatten()
        v = (start[:, None] + 2 * kd + torch.arange(d)).flatten()
        return q, v, "tinyvit_per_head"
    if out == 3 * qkv.in_features:  # SAM ViT: reshape(B, N, 3, heads, hd): contiguous thirds
        c = qkv.in_features
        return torch.arange(c), torch.arange(2 * c, 3 * c), "sam_thirds"
    raise InputError(
        f"{type(attn).__name__}: cannot tell where q and v are in its qkv output ({qkv.in_features} -> {out}); "
        "only SAM ViT and TinyViT attention are supported.")


def lora_layers(module: nn.Module) -> list[tuple[str, LoRAQKV]]:
    """``(name, layer)`` of every :class:`LoRAQKV` under ``module``, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoRAQKV)]


def add_lora(image_encoder: nn.Module, rank: int = 4, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze ``image_encoder`` and add LoRA (rank ``rank``) to q and v of every attention block.

    Returns the new trainable parameters (per block: q A, q B, v A, v B). Refuses an encoder that
    already has LoRA or has no fused-qkv attention.
    """
    if lora_layers(image_encoder):
        raise InputError("this image encoder already has LoRA layers; add them once (or remove_lora first).")
    targets = [(n, m) for n, m in image_encoder.named_modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
    if not targets:
        raise InputError(f"{type(image_encoder).__name__} has no attention block with a fused 'qkv' Linear to adapt.")
    plans = [(n, m, *qv_channels(m)) for n, m in targets]  # check every block before changing any
    for p in image_encoder.parameters():
        p.requires_grad_(False)
    new: list[nn.Parameter] = []
    for _name, attn, q, v, layout in plans:
        layer = LoRAQKV(attn.qkv, rank, q, v, alpha=alpha, layout=layout)
        attn.qkv = layer
        new.extend(layer.lora_parameters())
    log.info("LoRA rank %d on q and v of %d attention blocks: %d trainable parameters",
             rank, len(plans), sum(p.numel() for p in new))
    return new


def remove_lora(image_encoder: nn.Module) -> int:
    """Put the original qkv Linear layers back (the LoRA tensors are dropped); returns how many."""
    n = 0
    for name, layer in lora_layers(image_encoder):
        parent_name, _, child = name.rpartition(".")
        parent = image_encoder.get_submodule(parent_name) if parent_name else image_encoder
        setattr(parent, child, layer._base[0])
        n += 1
    return n


# ------------------------------------------------------------------------------------ adapter files
def _root(model: Any) -> nn.Module:
    """The ``nn.Module`` of a model or of a :class:`~fmabs_core.generalist.base.Generalist` wrapper."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise InputError(f"expected a torch model or a Generalist, got {type(model).__name__}.")


def _head_names(root: nn.Module, heads: bool | Iterable[str] | None) -> list[str]:
    present = [h for h in HEADS if isinstance(getattr(root, h, None), nn.Module)]
    if heads is None:  # the heads being trained
        return [h for h in present if any(p.requires_grad for p in getattr(root, h).parameters())]
    if heads is True:
        return present
    if heads is False:
        return []
    names = list(heads)
    for h in names:
        if h not in present:
            raise InputError(f"the model has no {h!r} to save; it has {', '.join(present) or 'none of ' + str(HEADS)}.")
    return names


def adapter_state(model: Any, heads: bool | Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The trained tensors only, under the model's state-dict keys (detached CPU copies).

    LoRA A/B of every adapted block, plus the full state of the prompt encoder and mask decoder when
    they are trained: ``heads=None`` includes a head if any of its parameters requires grad;
    ``True``/``False`` or a list of names forces the choice.
    """
    root = _root(model)
    layers = lora_layers(root)
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        for attr in _LORA_NAMES:
            state[f"{name}.{attr}"] = getattr(layer, attr).detach().cpu().clone()
    for h in _head_names(root, heads):
        for k, v in getattr(root, h).state_dict(prefix=f"{h}.").items():
            state[k] = v.detach().cpu().clone()
    if not state:
        raise InputError("nothing to save: the model has no LoRA layers and no trained head.")
    return state


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _digest(payload: Mapping[str, Any]) -> str:
    """sha256 over every field but ``digest``: header fields as canonical JSON, then each tensor's
    key, dtype, shape and raw bytes in key order."""
    h = hashlib.sha256()
    header = {k: payload[k] for k in sorted(payload) if k not in ("digest", "state")}
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(payload["state"]):
        t = payload["state"][key]
        h.update(f"\n{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _check_sha(sha: str, what: str) -> str:
    s = str(sha).strip().lower()
    if not _SHA256.fullmatch(s):
        raise InputError(f"{what} must be a 64-digit hex sha256 of the base checkpoint file, got {sha!r}.")
    return s


def _canonical_base(name: str) -> str:
    from fmabs_core.generalist.models import canonical_name

    try:
        return canonical_name(name)
    except InputError:
        return str(name).strip().lower()


def base_sha256(name: str, checkpoint: str | os.PathLike | None = None) -> str:
    """sha256 of the base checkpoint: the recorded value for the published file, else hashed from disk."""
    from fmabs_core.generalist import weights as W

    entry = W.get_entry(_canonical_base(name))
    if checkpoint is None and entry.sha256:
        return entry.sha256.lower()
    path = W.resolve(entry, checkpoint, check=checkpoint is None)
    return W.file_hashes(path)[0]


def save_adapter(path: str | os.PathLike, model: Any, base_name: str, base_sha256: str,
                 extra_meta: Mapping[str, Any] | None = None, heads: bool | Iterable[str] | None = None) -> Path:
    """Write the trained tensors (:func:`adapter_state`) to ``path`` atomically (temp file + rename).

    ``extra_meta``: JSON-serialisable facts to keep with it (number of classes, tiling, training
    iterations...); returned by :func:`load_adapter`.
    """
    root = _root(model)
    path = Path(path)
    sha = _check_sha(base_sha256, "base_sha256")
    try:
        meta_json = json.dumps(dict(extra_meta or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"extra_meta for {path} must be JSON-serialisable ({exc}).") from exc
    layers = lora_layers(root)
    payload: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_name": _canonical_base(base_name),
        "base_sha256": sha,
        "rank": layers[0][1].rank if layers else 0,
        "alpha": layers[0][1].alpha if layers else 0.0,
        "meta": meta_json,
        "state": adapter_state(root, heads),
    }
    payload["digest"] = _digest(payload)
    save_atomic(payload, path)  # temp file + fsync + rename: a failed save leaves the old file
    log.info("saved LoRA adapter %s (%d tensors, base %s)", path, len(payload["state"]), payload["base_name"])
    return path


def _read_adapter(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path}: adapter file not found.")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe globals, truncated zip, bad CRC, not a torch file...
        raise WeightsError(
            f"{path}: cannot be read as a weights-only PyTorch file ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "it is corrupt, not an adapter, or holds code (refused)."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise WeightsError(f"{path}: is not an FM-ABS LoRA adapter (no '{ADAPTER_FORMAT}' header); "
                           "give a file written by save_adapter.")
    if payload.get("version") != ADAPTER_VERSION:
        raise WeightsError(f"{path}: adapter format version {payload.get('version')!r}, this code reads "
                           f"{ADAPTER_VERSION}; update fmabs_core or re-export the adapter.")
    want = {"base_name": str, "base_sha256": str, "rank": int, "alpha": float, "meta": str, "state": dict, "digest": str}
    for key, typ in want.items():
        if not isinstance(payload.get(key), typ):
            raise WeightsError(f"{path}: adapter field {key!r} is missing or not a {typ.__name__}; the file is damaged.")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state"].items()):
        raise WeightsError(f"{path}: adapter state must map names to tensors; the file is damaged.")
    if payload["rank"] < 1 or not math.isfinite(payload["alpha"]) or payload["alpha"] <= 0:
        raise WeightsError(f"{path}: adapter rank {payload['rank']} / alpha {payload['alpha']} are not a LoRA "
                           "scaling (rank >= 1, a finite alpha > 0); the file is damaged.")
    try:
        meta = json.loads(payload["meta"])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: adapter field 'meta' is not a JSON object; the file is damaged.")
    if _digest(payload) != payload["digest"]:
        raise WeightsError(f"{path}: content checksum mismatch: the adapter was corrupted or edited after saving. "
                           "Re-export it from the fine-tuning run.")
    return payload


def _short(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_adapter(path: str | os.PathLike, model: Any, base_name: str, base_sha256: str) -> dict[str, Any]:
    """Load an adapter written by :func:`save_adapter` into ``model`` (all or nothing); returns its info.

    ``base_name`` / ``base_sha256`` describe the base weights ``model`` was built from; an adapter
    made for other weights is refused. If the model's encoder has no LoRA yet it is added with the
    file's rank and alpha. Every check (format, content checksum, base, keys, shapes) runs before
    any tensor is copied; the error names the file and what is wrong.
    """
    path = Path(path)
    root = _root(model)
    payload = _read_adapter(path)
    want_name, want_sha = _canonical_base(base_name), _check_sha(base_sha256, "base_sha256")
    if payload["base_name"] != want_name:
        raise WeightsError(f"{path}: adapter made for base model {payload['base_name']!r}, not {want_name!r}; "
                           "load it into the generalist it was trained on.")
    if payload["base_sha256"] != want_sha:
        raise WeightsError(f"{path}: adapter made for base weights with sha256 {payload['base_sha256']}, but the "
                           f"model's checkpoint has sha256 {want_sha}; it only fits the exact weights it was tuned on.")
    state: dict[str, torch.Tensor] = payload["state"]
    encoder = getattr(root, "image_encoder", root)
    added = False
    if not lora_layers(root) and any(k.rsplit(".", 1)[-1] in _LORA_NAMES for k in state):
        if payload["rank"] < 1:
            raise WeightsError(f"{path}: adapter has LoRA tensors but rank {payload['rank']}; the file is damaged.")
        add_lora(encoder, payload["rank"], payload["alpha"])
        added = True
    try:
        targets = _adapter_targets(root, state)
        missing = set(targets) - set(state)
        unexpected = set(state) - set(targets)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing: {_short(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")
            raise WeightsError(f"{path}: adapter keys do not match the model ({'; '.join(parts)}); it was made for "
                               "a different architecture, LoRA placement or head.")
        wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(t.shape)}" for k, t in targets.items()
                 if tuple(state[k].shape) != tuple(t.shape)]
        if wrong:
            raise WeightsError(f"{path}: adapter tensors have the wrong shape ({_short(wrong, 3)}); a different "
                               "LoRA rank or number of classes? Build the model to match the adapter's metadata.")
        bad_dtype = [k for k, t in targets.items() if t.dtype.is_floating_point != state[k].dtype.is_floating_point]
        if bad_dtype:
            raise WeightsError(f"{path}: adapter tensors of the wrong kind of dtype: {_short(bad_dtype)}.")
    except BaseException:
        if added:
            remove_lora(encoder)
        raise
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(state[k])
    info = {k: payload[k] for k in ("base_name", "base_sha256", "rank", "alpha")}
    info["meta"] = json.loads(payload["meta"])
    info["keys"] = len(state)
    log.info("loaded LoRA adapter %s (%d tensors)", path, len(state))
    return info


def _adapter_targets(root: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors an adapter must fill: all LoRA tensors, plus every state entry of each head
    the file has any key of (a head is saved whole or not at all)."""
    targets: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(root):
        for attr in _LORA_NAMES:
            targets[f"{name}.{attr}"] = getattr(layer, attr)
    file_heads = {k.split(".", 1)[0] for k in state} & set(HEADS)
    for h in sorted(file_heads):
        mod = getattr(root, h, None)
        if isinstance(mod, nn.Module):
            targets.update(mod.state_dict(prefix=f"{h}.", keep_vars=True))
    return {k: (v.data if isinstance(v, nn.Parameter) else v) for k, v in targets.items()}
