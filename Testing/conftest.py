"""Shared fixtures (small synthetic NIfTI datasets, the LA 2018 scans), and the rule on skips.

A skip hides whatever the test exists to catch, so with ``FMABS_STRICT_SKIPS=1`` (``.ci/run`` sets it)
every skip fails unless :data:`ALLOWED_SKIPS` lists the test with its reason. Skips elsewhere (a
developer's machine without chromium or slicer-core) stay skips and are listed by ``-rs``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LA_DIR = REPO.parent / "shared" / "data" / "la2018"

#: tests that may skip under FMABS_STRICT_SKIPS, with why: what they need cannot be installed by .ci/run
ALLOWED_SKIPS = {
    "Testing/slicer/test_deps.py::test_on_python_39_the_module_loads_and_says_why":
        "needs a Python 3.9 interpreter (Slicer 5.6/5.8's); Debian 12 has none and python.org is not reachable",
}
#: skip reasons allowed under FMABS_STRICT_SKIPS, with why: data that is not part of the repository
ALLOWED_SKIP_REASONS = {
    "cannot mount a small tmpfs here": "the disk-full tests mount a real few-MB filesystem; a machine that refuses "
                                       "mounts (no root) cannot make one, and a fake full disk would test nothing",
    "LA 2018 data not found": "the LA scans live beside the repository (../shared/data/la2018), not in it; the tests "
                              "that need them say so and run wherever the data is",
}
STRICT_SKIPS_VARIABLE = "FMABS_STRICT_SKIPS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under FMABS_STRICT_SKIPS=1 an unlisted skip is a failure that says why it was skipped."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and os.environ.get(STRICT_SKIPS_VARIABLE) == "1"
            and item.nodeid.split("[")[0] not in ALLOWED_SKIPS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(allowed in reason for allowed in ALLOWED_SKIP_REASONS):
            return
        report.outcome = "failed"
        report.longrepr = (f"skipped ({reason}), and {STRICT_SKIPS_VARIABLE}=1 allows only the skips listed in "
                           "Testing/conftest.py ALLOWED_SKIPS: install what the test needs, or list it there with why")


@pytest.fixture(scope="session")
def la_dir() -> Path:
    if not (LA_DIR / "imagesTr").is_dir():
        pytest.skip(f"LA 2018 data not found at {LA_DIR} (it lives in ../shared/data/la2018 beside the repo)")
    return LA_DIR


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """Eight 32x32x32 synthetic scans with oblique, flipped affines in imagesTr/labelsTr."""
    from fmabs_core.data.phantom import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantom"), n_cases=8, shape=(32, 32, 32), seed=3)


def _oblique_affine() -> np.ndarray:
    """A non-RAS (LPI-like) and rotated affine with anisotropic spacing."""
    angle = 0.3
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.8, -1.1, -1.5])
    aff[:3, 3] = [12.0, -7.5, 30.0]
    return aff


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, _oblique_affine() if affine is None else affine), str(path))
    return path


@pytest.fixture
def oblique_affine() -> np.ndarray:
    return _oblique_affine()


@pytest.fixture
def write_nifti():
    """write_nifti(path, data, affine=None): a NIfTI file on an oblique grid unless told otherwise."""
    return _write_nifti
