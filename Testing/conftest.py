"""Shared fixtures: small synthetic NIfTI datasets and the LA 2018 scans when present."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LA_DIR = REPO.parent / "shared" / "data" / "la2018"


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
