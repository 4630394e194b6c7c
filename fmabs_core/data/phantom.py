"""Synthetic MRI-like scans with a known structure, for the demo and the tests.

Each scan holds one smooth blob (a few overlapping ellipsoids, warped by a smooth field) brighter than
a textured background, with Rician-like noise and a multiplicative bias field, as in MR images. The
affine can be oblique and non-RAS so that orientation handling is exercised end to end.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from fmabs_core.data.io import atomic_path


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-8)


def make_phantom(shape: tuple[int, int, int] = (64, 64, 48), rng: np.random.Generator | None = None,
                 hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of one synthetic scan.

    ``hard``: what three drawn slices do not teach a 3D model, as in real anatomy (the left atrium's
    veins, the aorta beside it): a thin tube leaving the structure (labelled), an unlabelled neighbour
    of nearly the same brightness a few voxels away (a dark gap between them, an edge a SAM-family
    model sees), and a stronger bias field.
    """
    rng = rng or np.random.default_rng()
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    warp = np.stack([_smooth_noise(shape, 6, rng) for _ in range(3)]) * 3.0
    coords = grid + warp
    centre = np.array(shape, dtype=np.float32) * rng.uniform(0.4, 0.6, 3)
    inside = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(2, 4))):
        c = centre + rng.normal(0, 0.06, 3) * np.array(shape)
        radii = np.array(shape) * rng.uniform(0.12, 0.22, 3)
        d = sum(((coords[a] - c[a]) / radii[a]) ** 2 for a in range(3))
        inside |= d <= 1.0
    neighbour = np.zeros(shape, dtype=bool)
    if hard:
        inside, neighbour = _hard_parts(inside, coords, centre, shape, rng)
    label = inside.astype(np.uint8)
    texture = 0.15 * _smooth_noise(shape, 2, rng)
    image = 0.25 + texture + 0.45 * ndimage.gaussian_filter(label.astype(np.float32), 0.8)
    image += 0.45 * ndimage.gaussian_filter(neighbour.astype(np.float32), 0.8)
    bias = 1.0 + (0.45 if hard else 0.3) * _smooth_noise(shape, 12, rng)
    noise_r, noise_i = rng.normal(0, 0.06, shape), rng.normal(0, 0.06, shape)
    image = np.sqrt((image * bias + noise_r) ** 2 + noise_i**2)  # Rician magnitude
    return image.astype(np.float32), label


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _hard_parts(inside: np.ndarray, coords: np.ndarray, centre: np.ndarray, shape: tuple[int, int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The structure with a thin tube added, and an unlabelled look-alike neighbour beside it."""
    size = np.array(shape, dtype=np.float32)
    extent = np.ptp(np.argwhere(inside), axis=0).max() / 2 + 1 if inside.any() else size.min() / 5
    # a tube of radius ~1.3 voxels from the centre outwards, 0.45 of the scan long
    d = _unit(rng)
    rel = np.moveaxis(coords, 0, -1) - centre
    t = np.clip(rel @ d, 0.0, 0.45 * size.min())
    dist = np.linalg.norm(rel - t[..., None] * d, axis=-1)
    inside = inside | (dist <= 1.3)
    # a neighbour: an ellipsoid whose near side sits ~3 voxels off the structure, in a direction away from the tube
    e = _unit(rng)
    e = e - (e @ d) * d
    e /= np.linalg.norm(e) + 1e-8
    radii = size * rng.uniform(0.10, 0.15, 3)
    c = centre + e * (extent + radii.max() + 3.0)
    near = sum(((coords[a] - c[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
    gap = ndimage.binary_dilation(inside, iterations=2)
    return inside, near & ~gap


def phantom_affine(rng: np.random.Generator, spacing: tuple[float, float, float] = (1.0, 1.0, 1.25),
                   oblique: bool = True) -> np.ndarray:
    """An LPS-ish, slightly rotated affine (so that canonical reorientation is really needed)."""
    angle = rng.uniform(-0.2, 0.2) if oblique else 0.0
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flip = np.diag([-1.0, -1.0, 1.0])  # L->R and P->A flipped, as DICOM-derived files often are
    affine = np.eye(4)
    affine[:3, :3] = rot @ flip @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return affine


def write_dataset(folder: str | Path, n_cases: int = 16, shape: tuple[int, int, int] = (64, 64, 48),
                  seed: int = 0, hard: bool = False) -> Path:
    """Write ``imagesTr/`` and ``labelsTr/`` (nnU-Net / MSD layout) of synthetic scans."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        image, label = make_phantom(shape, rng, hard=hard)
        affine = phantom_affine(rng)
        for sub, arr in (("imagesTr", image), ("labelsTr", label)):
            path = folder / sub / f"phantom_{i:03d}.nii.gz"
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(arr, affine), str(tmp))
    return folder


#: the sample scans the Slicer module registers with Sample Data (SlicerFMABS/SlicerFMABSLib/sampledata.py)
SAMPLE_SCANS = 4
SAMPLE_SHAPE = (48, 48, 40)
SAMPLE_SEED = 2026


def sample_file_names(n: int = SAMPLE_SCANS) -> list[str]:
    """The scans, then the drawn planes of the first (what a clinician's three slices look like)."""
    return [f"FMABS-phantom-{i + 1}.nii.gz" for i in range(n)] + ["FMABS-phantom-1-drawn.nii.gz"]


def write_sample(folder: str | Path, n: int = SAMPLE_SCANS) -> list[Path]:
    """Small phantom scans (int16, 1 x 1 x 1.25 mm, axis-aligned) and the three drawn planes of the first
    (1 = the structure on the planes, 0 elsewhere, as a segmentation); deterministic for the seed."""
    from fmabs_core.active.expert import simulated_crosslabel
    from fmabs_core.contract import UNLABELLED

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SAMPLE_SEED)
    affine = np.diag([1.0, 1.0, 1.25, 1.0])  # RAS, axis-aligned: the file's grid is the canonical one
    names = sample_file_names(n)
    written = []
    for i in range(n):
        image, label = make_phantom(SAMPLE_SHAPE, rng)
        arrays = [(names[i], np.rint(image * 1000).astype(np.int16))]
        if i == 0:
            cross, _ = simulated_crosslabel(label, {}, "truth")
            arrays.append((names[-1], ((cross != UNLABELLED) & (cross > 0)).astype(np.uint8)))
        for name, arr in arrays:
            path = folder / name
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(arr, affine), str(tmp))
            written.append(path)
    return written
