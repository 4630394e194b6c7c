"""Segmentation nodes <-> label arrays and files: cross-labels, review layers, export.

Every array here is on fmabs_core's canonical grid of the reference volume (see geometry.py), so
a cross-label written from a drawing loads with ``fmabs_core.io.load_label`` voxel for voxel over
the project image, whatever the scan's orientation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import vtk

from . import deps, geometry
from .scene import scratch_nodes

log = logging.getLogger(__name__)

deps.ensure_fmabs_core_importable()  # fmabs_core.contract (standard library only) is shared with the library

#: cross-label value of the voxels nobody labelled
from fmabs_core.contract import UNLABELLED  # noqa: E402
#: segment tag holding the project class value of a segment (survives renaming by the user)
CLASS_TAG = "FMABS.class"
#: base colour of each review layer: per-view SAM pseudo-labels, their fusion, the prediction
LAYER_COLOURS = {
    "axial": (0.95, 0.30, 0.30),
    "coronal": (0.30, 0.85, 0.35),
    "sagittal": (0.95, 0.85, 0.25),
    "fused": (0.25, 0.75, 0.95),
    "prediction": (0.85, 0.35, 0.90),
    "label": (0.90, 0.60, 0.20),
}


@dataclass
class CrossLabelReport:
    """What was saved and what the user should look at (warnings are meant for a message box)."""

    path: Path | None
    slices: dict[str, int]
    drawn_voxels: dict[str, int] = field(default_factory=dict)
    outside_voxels: int = 0
    warnings: list[str] = field(default_factory=list)


# ---- pure numpy --------------------------------------------------------------------------------
def crosslabel_from_drawing(drawn: np.ndarray, slices: Mapping[str, int]) -> tuple[np.ndarray, CrossLabelReport]:
    """Keep the drawing on the three planes (0 = background there), 255 everywhere else.

    ``drawn`` is a canonical class array (0 background, 1..C). Drawing outside the planes is not
    saved (the library would read it as a labelled voxel otherwise) and is reported.
    """
    drawn = np.asarray(drawn)
    cross = np.full(drawn.shape, UNLABELLED, dtype=np.uint8)
    on_planes = np.zeros(drawn.shape, dtype=bool)
    report = CrossLabelReport(path=None, slices={v: int(i) for v, i in slices.items()})
    for view, index in slices.items():
        axis = geometry.VIEW_AXIS[view]
        if not 0 <= int(index) < drawn.shape[axis]:
            raise geometry.GeometryError(
                f"{view} slice {index} is outside the volume (size {drawn.shape[axis]} on that axis)"
            )
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = int(index)
        plane = drawn[tuple(sl)]
        cross[tuple(sl)] = plane.astype(np.uint8)
        on_planes[tuple(sl)] = True
        count = int((plane > 0).sum())
        report.drawn_voxels[view] = count
        if count == 0:
            report.warnings.append(
                f"Nothing is drawn on the {view} slice {index}: it is saved as all background. "
                "Draw the structure there, or leave it if the structure is absent from that slice."
            )
    missing = [v for v in ("axial", "coronal", "sagittal") if v not in slices]
    if missing:
        report.warnings.append(f"No {', '.join(missing)} slice given: a cross-label needs all three views.")
    report.outside_voxels = int(((drawn > 0) & ~on_planes).sum())
    if report.outside_voxels:
        where = ", ".join(f"{v} {i}" for v, i in slices.items())
        report.warnings.append(
            f"{report.outside_voxels} drawn voxels lie outside the three slices ({where}) and were not saved. "
            "Draw only on the shown slices (tip: disable 'Sphere brush' and use thin brushes)."
        )
    return cross, report


# ---- segment <-> class ---------------------------------------------------------------------------
def segment_ids(segmentation_node: Any) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def class_of_segments(segmentation_node: Any, classes: Mapping[int, str]) -> dict[str, int]:
    """Map segment IDs to project class values: the FMABS.class tag, else the segment name.

    A single unmatched segment with a single-class project is taken as that class, because users
    often draw with a default "Segment_1".
    """
    seg = segmentation_node.GetSegmentation()
    by_name = {name.strip().lower(): value for value, name in classes.items()}
    out: dict[str, int] = {}
    unmatched = []
    for sid in segment_ids(segmentation_node):
        segment = seg.GetSegment(sid)
        value = segment_class_tag(segment)
        if value is None:
            value = by_name.get(segment.GetName().strip().lower())
        if value is None:
            unmatched.append(sid)
        else:
            out[sid] = value
    if unmatched:
        if len(unmatched) == 1 and len(classes) == 1 and not out:
            out[unmatched[0]] = next(iter(classes))
        else:
            names = [seg.GetSegment(s).GetName() for s in unmatched]
            raise ValueError(
                f"segments {names} of '{segmentation_node.GetName()}' match no project class "
                f"{dict(classes)}; rename them to a class name."
            )
    unknown = sorted(set(out.values()) - set(classes))
    if unknown:
        raise ValueError(f"segment class values {unknown} are not project classes {dict(classes)}")
    return out


def segment_class_tag(segment: Any) -> int | None:
    """The class value stored on a segment by this module, if any."""
    if not segment.HasTag(CLASS_TAG):
        return None
    ref = vtk.reference("")
    segment.GetTag(CLASS_TAG, ref)
    try:
        return int(str(ref))
    except ValueError:
        return None


def add_class_segments(segmentation_node: Any, classes: Mapping[int, str], base_colour: Sequence[float] | None = None) -> dict[int, str]:
    """Add one empty segment per class (tagged with its value); returns class value -> segment ID."""
    seg = segmentation_node.GetSegmentation()
    out = {}
    for value, name in sorted(classes.items()):
        colour = class_colour(value, base_colour)
        sid = seg.AddEmptySegment("", name, list(colour))
        seg.GetSegment(sid).SetTag(CLASS_TAG, str(value))
        out[value] = sid
    return out


def class_colour(value: int, base: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Distinct colours per class; with a layer ``base`` colour, classes are shades of it."""
    palette = [(0.90, 0.35, 0.30), (0.30, 0.70, 0.95), (0.35, 0.85, 0.40), (0.95, 0.80, 0.25),
               (0.75, 0.40, 0.90), (0.95, 0.55, 0.20), (0.40, 0.90, 0.85)]
    if base is None:
        return palette[(value - 1) % len(palette)]
    shade = 1.0 - 0.25 * ((value - 1) % 3)
    return tuple(float(min(1.0, c * shade)) for c in base)  # type: ignore[return-value]


