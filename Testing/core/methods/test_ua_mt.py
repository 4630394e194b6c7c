"""UA-MT as a plug-in method: registry and CLI options, its loss pieces on hand-made tensors, a tiny CLI run."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fmabs_core import methods
from fmabs_core.cli import build_parser, main
from fmabs_core.methods import ua_mt
from fmabs_core.methods.losses import sigmoid_rampup
from fmabs_core.runs.events import read_events

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = ("--ema", "--consistency", "--noise-std", "--noise-clip", "--mc-passes", "--rampup")


def _train_option_strings() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices["train"]._actions for s in a.option_strings}


def test_registered_and_options_in_train_help():
    cls = methods.available()["ua-mt"]
    assert cls is ua_mt.UAMT and cls.uses_unlabelled and cls.supervision == "cross"
    assert cls.describe().startswith("UA-MT")
    assert {o["name"] for o in next(d for d in methods.describe() if d["name"] == "ua-mt")["options"]} == {
        "ema", "consistency", "noise_std", "noise_clip", "mc_passes", "rampup"}
    assert set(OPTIONS) <= _train_option_strings()
    cfg = methods.get_method("ua-mt", {"mc_passes": 4, "rampup": 0.5}).config
    assert (cfg.mc_passes, cfg.rampup, cfg.consistency, cfg.noise_std, cfg.noise_clip) == (4, 0.5, 0.1, 0.1, 0.2)
    # found by scanning the methods folder: no other file of the package names it
    pkg = Path(ua_mt.__file__).parents[1]
    others = [p for p in pkg.rglob("*.py") if p.name != "ua_mt.py" and ("ua_mt" in p.read_text(encoding="utf-8"))]
    assert not others


def test_threshold_from_three_quarters_to_ln_c():
    assert ua_mt.uncertainty_threshold(0, 100, 2) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert ua_mt.uncertainty_threshold(100, 100, 2) == pytest.approx(math.log(2))
    assert ua_mt.uncertainty_threshold(50, 100, 3) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(3))


def test_masked_mse_zero_when_equal_and_known_value():
    logits = torch.randn(2, 2, 3, 3, 3)
    unc = torch.zeros(2, 1, 3, 3, 3)
    cons, mask = ua_mt.masked_softmax_mse(logits, torch.softmax(logits, 1), unc, 0.5)
    assert float(cons) == 0.0 and mask.sum() == 2 * 27
    # student (0.5, 0.5) vs teacher (1, 0): (0.25 + 0.25) / C = 0.25 per certain voxel
    student = torch.zeros(1, 2, 2, 2, 2)
    teacher = torch.zeros(1, 2, 2, 2, 2)
    teacher[:, 0] = 1
    cons, _ = ua_mt.masked_softmax_mse(student, teacher, torch.zeros(1, 1, 2, 2, 2), 0.1)
    assert float(cons) == pytest.approx(0.25)


def test_uncertain_voxels_do_not_contribute():
    teacher = torch.zeros(1, 2, 4, 4, 4)
    teacher[:, 0] = 1
    unc = torch.zeros(1, 1, 4, 4, 4)
    unc[..., :2] = 0.9  # above the threshold: masked out
    student = torch.zeros(1, 2, 4, 4, 4)
    student[:, 0] = 20.0  # agrees with the teacher where certain
    student[:, 1, ..., :2] = 40.0  # disagrees strongly where uncertain
    student.requires_grad_(True)
    cons, mask = ua_mt.masked_softmax_mse(student, teacher, unc, 0.6)
    assert float(mask.mean()) == 0.5
    assert float(cons.detach()) < 1e-12
    cons.backward()
    assert float(student.grad[..., :2].abs().sum()) == 0.0
    # the same disagreement where certain counts, normalised by the certain voxels only
    cons2, _ = ua_mt.masked_softmax_mse(student.detach(), teacher, torch.zeros_like(unc), 0.6)
    assert float(cons2) == pytest.approx(0.5 * 2 / 2, rel=1e-6)  # half the voxels off by 1 in both of C=2 classes


class _Alternating(nn.Module):
    """Confident class 0 for the first copy of the batch, class 1 for the second; records its inputs."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        half = x.shape[0] // 2 if x.shape[0] > 1 else 1
        out[:half, 0] = 30.0
        out[half:, 1] = 30.0
        return out


