"""Cross-label simulation, the project datastore and its integrity check."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.data import crosslabel
from fmabs_core.data.project import Project, import_folder
from fmabs_core.errors import InputError


def _dense() -> np.ndarray:
    lab = np.zeros((20, 24, 16), np.uint8)
    lab[4:13, 6:19, 3:12] = 1
    lab[8:11, 8:12, 5:8] = 2
    return lab


def test_simulated_crosslabel_has_exactly_three_planes():
    dense = _dense()
    cross, slices = crosslabel.simulate(dense, "centre")
    assert slices == {"axial": (3 + 11) // 2, "coronal": (6 + 18) // 2, "sagittal": (4 + 12) // 2}
    planes = crosslabel.labelled_planes(cross)
    assert planes == {"axial": [slices["axial"]], "coronal": [slices["coronal"]], "sagittal": [slices["sagittal"]]}
    labelled = cross != 255
    assert labelled.sum() == (20 * 24 + 20 * 16 + 24 * 16) - (20 + 24 + 16) + 1  # three planes, shared lines once
    np.testing.assert_array_equal(cross[labelled], dense[labelled])
    assert set(np.unique(cross).tolist()) == {0, 1, 2, 255}


def test_random_slices_cut_the_object():
    dense = _dense()
    rng = np.random.default_rng(1)
    for _ in range(10):
        cross, slices = crosslabel.simulate(dense, "random", rng)
        assert 3 <= slices["axial"] <= 11 and 6 <= slices["coronal"] <= 18 and 4 <= slices["sagittal"] <= 12
        assert (cross == 1).any()


def test_import_check_and_split(tmp_path, phantom_data):
    project, problems = import_folder(phantom_data, tmp_path / "proj", val_fraction=0.25, seed=0)
    assert problems == []
    meta = json.loads((tmp_path / "proj" / "fmabs.json").read_text())
    assert len(meta["cases"]) == 8 and len(meta["split"]["val"]) == 2
    assert set(meta["split"]["train"]) | set(meta["split"]["val"]) == set(meta["cases"])
    assert project.check() == []
    # the user's files are copied, never moved or modified
    assert len(list((phantom_data / "imagesTr").iterdir())) == 8


def test_integrity_check_reports_every_problem(tmp_path, phantom_data):
    project, _ = import_folder(phantom_data, tmp_path / "proj")
    c0, c1, c2 = project.cases[:3]
    img0 = nib.load(str(project.image_path(c0)))
    # c0: label with a wrong shape; c1: label with a shifted affine; c2: label value outside the classes
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 31), np.uint8), img0.affine), str(project.label_path(c0)))
    aff = nib.load(str(project.image_path(c1))).affine.copy()
    aff[:3, 3] += 5
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), aff), str(project.label_path(c1)))
    bad = np.zeros((32, 32, 32), np.uint8)
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, nib.load(str(project.image_path(c2))).affine), str(project.label_path(c2)))
    problems = project.check()
    by_case = {p.case: p.message for p in problems}
    assert set(by_case) == {c0, c1, c2}
    assert "shape" in by_case[c0] and "affine differs" in by_case[c1] and "[7]" in by_case[c2]


def test_import_reports_all_bad_pairs_and_imports_nothing(tmp_path, phantom_data):
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    files = sorted((phantom_data / "imagesTr").iterdir())[:3]
    for f in files:
        (src / "imagesTr" / f.name).write_bytes(f.read_bytes())
        lab = nib.load(str(phantom_data / "labelsTr" / f.name))
        (src / "labelsTr" / f.name).write_bytes((phantom_data / "labelsTr" / f.name).read_bytes())
    nan_img = nib.load(str(files[0]))
    data = nan_img.get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, nan_img.affine), str(src / "imagesTr" / files[0].name))
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), lab.affine), str(src / "labelsTr" / files[1].name))
    project, problems = import_folder(src, tmp_path / "proj")
    assert len(problems) == 2
    assert project.cases == []


def test_empty_crosslabel_is_a_clear_error(tmp_path, phantom_data):
    project, _ = import_folder(phantom_data, tmp_path / "proj")
    case = project.cases[0]
    ref = nib.load(str(project.image_path(case)))
    nib.save(nib.Nifti1Image(np.full(ref.shape, 255, np.uint8), ref.affine), str(project.crosslabel_path(case)))
    with pytest.raises(InputError, match="no labelled voxel"):
        project.load_crosslabel(case)
    assert any("no labelled voxel" in p.message for p in project.check())


def test_project_update_is_locked_and_atomic(tmp_path):
    project = Project.create(tmp_path / "p", {1: "atrium"})
    project.update(lambda m: m.__setitem__("budget", 20))
    assert project.read()["budget"] == 20
    assert project.classes == {1: "atrium"} and project.num_classes == 1
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".fmabs.json")]
