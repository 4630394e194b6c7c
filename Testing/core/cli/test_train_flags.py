"""The paper-faithful training and inference choices are command-line options too."""

from __future__ import annotations

import pytest

from fmabs_core.cli import build_parser
from fmabs_core.cli.train_cmds import config_from_args


def _cfg(project, *extra):
    args = build_parser().parse_args(["train", "--project", str(project.root), "--run", "r", *extra])
    return config_from_args(args, project)


def test_flip_crop_and_expert_flags_reach_the_config(project):
    cfg = _cfg(project)
    assert (cfg.flip_axes, cfg.crop, cfg.expert_slices) == ((0, 1), "uniform", "truth")
    cfg = _cfg(project, "--flip-axes", "0", "1", "2", "--crop", "anchored", "--expert-slices", "suggested")
    assert (cfg.flip_axes, cfg.crop, cfg.expert_slices) == ((0, 1, 2), "anchored", "suggested")
    assert _cfg(project, "--flip-axes").flip_axes == ()  # no flips at all


def test_bad_flags_are_refused_by_the_parser(project):
    for bad in (["--flip-axes", "3"], ["--crop", "random"], ["--expert-slices", "centre"]):
        with pytest.raises(SystemExit):
            _cfg(project, *bad)


def test_predict_takes_the_references_stride_and_blending():
    args = build_parser(light=True).parse_args(["predict", "--model", "m", "--input", "i", "--output", "o",
                                                "--stride", "18", "18", "4", "--blend", "gaussian"])
    assert args.stride == [18, 18, 4] and args.blend == "gaussian"
    assert build_parser(light=True).parse_args(["predict", "--model", "m", "--input", "i", "--output", "o"]).blend \
        == "constant"
