"""Segmentation and suggestions in a child process, end to end on a real scene.

The child is a stand-in ``fmabs_core`` package (the real one needs torch and a trained model); it
writes its outputs exactly as the CLI does: ``<output>/<case>.nii.gz`` on the input's grid, and
the suggestions as JSON on stdout.
"""

from __future__ import annotations

import sys
import textwrap
import time

import numpy as np
import pytest

from slicer_helpers import AFFINES

FAKE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import nibabel as nib
    import numpy as np

    args = sys.argv[1:]
    if args[0] == "predict":
        src = Path(args[args.index("--input") + 1])
        out = Path(args[args.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        img = nib.load(str(src))
        data = (np.asarray(img.dataobj) > 100).astype(np.uint8)
        name = src.name[:-7] if src.name.endswith(".nii.gz") else src.stem
        nib.save(nib.Nifti1Image(data, img.affine), str(out / f"{name}.nii.gz"))
        print("wrote", out / f"{name}.nii.gz")
    elif args[0] == "suggest":
        print("INFO scoring 3 scans")
        print(json.dumps({"strategy": args[args.index("--strategy") + 1], "cases": [
            {"case": "patient01", "score": 0.9, "axial": {"index": 3, "ras": [1.0, 2.0, 3.0]},
             "coronal": {"index": 4, "ras": [1.0, 2.0, 3.0]}, "sagittal": {"index": 5, "ras": [1.0, 2.0, 3.0]}}]}))
    else:
        sys.exit("unknown command")
''')


@pytest.fixture
def logic(scene, tmp_path, monkeypatch):
    from SlicerFMABSLib.logic import FMABSLogic

    pkg = tmp_path / "fake" / "fmabs_core"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE)
    lg = FMABSLogic(scene)
    lg.python = sys.executable
    monkeypatch.setattr(lg, "job_pythonpath", lambda: [str(tmp_path / "fake")])
    lg.create_project(tmp_path / "project", {1: "bright"})
    return lg


def _wait(fn, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = fn()
        if out is not None:
            return out
        time.sleep(0.05)
    raise AssertionError("the background job did not finish")


def test_segment_volume_in_background(logic, oblique_scan, tmp_path):
    from fmabs_core import io as fio
    from SlicerFMABSLib import segmentations

    path, data, affine = oblique_scan
    volume = logic.load_volume_file(path, "patient01")
    (tmp_path / "model").mkdir()
    t0 = time.time()
    job = logic.start_prediction(tmp_path / "model", volume)
    assert time.time() - t0 < 2.0  # the GUI does not wait
    assert logic.finish_prediction() is None or job.process.poll() is not None
    node = _wait(logic.finish_prediction)
    assert node.GetAttribute("FMABS.layer") == "segmentation"
    expected = fio.load_image(path).array > 100
    cmap = segmentations.class_of_segments(node, logic.project.classes)
    arr, _ = segmentations.segmentation_to_canonical(logic.seg_logic, logic.scene, node, volume, cmap)
    np.testing.assert_array_equal(arr, expected.astype(np.uint8))
    # the job read the user's file directly (unmodified NIfTI), and wrote only under the project
    assert f"--input {path}" in job.process.log_path.read_text() or str(path) in " ".join(job.process.argv)
    assert job.output.is_relative_to(logic.project.root)


def test_edited_volume_is_handed_over_as_a_copy(logic, oblique_scan, tmp_path):
    from SlicerFMABSLib import geometry

    path, _, _ = oblique_scan
    volume = logic.load_volume_file(path, "patient01")
    array = geometry.node_array_ijk(volume)
    geometry.set_node_array_ijk(volume, array + 1000, geometry.ijk_to_ras(volume))  # edited in Slicer
    (tmp_path / "model").mkdir()
    job = logic.start_prediction(tmp_path / "model", volume)
    source = job.process.argv[job.process.argv.index("--input") + 1]
    assert source != str(path) and source.endswith("patient01.nii.gz")
    node = _wait(logic.finish_prediction)
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1  # every voxel is > 100 after the edit
    with pytest.raises(FileNotFoundError, match="no such model"):
        logic.start_prediction(tmp_path / "nope", volume)


def test_failed_segmentation_shows_the_log(logic, oblique_scan, tmp_path):
    path, _, _ = oblique_scan
    volume = logic.load_volume_file(path, "patient01")
    (tmp_path / "model").mkdir()
    logic.python = sys.executable
    (tmp_path / "fake" / "fmabs_core" / "__main__.py").write_text("import sys; sys.exit('fmabs: error: bad model')")
    logic.start_prediction(tmp_path / "model", volume)
    with pytest.raises(RuntimeError, match="bad model"):
        _wait(logic.finish_prediction)


def test_suggestions_in_background(logic):
    logic.start_suggestions("r1", "her", 2)
    suggestions = _wait(logic.finish_suggestions)
    assert [s.case for s in suggestions] == ["patient01"]
    assert suggestions[0].slices["sagittal"] == {"index": 5, "ras": [1.0, 2.0, 3.0]}


def test_add_loaded_volumes(logic, oblique_scan, scene):
    from fmabs_core import io as fio
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
