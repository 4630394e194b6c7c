"""``fmabs bench command``: both whole processes run on the same slices and the report says so."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_bench_command_runs_both_processes(tmp_path, write_nifti, capsys):
    from fmabs_core.cli import main

    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.3, (48, 40, 24)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[14:34, 12:28, 6:18] = 1
    image[label > 0] += 2.0
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    write_nifti(tmp_path / "scan.nii.gz", image, aff)
    write_nifti(tmp_path / "mask.nii.gz", label, aff)
    assert main(["bench", "command", "--image", str(tmp_path / "scan.nii.gz"), "--label", str(tmp_path / "mask.nii.gz"),
                 "--pseudo-max-slices", "1", "--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slices"] == 3 and report["slices_per_view"] == {"axial": 1, "coronal": 1, "sagittal": 1}
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds"].values())
    assert report["encoder"].startswith("litemedsam, encoder fp32")
    assert "speed-up" in capsys.readouterr().out


def test_reference_inputs_are_the_slices_pseudo_label_prompts():
    from fmabs_core.cli.bench_command import _reference_inputs

    label = np.zeros((30, 20, 10), np.uint8)
    label[5:25, 4:16, 2:8] = 1
    slices, boxes, counts = _reference_inputs(np.ones(label.shape, np.float32), label, 4)
    assert counts == {"axial": 4, "coronal": 4, "sagittal": 4} and slices.shape[0] == boxes.shape[0] == 12
    _, _, every = _reference_inputs(np.ones(label.shape, np.float32), label, None)
    assert every == {"axial": 6, "coronal": 12, "sagittal": 20}
