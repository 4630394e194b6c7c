"""NIfTI reading and writing on the canonical RAS grid.

Everything inside the library works on the *canonical* array (nibabel ``as_closest_canonical``):
axis 0 runs R-L (sagittal slices), axis 1 A-P (coronal), axis 2 S-I (axial). This keeps "axial"
meaning the same thing here, in NIfTI viewers and in Slicer. Results are written back in the input's
own orientation and affine, so that they overlay the input voxel for voxel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from fmabs_core.contract import VIEW_AXIS, VIEWS  # noqa: F401 (re-exported)
from fmabs_core.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: view name -> canonical array axis that is constant on a slice of that view


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def case_id(path: str | os.PathLike) -> str:
    """Case identifier: the file name without its NIfTI suffix (and nnU-Net's ``_0000`` channel)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".seg.nrrd", ".nrrd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name


@dataclass
class Volume:
    """A 3D volume on the canonical RAS grid, remembering how to go back to the file's grid."""

    array: np.ndarray
    affine: np.ndarray  # canonical voxel -> world (RAS+ mm)
    source_affine: np.ndarray
    source_shape: tuple[int, ...]
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """Reorient a canonical array (spatial axes first) back to the file's voxel order."""
        src = nib.orientations.io_orientation(self.source_affine)
        ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
        back = nib.orientations.ornt_transform(ras, src)
        return nib.orientations.apply_orientation(array, back)

    def with_array(self, array: np.ndarray) -> "Volume":
        return Volume(array, self.affine, self.source_affine, self.source_shape, self.path)


def _load_nifti(path: Path) -> nib.Nifti1Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path or re-import the project.")
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (.nii or .nii.gz). Convert it first, e.g. in 3D Slicer.")
    try:
        img = nib.load(str(path))
        img = nib.Nifti1Image.from_image(img) if not isinstance(img, nib.Nifti1Image) else img
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot be read as NIfTI ({exc}). Re-export the file.") from exc
    if len(img.shape) != 3:
        extra = " (a 4D file: split its channels or time points into 3D files)" if len(img.shape) == 4 else ""
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}{extra}.")
    if min(img.shape) < 2:
        raise InputError(f"{path}: shape {tuple(img.shape)} is a single slice, not a 3D volume.")
    if not np.all(np.isfinite(img.affine)):
        raise InputError(f"{path}: the affine has NaN or inf entries; fix the header.")
    return img


def _to_volume(img: nib.Nifti1Image, path: Path, data: np.ndarray) -> Volume:
    canon = nib.as_closest_canonical(img)
    src = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    fwd = nib.orientations.ornt_transform(src, ras)
    array = np.ascontiguousarray(nib.orientations.apply_orientation(data, fwd))
    return Volume(array, canon.affine.copy(), img.affine.copy(), tuple(img.shape), Path(path))


def load_image(path: str | os.PathLike) -> Volume:
    """Load an intensity volume as float32 on the canonical grid; NaN or inf is an error."""
    path = Path(path)
    img = _load_nifti(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} voxels are NaN or inf. Replace them (e.g. with 0) before importing."
        )
    return _to_volume(img, path, data)


def load_label(
    path: str | os.PathLike, num_classes: int | None = None, allow_unlabelled: bool = False
) -> Volume:
    """Load a label volume as uint8 on the canonical grid, checking its values.

    ``num_classes`` counts foreground classes (1..C). ``allow_unlabelled`` admits 255 (cross-labels).
    """
    path = Path(path)
    img = _load_nifti(path)
    data = np.asarray(img.dataobj)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: label volume holds NaN or inf; labels must be integers.")
        if not np.all(data == np.round(data)):
            raise InputError(f"{path}: label volume holds non-integer values; labels must be integers.")
    data = np.asarray(data)
    values = np.unique(data)
    allowed = set(range(0, (num_classes if num_classes is not None else 254) + 1))
    if allow_unlabelled:
        allowed.add(255)
    bad = [v for v in values.tolist() if int(v) != v or int(v) not in allowed]
    if bad:
        what = f"0..{num_classes}" if num_classes is not None else "0..254"
        extra = " or 255 (not labelled)" if allow_unlabelled else ""
        raise InputError(
            f"{path}: label values {bad[:10]} are outside the expected {what}{extra}. "
            "Check the project's classes or relabel the file."
        )
    return _to_volume(img, path, data.astype(np.uint8))


def check_pair(image: Volume, label: Volume, atol: float = 1e-3) -> list[str]:
    """Problems that make ``label`` unusable with ``image`` (empty when they match)."""
    problems = []
    if image.source_shape != label.source_shape:
        problems.append(
            f"{label.path}: shape {label.source_shape} differs from its image {image.path} "
            f"{image.source_shape}; resample the label onto the image grid."
        )
    elif not np.allclose(image.source_affine, label.source_affine, atol=atol):
        problems.append(
            f"{label.path}: affine differs from its image {image.path}; the label is not on the image "
            "grid (resample it onto the image, or fix the header)."
        )
    return problems


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_like(
    array: np.ndarray,
    reference: Volume,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.uint8,
    protect: tuple[Path, ...] = (),
) -> Path:
    """Write a canonical-grid array as NIfTI on ``reference``'s own grid (shape, orientation, affine).

    Refuses to overwrite the reference's own file or any path in ``protect`` (the user's inputs).
    """
    path = Path(path)
    protected = {p.resolve() for p in protect if p is not None}
    if reference.path is not None:
        protected.add(Path(reference.path).resolve())
    if path.resolve() in protected:
        raise InputError(f"{path}: refusing to overwrite an input file; choose another output folder.")
    if tuple(array.shape[:3]) != tuple(reference.array.shape[:3]):
        raise ValueError(f"array shape {array.shape} does not match reference {reference.array.shape}")
    data = np.asarray(reference.to_source(np.asarray(array))).astype(dtype)
    img = nib.Nifti1Image(data, reference.source_affine)
    img.set_qform(reference.source_affine, code=1)
    img.set_sform(reference.source_affine, code=1)
    if np.dtype(dtype).kind in "ui":
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def list_niftis(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder.")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
