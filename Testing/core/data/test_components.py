"""fmabs_core.data.components: the largest part of each class, on masks and on a teacher's probabilities."""

from __future__ import annotations

import numpy as np

from fmabs_core.data.components import keep_largest_probs, largest_component


def _two_classes_with_islands() -> np.ndarray:
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:8, 2:8, 2:8] = 1  # class 1's main part (216 voxels)
    mask[15:17, 15:17, 15:17] = 1  # an island of class 1 (8 voxels)
    mask[10:16, 2:6, 2:6] = 2  # class 2's main part (96 voxels)
    mask[2, 18, 18] = 2  # an island of class 2 (1 voxel)
    return mask


def test_each_class_keeps_its_largest_part_and_corners_connect():
    mask = _two_classes_with_islands()
    kept = largest_component(mask)
    assert (kept == 1).sum() == 216 and (kept == 2).sum() == 96
    assert kept[16, 16, 16] == 0 and kept[2, 18, 18] == 0
    diagonal = np.zeros((6, 6, 6), np.uint8)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1  # touching by a corner: one part (26-connectivity)
    np.testing.assert_array_equal(largest_component(diagonal), diagonal)


def test_removed_voxels_of_a_teacher_become_certain_background():
    mask = _two_classes_with_islands()
    probs = np.zeros((3, *mask.shape), np.float32)
    for c in range(3):
        probs[c] = np.where(mask == c, 0.8, 0.1)
    cleaned, removed = keep_largest_probs(probs)
    assert removed == 8 + 1
    np.testing.assert_array_equal(cleaned.argmax(0), largest_component(mask))
    assert (cleaned[:, 16, 16, 16] == [1, 0, 0]).all() and (cleaned[:, 2, 18, 18] == [1, 0, 0]).all()
    kept = largest_component(mask) == mask
    np.testing.assert_array_equal(cleaned[:, kept], probs[:, kept])  # nothing else changes
    again, none = keep_largest_probs(cleaned)  # idempotent: a replay of a cleaned teacher file is exact
    assert none == 0 and again is cleaned
