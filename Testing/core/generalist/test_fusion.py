"""Fusion rules where the answer is known: a teacher made worse on purpose, a generalist right on two views and
wrong on one, a confident teacher the views must not overrule, STAPLE through SimpleITK, and the drawn-plane
scores a round reports."""

from __future__ import annotations

import numpy as np
import pytest

from fmabs_core.contract import FUSIONS, UNLABELLED, VIEWS
from fmabs_core.errors import InputError
from fmabs_core.generalist.fusion import (AUTO_CANDIDATES, FusionRule, choose_rule, combine, counts_dice, fill_unprompted,
                                          heldout_gain, merge_counts, plane_counts, plane_dice, plane_sample, probs_from_uint8,
                                          probs_to_uint8, quantise_probs, teacher_probs_of, vote)


def ball(shape=(24, 24, 24), r=7.0, centre=None) -> np.ndarray:
    c = np.array(centre if centre is not None else [s / 2 for s in shape])
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (np.linalg.norm(g - c, axis=-1) <= r).astype(np.uint8)


def dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def soft_probs(mask: np.ndarray, sure: float) -> np.ndarray:
    """Teacher probabilities: ``sure`` for its own label everywhere."""
    p = np.where(mask > 0, sure, 1 - sure).astype(np.float32)
    return np.stack([1 - p, p])


def view_probs_of(views: dict[str, np.ndarray], p: float = 0.95) -> dict[str, dict[int, np.ndarray]]:
    return {v: {1: np.where(m > 0, p, 1 - p).astype(np.float16)} for v, m in views.items()}


@pytest.fixture
def scene():
    truth = ball()
    bad_view = ball(r=10.0)  # one view grossly over-segments
    views = {"axial": truth.copy(), "coronal": bad_view, "sagittal": truth.copy()}
    return truth, views


def test_vote_keeps_what_two_views_agree_on(scene):
    truth, views = scene
    assert dice(vote(list(views.values()), "mv"), truth) == 1.0  # the wrong view is outvoted
    assert np.array_equal(vote(list(views.values()), "ua"), truth)  # all three agree only inside the truth


def test_soft_fusion_lets_a_confident_teacher_stand_against_the_views(scene):
    truth, _ = scene
    wrong = ball(r=10.0)
    views = dict.fromkeys(VIEWS, wrong)  # every view is wrong in the same way
    teacher = soft_probs(truth, 0.97)
    fused = combine(views, teacher, FusionRule("soft", teacher_weight=0.5), view_probs_of(views, 0.9))
    assert np.array_equal(fused, truth)  # 0.5 * 0.03 + 0.5 * 0.9 = 0.465 < 0.5 outside the truth
    views_only = combine(views, teacher, FusionRule("soft", teacher_weight=0.0), view_probs_of(views, 0.9))
    assert np.array_equal(views_only, wrong)


def test_soft_fusion_lets_the_views_decide_where_the_teacher_hesitates(scene):
    truth, views = scene
    grown = ball(r=9.0)  # a teacher made worse on purpose: over-segmenting, and unsure of it
    teacher = soft_probs(grown, 0.6)
    fused = combine(views, teacher, FusionRule("soft", teacher_weight=0.5), view_probs_of(views))
    assert dice(fused, truth) > dice(grown, truth) + 0.1
    # with the teacher alone the result is the teacher
    alone = combine(views, teacher, FusionRule("soft", teacher_weight=1.0), view_probs_of(views))
    assert np.array_equal(alone, grown)


def test_gate_keeps_the_confident_teacher_and_votes_elsewhere(scene):
    truth, views = scene
    grown = ball(r=9.0)
    teacher = soft_probs(grown, 0.6)
    sure = soft_probs(grown, 0.99)
    assert np.array_equal(combine(views, sure, FusionRule("gate", confidence=0.9)), grown)
    assert np.array_equal(combine(views, teacher, FusionRule("gate", confidence=0.9)), vote(list(views.values())))


def test_staple_through_simpleitk_outvotes_the_wrong_rater(scene):
    truth, views = scene
    teacher = soft_probs(truth, 0.9)
    fused = combine(views, teacher, FusionRule("staple"))
    assert dice(fused, truth) > 0.99 and fused.dtype == np.uint8


def test_every_fusion_is_offered_and_checked():
    assert set(FUSIONS) == {"auto", "mv", "ua", "soft", "gate", "staple"}
    with pytest.raises(InputError, match="--fusion"):
        FusionRule("median").check()
    with pytest.raises(InputError, match="--teacher-weight"):
        FusionRule("soft", teacher_weight=1.5).check()
    with pytest.raises(InputError, match="--gate-confidence"):
        FusionRule("gate", confidence=0.2).check()
    with pytest.raises(InputError, match="chosen per round"):
        combine({"axial": ball()}, soft_probs(ball(), 0.9), FusionRule("auto"))
    with pytest.raises(InputError, match="probabilities"):
        combine({"axial": ball()}, soft_probs(ball(), 0.9), FusionRule("soft"))


def test_multiclass_soft_fusion_picks_the_highest_score():
    shape = (12, 12, 12)
    a = np.zeros(shape, np.uint8)
    a[2:6] = 1
    a[7:11] = 2
    teacher = teacher_probs_of(a, 2)
    views = dict.fromkeys(VIEWS, a)
    probs = {v: {1: (a == 1).astype(np.float16), 2: (a == 2).astype(np.float16)} for v in VIEWS}
    assert np.array_equal(combine(views, teacher, FusionRule("soft"), probs), a)


