"""What runs the encoder: conv + batch-norm folding, the CPU allocator tuning, and OpenVINO, each giving
the same embeddings as the plain PyTorch encoder."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fmabs_core import device as fdevice
from fmabs_core.errors import InputError
from fmabs_core.generalist import get_generalist
from fmabs_core.generalist.models import GENERALISTS
from fmabs_core.generalist.runtime import fuse_conv_bn, resolve_runtime


def _trained_bn(ch: int, rng: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(ch)
    bn.running_mean.copy_(torch.randn(ch, generator=rng))
    bn.running_var.copy_(torch.rand(ch, generator=rng) + 0.5)
    bn.weight.data.copy_(torch.randn(ch, generator=rng))
    bn.bias.data.copy_(torch.randn(ch, generator=rng))
    return bn


def test_fuse_conv_bn_folds_only_conv_bn_pairs_and_keeps_the_output():
    rng = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _trained_bn(8, rng)),
        nn.GELU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _trained_bn(8, rng)),
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU()),  # not a pair: untouched
    ).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    with torch.no_grad():
        before = net(x)
        assert fuse_conv_bn(net) == 2
        after = net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net[3][1], nn.ReLU)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fuse_conv_bn_leaves_a_training_module_alone():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert fuse_conv_bn(net) == 0 and isinstance(net[0][1], nn.BatchNorm2d)


def test_litemedsam_encoder_folded_gives_the_same_embeddings():
    _cls, build = GENERALISTS["litemedsam"]
    enc = build(None, True).image_encoder.eval()
    plain = copy.deepcopy(enc)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    assert fuse_conv_bn(enc) > 20  # TinyViT wraps its convolutions as Conv2d_BN
    with torch.no_grad():
        ref, got = plain(x), enc(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_runtime_choices_are_checked(monkeypatch):
    from fmabs_core.generalist import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "torch" and resolve_runtime(None, cuda) == "torch"
    many, few = runtime.OPENVINO_MIN_SLICES, runtime.OPENVINO_MIN_SLICES - 1
    monkeypatch.setattr(runtime, "openvino_installed", lambda: True)
    assert resolve_runtime("auto", cpu, many) == "openvino"  # the conversion pays
    assert resolve_runtime("auto", cpu, few) == "torch" and resolve_runtime("auto", cpu, None) == "torch"
    assert resolve_runtime("auto", cuda, many) == "torch" and resolve_runtime("torch", cpu, many) == "torch"
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    assert resolve_runtime("auto", cpu, many) == "torch"  # not installed: no error, torch
    assert resolve_runtime("openvino", cpu) == "openvino"
    with pytest.raises(InputError, match="CPU only"):
        resolve_runtime("openvino", cuda)
    with pytest.raises(InputError, match="not one of auto, torch, openvino"):
        resolve_runtime("onnx", cpu)


def test_allocator_tuning_is_on_by_default_on_glibc_reversible_and_off_with_the_switch():
    code = ("from fmabs_core import device; import platform; t = device.tune_cpu_allocator(); "
            "assert t == device.tune_cpu_allocator(); assert device.tune_cpu_allocator(False) is False; "
            "assert device.tune_cpu_allocator() == t; print(t, platform.libc_ver()[0])")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert on[0] == str(on[1] == "glibc")
    env = {**__import__("os").environ, fdevice.ENV_CPU_TUNING: "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert off.split()[0] == "False"


@pytest.mark.slow
def test_openvino_encoder_matches_torch_and_has_its_own_identity():
    """openvino is in the test extra: no skip when it is missing (the test fails, as it should)."""
    rng = np.random.default_rng(0)
    slices = rng.random((3, 70, 90)).astype(np.float32)
    ref_g = get_generalist("litemedsam", device="cpu", runtime="torch")
    ov_g = get_generalist("litemedsam", device="cpu", runtime="openvino")
    assert ov_g is not ref_g and ov_g.identity != ref_g.identity and "openvino" in ov_g.precision
    assert ov_g.batch_size() > 1  # several requests in flight
    ref = ref_g.encode(slices, (0.0, 1.0)).features
    got = ov_g.encode(slices, (0.0, 1.0)).features
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    box = np.array([[20, 15, 60, 50]] * 3, float)
    a = ov_g.decode(ov_g.encode(slices, (0.0, 1.0)), box)
    b = ref_g.decode(ref_g.encode(slices, (0.0, 1.0)), box)
    assert b.any() and np.mean(a != b) < 1e-3  # a logit within rounding of 0 may flip, no more
