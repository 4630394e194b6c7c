"""The process-group backend: NCCL when each rank has its own GPU, gloo when ranks share one or run
on the CPU, and a one-line refusal of a bad override. (The CUDA branch of ``init`` itself needs a
GPU; only this choice runs here.)"""

from __future__ import annotations

import pytest
import torch

from fmabs_core.errors import InputError
from fmabs_core.training.distributed import BACKEND_ENV, choose_backend

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_nccl_only_when_every_rank_has_a_gpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert choose_backend(CUDA, local_world_size=2, gpu_count=2) == "nccl"
    assert choose_backend(CUDA, local_world_size=1, gpu_count=8) == "nccl"
    # two ranks on one GPU: NCCL would refuse them ("Duplicate GPU detected")
    assert choose_backend(CUDA, local_world_size=2, gpu_count=1) == "gloo"
    assert choose_backend(CPU, local_world_size=2, gpu_count=0) == "gloo"


def test_backend_override_and_its_refusals(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "GLOO")
    assert choose_backend(CUDA, local_world_size=1, gpu_count=1) == "gloo"
    monkeypatch.setenv(BACKEND_ENV, "nccl")
    assert choose_backend(CUDA, local_world_size=2, gpu_count=1) == "nccl"  # the user asked for it
    with pytest.raises(InputError, match="needs --device cuda"):
        choose_backend(CPU, local_world_size=2, gpu_count=0)
    monkeypatch.setenv(BACKEND_ENV, "mpi")
    with pytest.raises(InputError, match=f"{BACKEND_ENV}='mpi'.*use nccl or gloo"):
        choose_backend(CUDA, local_world_size=1, gpu_count=1)
