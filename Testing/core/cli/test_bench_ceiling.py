"""``fmabs bench ceiling``: the generalist prompted with the truth and with the truth off by a margin."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmabs_core.cli import main
from fmabs_core.cli.bench_ceiling import bench_ceiling, format_ceiling, prompt_masks
from fmabs_core.data.phantom import write_dataset


def test_prompt_masks_grow_and_shrink_each_class_by_the_margin():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 1  # a 10-voxel cube
    truth[0:3, 0:3, 0:3] = 2
    masks = prompt_masks(truth, 2)
    grown, shrunk = masks["grown 2"], masks["shrunk 2"]
    assert (masks["truth"] == truth).all()
    assert (grown[truth == 1] == 1).all() and grown[5:15, 5:15, 3].all() and not grown[5:15, 5:15, 2].any()
    assert (shrunk == 1).sum() == 6 ** 3 and not (shrunk == 2).any()  # the 3-voxel cube disappears at margin 2
    assert (grown == 2).sum() > 27 and not ((grown == 2) & (truth == 1)).any()  # classes do not overwrite each other


def test_bad_options_are_refused_with_their_names(tmp_path, capsys):
    assert main(["bench", "ceiling", "--la", str(tmp_path), "--margin", "0"]) == 2
    assert "--margin" in capsys.readouterr().err
    assert main(["bench", "ceiling", "--la", str(tmp_path / "none")]) == 2
    assert "--la" in capsys.readouterr().err
    data = write_dataset(tmp_path / "ph", n_cases=2, shape=(24, 24, 16), seed=5)
    assert main(["bench", "ceiling", "--la", str(data), "--cases", "nosuchscan"]) == 2
    assert "--cases: nosuchscan" in capsys.readouterr().err


@pytest.mark.slow  # runs LiteMedSAM
def test_ceiling_on_phantoms_reports_every_view_and_the_fusion(tmp_path):
    data = write_dataset(tmp_path / "ph", n_cases=1, shape=(40, 40, 24), seed=5)
    rep = bench_ceiling(str(data), scans=5, device="cpu", margin=1, case_ids=[sorted(p.name.split(".")[0] for p in
                                                                               (data / "imagesTr").iterdir())[0]])
    assert [r["prompt"] for r in rep["rows"]] == ["truth", "grown 1", "shrunk 1"]
    truth, grown, shrunk = rep["rows"]
    assert truth["prompt_dice"] == 1.0 and grown["prompt_dice"] < 1.0 and shrunk["prompt_dice"] < 1.0
    assert all(0.0 < r[v] <= 1.0 for r in rep["rows"] for v in ("axial", "coronal", "sagittal", "fused"))
    assert "fused - prompt" in format_ceiling(rep)
    quick = bench_ceiling(str(data), scans=1, device="cpu", margin=1, max_slices=1)
    assert all(math.isnan(r["fused"]) and 0.0 < r["axial"] <= 1.0 for r in quick["rows"])
    assert "no fused figure" in format_ceiling(quick)
