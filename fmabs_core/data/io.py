"""NIfTI reading and writing on the canonical RAS grid.

Everything inside the library works on the *canonical* array (nibabel ``as_closest_canonical``):
axis 0 runs R-L (sagittal slices), axis 1 A-P (coronal), axis 2 S-I (axial). This keeps "axial"
meaning the same thing here, in NIfTI viewers and in Slicer. Results are written back in the input's
own orientation and affine, so that they overlay the input voxel for voxel.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from fmabs_core.contract import VIEW_AXIS, VIEWS  # noqa: F401 (re-exported)
from fmabs_core.errors import InputError, disk_full

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

    def grid(self) -> "Volume":
        """This volume's grid without its voxels (a read-only, zero-stride placeholder of the same shape):
        what :func:`save_like` needs to write on the grid, kept for many scans at no memory cost."""
        return self.with_array(np.broadcast_to(np.zeros((), np.uint8), self.array.shape))


#: the most memory one volume may take once loaded as float32, in bytes (``FMABS_MAX_VOLUME_BYTES``
#: overrides it); a header claiming more is refused before anything is allocated
MAX_VOLUME_BYTES = int(os.environ.get("FMABS_MAX_VOLUME_BYTES", 8 * 1024 ** 3))
#: deflate shrinks data at most about 1032:1, so a .nii.gz this many times smaller than the voxels its
#: header claims cannot hold them (a truncated file, or a header that lies)
MAX_GZIP_RATIO = 1100
_SCALAR_KINDS = "biuf"


def _memory_ceiling() -> int:
    try:
        import psutil

        return int(min(MAX_VOLUME_BYTES, psutil.virtual_memory().total // 2))
    except Exception:  # noqa: BLE001 - psutil missing or unusable: the fixed ceiling alone
        return MAX_VOLUME_BYTES


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def read_header(path: str | os.PathLike, channels: bool = False) -> nib.Nifti1Image:
    """Open a NIfTI file and check everything its header says, without reading the voxels.

    ``channels``: a 4D file of 3D volumes (X, Y, Z, K) is expected instead of a 3D one.

    Refused, naming the file: missing or not a file, not NIfTI, unreadable header, voxels that are not
    single numbers (RGB, complex), not 3D, a claimed size beyond the memory ceiling or beyond what the
    file can hold, non-finite intensity scaling, and affines with NaN/inf entries or collapsed axes.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path or re-import the project.")
    if not path.is_file():
        raise InputError(f"{path}: not a file (a folder?). Give the path of a .nii or .nii.gz file.")
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file (.nii or .nii.gz). Convert it first, e.g. in 3D Slicer.")
    try:
        _check_raw_header(path)
        img = nib.load(str(path))
        img = nib.Nifti1Image.from_image(img) if not isinstance(img, nib.Nifti1Image) else img
        shape = tuple(int(n) for n in img.shape)
        dtype = np.dtype(img.get_data_dtype())
    except _BadScaling as exc:
        raise InputError(str(exc)) from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot be read as NIfTI ({_reason(exc)}). The file is damaged or not "
                         "NIfTI; re-export it.") from None
    if dtype.fields is not None or dtype.kind not in _SCALAR_KINDS:
        what = "colour (RGB/RGBA)" if dtype.fields is not None else ("complex" if dtype.kind == "c" else "non-numeric")
        raise InputError(f"{path}: voxels of type {dtype.descr if dtype.fields else dtype} are {what} values, not "
                         "single numbers. Save the volume as one grey-level channel (e.g. 'Scalar volume' in "
                         "3D Slicer).")
    if channels:
        if len(shape) != 4:
            raise InputError(f"{path}: expected 4D channels (X, Y, Z, K), got shape {shape}.")
    elif len(shape) != 3:
        extra = " (a 4D file: split its channels or time points into 3D files)" if len(shape) == 4 else ""
        raise InputError(f"{path}: expected a 3D volume, got shape {shape}{extra}.")
    if min(shape[:3]) < 2:
        raise InputError(f"{path}: shape {shape} has fewer than 2 voxels along an axis (a single slice, or a "
                         "damaged header), not a 3D volume.")
    n_voxels = int(np.prod(shape, dtype=np.float64))
    raw_bytes = n_voxels * dtype.itemsize
    need = n_voxels * (4 + dtype.itemsize)  # the file's voxels plus their float32 copy
    ceiling = _memory_ceiling()
    if need > ceiling:
        raise InputError(f"{path}: the header claims shape {shape} of {dtype} ({_gib(need)} in memory), more than "
                         f"the limit of {_gib(ceiling)}. The header is damaged, or the scan must be cropped or "
                         "resampled first.")
    size = path.stat().st_size
    offset = int(img.header.get("vox_offset", 352) or 352)
    if path.name.endswith(".gz"):
        if raw_bytes > max(size, 1) * MAX_GZIP_RATIO:
            raise InputError(f"{path}: the header claims {shape} voxels ({_gib(raw_bytes)}) but the compressed file "
                             f"has only {size} bytes: it is truncated or its header is damaged. Re-export it.")
    elif size < offset + raw_bytes:
        raise InputError(f"{path}: the file is truncated: its header needs {offset + raw_bytes} bytes for {shape} "
                         f"voxels of {dtype}, the file has {size}. Re-export it.")
    _check_affine(path, img)
    return img


