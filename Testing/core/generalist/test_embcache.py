"""The embedding cache: each slice encoded once per run, LRU under a bound, a file tier that survives
a restart only where its bytes still match (real LiteMedSAM for the rounds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmabs_core.errors import InputError
from fmabs_core.generalist import get_generalist
from fmabs_core.generalist.embcache import EmbeddingCache, encode_cached, scan_digest
from fmabs_core.generalist.pseudolabel import multiview_pseudolabel

SHAPE = (4, 8, 8)  # one slice's embedding, small
SLOT_GB = 4 * 8 * 8 * 2 / 2**30  # one fp16/bf16 slot in GB


def _emb(i: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))


def test_lru_eviction_under_a_bound():
    cache = EmbeddingCache("cpu", capacity_gb=3 * SLOT_GB, tier="host", dtype="float16")
    for i in range(3):
        cache.put(f"k{i}", _emb(i))
    assert cache.get("k0") is not None  # k0 now most recently used: k1 is the oldest
    cache.put("k3", _emb(3))
    assert cache.get("k1") is None and cache.get("k0") is not None and cache.get("k3") is not None
    assert len(cache) == 3 and cache.evictions == 1 and cache.tier == "host"


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                ("float32", torch.float32)])
def test_put_returns_what_get_returns(dtype, torch_dtype):
    """A slice just encoded decodes from the stored precision too: hit or miss, the same numbers."""
    cache = EmbeddingCache("cpu", tier="host", dtype=dtype)
    x = _emb(0)
    out = cache.put("a", x)
    got = cache.get("a")
    assert torch.equal(out, got) and got.dtype == torch.float32
    assert torch.equal(got, x.to(torch_dtype).float())


def test_auto_dtype_follows_the_encoder():
    assert EmbeddingCache("cpu", compute_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert EmbeddingCache("cpu", compute_dtype=None).dtype == torch.float16


def test_bad_options_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="tier 'gpu'"):
        EmbeddingCache("cpu", tier="gpu")
    with pytest.raises(InputError, match="bound must be > 0"):
        EmbeddingCache("cpu", capacity_gb=0)
    with pytest.raises(InputError, match="needs a folder"):
        EmbeddingCache("cpu", tier="disk")


def test_file_tier_reused_after_restart_only_where_bytes_match(tmp_path):
    def open_cache():
        c = EmbeddingCache("cpu", capacity_gb=4 * SLOT_GB, tier="disk", dtype="bfloat16", folder=tmp_path, name="e")
        c.expect(4)
        return c

    first = open_cache()
    stored = {f"k{i}": first.put(f"k{i}", _emb(i)) for i in range(3)}
    first.close()  # flushes the index
    again = open_cache()
    again.put("warm", _emb(9))  # the first put opens the file (layout known)
    assert torch.equal(again.get("k0"), stored["k0"]) and again.hits == 1
    # a torn or stale slot: its digest no longer matches, so it is re-encoded, not trusted
    index = json.loads((tmp_path / "e.json").read_text())
    slot = index["entries"]["k1"][0]
    data = np.memmap(tmp_path / "e.bin", dtype=np.int16, mode="r+", shape=(4, int(np.prod(SHAPE))))
    data[slot, :5] += 1
    data.flush()
    del data
    again.close()
    third = open_cache()
    third.put("warm2", _emb(8))
    assert third.get("k1") is None and torch.equal(third.get("k2"), stored["k2"])


def test_file_tier_with_another_layout_starts_afresh(tmp_path):
    c = EmbeddingCache("cpu", capacity_gb=2 * SLOT_GB, tier="disk", dtype="bfloat16", folder=tmp_path, name="e")
    c.put("a", _emb(0))
    c.close()
    other = EmbeddingCache("cpu", capacity_gb=2 * SLOT_GB, tier="disk", dtype="float16", folder=tmp_path, name="e")
    other.put("b", _emb(1))
    assert other.get("a") is None and other.get("b") is not None


def test_encode_cached_encodes_only_misses():
    calls: list[int] = []

    def encode(slices: np.ndarray) -> torch.Tensor:
        calls.append(len(slices))
        return torch.from_numpy(slices[:, None].repeat(4, 1).astype(np.float32))

    slices = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    cache = EmbeddingCache("cpu", tier="host", dtype="float32")
    a = encode_cached(cache, encode, slices, [1, 3], ["s1", "s3"])
    b = encode_cached(cache, encode, slices, [0, 1, 3], ["s0", "s1", "s3"])
    assert calls == [2, 1] and torch.equal(a, b[1:])


def test_scan_digest_tracks_content():
    a = np.zeros((4, 4, 4), np.float32)
    b = a.copy()
    b[1, 2, 3] = 1e-6
    assert scan_digest(a) == scan_digest(a.copy()) != scan_digest(b)
    assert scan_digest(a) != scan_digest(a.reshape(2, 8, 4))


# ---------------------------------------------------------------- real LiteMedSAM, two rounds
def _blob(shape=(40, 36, 24)):
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    obj = ((x - 20) / 9) ** 2 + ((y - 17) / 8) ** 2 + ((z - 12) / 6) ** 2 <= 1
    img = (obj * 3.0 + np.random.default_rng(0).normal(0, 0.2, shape)).astype(np.float32)
    return img, obj.astype(np.uint8)


@pytest.mark.slow
def test_second_round_decodes_only_and_matches_an_uncached_round(tmp_path):
    g = get_generalist("litemedsam", device="cpu", dtype="float32")
    img, obj = _blob()
    kw = dict(fusion="mv", max_slices_per_view=2)
    cache = EmbeddingCache("cpu", tier="disk", dtype="float32", folder=tmp_path, name="emb")
    enc0 = g.encoded_slices
    multiview_pseudolabel(g, img, obj, np.random.default_rng(1), cache=cache, **kw)
    assert g.encoded_slices - enc0 == 6
    enc1 = g.encoded_slices
    cached = multiview_pseudolabel(g, img, obj, np.random.default_rng(2), cache=cache, **kw)  # new box jitter
    assert g.encoded_slices == enc1 and cache.hits == 6  # the second round only decodes
    plain = multiview_pseudolabel(g, img, obj, np.random.default_rng(2), **kw)
    for key in ("axial", "coronal", "sagittal", "fused"):
        np.testing.assert_array_equal(cached[key], plain[key])  # fp32 storage: bit-identical embeddings