# ---- segmentation -> arrays -----------------------------------------------------------------------
def _export_segment_ijk(seg_logic: Any, scene: Any, segmentation_node: Any, segment_id: str, reference: Any) -> np.ndarray:
    """One segment as a 0/1 array on the reference volume's IJK grid.

    The export goes through a temporary labelmap node; ``ExportSegmentsToLabelmapNode`` also adds a
    ``<segmentation>_ColorTable`` node and a display node. All of them are removed again.
    """
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    with scratch_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__fmabs_export__")
        if not seg_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference):
            raise RuntimeError(
                f"exporting segment '{segment_id}' of '{segmentation_node.GetName()}' onto "
                f"'{reference.GetName()}' failed"
            )
        return geometry.node_array_ijk(labelmap) > 0


def segmentation_to_canonical(seg_logic: Any, scene: Any, segmentation_node: Any, reference_volume: Any,
                              class_map: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Class array (uint8) of the given segments on the reference volume's canonical grid, and its affine."""
    affine = geometry.ijk_to_ras(reference_volume)
    dims = reference_volume.GetImageData().GetDimensions()
    out = np.zeros(tuple(dims), dtype=np.uint8)
    for sid, value in class_map.items():
        mask = _export_segment_ijk(seg_logic, scene, segmentation_node, sid, reference_volume)
        overlap = int((mask & (out > 0) & (out != value)).sum())
        if overlap:
            log.warning("segment %s overlaps another class on %d voxels; the later segment wins", sid, overlap)
        out[mask] = value
    return geometry.to_canonical(out, affine)


# ---- files -> segmentations -----------------------------------------------------------------------
def read_labelmap_node(scene: Any, path: str | os.PathLike, name: str) -> Any:
    """Read a label file into a new labelmap node with Slicer's own reader (storage node, no app needed)."""
    import slicer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    storage.SetCenterImage(False)
    scene.AddNode(storage)
    try:
        if not storage.ReadData(node):
            raise OSError(f"{path}: Slicer could not read this label file")
    except Exception:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise
    scene.RemoveNode(storage)  # the node is a temporary copy, not something to save back
    return node


def labelmap_to_segmentation(seg_logic: Any, scene: Any, labelmap_node: Any, reference_volume: Any, name: str,
                             classes: Mapping[int, str], base_colour: Sequence[float] | None,
                             segmentation_node: Any | None = None) -> Any:
    """Import a labelmap node as segments named after the classes, on the reference volume's geometry."""
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    before = set(segment_ids(segmentation_node))
    values = np.unique(geometry.node_array_ijk(labelmap_node))
    if any(v != 0 for v in values) and not seg_logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ""):
        raise RuntimeError(f"importing '{labelmap_node.GetName()}' into segmentation '{name}' failed")
    seg = segmentation_node.GetSegmentation()
    for sid in [s for s in segment_ids(segmentation_node) if s not in before]:
        segment = seg.GetSegment(sid)
        value = int(segment.GetLabelValue())  # Slicer keeps the file's label value
        if value == UNLABELLED:  # "not labelled" is no structure: drop it rather than show it
            seg.RemoveSegment(sid)
            continue
        segment.SetName(classes.get(value, f"class {value}"))
        segment.SetColor(*class_colour(value, base_colour))
        segment.SetTag(CLASS_TAG, str(value))
    return segmentation_node


