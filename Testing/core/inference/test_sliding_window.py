"""Sliding windows as the references run them: per-axis steps (18 x 18 x 4 on LA) and plain averaging."""

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


class _WindowMean(nn.Module):
    """Logits constant over a window: channel 1 = the window's mean intensity (shows how windows blend)."""

    def forward(self, x):
        m = x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
        return torch.cat([torch.zeros_like(x), m], 1)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_constant_mode_averages_windows_plainly(mode):
    image = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None] ** 2 / 300, (32, 16, 16)).copy()
    stride = 4
    ov = overlap_for_stride((16, 16, 16), (stride, 16, 16))  # windows at x = 0, 4, ..., 16
    probs = predict_proba(_WindowMean(), image, (16, 16, 16), ov, normalise=False, mode=mode)
    starts = range(0, 32 - 16 + 1, stride)
    means = {s: image[s:s + 16].mean() for s in starts}
    logit = np.array([np.mean([means[s] for s in starts if s <= x < s + 16]) for x in range(32)])
    got = probs[1, :, 8, 8]  # mid-window in y, z (at the corners every Gaussian weight is clipped alike)
    got_logit = np.log(got / (1 - got))
    if mode == "constant":
        np.testing.assert_allclose(got_logit, logit, rtol=1e-4, atol=1e-4)
    else:  # the Gaussian weights favour each window's centre: not the plain average
        assert not np.allclose(got_logit, logit, rtol=1e-3)


def test_inference_options_are_checked():
    check_inference_config(InferenceConfig(overlap=(0.5, 0.5, 0.9)))
    for cfg, word in [(InferenceConfig(overlap=(0.5, 1.2, 0.1)), "--overlap"), (InferenceConfig(mode="max"), "--blend"),
                      (InferenceConfig(stride=(0, 1, 1)), "--stride")]:
        with pytest.raises(InputError, match=word):
            check_inference_config(cfg)
