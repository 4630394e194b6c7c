"""Tile size against Dice: the crop, the decoder-resolution ceiling, the choice rule, and a real measurement."""

from __future__ import annotations

import numpy as np
import pytest

from fmabs_core.errors import InputError
from fmabs_core.generalist.grid_choice import GridTrial, _ceiling, choose_grid, foreground_crop, measure_grids
from fmabs_core.generalist.tiling import TileLayout, tile_label


def _trial(grid: int, canvases: float, dice: float) -> GridTrial:
    return GridTrial(grid, canvases, 0.0, 0.0, dice, 1.0, 0.0)


def test_choice_takes_fewest_canvases_within_tolerance():
    trials = [_trial(9, 1, 0.80), _trial(5, 4, 0.81), _trial(4, 5, 0.87), _trial(3, 9, 0.86)]
    assert choose_grid(trials, tolerance=0.02).grid == 4  # 3 is as good but costs more canvases
    assert choose_grid(trials, tolerance=0.1).grid == 9
    assert choose_grid(trials, tolerance=0.0).grid == 4


def test_foreground_crop_is_centred_clipped_and_padded():
    image = np.arange(20 * 20 * 10, dtype=np.float32).reshape(20, 20, 10)
    label = np.zeros((20, 20, 10), np.uint8)
    label[17:19, 2:4, 5] = 1  # near a border: the crop is clipped inside the scan
    img, lab = foreground_crop(image, label, (8, 8, 6))
    assert img.shape == lab.shape == (8, 8, 6) and lab.sum() == label.sum()
    np.testing.assert_array_equal(img, image[12:20, 0:8, 2:8])
    img, lab = foreground_crop(image, label, (24, 8, 4))  # larger than the scan along X: padded
    assert img.shape == (24, 8, 4) and lab.sum() == label.sum() and img.min() == image.min()
    with pytest.raises(InputError, match="foreground"):
        foreground_crop(image, np.zeros_like(label), (8, 8, 6))


def test_ceiling_loses_small_objects_on_coarse_grids():
    """A 6-px blob survives a 64-px mask grid when the canvas holds 4 tiles, not when it holds 81."""
    vol = np.zeros((112, 112, 80), np.uint8)
    vol[50:56, 50:56, :] = 1
    dice = {}
    for g in (9, 2):
        z = min(80, g * g)
        layout = TileLayout((112, 112, z), g, 1)
        back = _ceiling(np.asarray(tile_label(np.ascontiguousarray(vol[..., :z]), layout)), layout, 1, 256)
        truth = vol[..., :z] == 1
        dice[g] = 2 * np.logical_and(back, truth).sum() / (back.sum() + truth.sum())
    assert dice[2] > 0.5 > dice[9]


@pytest.mark.slow
def test_measure_grids_on_a_phantom_with_litemedsam():
    """The real LiteMedSAM, box-prompted per tile: a phantom sphere is found at both grid sizes."""
    from fmabs_core.generalist import get_generalist

    rng = np.random.default_rng(0)
    zz = np.arange(16)
    xx, yy, zz = np.meshgrid(np.arange(48), np.arange(48), zz, indexing="ij")
    label = (((xx - 24) ** 2 + (yy - 22) ** 2) < 12 ** 2).astype(np.uint8)
    image = (label * 2.0 + rng.normal(0, 0.2, label.shape)).astype(np.float32)
    trials = measure_grids(get_generalist("litemedsam", device="cpu"), [(image, label)], grids=(4, 2))
    assert [t.grid for t in trials] == [4, 2]
    assert [t.canvases_per_crop for t in trials] == [1.0, 4.0]
    assert all(t.prompted_dice > 0.7 and t.ceiling_dice > 0.9 for t in trials), trials
    with pytest.raises(InputError, match="grids must lie"):
        measure_grids(get_generalist("litemedsam", device="cpu"), [(image, label)], grids=(5,))
