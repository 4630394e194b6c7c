"""Which number format and memory layout the generalist's encoder runs in, chosen per device.

Measured on LiteMedSAM (``fmabs bench precision``, LA scans, ground-truth-prompted slices, same box
jitter; CPU with AVX-512 BF16, 2 cores):

- bf16 autocast with channels-last: about 2x faster than fp32, but pseudo-label Dice moved by up to
  0.04 on one view (mean -0.006 to -0.009), even with the mask decoder kept in fp32 (it is, on the
  CPU: logits near 0 flip pixels); keeping the input convolution, the first stage or the neck in
  fp32 still left 0.01-0.02. It misses the 0.005 bar, so on the CPU bf16 is opt-in
  (``--generalist-dtype bfloat16``), never the default.
- fp32 with channels-last: faster than contiguous fp32 (oneDNN's blocked kernels without a layout
  conversion around each convolution), same precision: the CPU default. What else speeds the
  encoder up at equal numbers (folding, the allocator, OpenVINO) is in :mod:`~fmabs_core.generalist.runtime`.
- CUDA: bf16 autocast (fp16 on GPUs without bf16), as before; layout unchanged until measured.

``cpu_has_bf16`` says whether bf16 would be native here (x86 ``avx512_bf16``/``amx_bf16``, ARM
``bf16``); without it bf16 is emulated and much slower, and asking for it logs a warning.
"""


from __future__ import annotations

import functools
import logging
import os
import platform

import torch

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

#: CPU feature flags (``/proc/cpuinfo``) that mean native bf16 arithmetic
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: environment override of the detection (tests, odd platforms): "1" / "0"
ENV_CPU_BF16 = "FMABS_CPU_BF16"

_TABLE = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (x86 AVX-512 BF16 / AMX, or ARM's BF16 extension)."""
    env = os.environ.get(ENV_CPU_BF16)
    if env in ("0", "1"):
        return env == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)
    except OSError:  # macOS, Windows: no cheap reliable probe; keep fp32
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            if flags & set(_BF16_FLAGS) or (platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags):
                return True
    return False


def amp_dtype(device: torch.device, dtype: str | None) -> torch.dtype | None:
    """Autocast dtype for ``dtype`` ('auto', 'float32', 'bfloat16', 'float16') on ``device``; None = fp32.

    auto: bf16 on CUDA (fp16 on GPUs without bf16); fp32 on the CPU (see the module docstring).
    """
    key = (dtype or "auto").lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if key not in _TABLE:
        raise InputError(f"generalist dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if _TABLE[key] is torch.float16 and device.type == "cpu":
        raise InputError("float16 autocast is not supported on CPU; use float32 or bfloat16.")
    if _TABLE[key] is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        log.warning("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 autocast will be slow")
    return _TABLE[key]


LAYOUTS = ("auto", "channels_last", "contiguous")


def use_channels_last(device: torch.device, layout: str = "auto") -> bool:
    """Channels-last encoder input and weights: on the CPU by default (measured faster, same numbers)."""
    if layout not in LAYOUTS:
        raise InputError(f"generalist layout {layout!r} is not one of {', '.join(LAYOUTS)}.")
    return device.type == "cpu" if layout == "auto" else layout == "channels_last"


def describe(device: torch.device, amp: torch.dtype | None, channels_last: bool) -> str:
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    return name + ("+channels-last" if channels_last else "") + f" on {device.type}"
