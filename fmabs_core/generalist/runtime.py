"""What runs the generalist's image encoder: PyTorch, or OpenVINO on the CPU.

The encoder is where the time goes (the prompt encoder and mask decoder are small), so only it has a
choice of runtime. Measured side by side, each config in its own process (``fmabs bench precision
--scans 3 --slices 8 --encoder-slices 8``: 3 LA scans, 72 ground-truth-prompted slices, LiteMedSAM,
2 CPU cores with AVX-512 BF16/AMX); encoder time per slice against fp32 as it ran before:

- ``torch`` (default): conv + batch norm folded into one convolution (the same numbers to fp32
  rounding) and glibc's allocator kept from unmapping each activation
  (:func:`fmabs_core.device.tune_cpu_allocator`), channels-last: 2.45x, identical pseudo-labels.
- ``openvino`` fp32: 2.75x, identical pseudo-labels; converting the encoder costs ~9 s once per
  process, so it pays from a few dozen slices on; an optional dependency (``pip install openvino``),
  CPU only, two requests in flight (1.15x over one at a time).
- with ``--generalist-dtype bfloat16``: torch 3.4x, OpenVINO 4.6x, but pseudo-label Dice moved (mean
  -0.007, one view -0.04): see :mod:`~fmabs_core.generalist.precision`.
- not offered: ``torch.compile`` (inductor with freezing) was 1.17x the tuned torch encoder, same
  numbers, but took 53 s to compile per process; OpenVINO gives as much for 9 s.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")

Encoder = Callable[[torch.Tensor], torch.Tensor]


def resolve_runtime(runtime: str | None, device: torch.device) -> str:
    """``auto`` is ``torch`` (no conversion cost, no extra dependency); ``openvino`` only on the CPU."""
    key = (runtime or "auto").lower()
    if key not in RUNTIMES:
        raise InputError(f"generalist runtime {runtime!r} is not one of {', '.join(RUNTIMES)}.")
    if key == "auto":
        return "torch"
    if key == "openvino" and device.type != "cpu":
        raise InputError(f"--generalist-runtime openvino runs on the CPU only; the device is {device}. "
                         "Use --generalist-runtime torch (or auto) on a GPU.")
    return key


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold each ``Sequential(Conv2d, BatchNorm2d)`` of a frozen, eval-mode module into one convolution.

    TinyViT (LiteMedSAM, MobileSAM) wraps most convolutions this way; in eval mode the batch norm is an
    affine map, so folding it changes nothing but rounding and saves one pass over 67 MB activations.
    Returns how many pairs were folded (0 for ViT encoders, which have none).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for name, child in list(module.named_children()):
        parts = list(child.children()) if isinstance(child, nn.Sequential) else []
        if (len(parts) == 2 and type(parts[0]) is nn.Conv2d and type(parts[1]) is nn.BatchNorm2d
                and not child.training and parts[1].track_running_stats):
            setattr(module, name, fuse_conv_bn_eval(parts[0], parts[1]))
            folded += 1
        else:
            folded += fuse_conv_bn(child)
    return folded


class OpenVINOEncoder:
    """The encoder converted to OpenVINO and compiled for this CPU's throughput: one slice per request,
    as many requests in flight as OpenVINO's streams (one per core or pair of cores).

    Batch 1 is what the conversion supports (TinyViT reshapes with traced sizes); parallel requests
    measured 1.15x the single-request latency mode on 2 cores, so callers pass several slices at once
    (:attr:`batch_slices`).
    """

    #: slices per call that keep every stream busy
    batch_slices = 8

    def __init__(self, encoder: nn.Module, image_size: int, bf16: bool) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise InputError("--generalist-runtime openvino needs the openvino package: "
                             "pip install openvino (or choose --generalist-runtime torch).") from None
        example = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about TinyViT's shape asserts: sizes are fixed here
            converted = ov.convert_model(encoder, example_input=example)
        hint = "bf16" if bf16 else "f32"
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                              "PERFORMANCE_HINT": "THROUGHPUT"})
        self._queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._results: dict[int, np.ndarray] = {}
        self._queue.set_callback(self._keep)
        self.precision = hint
        log.info("generalist encoder converted to OpenVINO (%s, %d requests in flight)", hint, len(self._queue))

    def _keep(self, request, index: int) -> None:
        self._results[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().float().contiguous().cpu().numpy()
        self._results.clear()
        for i, one in enumerate(batch):
            self._queue.start_async({0: one[None]}, i)
        self._queue.wait_all()
        return torch.from_numpy(np.concatenate([self._results[i] for i in range(len(batch))], 0))


def make_encoder(encoder: nn.Module, device: torch.device, runtime: str, image_size: int,
                 amp: torch.dtype | None) -> Encoder:
    """The callable that embeds a preprocessed ``N x 3 x S x S`` batch with ``runtime`` (resolved)."""
    from fmabs_core.device import cpu_tuning_enabled, tune_cpu_allocator

    if device.type == "cpu" and cpu_tuning_enabled():
        tune_cpu_allocator()
        fuse_conv_bn(encoder)
    if runtime == "openvino":
        return OpenVINOEncoder(encoder, image_size, bf16=amp is torch.bfloat16)
    return encoder
