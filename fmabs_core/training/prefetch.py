"""The next training batch, cut out on a background thread while the current step computes.

Why speculative: patch sampling is driven by one checkpointed generator, and hooks between steps
may draw from it (FM-ABS picks a round's scans with it) or change the data (new pseudo-labels,
new cross-labels). So the thread samples from a *copy* of the generator, and the batch is used
only if, when the step asks for it, the real generator is still in the state the copy started
from and the data are the same objects; the real generator then jumps to the copy's end state.
Otherwise the batch is dropped and drawn again on the loop's thread. Either way the batch and the
generator's state are exactly those of drawing on the loop's thread: runs stay bitwise resumable.

On CUDA the batch is put in pinned memory, so its copy to the GPU (``non_blocking``) overlaps too.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def _data_signature(sampler: Any) -> tuple:
    """What a batch depends on besides the generator: the pools, their arrays (by identity), the split."""
    cases = [*sampler.labelled, *sampler.unlabelled]
    return (tuple(id(c) for c in sampler.labelled), tuple(id(c) for c in sampler.unlabelled),
            tuple((id(c.image), id(c.target), id(c.pseudo)) for c in cases),
            sampler.batch_size, sampler.labelled_bs, tuple(sampler.keep) if sampler.keep is not None else None,
            sampler.augment, tuple(sampler.patch))


class BatchPrefetcher:
    """``next(sampler)``: the sampler's next batch, prepared ahead when nothing changed in between."""

    def __init__(self, pin_memory: bool = False, enabled: bool = True) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmabs-batches") if enabled else None
        self._pending: tuple[Future, Any, dict, tuple, tuple] | None = None
        self.sample_s: list[float] = []  # seconds to make each batch (on whichever thread made it)
        self.wait_s: list[float] = []  # seconds the loop waited for each batch
        self.used = self.dropped = 0

    def _make(self, sampler: Any) -> tuple[dict[str, torch.Tensor], dict, float]:
        t0 = time.perf_counter()
        batch = sampler.next_batch()
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, sampler.rng.bit_generator.state, time.perf_counter() - t0

    def _speculate(self, sampler: Any) -> None:
        start = sampler.rng.bit_generator.state
        spec = copy.copy(sampler)
        spec.labelled, spec.unlabelled = list(sampler.labelled), list(sampler.unlabelled)
        spec.rng = np.random.Generator(type(sampler.rng.bit_generator)())
        spec.rng.bit_generator.state = start
        # references to the arrays are kept in the signature's owner tuple so their ids stay unique
        keep_alive = tuple((c.target, c.pseudo) for c in (*sampler.labelled, *sampler.unlabelled))
        self._pending = (self._pool.submit(self._make, spec), sampler, start, _data_signature(sampler), keep_alive)

    def next(self, sampler: Any) -> dict[str, torch.Tensor]:
        """The batch ``sampler.next_batch()`` would give now (and its generator advanced alike)."""
        t0 = time.perf_counter()
        batch = None
        if self._pending is not None:
            future, owner, start, signature, _alive = self._pending
            self._pending = None
            made, end, seconds = future.result()  # also waits for a batch that is then dropped
            if owner is sampler and sampler.rng.bit_generator.state == start and _data_signature(sampler) == signature:
                sampler.rng.bit_generator.state = end
                batch = made
                self.used += 1
                self.sample_s.append(seconds)
            else:
                self.dropped += 1
        if batch is None:
            batch, _end, seconds = self._make(sampler)
            self.sample_s.append(seconds)
        self.wait_s.append(time.perf_counter() - t0)
        if self.enabled:
            self._speculate(sampler)
        return batch

    def stats(self) -> dict[str, float]:
        n = max(1, len(self.wait_s))
        return {"sample_s": float(np.mean(self.sample_s)) if self.sample_s else 0.0, "wait_s": sum(self.wait_s) / n,
                "prefetched": self.used, "dropped": self.dropped}

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].cancel()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.enabled = False
