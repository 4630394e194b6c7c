"""Shared fixtures for the module's headless tests.

The MRML tests run on real nodes from the ``slicer-core`` wheel (Slicer's data layer without the
application). When it is missing they are skipped with a message; CI installs it (test extras).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from slicer_helpers import AFFINES, TINY_TRAIN, write_nifti  # noqa: F401  (helpers live in their own module: two
# conftest.py files in Testing/ would make "from conftest import" ambiguous)

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SlicerFMABS"
for p in (str(REPO), str(MODULE_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

SLICER_MISSING = "slicer-core is not installed (pip install slicer-core, or the 'test' extras): MRML tests skipped"


def slicer_core():
    """Import slicer-core's ``slicer`` package or skip the calling test with a clear message."""
    try:
        import slicer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken binary wheel
        pytest.skip(f"{SLICER_MISSING} ({exc})")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip(f"{SLICER_MISSING} (the installed 'slicer' has no vtkMRMLScene)")
    return slicer


@pytest.fixture
def slicer_mod():
    return slicer_core()


@pytest.fixture
def scene(slicer_mod):
    """A fresh MRML scene, also set as ``slicer.mrmlScene`` (as in the application)."""
    import vtk

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    vtk.vtkObject.GlobalWarningDisplayOff()
    scn = slicer_mod.vtkMRMLScene()
    slicer_mod.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scn)
    previous = getattr(slicer_mod, "mrmlScene", None)
    slicer_mod.mrmlScene = scn
    yield scn
    scn.Clear(1)
    slicer_mod.mrmlScene = previous


@pytest.fixture
def oblique_scan(tmp_path):
    """A smooth random scan on an oblique, left-handed grid (the hardest case), and its affine."""
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(18, 20, 12)) * 50 + 100).astype(np.float32)
    path = tmp_path / "input" / "patient01.nii.gz"
    path.parent.mkdir()
    affine = write_nifti(path, data, AFFINES["oblique_lefthanded"])
    return path, data, affine


# ---- a tiny real fmabs project, for the tests that run real `python -m fmabs_core` jobs ---------------
@pytest.fixture(scope="session")
def project_templates(tmp_path_factory) -> dict[str, Path]:
    """Six 32^3 phantom scans imported twice: ``bare`` (no cross-labels) and ``labelled`` (two simulated)."""
    from fmabs_core.cli import main
    from fmabs_core.data.project import import_folder
    from fmabs_core.data.phantom import write_dataset

    base = tmp_path_factory.mktemp("fmabs-projects")
    data = write_dataset(base / "data", n_cases=6, shape=(32, 32, 32), seed=0)
    out = {}
    for name in ("bare", "labelled"):
        project, problems = import_folder(data, base / name)
        assert problems == []
        out[name] = project.root
    assert main(["crosslabel", "simulate", "--project", str(out["labelled"]), "--count", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_template(project_templates, tmp_path_factory) -> Path:
    """The labelled project with run ``model``: a real network trained for 2 iterations by the real CLI."""
    import shutil
    import subprocess

    root = tmp_path_factory.mktemp("fmabs-trained") / "project"
    shutil.copytree(project_templates["labelled"], root)
    argv = [sys.executable, "-m", "fmabs_core", "train", "--project", str(root), "--method", "sup", "--iterations",
            "2", "--run", "model", "--device", "cpu", *TINY_TRAIN]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "runs" / "model" / "model.pt").is_file()
    return root


@pytest.fixture
def bare_project(project_templates, tmp_path) -> Path:
    """A private copy (tests write runs into it) of the project without cross-labels."""
    import shutil

    return Path(shutil.copytree(project_templates["bare"], tmp_path / "bare"))


@pytest.fixture
def labelled_project(project_templates, tmp_path) -> Path:
    """A private copy of the project with two cross-labelled training scans."""
    import shutil

    return Path(shutil.copytree(project_templates["labelled"], tmp_path / "labelled"))


@pytest.fixture
def trained_project(trained_template, tmp_path) -> Path:
    """A private copy of the trained project (``fmabs suggest`` records its rounds in fmabs.json)."""
    import shutil

    return Path(shutil.copytree(trained_template, tmp_path / "trained"))
