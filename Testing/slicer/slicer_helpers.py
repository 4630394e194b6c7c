"""Helpers shared by the module's tests: oblique affines and a NIfTI writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np


#: `fmabs train` options for a network small enough to train a few iterations on a CPU in seconds
TINY_TRAIN = ["--patch-size", "32", "32", "32", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1"]


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles in degrees (x, then y, then z), no scipy needed."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


#: affines that exercise the geometry: oblique with a negative determinant (Slicer reverses K),
#: oblique right-handed, plain LAS (radiological NIfTI), and a permuted PIR grid
AFFINES = {
    "oblique_lefthanded": rotation(20, -10, 35) @ np.diag([-0.8, 1.1, 2.5]),
    "oblique": rotation(-15, 25, 10) @ np.diag([0.9, 0.7, 1.6]),
    "LAS": np.diag([-1.25, 1.25, 2.5]),
    "PIR": np.array([[0.0, 0.0, -1.0], [-0.9, 0.0, 0.0], [0.0, -1.5, 0.0]]),
}


def write_nifti(path: Path, data: np.ndarray, linear: np.ndarray, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    import nibabel as nib

    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return nib.load(str(path)).affine