def load_label_file_as_segmentation(seg_logic: Any, scene: Any, path: str | os.PathLike, reference_volume: Any,
                                    name: str, classes: Mapping[int, str], layer: str = "label") -> Any:
    """A label NIfTI (pseudo-label, prediction) as a segmentation node aligned with ``reference_volume``.

    Raises when the file is not on the volume's grid: overlaying it would mislead the reviewer. Only the
    segmentation node (and its display node) stays in the scene; the labelmap read from the file and
    whatever came with it are removed.
    """
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    try:
        with scratch_nodes(scene):
            labelmap = read_labelmap_node(scene, path, f"__fmabs_{name}__")
            ref_affine, ref_shape = geometry.canonical_grid(reference_volume)
            lab_affine, lab_shape = geometry.canonical_grid(labelmap)
            if not geometry.same_grid(ref_affine, ref_shape, lab_affine, lab_shape):
                raise geometry.GeometryError(
                    f"{path}: not on the grid of volume '{reference_volume.GetName()}' "
                    f"(shape {lab_shape} vs {ref_shape}); was it made from another scan?"
                )
            labelmap_to_segmentation(seg_logic, scene, labelmap, reference_volume, name, classes,
                                     LAYER_COLOURS.get(layer), segmentation_node=node)
    except BaseException:
        display = node.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(node)
        raise
    node.SetAttribute("FMABS.layer", layer)
    node.SetAttribute("FMABS.file", str(path))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(0.35)
        display.SetOpacity2DOutline(1.0)
    return node


# ---- segmentation -> files -----------------------------------------------------------------------
def write_nifti_canonical(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, out_affine: np.ndarray,
                          protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write a canonical uint8 array in the voxel order of ``out_affine``'s grid, atomically."""
    import nibabel as nib
    from fmabs_core.data.io import atomic_path

    path = Path(path)
    if any(Path(p).resolve() == path.resolve() for p in protect if p):
        raise ValueError(f"{path}: refusing to overwrite an input file; choose another output folder.")
    data = geometry.from_canonical(np.asarray(array), out_affine).astype(np.uint8)
    check, check_affine = geometry.to_canonical(data, out_affine)
    if not np.allclose(check_affine, affine, atol=geometry.AFFINE_ATOL):
        raise geometry.GeometryError(f"{path}: output grid does not match the segmentation's grid")
    img = nib.Nifti1Image(data, out_affine)
    img.set_qform(out_affine, code=1)
    img.set_sform(out_affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_seg_nrrd(scene: Any, segmentation_node: Any, path: str | os.PathLike) -> Path:
    """Save a segmentation as .seg.nrrd (Slicer's own format, keeps names and colours), atomically."""
    import slicer
    from fmabs_core.data.io import atomic_path

    path = Path(path)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    try:
        with atomic_path(path) as tmp:
            storage.SetFileName(str(tmp))
            if not storage.WriteData(segmentation_node):
                raise OSError(f"{path}: writing segmentation '{segmentation_node.GetName()}' failed")
    finally:
        scene.RemoveNode(storage)
    return path


def read_seg_nrrd(scene: Any, path: str | os.PathLike, name: str) -> Any:
    """Read a .seg.nrrd into a new segmentation node."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    try:
        if not storage.ReadData(node):
            raise OSError(f"{path}: Slicer could not read this segmentation")
    finally:
        scene.RemoveNode(storage)
    return node
