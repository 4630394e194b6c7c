"""Segmentation and suggestions in a child process, end to end on a real scene.

REAL PROCESSES: the logic launches the real ``python -m fmabs_core predict`` / ``suggest`` with a
real model (a width-4 network trained for 2 iterations on six 32^3 phantom scans by the real CLI,
once per session), and loads what the job wrote into real MRML nodes. There is no stand-in
``fmabs_core``: the library runs here on the CPU, so the tests run it (mocks are only for the
Slicer application's Qt GUI, see test_widget_mock.py). Each job takes a few seconds on a quiet
machine, mostly the child's torch import.
"""

from __future__ import annotations

import sys
import time

import nibabel as nib
import numpy as np
import pytest

from slicer_helpers import AFFINES

TIMEOUT = 180.0  # generous: the child imports torch and may share a busy CPU


pytestmark = pytest.mark.slow  # trains, starts processes or runs LiteMedSAM


def _make_logic(scene, project_root=None):
    from SlicerFMABSLib.logic import FMABSLogic

    lg = FMABSLogic(scene)
    lg.python = sys.executable  # the interpreter with fmabs_core's dependencies (Slicer: PythonSlicer)
    if project_root is not None:
        lg.open_project(project_root)
    return lg


@pytest.fixture
def logic(scene, tmp_path):
    """The logic on a new, empty project (no jobs)."""
    lg = _make_logic(scene)
    lg.create_project(tmp_path / "project", {1: "bright"})
    return lg


@pytest.fixture
def trained_logic(scene, trained_project):
    """The logic on a project with a trained run ``model``; kills any job a failed test left running."""
    lg = _make_logic(scene, trained_project)
    yield lg
    for job in (lg.prediction.process if lg.prediction else None, lg.suggest_job):
        if job is not None and job.running:
            job.process.kill()
            job.wait(30)


@pytest.fixture
def phantom_scan(project_templates, tmp_path):
    """A user's scan outside the project: a phantom's voxels on an oblique, left-handed grid (the hardest case)."""
    from slicer_helpers import write_nifti

    source = project_templates["bare"] / "images" / "phantom_004.nii.gz"  # the validation scan
    data = np.asarray(nib.load(str(source)).dataobj)
    path = tmp_path / "input" / "patient01.nii.gz"
    path.parent.mkdir()
    affine = write_nifti(path, data, AFFINES["oblique_lefthanded"])
    return path, data, affine


def _wait(fn, timeout=TIMEOUT):
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = fn()
        if out is not None:
            return out
        time.sleep(0.1)
    raise AssertionError("the background job did not finish")


def _check_on_grid_of(output, source):
    """The job's NIfTI is a label on the input's own grid: same shape, same affine, classes 0/1."""
    out, src = nib.load(str(output)), nib.load(str(source))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    values = np.asarray(out.dataobj)
    assert set(np.unique(values).tolist()) <= {0, 1}
    return values


def test_segment_volume_in_background(trained_logic, phantom_scan):
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import segmentations

    logic = trained_logic
    path, data, affine = phantom_scan
    volume = logic.load_volume_file(path, "patient01")
    model = logic.project.run_dir("model")
    t0 = time.time()
    job = logic.start_prediction(model, volume, device="cpu")
    assert time.time() - t0 < 2.0  # the GUI does not wait
    assert logic.finish_prediction() is None or job.process.poll() is not None
    node = _wait(logic.finish_prediction)
    assert node.GetAttribute("FMABS.layer") == "segmentation"
    # the job read the user's file directly (unmodified NIfTI), and wrote only under the project
    assert job.process.argv[job.process.argv.index("--input") + 1] == str(path)
    assert job.output.is_relative_to(logic.project.root)
    _check_on_grid_of(job.output, path)
    # the node holds exactly what the job wrote
    written = fio.load_label(job.output, logic.project.num_classes).array.astype(np.uint8)
    assert written.any(), "the 2-iteration model (seeded, CPU) finds part of the phantom's object"
    cmap = segmentations.class_of_segments(node, logic.project.classes)
    arr, _ = segmentations.segmentation_to_canonical(logic.seg_logic, logic.scene, node, volume, cmap)
    np.testing.assert_array_equal(arr, written)


def test_edited_volume_is_handed_over_as_a_copy(trained_logic, phantom_scan, tmp_path):
    from SlicerFMABSLib import geometry

    logic = trained_logic
    path, _, _ = phantom_scan
    volume = logic.load_volume_file(path, "patient01")
    array = geometry.node_array_ijk(volume)
    geometry.set_node_array_ijk(volume, array + 1000, geometry.ijk_to_ras(volume))  # edited in Slicer
    job = logic.start_prediction(logic.project.run_dir("model"), volume, device="cpu")
    source = job.process.argv[job.process.argv.index("--input") + 1]
    assert source != str(path) and source.endswith("patient01.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(source).dataobj), array + 1000)  # the edit went to the job
    node = _wait(logic.finish_prediction)
    assert node.GetAttribute("FMABS.layer") == "segmentation"
    _check_on_grid_of(job.output, source)
    with pytest.raises(FileNotFoundError, match="no such model"):
        logic.start_prediction(tmp_path / "nope", volume)


def test_failed_segmentation_shows_the_log(trained_logic, phantom_scan, tmp_path):
    """A folder without a model: the real CLI fails, and the error carries its message."""
    logic = trained_logic
    path, _, _ = phantom_scan
    volume = logic.load_volume_file(path, "patient01")
    (tmp_path / "empty-run").mkdir()
    job = logic.start_prediction(tmp_path / "empty-run", volume, device="cpu")
    with pytest.raises(RuntimeError, match=r"segmentation failed \(exit 2\)") as err:
        _wait(logic.finish_prediction)
    assert "fmabs: error:" in str(err.value) and "empty-run" in str(err.value)
    assert not job.output.exists()


def test_suggestions_in_background(trained_logic):
    logic = trained_logic
    unlabelled = set(logic.project.split("train")) - set(logic.project.crosslabelled())
    logic.start_suggestions("model", "her", 2)
    suggestions = _wait(logic.finish_suggestions)
    assert len(suggestions) == 2 and {s.case for s in suggestions} <= unlabelled
    for s in suggestions:
        assert s.score is not None and set(s.slices) == {"axial", "coronal", "sagittal"}
        for entry in s.slices.values():
            assert 0 <= entry["index"] < 32 and len(entry["ras"]) == 3
    # the real command also recorded the round in the project
    rounds = logic.project.read()["rounds"]
    assert rounds[-1]["kind"] == "suggest" and rounds[-1]["cases"] == [s.case for s in suggestions]


def test_add_loaded_volumes(logic, oblique_scan, scene):
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import geometry

    path, data, affine = oblique_scan
    from_file = logic.load_volume_file(path, "patient 01")
    made = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "made in slicer")
    lin = np.eye(4)
    lin[:3, :3] = AFFINES["PIR"]
    geometry.set_node_array_ijk(made, np.arange(60, dtype=np.int16).reshape(3, 4, 5), lin)
    added = logic.add_volume_nodes([from_file, made])
    assert added == ["patient_01", "made_in_slicer"]
    assert logic.project.image_path("patient_01").read_bytes() == path.read_bytes()  # copied as is
    img = fio.load_image(logic.project.image_path("made_in_slicer"))
    canon, canon_affine = geometry.node_to_canonical(made)
    np.testing.assert_array_equal(img.array, canon)
    np.testing.assert_allclose(img.affine, canon_affine, atol=1e-5)
    assert logic.add_volume_nodes([from_file]) == []  # already there
    assert from_file.GetAttribute("FMABS.case") == "patient_01"