def test_mc_uncertainty_is_entropy_of_the_mean_batched_as_the_reference():
    x = torch.randn(2, 1, 3, 3, 3)
    net = _Alternating()
    unc = ua_mt.mc_uncertainty(net, x, 8, 0.1, 0.2)
    assert len(net.inputs) == 4 and all(i.shape[0] == 4 for i in net.inputs)  # T/2 passes of two copies
    for inp in net.inputs:
        noise = inp - x.repeat(2, 1, 1, 1, 1)
        assert float(noise.abs().max()) <= 0.2 + 1e-6 and float(noise.std()) > 0.02
    assert not torch.equal(net.inputs[0][:2], net.inputs[0][2:])  # each copy its own noise
    # each sample saw class 0 in one copy and class 1 in the other: mean (0.5, 0.5), entropy ln 2 (mean entropy is 0)
    assert unc.shape == (2, 1, 3, 3, 3)
    assert torch.allclose(unc, torch.full_like(unc, math.log(2)), atol=1e-4)
    odd = _Alternating()
    ua_mt.mc_uncertainty(odd, x, 3, 0.1, 0.2)
    assert [i.shape[0] for i in odd.inputs] == [4, 2]


class _Constant(nn.Module):
    def __init__(self, cls: int):
        super().__init__()
        self.cls = cls

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, self.cls] = 30.0
        return out


def _tr(iterations=10):
    return SimpleNamespace(cfg=SimpleNamespace(iterations=iterations), autocast=contextlib.nullcontext)


def test_loss_uses_only_unlabelled_crops():
    method = methods.get_method("ua-mt", {})
    method.teacher = _Constant(0)  # certain everywhere, class 0
    target = torch.full((2, 4, 4, 4), 255, dtype=torch.long)
    target[0, 0] = 1
    batch = {"image": torch.randn(2, 1, 4, 4, 4), "target": target, "labelled": torch.tensor([True, False])}
    logits = torch.zeros(2, 2, 4, 4, 4)
    logits[0, 1] = 30.0  # the labelled crop disagrees with the teacher: not part of the consistency
    logits[1, 0] = 30.0  # the unlabelled crop agrees
    total, logs = method.loss(_tr(), batch, logits, 10)
    assert logs["loss_cons"] < 1e-12 and logs["certain"] == 1.0
    assert logs["lambda_c"] == pytest.approx(0.1) and logs["threshold"] == pytest.approx(math.log(2))
    assert float(total) == pytest.approx(logs["loss_sup"], abs=1e-6)
    logits[1] = 0.0  # the unlabelled crop now says (0.5, 0.5): 0.25 per voxel
    total, logs = method.loss(_tr(), batch, logits, 10)
    assert logs["loss_cons"] == pytest.approx(0.25)
    assert float(total) == pytest.approx(logs["loss_sup"] + 0.1 * 0.25, rel=1e-5)
    # early in the run the weight is 0.1 x the ramp over `rampup` x iterations
    _, logs = method.loss(_tr(), batch, logits, 2)
    assert logs["lambda_c"] == pytest.approx(0.1 * sigmoid_rampup(2, 10))


@pytest.mark.slow
def test_tiny_cli_run(project):
    # two unlabelled crops per batch: the teacher sees only those (as in the reference), and a 16^3 crop
    # leaves the V-Net a 1x1x1 bottleneck, where train-mode BatchNorm needs more than one sample
    run = project.run_dir("ua")
    rc = main(["train", "--project", str(project.root), "--method", "ua-mt", "--iterations", "4", "--run", "ua",
               "--patch-size", "16", "16", "16", "--width", "4", "--batch-size", "3", "--labelled-batch-size", "1",
               "--dropout", "0.2", "--device", "cpu", "--val-every", "4", "--max-val-cases", "1", "--rampup", "0.5"])
    assert rc == 0
    assert (run / "model.pt").exists()
    progress = [e for e in read_events(run) if e["type"] == "progress"]
    assert len(progress) == 4
    for e in progress:
        assert {"loss_sup", "loss_cons", "lambda_c", "certain"} <= set(e["losses"])
        assert 0.0 <= e["losses"]["certain"] <= 1.0
    assert progress[-1]["losses"]["lambda_c"] == pytest.approx(0.1 * sigmoid_rampup(3, 2))
