"""The user's scene after the module's work, on real MRML nodes (slicer-core): no temporary node left
(``ExportSegmentsToLabelmapNode``'s ``*_ColorTable`` included), collections released, slice nodes by ID."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from slicer_helpers import AFFINES, write_nifti


def census(scene) -> dict[str, int]:
    """Number of nodes of each class in the scene."""
    return dict(collections.Counter(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())))


@pytest.fixture
def labelling(scene, tmp_path):
    """A project scan loaded for labelling, with a drawing on its three centre planes."""
    from SlicerFMABSLib import geometry
    from SlicerFMABSLib.logic import FMABSLogic

    logic = FMABSLogic(scene)
    logic.create_project(tmp_path / "project", {1: "atrium", 2: "scar"})
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "s1.nii.gz", np.random.default_rng(0).random((10, 11, 12)).astype(np.float32),
                AFFINES["oblique_lefthanded"])
    logic.project.add_case(tmp_path / "in" / "s1.nii.gz")
    volume = logic.start_labelling("s1")
    drawing = logic.label_segmentation()
    _, shape = geometry.canonical_grid(volume)
    mask = np.zeros(shape, np.uint8)
    mask[2:6, 3:7, 5] = 1
    import vtk

    # the Segment Editor's brush, as test_labels.paint: a labelmap imported into the segment
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "paint")
    geometry.set_node_array_ijk(labelmap, geometry.from_canonical(mask, geometry.ijk_to_ras(volume)),
                                geometry.ijk_to_ras(volume))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(drawing.GetSegmentation().GetNthSegmentID(0))
    assert logic.seg_logic.ImportLabelmapToSegmentationNode(labelmap, drawing, ids)
    scene.RemoveNode(labelmap)
    return logic, volume, drawing


def test_save_and_export_leave_the_scene_as_they_found_it(labelling, tmp_path):
    """ExportSegmentsToLabelmapNode adds '<segmentation>_ColorTable' (and a display node) for each segment
    exported: a save or an export must remove them, as Slicer's arrayFromSegmentBinaryLabelmap does."""
    logic, volume, drawing = labelling
    scene = logic.scene
    before = census(scene)
    logic.save_crosslabel("s1", drawing, volume, {"axial": 5, "coronal": 4, "sagittal": 3})
    assert census(scene) == before
    logic.export_segmentation(drawing, volume, tmp_path / "export", "s1_seg")
    logic.export_segmentation(drawing, volume, tmp_path / "export", "s1_seg", overwrite=True)
    assert census(scene) == before
    assert not any(scene.GetNthNode(i).GetName().endswith("_ColorTable") for i in range(scene.GetNumberOfNodes()))


def test_review_layers_add_only_their_segmentations(labelling):
    """Loading review layers reads label files through temporary labelmap nodes: only the layers stay."""
    from fmabs_core.data import io as fio

    logic, volume, _ = labelling
    image = fio.load_image(logic.project.image_path("s1"))
    labels = np.zeros(image.array.shape, np.uint8)
    labels[1:4, 2:5, 3:6] = 1
    for layer in ("axial", "fused"):
        fio.save_like(labels, image, logic.project.run_dir("r1") / "pseudo" / f"s1_{layer}.nii.gz")
    before = census(logic.scene)
    nodes = logic.load_review_layers("s1", "r1", volume)
    after = census(logic.scene)
    added = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in added.items() if v} == {"vtkMRMLSegmentationNode": 2, "vtkMRMLSegmentationDisplayNode": 2}
    assert set(nodes) == {"axial", "fused"}
    logic.load_review_layers("s1", "r1", volume)  # loading again replaces the layers, display nodes included
    assert census(logic.scene) == after
    with pytest.raises(Exception, match="not on the grid"):  # a failed load leaves nothing behind either
        bad = logic.project.run_dir("r1") / "pseudo" / "s1_coronal.nii.gz"
        write_nifti(bad, np.zeros((4, 4, 4), np.uint8), np.eye(3))
        logic.load_review_layers("s1", "r1", volume)
    assert census(logic.scene).get("vtkMRMLSegmentationNode") == before.get("vtkMRMLSegmentationNode", 0)


class RecordingScene:
    """The real scene, remembering the collections GetNodesByClass hands out."""

    def __init__(self, scene):
        self.scene, self.collections = scene, []

    def GetNodesByClass(self, name):
        collection = self.scene.GetNodesByClass(name)
        self.collections.append(collection)
        return collection

    def __getattr__(self, name):
        return getattr(self.scene, name)


def test_collections_are_released(scene, slicer_mod):
    """GetNodesByClass returns a collection the caller owns: left alone, each call leaks one."""
    from SlicerFMABSLib.scene import nodes_by_class, slice_nodes

    for name in ("a", "b"):
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    recording = RecordingScene(scene)
    assert [n.GetName() for n in nodes_by_class(recording, "vtkMRMLScalarVolumeNode")] == ["a", "b"]
    green = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # not a singleton: found by its layout name
    green.SetLayoutName("Green")
    slice_nodes(recording)
    assert recording.collections and all(c.GetReferenceCount() == 1 for c in recording.collections)  # ours only
    leaked = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert leaked.GetReferenceCount() == 2  # what the helper avoids


def test_slice_nodes_by_id(scene, slicer_mod):
    """The red/green/yellow slice nodes are found by ID; one that does not exist is left out (not an error)."""
    from SlicerFMABSLib.scene import slice_nodes

    assert slice_nodes(scene) == {}
    for name in ("Red", "Yellow"):
        node = slicer_mod.vtkMRMLSliceNode()
        node.SetLayoutName(name)
        node.SetSingletonTag(name)  # as Slicer's slice logic creates them: ID vtkMRMLSliceNodeRed...
        scene.AddNode(node)
    found = slice_nodes(scene)
    assert set(found) == {"axial", "sagittal"} and found["axial"].GetID() == "vtkMRMLSliceNodeRed"
