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
#: glibc's own starting thresholds (<malloc.h>: 128 KiB), restored by ``tune_cpu_allocator(False)``
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def tune_cpu_allocator(keep_heap: bool = True) -> bool:
    """Keep freed memory in glibc's heap instead of giving it back to the kernel after every tensor
    (``keep_heap=False``: glibc's starting thresholds again, for what fragments such a heap).

    Why: LiteMedSAM's first stage makes 67 MB activations (256 channels at 256 x 256); with glibc's
    defaults each is a fresh ``mmap`` whose pages fault in and are unmapped again, which measured
    ~30 % of the encoder's time as kernel time (``os.times``). Raising the mmap and trim thresholds
    (``mallopt``) removed it, with identical numbers. The cost: the process keeps its peak heap, and a
    heap that never unmaps fragments when many differently sized activations live at once (training the
    tiled generalist: :attr:`fmabs_core.methods.base.Method.cpu_allocator_tuning`).
    Process-wide; a no-op off glibc (macOS, Windows, musl) or with FMABS_CPU_TUNING=0. Returns whether
    the thresholds are raised now.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is None:
        _ALLOCATOR_TUNED = False
    if bool(keep_heap) == _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED
    import ctypes
    import platform

    if not cpu_tuning_enabled() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    value = 1 << 30 if keep_heap else _GLIBC_DEFAULT_THRESHOLD
    ok = bool(libc.mallopt(m_mmap_threshold, value)) and bool(libc.mallopt(m_trim_threshold, value))
    if ok:
        _ALLOCATOR_TUNED = bool(keep_heap)
        if not keep_heap:
            libc.malloc_trim(0)  # give back what the tuned heap kept
    log.debug("glibc malloc thresholds %s: %s", "raised" if keep_heap else "restored", ok)
    return _ALLOCATOR_TUNED
