"""The papers' metrics (medpy's definitions) against hand-computed cases, beside MONAI's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmabs_core.inference.metrics import (METRIC_DEFINITIONS, METRIC_KEYS, medpy_distances, score_case, summarise,
                                          surface)


def _points(shape, *points):
    m = np.zeros(shape, bool)
    for p in points:
        m[p] = True
    return m


def test_surface_is_the_mask_minus_its_6_connected_erosion():
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    assert surface(cube).sum() == 125 - 27
    full = np.ones((3, 3, 3), bool)
    assert surface(full).sum() == 26  # the array's edge is outside: only the centre is interior
    cross = np.zeros((5, 5, 5), bool)
    cross[2, 2, 1:4] = cross[2, 1:4, 2] = cross[1:4, 2, 2] = True  # the 6-neighbourhood of the centre
    assert surface(cross).sum() == 6  # the centre's six neighbours are all in: it is interior


def test_pooled_95hd_and_one_way_asd_by_hand():
    """pred: one voxel; truth: that voxel and one 4 voxels away along z.

    pred -> truth: [0]; truth -> pred: [0, 4]. Pooled [0, 0, 4]: 95th percentile 0 + 0.9 * 1.9... = 3.6
    (numpy's linear interpolation: position 0.95 * 2 = 1.9 between 0 and 4). ASD pred -> truth: 0.
    MONAI: max(95th of [0], 95th of [0, 4] = 3.8) = 3.8; symmetric ASD mean([0, 0, 4]) = 4/3.
    """
    pred = _points((12, 12, 12), (5, 5, 5))
    gt = _points((12, 12, 12), (5, 5, 5), (5, 5, 9))
    assert medpy_distances(pred, gt) == pytest.approx((3.6, 0.0))
    assert medpy_distances(gt, pred) == pytest.approx((3.6, 2.0))  # ASD is one-way: truth -> pred = mean(0, 4)
    s = score_case("c", pred, gt, spacing=(1.0, 1.0, 2.0))
    assert (s.hd95_pooled_vox, s.asd_pred_vox) == pytest.approx((3.6, 0.0))
    assert (s.hd95_pooled_mm, s.asd_pred_mm) == pytest.approx((7.2, 0.0))  # 4 voxels of 2 mm
    assert s.hd95_vox == pytest.approx(3.8) and s.asd_vox == pytest.approx(4 / 3)  # MONAI's differ
    assert s.dice == pytest.approx(2 / 3) and s.jaccard == pytest.approx(1 / 2)


def test_shifted_cubes_by_hand():
    """Two 4-voxel cubes, one shifted by 2 along x: every surface distance is 0, 1 or 2, counted by hand."""
    a = np.zeros((12, 10, 10), bool)
    b = np.zeros((12, 10, 10), bool)
    a[2:6, 3:7, 3:7] = True
    b[4:8, 3:7, 3:7] = True
    # a's surface (56 voxels) by layer, distance to b's surface (b spans x = 4..7):
    #   x=2 face, 16 voxels: b's x=4 face is 2 away;  x=3 ring, 12 voxels: 1 away;
    #   x=4 ring, 12 voxels: on b's x=4 face, 0;      x=5 face: its ring (12) lies on b's side walls, 0,
    #   and its 4 inner voxels are inside b, 1 from b's surface.
    fwd = np.array([2] * 16 + [1] * 12 + [0] * 12 + [0] * 12 + [1] * 4)
    assert surface(a).sum() == len(fwd) == 56
    hd, asd = medpy_distances(a, b)
    both = np.hstack((fwd, fwd))  # the shift is symmetric: truth -> pred has the same distances
    assert asd == pytest.approx(fwd.mean())
    assert hd == pytest.approx(np.percentile(both, 95)) and hd == pytest.approx(2.0)


def test_empty_prediction_is_a_failure_not_zero():
    gt = _points((8, 8, 8), (3, 3, 3))
    s = score_case("e", np.zeros_like(gt), gt)
    assert s.failed and math.isnan(s.hd95_pooled_vox) and math.isnan(s.asd_pred_mm)
    summary = summarise([s, score_case("ok", gt, gt)])
    assert summary["hd95_pooled_vox"]["mean"] == 0.0 and summary["n_failed"] == 1
    assert set(METRIC_KEYS) == set(METRIC_DEFINITIONS)


def test_equals_medpy():
    """Ours equals medpy's ``dc``, ``jc``, ``hd95`` and ``asd`` (medpy is in the test extra, so CI compares)."""
    from medpy.metric import binary
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = ndimage.gaussian_filter(rng.random((24, 22, 20)), 3) > 0.5
        b = ndimage.gaussian_filter(rng.random((24, 22, 20)), 3) > 0.5
        for spacing in (None, (0.7, 1.0, 1.3)):
            hd, asd = medpy_distances(a, b, spacing)
            assert hd == pytest.approx(binary.hd95(a, b, voxelspacing=spacing))
            assert asd == pytest.approx(binary.asd(a, b, voxelspacing=spacing))
