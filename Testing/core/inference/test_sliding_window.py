"""Sliding windows as the references run them: per-axis steps (18 x 18 x 4 on LA), and each window's softmax
averaged plainly (UA-MT's and FM-ABS's ``test_single_case``: ``score_map += softmax(net(patch))``, ``cnt += 1``,
``score_map / cnt``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fmabs_core.errors import InputError
from fmabs_core.inference.predict import (REFERENCE_STRIDE_LA, InferenceConfig, check_inference_config,
                                          overlap_for_stride, predict_proba, window_overlap)


def test_overlap_for_stride_gives_monai_exactly_that_step():
    for patch in [(112, 112, 80), (96, 96, 96), (48, 48, 32), (80, 64, 16)]:
        for stride in [(18, 18, 4), (1, 1, 1), (7, 13, 3), (16, 16, 16)]:
            if any(s > p for s, p in zip(stride, patch)):
                continue
            ov = overlap_for_stride(patch, stride)
            assert [int(p * (1 - o)) for p, o in zip(patch, ov)] == list(stride)  # MONAI's step rule
    assert window_overlap(InferenceConfig(stride=REFERENCE_STRIDE_LA), (112, 112, 80)) == overlap_for_stride(
        (112, 112, 80), (18, 18, 4))
    with pytest.raises(InputError, match="--stride"):
        overlap_for_stride((16, 16, 16), (20, 1, 1))


def _reference_loop(net: nn.Module, image: np.ndarray, patch: tuple[int, int, int],
                    stride: tuple[int, int, int], average_logits: bool = False) -> np.ndarray:
    """The references' rule written out: window starts ``min(step * i, size - patch)``, the softmax of each
    window added into a score map with a count per voxel, the map divided by the count.
    ``average_logits``: the rule we had before (windows' logits averaged, one softmax at the end)."""
    starts = [[min(s * i, n - p) for i in range(int(np.ceil((n - p) / s)) + 1)]
              for n, p, s in zip(image.shape, patch, stride)]
    score, cnt = None, np.zeros(image.shape, np.float32)
    with torch.no_grad():
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    window = torch.from_numpy(image[x:x + patch[0], y:y + patch[1], z:z + patch[2]])[None, None]
                    out = net(window)
                    prob = (out if average_logits else torch.softmax(out, dim=1))[0].numpy()
                    if score is None:
                        score = np.zeros((prob.shape[0],) + image.shape, np.float32)
                    score[:, x:x + patch[0], y:y + patch[1], z:z + patch[2]] += prob
                    cnt[x:x + patch[0], y:y + patch[1], z:z + patch[2]] += 1
    mean = score / cnt
    return torch.softmax(torch.from_numpy(mean), 0).numpy() if average_logits else mean


def _confident_net() -> nn.Module:
    """A small random network with large, window-dependent logits: averaging logits and averaging
    probabilities then disagree visibly (a saturated window would outvote the others)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv3d):
                m.weight.mul_(8)
    return net.eval()


class _WindowMean(nn.Module):
    """Logits constant over a window, scaled by the window's mean intensity: windows disagree strongly."""

    def forward(self, x):
        m = 6 * x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
        return torch.cat([torch.zeros_like(x), m, -m], 1)


@pytest.mark.parametrize("net", [_confident_net(), _WindowMean()], ids=["conv", "window-mean"])
def test_windows_probabilities_are_averaged_as_the_references_do(net):
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(40, 36, 20)) + np.linspace(-2, 2, 40)[:, None, None]).astype(np.float32)
    patch, stride = (16, 16, 8), (6, 5, 3)
    want = _reference_loop(net, image, patch, stride)
    got = predict_proba(net, image, patch, overlap_for_stride(patch, stride), normalise=False, mode="constant")
    np.testing.assert_allclose(got, want, atol=2e-5)
    # the rule matters on this input: averaging logits (our rule before) lands far from the references'
    averaged_logits = _reference_loop(net, image, patch, stride, average_logits=True)
    assert np.abs(averaged_logits - want).max() > 0.05


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_gaussian_mode_weights_window_centres(mode):
    image = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None] ** 2 / 300, (32, 16, 16)).copy()
    ov = overlap_for_stride((16, 16, 16), (4, 16, 16))  # windows at x = 0, 4, ..., 16
    plain = _reference_loop(_WindowMean(), image, (16, 16, 16), (4, 16, 16))
    got = predict_proba(_WindowMean(), image, (16, 16, 16), ov, normalise=False, mode=mode)
    if mode == "constant":
        np.testing.assert_allclose(got, plain, atol=2e-5)
    else:  # the Gaussian weights favour each window's centre: not the plain mean
        assert not np.allclose(got[:, :, 8, 8], plain[:, :, 8, 8], atol=1e-3)


def test_inference_options_are_checked():
    check_inference_config(InferenceConfig(overlap=(0.5, 0.5, 0.9)))
    for cfg, word in [(InferenceConfig(overlap=(0.5, 1.2, 0.1)), "--overlap"), (InferenceConfig(mode="max"), "--blend"),
                      (InferenceConfig(stride=(0, 1, 1)), "--stride")]:
        with pytest.raises(InputError, match=word):
            check_inference_config(cfg)


def test_a_scan_normalised_in_place_segments_as_before():
    """What `fmabs predict` does to hold a large scan once (z-score in the scan's own memory, the class map
    slab by slab in uint8) gives the same probabilities and labels, bit for bit, as normalising a copy and
    numpy's argmax."""
    from fmabs_core.data.intensity import zscore
    from fmabs_core.inference.predict import class_map

    rng = np.random.default_rng(1)
    raw = (rng.normal(300.0, 80.0, size=(40, 36, 37)) + np.linspace(-90, 90, 40)[:, None, None]).astype(np.float32)
    net = _confident_net()
    want = predict_proba(net, raw, (16, 16, 8), 0.5)  # normalises a copy
    mine = raw.copy()
    assert zscore(mine, inplace=True) is mine
    got = predict_proba(net, mine, (16, 16, 8), 0.5, normalise=False)
    assert np.array_equal(got, want)
    assert np.array_equal(class_map(got, slab=5), want.argmax(0).astype(np.uint8))
    assert class_map(got).dtype == np.uint8


def test_float16_accumulation_is_close_and_says_so():
    """--accumulate float16 (very large scans): probabilities within 0.01 of the references' float32 mean (the scan
    and the sums are rounded to float16), labels the same but where two classes nearly tie; an unknown format is
    refused by name."""
    from fmabs_core.inference.predict import class_map

    rng = np.random.default_rng(2)
    image = (rng.normal(size=(40, 36, 24)) + np.linspace(-2, 2, 40)[:, None, None]).astype(np.float32)
    net = _confident_net()
    want = predict_proba(net, image, (16, 16, 8), 0.5, normalise=False)
    got = predict_proba(net, image, (16, 16, 8), 0.5, normalise=False, accumulate="float16")
    assert got.dtype == np.float16 and want.dtype == np.float32
    assert np.abs(got.astype(np.float32) - want).max() < 1e-2  # a network made very sensitive to its input
    differ = class_map(got) != class_map(want)
    top2 = np.sort(want, axis=0)[-2:]
    assert differ.mean() < 0.002 and (top2[1] - top2[0])[differ].max(initial=0) < 1e-2  # only near-ties
    with pytest.raises(InputError, match="--accumulate float64"):
        predict_proba(net, image, (16, 16, 8), 0.5, accumulate="float64")
