"""The simulated expert: which three slices it draws when it cross-labels a scan from its dense label.

The paper does not say where its simulated expert draws; the authors' code draws the middle slice of
the ground truth's bounding box in each view (``truth``). A real expert has no ground truth to centre
on, so the tool suggests slices from the model's prediction; ``suggested`` makes the simulated expert
draw exactly those (what a human following the suggestions would do).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fmabs_core.data.crosslabel import make_crosslabel, object_centre_slices
from fmabs_core.errors import InputError

#: where the simulated expert draws (``TrainConfig.expert_slices``)
PLACEMENTS = ("truth", "suggested")


def expert_slices(dense: np.ndarray, suggested: Mapping[str, int], placement: str = "truth") -> dict[str, int]:
    """The slice per view (view -> index) the simulated expert labels."""
    if placement == "truth":
        return object_centre_slices(dense)
    if placement == "suggested":
        return {view: int(index) for view, index in suggested.items()}
    raise InputError(f"expert_slices '{placement}': choose {' or '.join(PLACEMENTS)}")


def simulated_crosslabel(dense: np.ndarray, suggested: Mapping[str, int], placement: str = "truth"
                         ) -> tuple[np.ndarray, dict[str, int]]:
    """(cross-label, slices drawn) of the simulated expert."""
    picks = expert_slices(dense, suggested, placement)
    return make_crosslabel(dense, picks), picks
