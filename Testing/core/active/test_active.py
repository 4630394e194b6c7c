"""Active cross-labelling: scores, budget, slice suggestions and their geometry (fast, no training)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.data import io
from fmabs_core.active import budget as B
from fmabs_core.active.strategies import STRATEGIES, Strategy, gaussian_rampup, get_strategy, her_threshold, normalised_entropy, register
from fmabs_core.active.suggest import choose_slices, select, slice_point, suggest_slices
from fmabs_core.errors import InputError

SHAPE = (12, 10, 8)


def binary(p_fg: np.ndarray | float) -> np.ndarray:
    """A (2, X, Y, Z) probability volume with foreground probability ``p_fg``."""
    fg = np.broadcast_to(np.asarray(p_fg, dtype=np.float32), SHAPE).copy()
    return np.stack([1 - fg, fg])


# ---- strategies ---------------------------------------------------------------------------------------
def test_entropy_is_normalised():
    assert normalised_entropy(binary(0.5)) == pytest.approx(np.ones(SHAPE))
    assert normalised_entropy(np.full((3, *SHAPE), 1 / 3, np.float32)) == pytest.approx(np.ones(SHAPE), abs=1e-5)
    assert normalised_entropy(binary(1.0)) == pytest.approx(np.zeros(SHAPE), abs=1e-5)
    with pytest.raises(ValueError, match=r"\(C\+1, X, Y, Z\)"):
        normalised_entropy(np.ones(SHAPE))


def mixed(fraction: float) -> np.ndarray:
    """``fraction`` of the voxels at p=0.5 (entropy 1), the rest confidently background."""
    p = np.full(SHAPE, 0.01, np.float32)
    p.ravel()[: int(round(p.size * fraction))] = 0.5
    return binary(p)


@pytest.mark.parametrize("name", ["lc", "he", "her"])
@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_less_certain_scans_score_higher(name, progress):
    s = get_strategy(name)
    scores = [s.score(mixed(f), progress) for f in (0.0, 0.02, 0.1, 0.3)]
    assert scores == sorted(scores) and len(set(scores)) == 4, scores
    assert s.score(binary(0.99), progress) < s.score(binary(0.7), progress) <= s.score(binary(0.55), progress)


def test_known_values():
    # LC: bottom quartile of confidences; a quarter of the voxels at 0.6, the rest at 0.95
    p = np.full(SHAPE, 0.95, np.float32)
    p.ravel()[: p.size // 4] = 0.6
    assert get_strategy("lc").score(binary(p), 0.0) == pytest.approx(0.4, abs=1e-6)
    assert get_strategy("he").score(binary(0.5), 0.0) == pytest.approx(1.0)
    # HER: the share of voxels above beta(1) = 0.75
    q = np.full(SHAPE, 0.99, np.float32)
    q.ravel()[: q.size // 10] = 0.5
    assert get_strategy("her").score(binary(q), 1.0) == pytest.approx((q.size // 10) / q.size)


def test_her_and_he_disagree_where_they_should():
    """A few very uncertain voxels beat many mildly uncertain ones for HER, not for HE."""
    few = np.full(SHAPE, 0.99, np.float32)
    few.ravel()[: few.size // 10] = 0.5  # 10 % at entropy 1
    many = binary(0.8)  # all at entropy 0.72 < beta
    he, her = get_strategy("he"), get_strategy("her")
    assert he.score(many, 1.0) > he.score(binary(few), 1.0)
    assert her.score(binary(few), 1.0) > her.score(many, 1.0) == 0.0


def test_ramp_values():
    assert gaussian_rampup(0.0) == pytest.approx(math.exp(-5))
    assert gaussian_rampup(1.0) == 1.0
    assert gaussian_rampup(2.0) == 1.0 and gaussian_rampup(-1.0) == pytest.approx(math.exp(-5))
    assert her_threshold(0.0) == pytest.approx(0.5 + 0.25 * math.exp(-5))
    assert her_threshold(1.0) == pytest.approx(0.75)
    ts = np.linspace(0, 1, 11)
    assert np.all(np.diff([her_threshold(t) for t in ts]) > 0)


def test_random_is_seeded_and_needs_no_prediction():
    a, b, c = (get_strategy("random", seed=s) for s in (7, 7, 8))
    sa = [a.score(None, 0.0) for _ in range(5)]
    assert sa == [b.score(None, 0.0) for _ in range(5)] and sa != [c.score(None, 0.0) for _ in range(5)]
    assert not a.needs_prediction
    with pytest.raises(ValueError, match="unknown active strategy 'nope'"):
        get_strategy("nope")


def test_a_new_strategy_is_one_small_class():
    @register
    class Foreground(Strategy):
        name = "test-fg"

        def score(self, probs, progress):
            return float(probs[1].mean())

    try:
        assert get_strategy("test-fg").score(binary(0.3), 0.0) == pytest.approx(0.3)
    finally:
        STRATEGIES.pop("test-fg")


# ---- selection ------------------------------------------------------------------------------------------
def test_select_takes_top_k_and_keeps_only_their_probabilities():
    fg = {"a": 0.99, "b": 0.6, "c": 0.8, "d": 0.55, "e": 0.6}
    calls = []

    def predict(cid):
        calls.append(cid)
        return binary(fg[cid])

    sel = select(fg, 3, get_strategy("he"), 0.5, predict)
    assert sel.cases == ["d", "b", "e"]  # b and e tie: the smaller id first
    assert set(sel.probs) == {"b", "d", "e"} and sorted(calls) == sorted(fg)
    assert sel.scores["a"] < sel.scores["c"] < sel.scores["b"] == sel.scores["e"] < sel.scores["d"]

    calls.clear()
    rnd = select(fg, 2, get_strategy("random", seed=1), 0.5, predict)
    assert calls == [] and len(rnd.cases) == 2 and rnd.probs == {}
    assert rnd.cases == select(fg, 2, get_strategy("random", seed=1), 0.5, predict).cases


# ---- budget -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,warm", [(1, 1), (2, 1), (4, 1), (5, 1), (6, 1), (8, 2), (10, 2), (13, 3),
                                         (16, 3), (20, 4)])
def test_warmup_is_a_fifth_of_the_budget(budget, warm):
    assert B.warmup_count(budget) == warm


@pytest.mark.parametrize("budget", range(1, 25))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_rounds_spend_the_budget_exactly(budget, k):
    sizes = B.round_sizes(budget, k)
    assert sum(sizes) == budget
    assert sizes[0] == B.warmup_count(budget)
    assert all(1 <= s <= k for s in sizes[1:])
    assert all(s == k for s in sizes[1:-1])  # only the last round may be smaller
    assert len(sizes) - 1 == B.active_round_count(budget, k)
    for already in range(0, budget + 3):
        rest = B.round_sizes(budget, k, already)
        assert sum(rest) == max(0, budget - already)


def test_budget_errors_name_the_value():
    for bad in (None, 0, -3):
        with pytest.raises(InputError, match=f"--budget {bad}"):
            B.warmup_count(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="-k/active_k 0"):
        B.round_sizes(4, 0)


def test_budget_state_counts_files_and_pending(tmp_path, phantom_data):
    from fmabs_core.cli.project_cmds import simulate_crosslabels
    from fmabs_core.data.project import import_folder

    project, problems = import_folder(phantom_data, tmp_path / "proj")
    assert not problems
    train = project.split("train")
    simulate_crosslabels(project, train[:2], "centre", 0)
    state = B.budget_state(project, 5, pending=[train[1], train[2]])
    assert state.spent == 3 and state.remaining == 2 and state.next_round(2) == 2 and state.next_round(3) == 2
    B.record_round(project, {"run": "r", "round": 1, "kind": "active", "cases": [train[2]], "status": "pending"},
                   budget=5)
    B.set_round_status(project, "r", 1, "active", "labelled")
    meta = project.read()
    assert meta["budget"] == 5 and meta["rounds"][0]["status"] == "labelled" and "time" in meta["rounds"][0]
    assert B.rounds(project, "r", "active")[0]["cases"] == [train[2]] and B.rounds(project, "other") == []


# ---- slices -----------------------------------------------------------------------------------------------
def blob_probs(shape=(20, 18, 16), boxes=((slice(4, 9), slice(6, 13), slice(3, 8)),)) -> np.ndarray:
    fg = np.full(shape, 0.02, np.float32)
    for box in boxes:
        fg[box] = 0.97
    return np.stack([1 - fg, fg])


def test_centre_slices_go_through_the_predicted_object():
    probs = blob_probs()
    picks = choose_slices(probs, probs.shape[1:], "centre")
    assert picks == {"sagittal": 6, "coronal": 9, "axial": 5}
    mask = probs.argmax(0) > 0
    for view, idx in picks.items():
        axis = io.VIEW_AXIS[view]
        assert 0 <= idx < mask.shape[axis] and np.take(mask, idx, axis=axis).any()


def test_centre_snaps_to_the_object_when_the_box_centre_misses_it():
    # two lobes along axis 0 with a gap around the box centre (slice 9)
    probs = blob_probs(boxes=((slice(1, 5), slice(2, 6), slice(2, 6)), (slice(14, 19), slice(2, 6), slice(2, 6))))
    picks = choose_slices(probs, probs.shape[1:], "centre")
    mask = probs.argmax(0) > 0
    for view, idx in picks.items():
        assert np.take(mask, idx, axis=io.VIEW_AXIS[view]).any(), view
    assert picks["sagittal"] in (4, 14)


def test_no_object_or_no_prediction_falls_back_to_the_centre():
    empty = blob_probs(boxes=())
    assert choose_slices(empty, empty.shape[1:], "centre") == {"sagittal": 10, "coronal": 9, "axial": 8}
    assert choose_slices(None, (20, 18, 16), "uncertain") == {"sagittal": 10, "coronal": 9, "axial": 8}
    with pytest.raises(ValueError, match="'middle'"):
        choose_slices(empty, empty.shape[1:], "middle")  # type: ignore[arg-type]


def test_uncertain_slices_pick_the_highest_mean_entropy():
    fg = np.full((20, 18, 16), 0.02, np.float32)
    fg[13, :, :] = 0.5
    fg[:, 2, :] = 0.45
    fg[:, :, 11] = 0.55
    probs = np.stack([1 - fg, fg])
    assert choose_slices(probs, fg.shape, "uncertain") == {"sagittal": 13, "coronal": 2, "axial": 11}


PERMUTED = np.array([[0.0, 0.0, -1.2, 40.0], [-0.9, 0.1, 0.0, 12.0], [0.05, -0.8, 0.0, -33.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine_name", ["oblique", "permuted"])
def test_slice_points_agree_with_the_file_affine(tmp_path, write_nifti, oblique_affine, affine_name):
    """RAS of each suggested point = nibabel's affine applied to the point's file-grid voxel index."""
    affine = oblique_affine if affine_name == "oblique" else PERMUTED
    shape = (15, 13, 11)  # odd: slice centres are whole voxels, so values can be compared too
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    path = write_nifti(tmp_path / "scan.nii.gz", data, affine)
    vol = io.load_image(path)
    img = nib.load(str(path))
    file_data = np.asarray(img.dataobj)
    probs = np.stack([np.ones(vol.array.shape, np.float32), np.zeros(vol.array.shape, np.float32)])
    seen_axes = set()
    for view in io.VIEWS:
        axis = io.VIEW_AXIS[view]
        for index in (0, vol.array.shape[axis] // 3, vol.array.shape[axis] - 1):
            s = slice_point(vol, view, index)
            assert s["index"] == s["canonical_index"] == index and s["canonical_voxel"][axis] == index
            ras = img.affine @ np.append(s["file_voxel"], 1.0)
            np.testing.assert_allclose(s["ras"], ras[:3], atol=1e-3)
            assert s["file_voxel"][s["file_axis"]] == s["file_index"]
            assert 0 <= s["file_index"] < img.shape[s["file_axis"]]
            cv = tuple(int(v) for v in s["canonical_voxel"])
            fv = tuple(int(round(v)) for v in s["file_voxel"])
            assert vol.array[cv] == file_data[fv]  # the same voxel on both grids
            # every voxel of the file's slice is on the canonical slice (same plane)
            file_plane = np.take(file_data, s["file_index"], axis=s["file_axis"])
            assert set(np.take(vol.array, index, axis=axis).ravel()) == set(file_plane.ravel())
            seen_axes.add((axis, s["file_axis"]))
        assert set(suggest_slices(probs, vol)) == set(io.VIEWS)
    if affine_name == "permuted":
        assert any(a != f for a, f in seen_axes)  # the two index systems really differ here
    with pytest.raises(ValueError, match="axial slice 99 is outside"):
        slice_point(vol, "axial", 99)
