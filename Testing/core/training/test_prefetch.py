"""Batches prepared on a background thread are exactly the batches the loop's thread would draw,
also when something draws from the sampler's generator or changes the data in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmabs_core.training.api import Hook
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig
from fmabs_core.training.prefetch import BatchPrefetcher
from fmabs_core.training.sampler import Case, PatchSampler


def _sampler(seed: int = 0) -> PatchSampler:
    rng = np.random.default_rng(42)  # the same cases for every sampler of a test
    cases = []
    for i in range(3):
        target = np.full((20, 20, 20), 255, np.uint8)
        target[:, :, 10] = (rng.random((20, 20)) > 0.5).astype(np.uint8)
        cases.append(Case(f"c{i}", rng.random((20, 20, 20)).astype(np.float32), target))
    unl = [Case("u", rng.random((20, 20, 20)).astype(np.float32))]
    return PatchSampler(cases, unl, (8, 8, 8), batch_size=3, labelled_bs=2, seed=seed)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetched_batches_equal_drawn_ones_through_draws_and_data_changes():
    plain, ahead = _sampler(), _sampler()
    pf = BatchPrefetcher()
    try:
        for step in range(8):
            if step == 3:  # a hook draws from the generator between steps (FM-ABS picks a round's scans)
                for s in (plain, ahead):
                    s.rng.choice(4, 2, replace=False)
            if step == 5:  # a round replaces a scan's pseudo-label
                for s in (plain, ahead):
                    s.unlabelled[0].pseudo = np.ones((20, 20, 20), np.uint8)
            assert _equal(plain.next_batch(), pf.next(ahead)), f"batch {step} differs"
            assert plain.rng.bit_generator.state == ahead.rng.bit_generator.state
    finally:
        pf.close()
    assert pf.dropped == 2 and pf.used == 5  # the two changed steps were drawn again, the others used


class DrawAndRelabel(Hook):
    """At one iteration: draw from the sampler's generator and give a scan a new pseudo-label."""

    def before_step(self, tr, it):
        if it == 3:
            tr.sampler.rng.integers(0, 10)
            case = tr.train_cases[-1]
            case.pseudo = (case.image > case.image.mean()).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_training_with_prefetch_is_bitwise_the_same(project):
    cfg = TrainConfig(method="mt", iterations=6, seed=2, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                      labelled_bs=1, net=NetConfig(width=4, dropout=0.2, out_channels=2), val_every=100,
                      ckpt_every=100)
    models = {}
    for run, prefetch in (("plain", False), ("ahead", True)):
        tr = Trainer(project, run, cfg)
        tr.prefetch = prefetch
        tr.hooks.append(DrawAndRelabel())
        models[run] = torch.load(tr.train().raise_for_failure().model, weights_only=True)["state_dict"]
        if prefetch:
            stats = tr._batches.stats()
            assert stats["prefetched"] >= 4 and stats["dropped"] == 1
    assert all(torch.equal(models["plain"][k], models["ahead"][k]) for k in models["plain"])
