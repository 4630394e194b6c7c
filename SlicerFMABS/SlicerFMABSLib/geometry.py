"""Volume nodes <-> numpy arrays on fmabs_core's canonical RAS grid, and slice-view placement.

Why this module exists: Slicer does not always keep a NIfTI file's voxel order. Its ITK reader
reverses the K axis of files whose affine has a negative determinant (LAS, radiological NIfTI),
so a node's IJK array and IJKToRAS matrix may differ from what nibabel reads, while both describe
the same voxels in world space. Going through the *canonical* grid (nibabel
``as_closest_canonical``, the grid every fmabs_core array lives on) removes that ambiguity: the
canonical array and affine of a node equal those of ``fmabs_core.io.load_image`` of its file.

Only numpy, nibabel and VTK/MRML are used, no Qt: the functions run headless with slicer-core.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

from . import deps

log = logging.getLogger(__name__)

deps.ensure_fmabs_core_importable()  # fmabs_core.contract (standard library only) is shared with the library

#: canonical array axis that is constant on a slice of each view
from fmabs_core.contract import VIEW_AXIS, VIEWS  # noqa: E402,F401
#: Slicer's default slice views and the view each one shows while labelling
from .scene import SLICE_VIEW_OF  # noqa: E402,F401
#: slice orientation preset names in Slicer
ORIENTATION_PRESET = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
#: tolerance (mm) when comparing affines of the same grid read by ITK and by nibabel (float32 headers)
AFFINE_ATOL = 1e-3


class GeometryError(ValueError):
    """A node or file is not on the grid it must be on (names the node/file and what differs)."""


# ---- matrices -----------------------------------------------------------------------------------
def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 array (this is the NIfTI affine of the node's IJK array)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


# ---- voxels -------------------------------------------------------------------------------------
def node_array_ijk(volume_node: Any) -> np.ndarray:
    """A copy of the node's voxels indexed [i, j, k] (slicer.util.arrayFromVolume gives [k, j, i])."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise GeometryError(f"volume node '{name}' has no voxels; load the volume again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(
            f"volume node '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
            "a single-channel scalar volume is needed (extract one channel first)."
        )
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(flat.reshape(dims[::-1]).transpose(2, 1, 0))