def test_unprompted_slices_take_the_teachers_answer():
    truth = ball()
    teacher = soft_probs(truth, 0.8)

    class Result(dict):
        pass

    result = Result({v: np.zeros_like(truth) for v in VIEWS})
    result.slices = {v: np.array([12]) for v in VIEWS}
    result.probs = {v: {} for v in VIEWS}
    fill_unprompted(result, teacher)
    for v, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        sl = [slice(None)] * 3
        sl[axis] = 12
        assert not result[v][tuple(sl)].any()  # the prompted slice keeps the generalist's (empty) answer
        sl[axis] = 10
        assert np.array_equal(result[v][tuple(sl)], truth[tuple(sl)])
        assert np.allclose(result.probs[v][1][tuple(sl)], teacher[1][tuple(sl)], atol=1e-3)


def test_teacher_probabilities_round_trip_exactly_as_stored():
    rng = np.random.default_rng(0)
    p = rng.random((2, 5, 6, 7)).astype(np.float32)
    p[0] = 1 - p[1]
    q = quantise_probs(p)
    stored = probs_to_uint8(p)
    assert stored.shape == (5, 6, 7, 2) and stored.dtype == np.uint8
    assert np.array_equal(probs_from_uint8(stored), q)
    assert np.array_equal(quantise_probs(q), q)  # idempotent: a replay quantises nothing further


def test_drawn_plane_scores_pool_voxels_over_scans():
    truth = ball()
    cross = np.full(truth.shape, UNLABELLED, np.uint8)
    cross[12] = truth[12]
    cross[:, 12] = truth[:, 12]
    cross[:, :, 12] = truth[:, :, 12]
    assert plane_dice(truth, cross) == 1.0
    shrunk = ball(r=5.0)
    c1 = plane_counts(shrunk, cross)
    c2 = plane_counts(truth, cross)
    assert counts_dice(c2) == 1.0
    pooled = counts_dice(merge_counts([c1, c2]))
    assert plane_dice(shrunk, cross) < pooled < 1.0
    assert np.isnan(counts_dice({}))


def planes_of(truth: np.ndarray, at: int = 12) -> np.ndarray:
    cross = np.full(truth.shape, UNLABELLED, np.uint8)
    for axis in range(3):
        sl = [slice(None)] * 3
        sl[axis] = at
        cross[tuple(sl)] = truth[tuple(sl)]
    return cross


def test_auto_chooses_a_rule_the_drawn_planes_support(scene):
    truth, views = scene
    cross = planes_of(truth)
    # a hesitant over-segmenting teacher, two right views and one wrong: a rule with the views must win
    sample = plane_sample(cross, soft_probs(ball(r=9.0), 0.6), views, view_probs_of(views))
    name, scores = choose_rule([sample])
    assert name != "teacher" and scores[name] >= scores["teacher"] + 0.01
    assert dice(combine(views, soft_probs(ball(r=9.0), 0.6), AUTO_CANDIDATES[name], view_probs_of(views)),
                truth) > dice(ball(r=9.0), truth)


def test_auto_keeps_the_teacher_when_the_generalist_does_not_help():
    truth = ball()
    cross = planes_of(truth)
    wrong = dict.fromkeys(VIEWS, ball(r=10.0))  # every view wrong: no rule beats a right teacher on the planes
    name, scores = choose_rule([plane_sample(cross, soft_probs(truth, 0.97), wrong, view_probs_of(wrong))])
    assert name == "teacher" and scores["teacher"] == 1.0
    # a rule that is only a little better than the teacher is not enough (the margin)
    name, _ = choose_rule([plane_sample(cross, soft_probs(truth, 0.97), wrong, view_probs_of(wrong))], margin=0.0)
    assert name in ("teacher", "soft 0.75", "soft 0.5", "gate 0.9", "gate 0.7")  # they equal the teacher here


def test_heldout_gain_scores_each_scan_with_a_rule_chosen_on_the_others(scene):
    truth, views = scene
    cross = planes_of(truth)
    helped = [plane_sample(cross, soft_probs(ball(r=9.0), 0.6), views, view_probs_of(views)) for _ in range(3)]
    assert heldout_gain(helped) > 0.05
    assert np.isnan(heldout_gain(helped[:1]))
    wrong = dict.fromkeys(VIEWS, ball(r=10.0))
    hurt = [plane_sample(cross, soft_probs(truth, 0.97), wrong, view_probs_of(wrong)) for _ in range(3)]
    assert heldout_gain(hurt) == 0.0  # the teacher is kept on every held-out scan



def test_per_scan_each_scan_keeps_what_its_own_planes_choose(scene):
    """--fusion-per-scan: three scans whose teacher is right and one whose views are right. Pooled, the teacher
    wins; the one scan's own planes choose a rule with the views, and the round's labels score higher."""
    from fmabs_core.generalist.fusion import choose_auto

    truth, views = scene
    cross = planes_of(truth)
    wrong = dict.fromkeys(VIEWS, np.roll(truth, 6, axis=0))  # every view off the object: every rule loses
    right = [plane_sample(cross, soft_probs(truth, 0.55), wrong, view_probs_of(wrong)) for _ in range(3)]
    helped = plane_sample(cross, soft_probs(ball(r=9.0), 0.6), views, view_probs_of(views))
    pooled = choose_auto([*right, helped])
    assert pooled.rule == "teacher" and pooled.per_scan == [] and np.isnan(pooled.per_scan_score)
    own = choose_auto([*right, helped], per_scan=True)
    assert own.rule == "teacher" and own.scores == pooled.scores  # the pooled choice is unchanged
    assert own.per_scan[:3] == ["teacher"] * 3 and own.per_scan[3] != "teacher"
    assert own.per_scan[3] == choose_auto([helped]).rule  # a scan alone chooses as the pooled rule would for it
    assert own.per_scan_score > own.scores["teacher"] + 0.01
