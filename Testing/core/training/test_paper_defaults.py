"""The papers' defaults (issue 11, item 1): each one a named option, recorded in config.json, and doing what it says."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fmabs_core.contract import UNLABELLED
from fmabs_core.errors import InputError
from fmabs_core.training.config import NetConfig, TrainConfig, default_iterations
from fmabs_core.training.nets import build_network
from fmabs_core.training.sampler import Case, PatchSampler


def test_defaults_are_the_papers_and_are_saved():
    cfg = TrainConfig(method="fmabs")
    assert cfg.net.dropout == 0.5
    assert cfg.iterations == 20000  # FM-ABS paper's t_max (its code: 10000)
    assert TrainConfig(method="cfr-mt").iterations == 6000 and default_iterations("cfr-acmt") == 6000
    assert TrainConfig(method="mt", iterations=12).iterations == 12  # an explicit count wins
    assert cfg.flip_axes == (0, 1) and cfg.crop == "uniform" and cfg.expert_slices == "truth"
    saved = json.loads(cfg.to_json())
    for key in ("iterations", "flip_axes", "crop", "expert_slices"):
        assert key in saved
    assert saved["net"]["dropout"] == 0.5
    back = TrainConfig.from_dict(saved)
    assert back == cfg and not back.differences(cfg)


@pytest.mark.parametrize("change, word", [({"crop": "corner"}, "crop"), ({"flip_axes": (0, 3)}, "flip_axes"),
                                          ({"flip_axes": (1, 0)}, "flip_axes"), ({"expert_slices": "gt"}, "expert_slices")])
def test_bad_options_are_refused_by_name(change, word):
    with pytest.raises(InputError, match=word):
        TrainConfig(**change).check()


def test_vnet_has_dropout_in_student_and_teacher():
    import copy

    torch.manual_seed(0)
    net = build_network(NetConfig(width=4))
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    assert drops and all(m.p == 0.5 for m in drops)
    teacher = copy.deepcopy(net).train()  # the mean teacher is a copy, run in train mode
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(teacher(x), teacher(x))  # dropout perturbs the teacher
        teacher.eval()
        assert torch.allclose(teacher(x), teacher(x))


def _sampler(target: np.ndarray, crop: str, seed: int = 0, flip_axes=(0, 1), patch=(16, 16, 16)) -> PatchSampler:
    case = Case("a", np.zeros(target.shape, np.float32), target=target)
    return PatchSampler([case], [], patch, 2, 2, seed, augment=True, flip_axes=flip_axes, crop=crop)


def test_flips_are_in_plane_only():
    s = _sampler(np.zeros((32, 32, 32), np.uint8), "uniform")
    axes = {s._plan(s.labelled[0], True)["axis"] for _ in range(300)}
    assert axes == {0, 1}  # never the superior-inferior axis 2
    s3 = _sampler(np.zeros((32, 32, 32), np.uint8), "uniform", flip_axes=(0, 1, 2))
    assert {s3._plan(s3.labelled[0], True)["axis"] for _ in range(300)} == {0, 1, 2}
    none = _sampler(np.zeros((32, 32, 32), np.uint8), "uniform", flip_axes=())
    plan = none._plan(none.labelled[0], True)
    assert plan["axis"] is None
    a = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(PatchSampler._augment(0, None, a)[0], a)


def test_uniform_crops_always_hold_a_label():
    target = np.full((40, 40, 40), UNLABELLED, np.uint8)
    target[:, :, 3] = 0  # one axial plane near the border is labelled
    s = _sampler(target, "uniform")
    for _ in range(200):
        plan = s._plan(s.labelled[0], True)
        _, tgt, _ = s._materialise(plan)
        assert (tgt != UNLABELLED).any()


def test_uniform_crops_do_not_pile_up_at_the_borders():
    """With every voxel labelled, uniform starts are uniform; anchored ones favour the borders."""
    target = np.zeros((40, 40, 40), np.uint8)
    n = 3000
    freq = {}
    for crop in ("uniform", "anchored"):
        s = _sampler(target, crop, seed=1)
        starts = np.array([s._plan(s.labelled[0], True)["start"][0] for _ in range(n)])
        freq[crop] = float(np.mean(starts == 0))
    expected = 1 / 25  # 25 possible starts on a 40-voxel axis with a 16-voxel patch
    assert abs(freq["uniform"] - expected) < 0.015
    assert freq["anchored"] > 2 * expected


class _Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


@pytest.mark.parametrize("override", [True, False])
def test_crosslabel_overrides_the_pseudo_label_on_its_planes(override):
    from fmabs_core.methods import get_method

    shape = (1, 8, 8, 8)
    target = torch.full(shape, UNLABELLED, dtype=torch.int64)
    target[..., 0] = 1  # the expert says: foreground on this plane
    pseudo = torch.zeros(shape, dtype=torch.int64)  # the fused pseudo-label says: background everywhere
    logits = torch.zeros(1, 2, 8, 8, 8)
    logits[:, 1, ..., 0] = 20.0  # the student agrees with the expert on the plane
    logits[:, 0, ..., 1:] = 20.0  # and with the pseudo-label elsewhere
    method = get_method("fmabs", {"crosslabel_overrides": override})
    method.teacher = _Fixed(logits)
    tr = SimpleNamespace(cfg=SimpleNamespace(iterations=10), autocast=contextlib.nullcontext)
    batch = {"image": torch.zeros(1, 1, 8, 8, 8), "target": target, "pseudo": pseudo,
             "labelled": torch.tensor([True])}
    _, logs = method.loss(tr, batch, logits, 0)
    if override:
        assert logs["loss_sam"] < 1e-3  # nothing to learn: the plane's truth replaced the pseudo-label
    else:
        assert logs["loss_sam"] > 0.05  # the pseudo-label pulls against the expert's plane


def test_a_run_saved_before_the_paper_defaults_resumes_as_it_started(tmp_path):
    """config.json without the newer keys: the run keeps its old behaviour (all-axis flips, anchored
    crops, expert at the predicted centre) instead of switching mid-run to today's defaults."""
    import json

    from fmabs_core.training.config import TrainConfig

    path = tmp_path / "config.json"
    from dataclasses import asdict

    old = {k: v for k, v in json.loads(json.dumps(asdict(TrainConfig()))).items()
           if k not in ("flip_axes", "crop", "expert_slices")}
    path.write_text(json.dumps(old))
    cfg = TrainConfig.load(path)
    assert (cfg.flip_axes, cfg.crop, cfg.expert_slices) == ((0, 1, 2), "anchored", "suggested")
    path.write_text(json.dumps({**old, "flip_axes": [0, 1], "crop": "uniform", "expert_slices": "truth"}))
    cfg = TrainConfig.load(path)
    assert (cfg.flip_axes, cfg.crop, cfg.expert_slices) == ((0, 1), "uniform", "truth")