def _check_raw_header(path: Path) -> None:
    """Checks on the header's own bytes, for what nibabel quietly repairs or drops on load.

    ``sizeof_hdr`` must be 348 (NIfTI-1) or 540 (NIfTI-2), in either byte order: anything else is a damaged
    file or not NIfTI. ``scl_slope``/``scl_inter`` must not be infinite (nibabel ignores such a scaling, which
    silently changes the intensities the file claims).
    """
    import gzip
    import struct

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
    if len(head) < 4:
        raise ValueError(f"the file is empty or ends after {len(head)} bytes")
    size = {e: int.from_bytes(head[:4], "little" if e == "<" else "big") for e in "<>"}
    endian = next((e for e, n in size.items() if n in (348, 540)), None)
    if endian is None:
        raise ValueError(f"sizeof_hdr is {size['<']}, not 348 (NIfTI-1) or 540 (NIfTI-2)")
    nifti1 = size[endian] == 348
    dim_fmt, dim_at = ("h", 40) if nifti1 else ("q", 16)
    if len(head) >= dim_at + 8:
        ndim = struct.unpack(endian + dim_fmt, head[dim_at:dim_at + struct.calcsize(dim_fmt)])[0]
        if not 1 <= ndim <= 7:
            raise ValueError(f"dim[0] (the number of dimensions) is {ndim}, not 1..7")
    fmt, at = ("f", (112, 116)) if nifti1 else ("d", (176, 184))
    width = struct.calcsize(fmt)
    for key, offset in zip(("scl_slope", "scl_inter"), at):
        if len(head) >= offset + width:
            value = struct.unpack(endian + fmt, head[offset:offset + width])[0]
            if math.isinf(value):
                raise _BadScaling(f"{path}: the header's intensity scaling {key} is {value}; fix the header "
                                  "(scl_slope/scl_inter) or re-export the file.")


class _BadScaling(ValueError):
    pass


def _check_affine(path: Path, img: nib.Nifti1Image) -> None:
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - a header nibabel cannot turn into an affine
        raise InputError(f"{path}: the header's orientation (sform/qform) is unusable ({_reason(exc)}); "
                         "fix the header.") from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the affine (voxel to world, sform/qform) has NaN or inf entries; fix the header.")
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if not sv.max() > 0 or sv.min() <= 1e-6 * sv.max():
        raise InputError(f"{path}: the affine (voxel to world, sform/qform) is singular: its voxel axes collapse "
                         f"(singular values {', '.join(f'{v:.3g}' for v in sv)}), so the scan has no usable "
                         "orientation or spacing. Fix the header.")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _read_voxels(img: nib.Nifti1Image, path: Path, as_float: bool) -> np.ndarray:
    """The whole array, read now (nibabel reads lazily: a truncated file fails here, not later)."""
    try:
        if as_float:
            return np.asarray(img.get_fdata(dtype=np.float32))
        return np.asarray(img.dataobj)
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read {tuple(img.shape)} voxels; free memory, or crop or "
                         "resample the scan.") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError... on damaged files
        raise InputError(f"{path}: the voxel data cannot be read ({_reason(exc)}); the file is truncated or "
                         "damaged. Re-export it.") from None


def _to_volume(img: nib.Nifti1Image, path: Path, data: np.ndarray) -> Volume:
    try:
        canon = nib.as_closest_canonical(img)
        src = nib.orientations.io_orientation(img.affine)
        ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
        fwd = nib.orientations.ornt_transform(src, ras)
        array = np.ascontiguousarray(nib.orientations.apply_orientation(data, fwd))
    except Exception as exc:  # noqa: BLE001 - an orientation nibabel cannot resolve
        raise InputError(f"{path}: the affine gives no usable orientation ({_reason(exc)}); fix the header.") from None
    return Volume(array, canon.affine.copy(), img.affine.copy(), tuple(img.shape), Path(path))


