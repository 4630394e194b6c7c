"""Turning a ``--device`` value into a torch device, with one set of checks for every command."""

from __future__ import annotations

import logging

import torch

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device | None, fallback: bool = True) -> torch.device:
    """``auto`` (or None) picks CUDA when present. Asking for CUDA without one falls back to the CPU
    with a warning when ``fallback`` (training, prediction), and is an error otherwise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if not fallback:
            raise InputError(f"device {str(name)!r} requested but no CUDA GPU is available; use --device cpu.")
        log.warning("CUDA was requested but is not available here: training on the CPU instead")
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev
