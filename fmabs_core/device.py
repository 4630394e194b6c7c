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


#: "0": none of the CPU tuning (allocator thresholds here, conv + batch-norm folding in the generalist's
#: encoder): the code as it ran before, for benchmarks and bisecting
ENV_CPU_TUNING = "FMABS_CPU_TUNING"


def cpu_tuning_enabled() -> bool:
    import os

    return os.environ.get(ENV_CPU_TUNING) != "0"
_ALLOCATOR_TUNED: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of giving it back to the kernel after every tensor.

    Why: LiteMedSAM's first stage makes 67 MB activations (256 channels at 256 x 256); with glibc's
    defaults each is a fresh ``mmap`` whose pages fault in and are unmapped again, which measured
    ~30 % of the encoder's time as kernel time (``os.times``). Raising the mmap and trim thresholds
    (``mallopt``) removed it, with identical numbers. The cost: the process keeps its peak heap.
    Process-wide and once; a no-op off glibc (macOS, Windows, musl) or with FMABS_CPU_TUNING=0.
    Returns whether the thresholds are set.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    import ctypes
    import platform

    _ALLOCATOR_TUNED = False
    if not cpu_tuning_enabled() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    big = 1 << 30
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))
    log.debug("glibc malloc thresholds raised: %s", _ALLOCATOR_TUNED)
    return _ALLOCATOR_TUNED