def load_image(path: str | os.PathLike) -> Volume:
    """Load an intensity volume as float32 on the canonical grid; NaN or inf is an error."""
    path = Path(path)
    img = read_header(path)
    data = _read_voxels(img, path, as_float=True)
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
    img = read_header(path)
    data = _read_voxels(img, path, as_float=False)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: label volume holds NaN or inf; labels must be integers.")
        if not np.all(data == np.round(data)):
            raise InputError(f"{path}: label volume holds non-integer values; labels must be integers.")
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


def load_probabilities(path: str | os.PathLike, channels: int | None = None) -> Volume:
    """Load a 4D probability volume (``X, Y, Z, C+1``, uint8 with 255 = 1.0, as a round writes the teacher's) on
    the canonical grid, checking its layout."""
    path = Path(path)
    img = read_header(path, channels=True)
    if img.shape[3] < 2:
        raise InputError(f"{path}: expected 4D probabilities (X, Y, Z, classes + background), found shape "
                         f"{tuple(img.shape)}; use a <case>_teacher.nii.gz written by a pseudo-label round.")
    if channels is not None and img.shape[3] != channels:
        raise InputError(f"{path}: {img.shape[3]} probability channels, expected {channels} (background + classes).")
    data = _read_voxels(img, path, as_float=False)
    if data.dtype != np.uint8:
        raise InputError(f"{path}: probabilities must be stored as uint8 (255 = 1.0), found {data.dtype}.")
    return _to_volume(img, path, data)


def check_pair(image: Volume, label: Volume, atol: float = 1e-3) -> list[str]:
    """Problems that make ``label`` unusable with ``image`` (empty when they match)."""
    problems = []
    if tuple(image.source_shape[:3]) != tuple(label.source_shape[:3]):
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
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name to write.")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot write here ({exc.strerror or exc}); choose another place or fix the "
                         "folder's permissions.") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:  # a full disk while the caller wrote: say so, naming the file, keep nothing
            full = disk_full(path, exc)
            if full is None:
                raise
            raise full from None
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise InputError(f"{path}: cannot be written ({exc.strerror or exc}); choose another place.") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Remove the temporary files of :func:`atomic_path` for ``path`` that a killed process left behind (they were
    never renamed into place, so nothing uses them); return how many. Call it only while holding the lock that
    every writer of ``path`` holds, so that no live writer's temporary file is taken."""
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


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
    if path.is_dir():
        raise InputError(f"{path}: is a folder; refusing to write a segmentation over it.")
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


def list_niftis(folder: str | os.PathLike, skipped: list[Path] | None = None) -> list[Path]:
    """The NIfTI files of a folder (not hidden ones); ``skipped`` receives every other entry."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder." + (" It does not exist." if not folder.exists() else ""))
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot be listed ({exc.strerror or exc}).") from None
    found = [p for p in entries if p.is_file() and is_nifti(p) and not p.name.startswith(".")]
    if skipped is not None:
        skipped.extend(p for p in entries if p not in found)
    return found


def check_output_file(path: str | os.PathLike, inputs: tuple[Path, ...] = (), overwrite: bool = False,
                      option: str = "output") -> Path:
    """Refuse, before any work, an output file that would land on an input, on a folder, on an existing
    file (unless ``overwrite``), in a missing folder or in one that cannot be written."""
    path = Path(path)
    where = f"{option} {path}"
    if path.is_dir():
        raise InputError(f"{where}: is a folder; give the name of a file to write.")
    if path.exists() or path.is_symlink():
        target = path.resolve()
        if any(target == Path(p).resolve() for p in inputs):
            raise InputError(f"{where}: is one of the input files; refusing to overwrite it. Choose another name.")
        if not overwrite:
            raise InputError(f"{where}: exists; refusing to overwrite it. Choose another name, or add --overwrite.")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{where}: the folder {parent} does not exist; create it first or choose another place.")
    check_writable(parent, where)
    return path


def check_writable(folder: Path, what: str) -> None:
    """Write and remove a hidden probe file in ``folder``: a clear error when the folder is read-only."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fmabs-write-test.", dir=folder)
    except OSError as exc:
        raise InputError(f"{what}: cannot write in {folder} ({exc.strerror or exc}); choose another place or fix "
                         "the folder's permissions.") from None
    os.close(fd)
    os.unlink(probe)
