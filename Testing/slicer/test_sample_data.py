"""Sample Data > FM-ABS: the shipped phantom files, their registration, and their install rules.

Sample Data itself is a Slicer module (not in slicer-core): that it loads the files into nodes is checked by
the module's in-app test (``SlicerFMABSTest.test_sample_data``); here, everything it is given.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "Resources" / "SampleData"
sys.path.insert(0, str(REPO / "SlicerFMABS"))

from SlicerFMABSLib import sampledata  # noqa: E402


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    """The binary files in the repository are the seeded phantoms (regenerate with write_sample if this fails)."""
    from fmabs_core.data.phantom import sample_file_names, write_sample

    assert sample_file_names() == sampledata.FILES
    write_sample(tmp_path)
    for name in sampledata.FILES:
        shipped, fresh = nib.load(str(FOLDER / name)), nib.load(str(tmp_path / name))
        np.testing.assert_array_equal(np.asarray(shipped.dataobj), np.asarray(fresh.dataobj))
        np.testing.assert_allclose(shipped.affine, fresh.affine)
    drawn = np.asarray(nib.load(str(FOLDER / sampledata.FILES[-1])).dataobj)
    assert set(np.unique(drawn)) == {0, 1}  # one segment: the structure on the three planes
    planes = np.zeros(drawn.shape, bool)  # everything drawn lies on one slice per view, each with some drawing
    for axis in range(3):
        k = int(np.argmax(drawn.sum(axis=tuple(a for a in range(3) if a != axis))))
        plane = [slice(None)] * 3
        plane[axis] = k
        assert drawn[tuple(plane)].any()
        planes[tuple(plane)] = True
    assert not drawn[~planes].any()


def test_registration_arguments_point_at_the_files_with_their_checksums():
    args = sampledata.source_arguments(FOLDER, thumbnail="icon.png")
    assert args["category"] == "FM-ABS" and len(args["uris"]) == len(args["fileNames"]) == len(args["nodeNames"])
    assert args["loadFileTypes"] == ["VolumeFile"] * 4 + ["SegmentationFile"]
    for uri, name, checksum in zip(args["uris"], args["fileNames"], args["checksums"]):
        with urllib.request.urlopen(uri) as f:  # what Sample Data's urlretrieve reads
            data = f.read()
        assert data == (FOLDER / name).read_bytes()
        assert checksum == "SHA256:" + hashlib.sha256(data).hexdigest()


def test_the_module_registers_at_startup_and_cmake_installs_the_files():
    module = (REPO / "SlicerFMABS" / "SlicerFMABS.py").read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in module
    assert "def test_sample_data" in module and "self.test_sample_data" in module
    cmake = (REPO / "SlicerFMABS" / "CMakeLists.txt").read_text()
    for name in sampledata.FILES:
        assert f"Resources/SampleData/{name}" in cmake
    assert "${MODULE_NAME}Lib/sampledata.py" in cmake
