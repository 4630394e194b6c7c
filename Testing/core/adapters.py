"""A LoRA adapter for tests: what a sam-lora run writes, with random non-zero LoRA so it changes the embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmabs_core.generalist.lora import add_lora, base_sha256, lora_layers, save_adapter
from fmabs_core.generalist.models import GENERALISTS


def write_adapter(path: Path, seed: int = 0) -> nn.Module:
    """A sam-lora-style adapter for LiteMedSAM (encoder LoRA only) at ``path``; returns the model it holds."""
    model = GENERALISTS["litemedsam"][1](None, True)
    add_lora(model.image_encoder, rank=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, layer in lora_layers(model):
            layer.lora_q_B.copy_(torch.randn(layer.lora_q_B.shape, generator=gen) * 0.05)
            layer.lora_v_B.copy_(torch.randn(layer.lora_v_B.shape, generator=gen) * 0.05)
    save_adapter(path, model, "litemedsam", base_sha256("litemedsam"),
                 extra_meta={"generalist": "litemedsam", "num_classes": 2}, heads=False)
    return model
