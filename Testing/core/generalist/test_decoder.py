"""The folded decoder (projections folded into the prompt tokens, channels-last upsampling) gives the
stock SAM decoder's answers on the real LiteMedSAM weights, with box and point prompts, in fp32 and
under bf16 autocast (the GPU's path, run on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fmabs_core.generalist import get_generalist
from fmabs_core.generalist.decoder import decode_batched, folds


@pytest.fixture(scope="module")
def lite():
    return get_generalist("litemedsam", device="cpu")


def _prompts(model, n_points: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    corners = torch.sort(torch.rand(4, 2, 2, generator=g) * 255, dim=1).values  # x0<x1, y0<y1 per box
    boxes = corners.permute(0, 2, 1).reshape(4, 1, 4)[:, :, [0, 2, 1, 3]]
    points = None
    if n_points:
        coords = torch.rand(4, n_points, 2, generator=g) * 255
        labels = torch.ones(4, n_points, dtype=torch.int64)
        labels[0, -1] = -1  # padding, as _pack_points writes for a slice with fewer points
        points = (coords, labels)
    return model.prompt_encoder(points=points, boxes=boxes, masks=None)


@pytest.mark.parametrize("n_points", [0, 3])
def test_folded_decoder_gives_the_stock_answers(lite, n_points):
    model = lite.model
    assert folds(model.mask_decoder.transformer)
    torch.manual_seed(1)
    # embeddings at the scale of LiteMedSAM's (std ~0.2 on LA slices), so that masks have edges
    emb = torch.randn(4, 256, 64, 64) * 0.2
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(model, n_points)
        fast, iou_f = decode_batched(model.mask_decoder, emb, pe, sparse, dense)
        stock, iou_s = decode_batched(model.mask_decoder, emb, pe, sparse, dense, fast=False)
        one, _ = model.mask_decoder(emb[:1], pe, sparse[:1], dense[:1], False)  # SAM's own method
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(iou_f, iou_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[:1, :1], one, rtol=1e-4, atol=2e-4)
    assert ((fast > 0) != (stock > 0)).float().mean() < 1e-4  # the masks, not only the logits
    assert (stock > 0).float().mean() > 0.01 and (stock <= 0).float().mean() > 0.01  # masks with edges


def test_folded_decoder_under_bf16_autocast(lite):
    """The GPU decodes under bf16 autocast; the folded path must run there and stay as close to fp32
    as the stock path does."""
    model = lite.model
    torch.manual_seed(2)
    emb = torch.randn(4, 256, 64, 64) * 0.2
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(model, 2, seed=3)
        ref, _ = decode_batched(model.mask_decoder, emb, pe, sparse, dense, fast=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, _ = decode_batched(model.mask_decoder, emb, pe, sparse, dense)
            stock, _ = decode_batched(model.mask_decoder, emb, pe, sparse, dense, fast=False)
    err_fast = ((fast.float() > 0) != (ref > 0)).float().mean().item()
    err_stock = ((stock.float() > 0) != (ref > 0)).float().mean().item()
    assert err_fast < max(2 * err_stock, 2e-3), (err_fast, err_stock)


def test_other_decoders_keep_the_stock_path(lite):
    """A transformer whose projections are not plain linear maps (e.g. wrapped by an adapter) is not
    folded: its forward is the only one that knows what the wrapper does."""
    import copy

    model = copy.deepcopy(lite.model)

    class Scaled(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.out_features = base.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.base(x)

    attn = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    attn.v_proj = Scaled(attn.v_proj)
    assert not folds(model.mask_decoder.transformer)
    assert not folds(nn.Identity())
    torch.manual_seed(4)
    emb = torch.randn(2, 256, 64, 64) * 0.2
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = _prompts(model, 0)
        auto, _ = decode_batched(model.mask_decoder, emb, pe, sparse[:2], dense[:2])
        stock, _ = decode_batched(model.mask_decoder, emb, pe, sparse[:2], dense[:2], fast=False)
    assert torch.equal(auto, stock)


def test_pseudolabel_pass_decodes_several_slices_per_call(lite):
    """Warm rounds have nothing to encode; their decoder calls still group slices (CPU: 8)."""
    assert lite.decode_slices(1) == lite.decode_slices_cpu == 8
    assert lite.decode_slices(16) == 16
    calls = []
    real = lite.decode

    def counting(emb, *a, **k):
        calls.append(len(emb))
        return real(emb, *a, **k)

    from fmabs_core.generalist.pseudolabel import view_pseudolabel

    img = np.random.default_rng(0).normal(size=(20, 24, 12)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[5:15, 6:18, :] = 1
    lite.decode = counting
    try:
        view_pseudolabel(lite, img, mask, "axial", np.random.default_rng(0), (-3.0, 3.0), box_jitter=0)
    finally:
        del lite.decode
    assert len(calls) == 2 and sum(calls) == 12  # 12 axial slices with foreground: 8 + 4
