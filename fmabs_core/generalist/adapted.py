"""A CFR-tuned LoRA adapter on a *prompted* generalist (FM-ABS rounds with the fine-tuned encoder).

An adapter written by the ``sam-lora`` method (CFR's fine-tuning stage) holds LoRA tensors for the
image encoder's q and v, plus the prompt-free heads it trained (a mask decoder with C + 1 mask
tokens and the "no mask" embedding). In prompted mode only the encoder part applies: the box
prompts go through SAM's own pretrained prompt encoder and single/multi-mask decoder, which the
prompt-free heads replaced. So the LoRA update is merged into each block's qkv weights (one plain
``nn.Linear`` again: no extra cost per slice, and channels-last/bf16 work as before) and the heads
in the file are left out, which the log says.

The adapter must name the base model and the sha256 of the exact base weights (checked, as are its
content checksum and every tensor's shape, before anything changes); it is loaded weights-only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fmabs_core.errors import WeightsError
from fmabs_core.generalist import lora
from fmabs_core.generalist.base import Generalist
from fmabs_core.generalist.models import canonical_name, get_generalist
from fmabs_core.generalist.weights import file_hashes

log = logging.getLogger(__name__)


def adapter_sha256(path: str | Path) -> str:
    """sha256 of the adapter file: part of the embedding cache's key."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: adapter file not found; give the model.pt of a sam-lora run (--adapter FILE).")
    return file_hashes(path)[0]


def apply_prompted_adapter(model: nn.Module, path: str | Path, base_name: str, base_sha256: str) -> dict:
    """Merge the adapter's LoRA q/v updates into ``model.image_encoder`` (in place); returns its facts.

    Refused with a :class:`WeightsError` naming the file: unreadable or edited file, another base
    model or other base weights, no LoRA tensors, or tensors that do not fit this encoder.
    """
    path = Path(path)
    payload = lora._read_adapter(path)
    name, sha = lora._canonical_base(base_name), lora._check_sha(base_sha256, "base_sha256")
    if payload["base_name"] != name:
        raise WeightsError(f"{path}: adapter tuned on {payload['base_name']!r}, not on the generalist {name!r}; "
                           f"use --generalist {payload['base_name']} or another adapter.")
    if payload["base_sha256"] != sha:
        raise WeightsError(f"{path}: adapter tuned on base weights with sha256 {payload['base_sha256'][:12]}..., "
                           f"these weights have {sha[:12]}...; give the --generalist-checkpoint it was tuned on.")
    state: dict[str, torch.Tensor] = payload["state"]
    lora_keys = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    if not lora_keys:
        raise WeightsError(f"{path}: adapter holds no LoRA tensors for the image encoder; a prompted generalist "
                           "can only use the encoder part of a sam-lora adapter.")
    if payload["rank"] < 1:
        raise WeightsError(f"{path}: adapter has LoRA tensors but rank {payload['rank']}; the file is damaged.")
    encoder = model.image_encoder
    lora.add_lora(encoder, int(payload["rank"]), float(payload["alpha"]))
    try:
        targets = {f"image_encoder.{n}.{a}": getattr(layer, a)
                   for n, layer in lora.lora_layers(encoder) for a in lora._LORA_NAMES}
        if set(targets) != set(lora_keys):
            raise WeightsError(f"{path}: adapter LoRA keys do not match this encoder ({len(lora_keys)} in the file, "
                               f"{len(targets)} expected); it was made for another architecture.")
        wrong = [k for k, t in targets.items() if tuple(t.shape) != tuple(lora_keys[k].shape)]
        if wrong:
            raise WeightsError(f"{path}: adapter tensors of the wrong shape ({lora._short(wrong, 3)}).")
        with torch.no_grad():
            for k, t in targets.items():
                t.copy_(lora_keys[k])
            merged = [(layer, layer.merged_weight()) for _n, layer in lora.lora_layers(encoder)]
    finally:
        lora.remove_lora(encoder)  # the original Linear layers, now given the merged weights
    with torch.no_grad():
        for layer, weight in merged:
            layer._base[0].weight.copy_(weight)
    heads = sorted({k.split(".", 1)[0] for k in state} - {"image_encoder"})
    if heads:
        log.info("%s: prompted mode uses the tuned encoder only; the adapter's prompt-free %s left out",
                 path, " and ".join(heads))
    log.info("merged LoRA adapter %s (rank %d, %d blocks) into %s", path, payload["rank"], len(merged), name)
    return {"base_name": name, "rank": int(payload["rank"]), "blocks": len(merged), "heads_ignored": heads}


def get_adapted(name: str, adapter: str | Path | None, device: str | torch.device | None = "cpu",
                checkpoint: str | None = None, dtype: str = "auto", runtime: str = "auto") -> Generalist:
    """``get_generalist`` with ``adapter`` (None: the plain one) merged into its encoder; cached per
    adapter content (its sha256 is in the cache key and in ``g.identity``)."""
    if not adapter:
        return get_generalist(name, device=device, checkpoint=checkpoint, dtype=dtype, runtime=runtime)
    path = Path(adapter).expanduser().resolve()
    sha = adapter_sha256(path)
    key = canonical_name(name)

    def change(model: nn.Module) -> None:
        apply_prompted_adapter(model, path, key, lora.base_sha256(key, checkpoint))

    return get_generalist(name, device=device, checkpoint=checkpoint, dtype=dtype, runtime=runtime,
                          variant=(f"adapter={sha}", change))
