"""CFR concatenation: axial slices of a crop tiled on one square canvas, the exact inverse, the model frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError
from fmabs_core.generalist.tiling import (
    ModelFrame,
    TileLayout,
    chunk_ranges,
    grid_for,
    tile,
    tile_image,
    tile_label,
    tile_scale,
    tile_scales,
    untile,
)

SHAPES = [(37, 29, 11), (112, 112, 80), (5, 7, 1), (29, 37, 10), (8, 8, 16), (3, 4, 17)]


def _label(shape, rng):
    lab = rng.integers(0, 3, size=shape).astype(np.uint8)
    lab[rng.random(shape) < 0.3] = UNLABELLED  # the 255 value itself must survive the round trip
    return lab


@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_tile_untile_is_identity(shape, pad):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape).astype(np.float32)
    lab = _label(shape, rng)
    layout = TileLayout.for_volume(shape, pad=pad)
    g = layout.grid
    assert g == int(np.ceil(np.sqrt(shape[2]))) and g * g >= shape[2] > (g - 1) ** 2
    c_img, c_lab = tile_image(img, layout), tile_label(lab, layout)
    side = max(g * shape[0], g * shape[1]) + (g - 1) * pad
    assert c_img.shape == c_lab.shape == (side, side) == layout.canvas_shape
    assert c_img.dtype == img.dtype and c_lab.dtype == lab.dtype
    back_img, back_lab = untile(c_img, layout), untile(c_lab, layout)
    assert back_img.dtype == img.dtype and back_lab.dtype == np.uint8
    np.testing.assert_array_equal(back_img, img)  # bit for bit
    np.testing.assert_array_equal(back_lab, lab)
    # torch, with leading dims (a batch of two crops / class channels), gives the same canvases
    both = torch.from_numpy(np.stack([img, 2 * img]))
    c_t = tile(both, layout)
    assert isinstance(c_t, torch.Tensor) and c_t.shape == (2, side, side)
    np.testing.assert_array_equal(c_t[0].numpy(), c_img)
    assert torch.equal(untile(c_t, layout), both)


@pytest.mark.parametrize("shape", SHAPES)
def test_padding_holds_the_fill_value_and_tiles_sit_row_by_row(shape):
    rng = np.random.default_rng(1)
    layout = TileLayout.for_volume(shape, pad=1)
    smap = layout.slice_map()
    pad_px = smap < 0
    n_pad = smap.size - shape[0] * shape[1] * shape[2]
    assert pad_px.sum() == n_pad  # every voxel shown exactly once, the rest is padding
    img = rng.uniform(1.0, 2.0, size=shape).astype(np.float32)  # never equal to the fill
    lab = rng.integers(0, 3, size=shape).astype(np.uint8)
    c_img = tile_image(img, layout, fill=-5.0)
    c_lab = tile_label(lab, layout)
    assert np.all(c_img[pad_px] == -5.0) and np.all(c_img[~pad_px] >= 1.0)
    assert np.all(c_lab[pad_px] == UNLABELLED) and np.all(c_lab[~pad_px] < 3)
    assert np.all(tile_image(img, layout)[pad_px] == 0.0)  # default image fill: 0
    for k in range(shape[2]):
        r0, c0 = layout.tile_origin(k)
        assert (r0, c0) == ((k // layout.grid) * (shape[0] + 1), (k % layout.grid) * (shape[1] + 1))
        np.testing.assert_array_equal(c_img[r0 : r0 + shape[0], c0 : c0 + shape[1]], img[:, :, k])
        assert np.all(smap[r0 : r0 + shape[0], c0 : c0 + shape[1]] == k)


def test_la_example_9x9_grid_1016_canvas_padded_to_1024_for_sam():
    layout = TileLayout.for_volume((112, 112, 80))
    assert layout.grid == 9 and layout.canvas_side == 9 * 112 + 8 == 1016
    assert layout.describe() == "80 slices of 112 x 112 -> 9 x 9 grid, 1 px apart -> canvas 1016 x 1016"
    smap = layout.slice_map()
    assert (smap[:, 112] == -1).all() and (smap[112, :] == -1).all()  # the 1-px gap lines
    assert (smap[8 * 113 :, 8 * 113 :] == -1).all()  # tile 80 (the 81st) is unused: padding
    assert smap[8 * 113, 7 * 113] == 79  # the last slice: row 8, column 7
    sam = ModelFrame.for_layout(layout, 1024)  # fits: padded with fill, no resampling
    assert not sam.resized and sam.scale == 1.0 and sam.content_side == 1016
    lite = ModelFrame.for_layout(layout, 256)  # LiteMedSAM: shrunk ~4x
    assert lite.resized and lite.scale == pytest.approx(256 / 1016)
    assert tile_scale((112, 112, 80), 256).describe() == (
        "80 slices of 112 x 112 -> 9 x 9 grid, 1 px apart -> canvas 1016 x 1016 -> resized to 256 (x0.252): "
        "a slice is 28.2 x 28.2 model px, 7.1 x 7.1 px of the 64-px decoder mask")
    ts = tile_scale((112, 112, 80), 1024)
    assert ts.tile_model_px == (112.0, 112.0) and ts.tile_mask_px == (28.0, 28.0)
    assert "padded to 1024" in ts.describe()
    # the authors' layout: tiles touching (9 * 112 = 1008), also padded to 1024
    assert TileLayout.for_volume((112, 112, 80), pad=0).canvas_side == 1008
    options = tile_scales((112, 112, 80), 256)
    assert [o.layout.grid for o in options] == list(range(9, 0, -1))
    assert [o.canvases for o in options][:3] == [1, 2, 2] and options[-1].canvases == 80
    sizes = [o.tile_model_px[0] for o in options]
    assert sizes == sorted(sizes)  # fewer slices per canvas -> bigger tiles


def test_model_frame_pad_is_exact_and_fill_is_kept():
    rng = np.random.default_rng(2)
    layout = TileLayout.for_volume((112, 112, 80))
    frame = ModelFrame.for_layout(layout, 1024)
    lab = _label((112, 112, 80), rng)
    c = tile_label(lab, layout)
    m = frame.to_model(c, kind="label")
    assert m.shape == (1024, 1024) and m.dtype == torch.uint8
    assert (m[1016:, :] == UNLABELLED).all() and (m[:, 1016:] == UNLABELLED).all()
    assert torch.equal(frame.from_model(m, kind="label"), torch.from_numpy(c))
    assert np.array_equal(untile(frame.from_model(m, kind="label").numpy(), layout), lab)
    img = torch.from_numpy(tile_image(rng.normal(size=(112, 112, 80)).astype(np.float32), layout))
    mi = frame.to_model(img[None])  # leading dims kept; image padding: 0
    assert mi.shape == (1, 1024, 1024) and (mi[0, 1016:] == 0).all()
    assert torch.equal(frame.from_model(mi), img[None])
    # decoder output at M / 4 comes back on the canvas grid (bilinear for probabilities)
    probs = torch.rand(3, 256, 256)
    assert frame.from_model(probs).shape == (3, 1016, 1016)


def test_model_frame_resize_for_litemedsam():
    layout = TileLayout.for_volume((112, 112, 80))
    frame = ModelFrame.for_layout(layout, 256)
    lab = np.zeros((112, 112, 80), np.uint8)
    lab[30:80, 40:90, :] = 1
    c = tile_label(lab, layout)
    m = frame.to_model(c, kind="label")
    assert m.shape == (256, 256) and m.dtype == torch.uint8
    assert set(torch.unique(m).tolist()) <= {0, 1, UNLABELLED}  # nearest: no invented label values
    back = frame.from_model(m, kind="label").numpy()
    assert back.shape == (1016, 1016)
    # a ~4x round trip moves only pixels within 2 px of a label edge (object, 1-px gap, padding): the
    # 1-px gap lines themselves do not survive a 4x shrink (each lands on a model pixel or not)
    bad = back != c
    edges = ndi.binary_dilation(ndi.morphological_gradient(c.astype(np.int16), size=3) > 0, iterations=2)
    assert bad.any() and not (bad & ~edges).any()
    probs = torch.zeros(2, 64, 64)
    probs[0] = 0.25
    probs[1] = 0.75  # constant maps stay constant through bilinear resizes
    p = frame.from_model(probs)
    assert p.shape == (2, 1016, 1016) and torch.allclose(p[1], torch.full((1016, 1016), 0.75))
    img = torch.rand(1016, 1016)
    assert frame.to_model(img).shape == (256, 256)
    up = ModelFrame(225, 256, fit="resize")
    assert up.resized and up.scale == pytest.approx(256 / 225)
    assert ModelFrame(225, 256).resized is False  # fit="pad": padded, not stretched


def test_chunks_cover_the_crop_and_fit_the_grid():
    for depth, grid in [(80, 3), (80, 9), (80, 8), (1, 1), (17, 2), (10, 4)]:
        runs = chunk_ranges(depth, grid)
        assert runs[0][0] == 0 and runs[-1][1] == depth
        assert all(a < b and b - a <= grid * grid for a, b in runs)
        assert all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
        assert len(runs) == -(-depth // (grid * grid))
    assert [b - a for a, b in chunk_ranges(80, 3)] == [9, 9, 9, 9, 8, 9, 9, 9, 9]


def test_bad_inputs_are_refused_by_name():
    vol = np.zeros((8, 8, 10), np.float32)
    with pytest.raises(InputError, match="3 x 3 grid holds 9 slices"):
        tile(vol, grid=3)
    with pytest.raises(InputError, match="does not fit the array's dtype"):
        tile(np.zeros((4, 4, 3), np.int8), fill=UNLABELLED)
    with pytest.raises(InputError, match="3D crop"):
        tile(np.zeros((4, 4)))
    layout = TileLayout.for_volume(vol.shape)
    with pytest.raises(InputError, match="does not match the layout"):
        tile(np.zeros((8, 8, 11)), layout)
    with pytest.raises(InputError, match="does not end in"):
        untile(np.zeros((30, 30)), layout)
    with pytest.raises(InputError):
        grid_for(0)
    with pytest.raises(InputError, match="fit must be"):
        ModelFrame(100, 256, fit="crop")
