"""What runs the generalist's image encoder: PyTorch, or OpenVINO on the CPU.

The encoder is where the time goes (the prompt encoder and mask decoder are small), so only it has a
choice of runtime. Measured side by side, each config in its own process, LiteMedSAM on LA scans,
2 CPU cores with AVX-512 BF16/AMX; encoder throughput against fp32 as it ran before (``fmabs bench
precision --scans 1 --slices 2 --encoder-slices 40``, 2026-12-04; whole ground-truth-prompted
pseudo-labels, decoder included, in brackets, ``--scans 3 --slices 8``):

- ``torch``: conv + batch norm folded into one convolution (the same numbers to fp32 rounding) and
  glibc's allocator kept from unmapping each activation (:func:`fmabs_core.device.tune_cpu_allocator`),
  channels-last: 2.57x (2.23x), identical pseudo-labels.
- ``openvino`` fp32: 3.46x (2.88x), the same pseudo-labels but for pixels whose logit is within rounding of
  0 (at most 0.1 %, Testing/core/generalist/test_runtime.py); converting the encoder costs ~8 s once per
  process, paid back after about 45 slices (531 against 716 ms per slice); an optional dependency
  (``pip install openvino``, in the ``openvino`` extra), CPU only, two requests in flight.
- with ``--generalist-dtype bfloat16``: torch 4.4x, OpenVINO more, but pseudo-label Dice moved (mean
  -0.007 to -0.015, one view -0.03 to -0.04): see :mod:`~fmabs_core.generalist.precision`.
- not offered: ``torch.compile`` (inductor with freezing) was 1.17x the tuned torch encoder, same
  numbers, but took 53 s to compile per process; oneDNN's bf16 math mode for fp32 tensors
  (``torch.backends.mkldnn.*.fp32_precision = "bf16"``) changed neither the numbers nor the speed of
  this encoder in torch 2.14.

``auto`` picks OpenVINO where it pays: on the CPU, when the package is installed and the job will
encode at least :data:`OPENVINO_MIN_SLICES` slices (an FM-ABS training run knows its rounds' size);
otherwise torch, with no conversion and no extra dependency.
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


#: slices a job must encode for ``auto`` to choose OpenVINO on the CPU: its ~8 s conversion is paid
#: back after ~45 slices, so 200 leaves the gain clear of the measurement's noise
OPENVINO_MIN_SLICES = 200


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str | None, device: torch.device, expected_slices: int | None = None) -> str:
    """The runtime to use: ``auto`` is OpenVINO on the CPU when it is installed and ``expected_slices``
    (how many slices the job will encode; None: unknown) reaches :data:`OPENVINO_MIN_SLICES`, else
    torch. An explicit ``openvino`` is refused on a GPU."""
    key = (runtime or "auto").lower()
    if key not in RUNTIMES:
        raise InputError(f"generalist runtime {runtime!r} is not one of {', '.join(RUNTIMES)}.")
    if key == "auto":
        pays = expected_slices is not None and expected_slices >= OPENVINO_MIN_SLICES
        return "openvino" if device.type == "cpu" and pays and openvino_installed() else "torch"
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