def test_an_old_fmabs_run_keeps_the_fused_label_on_its_cross_labelled_planes(tmp_path):
    """crosslabel_overrides came with the same defaults: an old fmabs run resumes without it, unless it
    named the option itself; a new run gets today's default."""
    import json
    from dataclasses import asdict

    from fmabs_core.methods import get_method
    from fmabs_core.training.config import TrainConfig

    path = tmp_path / "config.json"
    new = json.loads(json.dumps(asdict(TrainConfig(method="fmabs", method_options={"box_jitter": 4}))))
    old = {k: v for k, v in new.items() if k not in ("flip_axes", "crop", "expert_slices")}
    for data, expected in ((old, False), (new, True),
                           ({**old, "method_options": {"crosslabel_overrides": True}}, True)):
        path.write_text(json.dumps(data))
        cfg = TrainConfig.load(path)
        assert get_method(cfg.method, cfg.method_options).config.crosslabel_overrides is expected
    path.write_text(json.dumps({**old, "method": "sup"}))
    assert "crosslabel_overrides" not in TrainConfig.load(path).method_options


def test_an_fmabs_run_saved_before_largest_component_resumes_without_it(tmp_path):
    """The option came later with the default on: a run whose config.json lacks it resumes as it started (the
    teacher uncut); a run that named it, or a new one, keeps what it says."""
    import json
    from dataclasses import asdict

    from fmabs_core.methods import get_method
    from fmabs_core.training.config import TrainConfig

    path = tmp_path / "config.json"
    new = json.loads(json.dumps(asdict(TrainConfig(method="fmabs", method_options={"box_jitter": 4}))))
    for options, expected in (({"box_jitter": 4}, False), ({"largest_component": True}, True)):
        path.write_text(json.dumps({**new, "method_options": options}))
        cfg = TrainConfig.load(path)
        assert get_method(cfg.method, cfg.method_options).config.largest_component is expected
    assert get_method("fmabs", {}).config.largest_component is True
    path.write_text(json.dumps({**new, "method": "mt", "method_options": {}}))
    assert "largest_component" not in TrainConfig.load(path).method_options


def test_the_added_options_defaults_are_the_methods_defaults():
    """ADDED_METHOD_OPTIONS names each added option's default now: it must be the method's Config default."""
    from dataclasses import fields

    from fmabs_core import methods
    from fmabs_core.training.config import ADDED_METHOD_OPTIONS, TrainConfig

    for method, added in ADDED_METHOD_OPTIONS.items():
        defaults = {f.name: f.default for f in fields(methods.available()[method].Config)}
        for option, (_before, now) in added.items():
            assert defaults[option] == now, (method, option)
        assert {k: v[1] for k, v in added.items()}.items() <= TrainConfig(method=method).method_options.items()


def test_a_sam_lora_or_cfr_run_saved_before_gradient_checkpointing_resumes_as_it_started(tmp_path):
    """The option changes memory and time, not results; an older run still resumes with what it had (no
    recomputation), so that its saved options and the resumed ones agree."""
    import json
    from dataclasses import asdict

    from fmabs_core.methods import get_method
    from fmabs_core.training.config import TrainConfig

    path = tmp_path / "config.json"
    for method in ("sam-lora", "cfr-mt"):
        new = json.loads(json.dumps(asdict(TrainConfig(method=method))))
        assert new["method_options"]["gradient_checkpointing"] is True
        old = {**new, "method_options": {k: v for k, v in new["method_options"].items()
                                         if k != "gradient_checkpointing"}}
        path.write_text(json.dumps(old))
        cfg = TrainConfig.load(path)
        assert get_method(method, cfg.method_options).config.gradient_checkpointing is False
        assert not TrainConfig.load(path).differences(cfg)
