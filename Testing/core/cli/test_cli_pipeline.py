"""The whole command-line path on small synthetic scans, and on a few real LA scans when present."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.cli import main
from fmabs_core.data.project import Project

TINY = ["--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
        "--device", "cpu"]


@pytest.mark.slow
def test_import_crosslabel_train_predict_evaluate(tmp_path, phantom_data, capsys):
    proj = tmp_path / "proj"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    assert main(["crosslabel", "simulate", "--project", str(proj), "--count", "3", "--seed", "1"]) == 0
    project = Project(proj)
    assert len(project.crosslabelled()) == 3
    for method in ("sup", "sup-dense", "mt"):
        assert main(["train", "--project", str(proj), "--method", method, "--iterations", "4", "--run", method,
                     "--val-every", "2", *TINY]) == 0
        run = project.run_dir(method)
        assert (run / "model.pt").exists() and (run / "config.json").exists()
        saved = json.loads((run / "config.json").read_text())
        assert saved["method"] == method and saved["net"]["width"] == 4
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(project.run_dir("sup")), "--input", str(phantom_data / "imagesTr"),
                 "--output", str(out), "--probabilities", "--largest-component"]) == 0
    for src in sorted((phantom_data / "imagesTr").iterdir()):
        pred = nib.load(str(out / src.name))
        img = nib.load(str(src))
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine, atol=1e-6)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
        probs = nib.load(str(out / src.name.replace(".nii.gz", "_probs.nii.gz")))
        assert probs.shape == img.shape
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(out), "--labels", str(phantom_data / "labelsTr"),
                 "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "mean" in table and "Dice" in table
    data = json.loads(report.read_text())
    assert data["summary"]["n_cases"] == 8
    assert all(0.0 <= c["dice"] <= 1.0 for c in data["cases"])


def test_training_without_crosslabels_is_a_clear_error(tmp_path, phantom_data, capsys):
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    rc = main(["train", "--project", str(proj), "--method", "sup", "--iterations", "2", "--run", "r", *TINY])
    assert rc == 2
    assert "no training scan has cross-labels" in capsys.readouterr().err


def test_predict_rejects_a_2d_file(tmp_path, phantom_data, capsys):
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    main(["train", "--project", str(proj), "--iterations", "2", "--run", "r", *TINY])
    bad = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(bad))
    rc = main(["predict", "--model", str(proj / "runs" / "r"), "--input", str(bad), "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "expected a 3D volume" in err


@pytest.mark.la
def test_la_scans_import_and_crosslabel(tmp_path, la_dir):
    """Three real LA scans: import keeps the 0.625 mm grid, cross-labels cut the atrium."""
    proj = tmp_path / "la"
    assert main(["import", str(la_dir), "--project", str(proj), "--limit", "3", "--classes", "1:left_atrium"]) == 0
    assert main(["crosslabel", "simulate", "--project", str(proj)]) == 0
    project = Project(proj)
    assert project.check() == []
    for case in project.split("train"):
        cross = project.load_crosslabel(case)
        assert np.allclose(cross.spacing, 0.625, atol=1e-3)
        assert (cross.array == 1).sum() > 100  # the three planes cross the atrium
