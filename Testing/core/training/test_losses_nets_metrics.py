"""Losses, schedules, the V-Net, and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmabs_core.methods import losses
from fmabs_core.methods.mean_teacher import ema_update
from fmabs_core.inference.metrics import dice_jaccard, score_case, summarise
from fmabs_core.training.nets import NetConfig, VNet, build_network, count_parameters


def test_partial_ce_ignores_unlabelled():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, 4)
    target = torch.full((2, 4, 4, 4), 255)
    target[0, 1] = 1
    target[1, :, 2] = 0
    expected = F.cross_entropy(logits.permute(0, 2, 3, 4, 1)[target != 255], target[target != 255])
    assert torch.isclose(losses.partial_cross_entropy(logits, target), expected)
    # changing logits where the target is 255 changes nothing
    logits2 = logits.clone()
    logits2[0, :, 3] = 100.0
    assert torch.isclose(losses.partial_cross_entropy(logits2, target), expected)
    assert losses.partial_cross_entropy(logits, torch.full_like(target, 255)).item() == 0.0


def test_noise_tolerant_dice_equals_dice_at_gamma_2():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(2, 2, 5, 5, 5), 1)
    onehot = losses.one_hot(torch.randint(0, 2, (2, 5, 5, 5)), 2)
    a = losses.noise_tolerant_dice(probs, onehot, gamma=2.0)
    b = losses.soft_dice_squared(probs, onehot)
    assert torch.isclose(a, b, atol=1e-6)
    assert losses.noise_tolerant_dice(onehot, onehot, gamma=1.5).item() == pytest.approx(0.0, abs=1e-6)


def test_schedules_at_start_and_end():
    t_max = 20000
    assert losses.lambda_sam(0, t_max) == pytest.approx(0.5 * (1 - math.exp(-5)))
    assert losses.lambda_sam(t_max, t_max) == pytest.approx(0.0)
    assert losses.lambda_consistency(0, t_max) == pytest.approx(0.1 * math.exp(-5))
    assert losses.lambda_consistency(t_max, t_max) == pytest.approx(0.1)
    assert losses.sigmoid_rampup(t_max / 2, t_max) == pytest.approx(math.exp(-1.25))


def test_ema_update_parameters_and_bn_buffers():
    student = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    teacher = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    for p in teacher.parameters():
        p.data.fill_(1.0)
    for p in student.parameters():
        p.data.fill_(3.0)
    student[1].running_mean.fill_(2.0)
    teacher[1].running_mean.fill_(0.0)
    ema_update(teacher, student, alpha=0.99)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.99 * 1 + 0.01 * 3))
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 0.02))


def test_vnet_parameter_count_and_shape():
    net = VNet(1, 2, 16)
    assert 9.3e6 < count_parameters(net) < 9.5e6  # the literature's "about 9.4 M"
    small = build_network(NetConfig(width=4))
    out = small(torch.zeros(1, 1, 32, 32, 16))
    assert out.shape == (1, 2, 32, 32, 16)


@pytest.mark.parametrize("name", ["unet", "segresnet", "basicunet"])
def test_monai_networks_by_name(name):
    net = build_network(NetConfig(name=name, width=8, out_channels=3))
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_metrics_hand_computed():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True  # 1000 voxels
    pred = np.zeros_like(gt)
    pred[5:15, 5:15, 5:10] = True  # 500 voxels, all inside
    dice, jac = dice_jaccard(pred, gt)
    assert dice == pytest.approx(2 * 500 / 1500)
    assert jac == pytest.approx(500 / 1000)
    s = score_case("c", pred, gt, spacing=(2.0, 2.0, 2.0))
    assert not s.failed
    assert s.hd95_vox == pytest.approx(5.0, abs=1e-6)  # the gt's far face is 5 voxels from pred
    assert s.hd95_mm == pytest.approx(10.0, abs=1e-6)
    same = score_case("same", gt, gt)
    assert same.dice == 1.0 and same.hd95_vox == 0.0 and same.asd_vox == 0.0


def test_empty_prediction_is_a_failure_not_hd_zero():
    gt = np.zeros((10, 10, 10), bool)
    gt[2:5, 2:5, 2:5] = True
    s = score_case("empty", np.zeros_like(gt), gt)
    assert s.failed and s.dice == 0.0 and math.isnan(s.hd95_vox) and math.isnan(s.asd_mm)
    ok = score_case("ok", gt, gt)
    summary = summarise([s, ok])
    assert summary["n_failed"] == 1
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd95_vox"]["mean"] == 0.0  # distances over the non-failed case only


def test_augmentation_matches_monai_transforms():
    """The sampler's numpy rot90/flip equal MONAI's Rotate90/Flip on channel-first patches."""
    from monai.transforms import Flip, Rotate90

    from fmabs_core.training.sampler import PatchSampler

    a = np.random.default_rng(0).random((1, 6, 6, 4)).astype(np.float32)
    for k in range(4):
        for axis in range(3):
            ours = PatchSampler._augment(k, axis, a)[0]
            ref = np.asarray(Flip(spatial_axis=axis)(Rotate90(k=k, spatial_axes=(0, 1))(a)))
            np.testing.assert_array_equal(ours, ref)
