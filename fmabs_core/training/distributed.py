"""Data-parallel training across GPUs and machines (``torchrun``), and helpers the methods share.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init` reads them and joins the
process group (NCCL on CUDA, gloo on CPU). Without them everything here is a cheap no-op, so the
engine and the methods call these helpers unconditionally and a single process behaves as before.

Conventions (see docs/events.md, "Distributed runs"):

- the global batch is ``--batch-size``; each rank trains on its share (:func:`split_batch`);
- only rank 0 writes events, status, checkpoints, pseudo-labels and the model;
- work that is per scan (generalist pseudo-labels, validation) can be split with :func:`shard` and
  the results collected on every rank with :func:`all_gather_object`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: minutes a collective may wait for the slowest rank (rank 0 validating big scans, say)
TIMEOUT_ENV = "FMABS_DDP_TIMEOUT_MIN"
#: forces the process-group backend (``nccl`` or ``gloo``); see :func:`choose_backend`
BACKEND_ENV = "FMABS_DDP_BACKEND"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``world_size == 1`` means not distributed."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The job layout from the ``torchrun`` environment (1 process when the variables are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world > 1 and not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistInfo(world, rank, local)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """The current layout: from the process group when joined, else from the environment."""
    if is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return env_info()


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def is_main() -> bool:
    return info().is_main


def choose_backend(device: torch.device, local_world_size: int, gpu_count: int) -> str:
    """The process-group backend: NCCL when every rank on a node has a GPU of its own, else gloo.

    NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so ranks that share a GPU talk
    through gloo, which copies CUDA tensors through the host for all-reduce and broadcast (what
    DDP needs). ``FMABS_DDP_BACKEND=nccl|gloo`` overrides the choice.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in ("nccl", "gloo"):
            raise InputError(f"{BACKEND_ENV}={forced!r} is not a backend: use nccl or gloo, or unset it")
        if forced == "nccl" and device.type != "cuda":
            raise InputError(f"{BACKEND_ENV}=nccl needs --device cuda: NCCL has no CPU transport")
        return forced
    if device.type != "cuda":
        return "gloo"
    return "nccl" if local_world_size <= gpu_count else "gloo"


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun``; returns the layout and this rank's device.

    On CUDA each rank uses ``cuda:LOCAL_RANK`` (the index given with ``--device cuda:N`` is ignored
    because ``torchrun`` decides the placement); with more ranks per node than GPUs they share GPUs
    round-robin over gloo (see :func:`choose_backend`). On CPU all ranks use the CPU and gloo.
    """
    layout = env_info()
    if not layout.enabled:
        return layout, device
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(layout.world_size)))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    backend = choose_backend(device, local_world, gpus)
    if device.type == "cuda":
        if local_world > gpus:
            log.warning("rank %d: %d processes per node share %d GPU(s) (cuda:%d); they use gloo, as NCCL "
                        "refuses two ranks on one GPU", layout.rank, local_world, gpus, layout.local_rank % gpus)
        device = torch.device("cuda", layout.local_rank % gpus)
        torch.cuda.set_device(device)
    if not is_initialized():
        minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=minutes)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        log.info("rank %d of %d joined the process group (%s, device %s)", layout.rank, layout.world_size,
                 backend, device)
    return layout, device


def shutdown() -> None:
    """Leave the process group (end of a run); harmless when not distributed."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``.

    Round-robin rather than contiguous blocks so that shares differ by at most one item and the
    original order is ``[x for group in zip(*all_shares) for x in group]``.
    """
    layout = info()
    return list(items)[layout.rank :: layout.world_size]


def all_gather_object(obj: T) -> list[T]:
    """``[obj from rank 0, obj from rank 1, ...]`` on every rank; ``[obj]`` without a process group.

    Pickles through the backend: fine for dicts of floats or uint8 label volumes, not for big
    float tensors every step.
    """
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (e.g. an EMA teacher
    whose BatchNorm statistics drifted apart because each rank saw different patches)."""
    if not is_initialized():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (EMA, saving, validation use it)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself.

    Over NCCL, BatchNorm becomes SyncBatchNorm so that its statistics are those of the global batch
    (as in a single-process run); gloo has no SyncBatchNorm (CPU runs, ranks sharing a GPU), so there
    each rank normalises its own share (``--norm instance`` makes such runs match a single process).
    """
    if not is_initialized():
        return model
    if device.type == "cuda" and dist.get_backend() == "nccl":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        log.warning("distributed run over gloo with BatchNorm: each rank normalises its own share of the batch")
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return nn.parallel.DistributedDataParallel(model)


def split_batch(batch_size: int, labelled_bs: int) -> tuple[list[int], int]:
    """Indices of the global batch that this rank trains on, and how many of them are labelled.

    The global batch is ``labelled_bs`` labelled patches followed by unlabelled ones; each rank gets
    an equal share of both kinds so that every rank's loss has the same terms as a single process.
    """
    layout = info()
    n = layout.world_size
    unlabelled = batch_size - labelled_bs
    if labelled_bs % n or unlabelled % n:
        raise InputError(
            f"--batch-size {batch_size} with {labelled_bs} labelled patches cannot be split evenly over "
            f"{n} processes: make both the labelled and the unlabelled counts multiples of {n}")
    lab, unl = labelled_bs // n, unlabelled // n
    r = layout.rank
    indices = list(range(r * lab, (r + 1) * lab)) + list(range(labelled_bs + r * unl, labelled_bs + (r + 1) * unl))
    return indices, lab


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (a cancel seen by one rank stops all)."""
    if not is_initialized():
        return flag
    return any(all_gather_object(bool(flag)))


def mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over ranks' loss logs (keys missing on a rank are averaged over the others)."""
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return {k: sum(float(d[k]) for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in keys}
