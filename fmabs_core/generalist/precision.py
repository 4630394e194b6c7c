"""Which number format and memory layout the generalist's encoder runs in, chosen per device.

Why bf16 on CPUs too: on CPUs with AVX-512 BF16 or AMX, oneDNN runs TinyViT's convolutions and
matrix products in bf16 several times faster than in fp32 (LiteMedSAM's encoder: bf16 autocast
2.3x, bf16 with channels-last 4.6x on the project's build machines; about 2x on 2 busy cores),
with embeddings within ~3 % relative error and pseudo-label Dice within 0.005 of fp32 (``fmabs
bench precision``). On a CPU without native bf16 the same autocast is emulated and much slower,
so there the default stays fp32. Channels-last is what lets oneDNN pick its blocked bf16 kernels
without a layout conversion around every convolution; in fp32 it measured no gain, so it is only
switched on together with bf16 on the CPU.
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

    auto: bf16 on CUDA (fp16 on GPUs without bf16), bf16 on CPUs with native bf16, else fp32.
    """
    key = (dtype or "auto").lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if key not in _TABLE:
        raise InputError(f"generalist dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if _TABLE[key] is torch.float16 and device.type == "cpu":
        raise InputError("float16 autocast is not supported on CPU; use float32 or bfloat16.")
    return _TABLE[key]


def use_channels_last(device: torch.device, amp: torch.dtype | None) -> bool:
    """Channels-last encoder input and weights: with bf16 on the CPU (measured: the layout matters there)."""
    return device.type == "cpu" and amp is torch.bfloat16


def describe(device: torch.device, amp: torch.dtype | None, channels_last: bool) -> str:
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    return name + ("+channels-last" if channels_last else "") + f" on {device.type}"
