"""How many slices an FM-ABS run expects to encode: what decides whether OpenVINO's one-off conversion pays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fmabs_core.methods.fmabs import FMABS, FMABSConfig


def _tr(shapes, iterations=100, world_size=1):
    cases = [SimpleNamespace(image=np.zeros(s, np.float32)) for s in shapes]
    return SimpleNamespace(train_cases=cases, cfg=SimpleNamespace(iterations=iterations),
                           dist=SimpleNamespace(world_size=world_size))


def _method(warmup=10, every=20, stop=80, **options):
    m = FMABS(FMABSConfig(**options))
    m.warmup, m.every, m.stop = warmup, every, stop  # rounds at 10, 30, 50, 70: four
    return m


def test_expected_encodes_counts_rounds_scans_and_capped_slices():
    tr = _tr([(40, 30, 20)] * 10)  # 90 slices over the three views per scan
    # no cache: every round encodes its scans again (4 rounds x 2 scans x 3 views x 5 slices)
    assert _method(pseudo_max_cases=2, pseudo_max_slices=5, embedding_cache="off").expected_encodes(tr) == 120
    # with the cache a slice is encoded once: never more than all slices of all scans (10 x 90)
    assert _method(embedding_cache="auto").expected_encodes(tr) == 900
    assert _method(embedding_cache="off").expected_encodes(tr) == 3600
    # ranks share the scans
    assert _method(embedding_cache="auto").expected_encodes(_tr([(40, 30, 20)] * 10, world_size=2)) == 450
    # no round before the end: nothing to encode
    assert _method(warmup=100, every=20, stop=80).expected_encodes(tr) == 0
    assert _method().expected_encodes(_tr([])) == 0