def set_node_array_ijk(volume_node: Any, array: np.ndarray, affine: np.ndarray) -> None:
    """Replace the node's voxels ([i, j, k] array) and geometry (IJK-to-RAS ``affine``)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise GeometryError(f"expected a 3D array for node '{volume_node.GetName()}', got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.int64:  # VTK_LONG_LONG volumes do not render in Slicer
        array = array.astype(np.int32)
    kji = np.ascontiguousarray(array.transpose(2, 1, 0))
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape)
    vtk_array = numpy_support.numpy_to_vtk(kji.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(kji.dtype))
    image.GetPointData().SetScalars(vtk_array)
    volume_node.SetIJKToRASMatrix(array_to_matrix(affine))
    volume_node.SetAndObserveImageData(image)
    volume_node.Modified()


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (per input axis: output axis, flip) that takes an array to canonical RAS."""
    import nibabel as nib

    return nib.orientations.io_orientation(affine)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of any grid -> the canonical RAS array and affine (as nibabel as_closest_canonical)."""
    import nibabel as nib

    ornt = canonical_orientation(affine)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))
    out_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return out, out_affine


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A canonical array -> the voxel order of the grid whose IJK-to-RAS is ``affine``."""
    import nibabel as nib

    ornt = canonical_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def canonical_header(affine: np.ndarray, dims: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Canonical affine and shape of a grid from its affine and shape alone (no voxels read)."""
    import nibabel as nib

    ornt = canonical_orientation(affine)
    shape = [0, 0, 0]
    for axis, (out_axis, _flip) in enumerate(ornt):
        shape[int(out_axis)] = int(dims[axis])
    return affine @ nib.orientations.inv_ornt_aff(ornt, tuple(dims)[:3]), tuple(shape)  # type: ignore[return-value]


def canonical_grid(volume_node: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The canonical-grid affine and shape of a node (without copying voxels)."""
    image = volume_node.GetImageData()
    if image is None:
        raise GeometryError(f"volume node '{volume_node.GetName()}' has no voxels; load the volume again.")
    return canonical_header(ijk_to_ras(volume_node), image.GetDimensions())


def node_to_canonical(volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """The node's voxels and affine on the canonical RAS grid (== fmabs_core.io.load_image of its file)."""
    return to_canonical(node_array_ijk(volume_node), ijk_to_ras(volume_node))


def same_grid(affine_a: np.ndarray, shape_a: tuple, affine_b: np.ndarray, shape_b: tuple, atol: float = AFFINE_ATOL) -> bool:
    """True when two canonical grids coincide voxel for voxel."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


# ---- slice views --------------------------------------------------------------------------------
def snapped_point(affine: np.ndarray, shape: tuple[int, ...], view: str, index: int | None = None,
                  ras: Any = None) -> tuple[np.ndarray, int]:
    """RAS point and canonical index of the voxel plane to show for a suggestion.

    The suggestion's RAS point is mapped to the canonical grid; its coordinate along the view's
    axis is replaced by ``index`` when given (exact), else rounded to the nearest plane, so the
    view lands on voxel centres and the drawing fills exactly one plane.
    """
    if view not in VIEW_AXIS:
        raise ValueError(f"unknown view '{view}' (use axial, coronal or sagittal)")
    axis = VIEW_AXIS[view]
    inv = np.linalg.inv(affine)
    if ras is not None:
        ras = np.asarray(ras, dtype=float).reshape(3)
        voxel = (inv @ np.append(ras, 1.0))[:3]
    else:
        voxel = (np.asarray(shape[:3], dtype=float) - 1) / 2.0
    if index is None:
        if ras is None:
            raise ValueError(f"{view}: a suggestion needs an index or a RAS point")
        index = int(np.rint(voxel[axis]))
    index = int(index)
    if not 0 <= index < shape[axis]:
        raise GeometryError(f"{view} slice {index} is outside the volume (size {shape[axis]} on that axis)")
    if ras is not None and abs(voxel[axis] - index) > 0.5 + 1e-3:
        log.warning("%s: suggested RAS %s lies at plane %.2f, not at the suggested index %d; using the index",
                    view, np.round(ras, 2).tolist(), voxel[axis], index)
    voxel = voxel.copy()
    voxel[axis] = index
    return (affine @ np.append(voxel, 1.0))[:3], index


def slice_offset(slice_to_ras: np.ndarray, point: np.ndarray) -> float:
    """Slicer's slice offset of the plane through ``point`` (offset = slice normal . point)."""
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    return float(normal @ np.asarray(point, dtype=float)[:3])


def place_slice_view(slice_node: Any, volume_node: Any, view: str, index: int | None = None,
                     ras: Any = None) -> float:
    """Turn a slice view to the volume's voxel planes and move it to the suggested plane.

    Returns the slice offset that was set. Rotating to the volume plane matters for oblique scans:
    otherwise Slicer reformats across voxel planes and the drawing would smear over two planes.
    """
    preset = ORIENTATION_PRESET[view]
    if slice_node.HasSliceOrientationPreset(preset):
        slice_node.SetOrientation(preset)
    slice_node.RotateToVolumePlane(volume_node)
    affine, shape = canonical_grid(volume_node)
    point, _ = snapped_point(affine, shape, view, index, ras)
    offset = slice_offset(matrix_to_array(slice_node.GetSliceToRAS()), point)
    slice_node.SetSliceOffset(offset)
    return offset


def shown_index(slice_node: Any, volume_node: Any, view: str, tolerance: float = 0.1) -> int:
    """Canonical index of the voxel plane a slice view shows; errors when the view is oblique to it."""
    axis = VIEW_AXIS[view]
    affine, shape = canonical_grid(volume_node)
    slice_to_ras = matrix_to_array(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    axis_dir = affine[:3, axis] / np.linalg.norm(affine[:3, axis])
    layout = slice_node.GetLayoutName() or slice_node.GetName()
    if abs(float(normal @ axis_dir)) < 1 - 1e-4:
        raise GeometryError(
            f"the {layout} view is not aligned with the {view} voxel planes of '{volume_node.GetName()}'; "
            "press 'Show slices' to align the views before saving."
        )
    origin = slice_to_ras[:3, 3]
    voxel = (np.linalg.inv(affine) @ np.append(origin, 1.0))[:3]
    index = int(np.rint(voxel[axis]))
    if abs(voxel[axis] - index) > tolerance:
        log.warning("%s view lies between voxel planes (%.2f); using plane %d", layout, voxel[axis], index)
    if not 0 <= index < shape[axis]:
        raise GeometryError(f"the {layout} view ({view} plane {index}) is outside '{volume_node.GetName()}'.")
    return index


def slice_points(slices: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalise a suggestion's per-view entries to {"index": int|None, "ras": list|None}."""
    out = {}
    for view in ("axial", "coronal", "sagittal"):
        entry = slices.get(view)
        if entry is None:
            continue
        if isinstance(entry, (int, np.integer)):
            out[view] = {"index": int(entry), "ras": None}
        else:
            index = entry.get("index")
            out[view] = {"index": None if index is None else int(index), "ras": entry.get("ras")}
    return out
