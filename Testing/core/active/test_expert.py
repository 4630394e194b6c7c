"""The simulated expert draws at the ground truth's centre (the reference code) or at the suggested slices."""

from __future__ import annotations

import numpy as np
import pytest

from fmabs_core.active.expert import expert_slices, simulated_crosslabel
from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError


def test_truth_centre_and_suggested_slices():
    dense = np.zeros((20, 30, 40), np.uint8)
    dense[2:7, 10:21, 30:35] = 1  # bounding-box centres: 4, 15, 32
    suggested = {"sagittal": 0, "coronal": 1, "axial": 2}
    assert expert_slices(dense, suggested, "truth") == {"sagittal": 4, "coronal": 15, "axial": 32}
    assert expert_slices(dense, suggested, "suggested") == suggested
    cross, picks = simulated_crosslabel(dense, suggested, "truth")
    assert (cross[4] == dense[4]).all() and (cross[:, 15] == dense[:, 15]).all()
    assert (cross[5:, :15, :32] == UNLABELLED).all()
    with pytest.raises(InputError, match="expert_slices"):
        expert_slices(dense, suggested, "oracle")
