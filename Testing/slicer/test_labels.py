"""Cross-labels from drawings, review layers and export, on real MRML nodes (slicer-core)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from slicer_helpers import AFFINES, write_nifti


@pytest.fixture
def project_logic(scene, oblique_scan, tmp_path):
    """A project with one oblique, left-handed scan loaded from the project as Slicer would."""
    from SlicerFMABSLib.logic import FMABSLogic

    logic = FMABSLogic(scene)
    logic.create_project(tmp_path / "project", {1: "atrium", 2: "scar"})
    path, _, _ = oblique_scan
    logic.project.add_case(path)
    volume = logic.load_case("patient01")
    return logic, volume


def paint(logic, segmentation, segment_id, mask_canonical, volume):
    """Stand-in for the Segment Editor's brush: write a canonical mask into a segment on the volume's grid."""
    import vtk

    from SlicerFMABSLib import geometry

    mask = geometry.from_canonical(mask_canonical.astype(np.uint8), geometry.ijk_to_ras(volume))
    labelmap = logic.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "paint")
    geometry.set_node_array_ijk(labelmap, mask, geometry.ijk_to_ras(volume))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert logic.seg_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
    logic.scene.RemoveNode(labelmap)


def test_crosslabel_from_drawing_pure():
    from SlicerFMABSLib.segmentations import crosslabel_from_drawing

    drawn = np.zeros((6, 7, 8), np.uint8)
    drawn[2, 1:4, 1:4] = 1  # sagittal plane 2
    drawn[1:3, 5, 2] = 2  # coronal plane 5
    drawn[5, 0, 0] = 1  # stray voxel, on no plane
    cross, report = crosslabel_from_drawing(drawn, {"sagittal": 2, "coronal": 5, "axial": 7})
    assert cross.dtype == np.uint8
    assert (cross[2] == drawn[2]).all() and (cross[:, 5] == drawn[:, 5]).all() and (cross[:, :, 7] == 0).all()
    planes = np.zeros(drawn.shape, bool)
    planes[2], planes[:, 5], planes[:, :, 7] = True, True, True
    assert (cross[~planes] == 255).all()
    assert report.outside_voxels == 1
    assert report.drawn_voxels == {"sagittal": 10, "coronal": 2, "axial": 0}  # (2, 5, 2) is on both planes
    text = "\n".join(report.warnings)
    assert "Nothing is drawn on the axial slice 7" in text and "1 drawn voxels lie outside" in text


def test_drawing_to_crosslabel_file(project_logic, scene):
    """A drawing on the three shown planes becomes crosslabels/<case>.nii.gz on the image's own grid."""
    from fmabs_core.data import io as fio
    from fmabs_core.data.crosslabel import labelled_planes
    from SlicerFMABSLib import geometry

    logic, volume = project_logic
    affine, shape = geometry.canonical_grid(volume)
    planes = {"axial": 5, "coronal": 9, "sagittal": 7}
    slice_nodes = {}
    for view, layout in geometry.SLICE_VIEW_OF.items():
        sn = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        sn.SetLayoutName(layout)
        slice_nodes[view] = sn
    logic.place_views(volume, {v: {"index": i} for v, i in planes.items()}, slice_nodes)
    shown = logic.shown_slices(volume, slice_nodes)
    assert shown == planes

    seg = logic.create_label_segmentation(volume)
    ids = {seg.GetSegmentation().GetSegment(s).GetName(): s for s in
           [seg.GetSegmentation().GetNthSegmentID(i) for i in range(2)]}
    assert set(ids) == {"atrium", "scar"}
    atrium = np.zeros(shape, bool)
    atrium[4:10, 5:12, 5] = True  # on the axial plane
    atrium[7, 3:15, 2:9] = True  # on the sagittal plane
    atrium[12, 12, 1] = True  # stray voxel: on no plane
    scar = np.zeros(shape, bool)
    scar[0:4, 9, 3:7] = True  # on the coronal plane (no overlap with the atrium)
    paint(logic, seg, ids["atrium"], atrium, volume)
    paint(logic, seg, ids["scar"], scar, volume)

    report = logic.save_crosslabel("patient01", seg, volume, shown)
    path = logic.project.crosslabel_path("patient01")
    assert report.path == path and path.exists()
    assert report.outside_voxels == 1
    assert any("outside the three slices" in w for w in report.warnings)

    image = fio.load_image(logic.project.image_path("patient01"))
    label = fio.load_label(path, num_classes=2, allow_unlabelled=True)
    assert fio.check_pair(image, label) == []  # same shape and affine as the scan file
    raw = nib.load(str(path))
    assert raw.get_data_dtype() == np.uint8
    np.testing.assert_allclose(raw.affine, nib.load(str(logic.project.image_path("patient01"))).affine, atol=1e-6)
    expected = np.full(shape, 255, np.uint8)
    for view, index in planes.items():
        sl = [slice(None)] * 3
        sl[geometry.VIEW_AXIS[view]] = index
        expected[tuple(sl)] = 0
    expected[atrium] = np.where(expected[atrium] == 0, 1, 255)
    expected[scar] = np.where(expected[scar] == 0, 2, expected[scar])
    np.testing.assert_array_equal(label.array, expected)
    assert labelled_planes(label.array) == {v: [i] for v, i in planes.items()}
    assert logic.project.load_crosslabel("patient01").array.max() == 255
    assert logic.case_rows() == [("patient01", True)]


def test_empty_view_warns(project_logic, scene):
    from SlicerFMABSLib import geometry

    logic, volume = project_logic
    _, shape = geometry.canonical_grid(volume)
    seg = logic.create_label_segmentation(volume)
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    mask = np.zeros(shape, bool)
    mask[3:6, 3:6, 4] = True
    paint(logic, seg, sid, mask, volume)
    report = logic.save_crosslabel("patient01", seg, volume, {"axial": 4, "coronal": 8, "sagittal": 9})
    assert report.drawn_voxels == {"axial": 9, "coronal": 0, "sagittal": 0}
    assert sum("Nothing is drawn" in w for w in report.warnings) == 2


def test_unknown_segment_name_is_an_error(project_logic):
    logic, volume = project_logic
    seg = logic.create_label_segmentation(volume)
    seg.GetSegmentation().AddEmptySegment("", "liver", [1, 1, 1])
    with pytest.raises(ValueError, match="liver"):
        logic.save_crosslabel("patient01", seg, volume, {"axial": 1, "coronal": 1, "sagittal": 1})


def test_wrong_volume_is_refused(project_logic, tmp_path):
    from SlicerFMABSLib import geometry

    logic, _ = project_logic
    other = tmp_path / "other.nii.gz"
    write_nifti(other, np.zeros((18, 20, 12), np.float32), AFFINES["oblique"])
    volume = logic.load_volume_file(other)
    seg = logic.create_label_segmentation(volume)
    with pytest.raises(geometry.GeometryError, match="not on the grid"):
        logic.save_crosslabel("patient01", seg, volume, {"axial": 1, "coronal": 1, "sagittal": 1})


def write_run_labels(logic, case="patient01", run="r1"):
    """Pseudo-labels and a prediction as the training job writes them (fmabs_core.io.save_like)."""
    from fmabs_core.data import io as fio

    image = fio.load_image(logic.project.image_path(case))
    shape = image.array.shape
    layers = {}
    rng = np.random.default_rng(3)
    for k, layer in enumerate(("axial", "coronal", "sagittal", "fused", "prediction")):
        arr = np.zeros(shape, np.uint8)
        arr[2 + k:9 + k, 4:12, 3:9] = 1
        arr[rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, shape[2])] = 2
        d = logic.project.run_dir(run)
        path = d / "predictions" / f"{case}.nii.gz" if layer == "prediction" else d / "pseudo" / f"{case}_{layer}.nii.gz"
        fio.save_like(arr, image, path)
        layers[layer] = arr
    return layers


def test_review_layers_align_with_volume(project_logic):
    from SlicerFMABSLib import geometry, segmentations

    logic, volume = project_logic
    expected = write_run_labels(logic)
    assert set(logic.review_files("patient01", "r1")) == set(expected)
    nodes = logic.load_review_layers("patient01", "r1", volume)
    assert set(nodes) == set(expected)
    colours = set()
    for layer, node in nodes.items():
        class_map = segmentations.class_of_segments(node, logic.project.classes)
        arr, affine = segmentations.segmentation_to_canonical(logic.seg_logic, logic.scene, node, volume, class_map)
        np.testing.assert_array_equal(arr, expected[layer], err_msg=layer)
        ref_affine, _ = geometry.canonical_grid(volume)
        np.testing.assert_allclose(affine, ref_affine, atol=1e-6)
        seg = node.GetSegmentation()
        colours.add(tuple(np.round(seg.GetSegment(seg.GetNthSegmentID(0)).GetColor(), 3)))
        assert node.GetAttribute("FMABS.layer") == layer
    assert len(colours) == len(nodes)  # each layer has its own colour
    logic.set_layer_visible(nodes["fused"], False, 0.5)
    assert nodes["fused"].GetDisplayNode().GetVisibility() == 0
    assert abs(nodes["fused"].GetDisplayNode().GetOpacity2DFill() - 0.5) < 1e-9
    # loading again replaces the layers instead of piling them up
    again = logic.load_review_layers("patient01", "r1", volume)
    n_seg = logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    assert n_seg == len(again)


def test_label_on_another_grid_is_refused(project_logic, tmp_path):
    from SlicerFMABSLib import geometry, segmentations

    logic, volume = project_logic
    bad = tmp_path / "bad_label.nii.gz"
    write_nifti(bad, np.ones((4, 4, 4), np.uint8), np.eye(3))
    with pytest.raises(geometry.GeometryError, match="not on the grid"):
        segmentations.load_label_file_as_segmentation(logic.seg_logic, logic.scene, bad, volume, "x", {1: "a"})


def test_export_matches_nibabel(project_logic, oblique_scan, tmp_path):
    """Exported NIfTI: the input file's voxel order and affine, and the segmentation's labels."""
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import segmentations

    logic, _ = project_logic
    path, data, file_affine = oblique_scan
    volume = logic.load_volume_file(path, "user scan")  # the user's own file, loaded in Slicer
    expected = write_run_labels(logic)["prediction"]  # canonical, on the same grid as the user's scan
    label_file = logic.project.run_dir("r1") / "predictions" / "patient01.nii.gz"
    seg = segmentations.load_label_file_as_segmentation(logic.seg_logic, logic.scene, label_file, volume, "pred",
                                                         logic.project.classes, "prediction")
    out = tmp_path / "export"
    nii, nrrd = logic.export_segmentation(seg, volume, out, "patient01_seg")
    img = nib.load(str(nii))
    np.testing.assert_allclose(img.affine, file_affine, atol=1e-6)  # the input's own grid
    assert img.shape == data.shape and img.get_data_dtype() == np.uint8
    reference = fio.load_image(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), reference.to_source(expected))
    np.testing.assert_array_equal(fio.load_label(nii, 2).array, expected)
    # .seg.nrrd re-read by Slicer gives the same labels on the volume
    back = segmentations.read_seg_nrrd(logic.scene, nrrd, "back")
    class_map = segmentations.class_of_segments(back, logic.project.classes)
    arr, _ = segmentations.segmentation_to_canonical(logic.seg_logic, logic.scene, back, volume, class_map)
    np.testing.assert_array_equal(arr, expected)
    assert sorted(p.name for p in out.iterdir()) == ["patient01_seg.nii.gz", "patient01_seg.seg.nrrd"]

    with pytest.raises(FileExistsError):
        logic.export_segmentation(seg, volume, out, "patient01_seg")
    logic.export_segmentation(seg, volume, out, "patient01_seg", overwrite=True)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        logic.export_segmentation(seg, volume, path.parent, "patient01", overwrite=True)
    assert path.read_bytes() == before


def test_export_of_unsaved_volume_uses_node_grid(project_logic, scene, tmp_path):
    """A volume made in Slicer (no file): the NIfTI uses the node's IJK order and IJK-to-RAS."""
    from SlicerFMABSLib import geometry

    logic, _ = project_logic
    affine = np.eye(4)
    affine[:3, :3] = AFFINES["LAS"]
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    geometry.set_node_array_ijk(volume, np.zeros((6, 5, 4), np.int16), affine)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = seg.GetSegmentation().AddEmptySegment("", "thing", [1, 0, 0])
    mask_ijk = np.zeros((6, 5, 4), np.uint8)
    mask_ijk[1:3, 2:4, 1] = 1
    canon, _ = geometry.to_canonical(mask_ijk, affine)
    paint(logic, seg, sid, canon, volume)
    nii, _ = logic.export_segmentation(seg, volume, tmp_path, "synthetic")
    img = nib.load(str(nii))
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask_ijk)


def _views(scene, mapped=("Red", "Green", "Yellow")):
    """The red, green and yellow slice nodes; those of ``mapped`` shown by the layout (what Slicer's layout
    manager sets: MappedInLayout), the others existing but hidden."""
    from SlicerFMABSLib import geometry

    nodes = {}
    for view, layout in geometry.SLICE_VIEW_OF.items():
        sn = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        sn.SetLayoutName(layout)
        sn.SetMappedInLayout(layout in mapped)
        nodes[view] = sn
    return nodes


def test_a_layout_that_hides_a_view_is_detected(project_logic, scene):
    """Slicer keeps a slice node for every view and unmaps those the layout hides: a one-view layout is caught,
    although all three nodes exist."""
    logic, volume = project_logic
    one_view = _views(scene, mapped=("Red",))
    assert logic.hidden_views(one_view) == ["coronal (Green)", "sagittal (Yellow)"]
    logic.place_views(volume, {"axial": {"index": 5}, "coronal": {"index": 9}, "sagittal": {"index": 7}}, one_view)
    logic.record_planes(volume, one_view)
    with pytest.raises(ValueError, match=r"does not show the coronal \(Green\), sagittal \(Yellow\) view"):
        logic.planes_to_save(volume, one_view)
    assert logic.hidden_views(_views(scene)) == []


def test_save_uses_the_planes_of_show_slices_and_reports_a_moved_view(project_logic, scene):
    """The planes saved are those Show slices recorded (in the parameter node), not wherever the views are at
    save time: a view scrolled after drawing is reported, never silently saved as an empty plane."""
    logic, volume = project_logic
    nodes = _views(scene)
    with pytest.raises(ValueError, match="Press Show slices first"):
        logic.planes_to_save(volume, nodes)
    planes = {"axial": 5, "coronal": 9, "sagittal": 7}
    logic.place_views(volume, {v: {"index": i} for v, i in planes.items()}, nodes)
    assert logic.record_planes(volume, nodes) == planes
    assert logic.params.labelPlanes == "axial=5,coronal=9,sagittal=7"  # saved with the scene
    assert logic.planes_to_save(volume, nodes) == (planes, {})
    logic.place_views(volume, {"coronal": {"index": 12}}, nodes)  # the user scrolls the green view
    recorded, moved = logic.planes_to_save(volume, nodes)
    assert recorded == planes and moved == {"coronal": (9, 12)}


def test_an_empty_plane_is_asked_about_before_anything_is_written(project_logic, scene):
    """0 on a saved plane means 'not this class': a plane with nothing drawn is asked about first; declined,
    nothing is written."""
    from SlicerFMABSLib import geometry

    logic, volume = project_logic
    _, shape = geometry.canonical_grid(volume)
    seg = logic.create_label_segmentation(volume)
    atrium = np.zeros(shape, bool)
    atrium[4:6, 5:8, 5] = True  # on the axial plane only (off the coronal 9 and sagittal 7 planes)
    paint(logic, seg, seg.GetSegmentation().GetNthSegmentID(0), atrium, volume)
    planes = {"axial": 5, "coronal": 9, "sagittal": 7}
    asked = []
    report = logic.save_crosslabel("patient01", seg, volume, planes, confirm_empty=lambda v: asked.append(v) or False)
    assert asked == [["coronal 9", "sagittal 7"]] and report is None
    assert not logic.project.crosslabel_path("patient01").exists()
    report = logic.save_crosslabel("patient01", seg, volume, planes, confirm_empty=lambda v: True)
    assert report is not None and logic.project.crosslabel_path("patient01").exists()
    assert not any(w.startswith("Nothing is drawn on") for w in report.warnings)  # asked already


def test_loading_a_cross_labelled_scan_shows_what_was_drawn_on_its_planes(project_logic, scene):
    """Load on a scan with a saved cross-label: the drawing holds the saved classes (segments in class order, a
    class not drawn present and empty), the views go to the drawn planes, and saving it again with Replace writes
    the same file: editing starts from what the expert drew, never from an empty drawing that would erase it."""
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import geometry, segmentations

    logic, volume = project_logic
    _, shape = geometry.canonical_grid(volume)
    assert logic.start_labelling("patient01") is volume and logic.params.labelSegmentation is None  # nothing saved yet
    logic.label_segmentation()
    assert not logic.drawing_is_saved_crosslabel()  # a new, empty drawing
    logic.scene.RemoveNode(logic.params.labelSegmentation)
    planes = {"axial": 4, "coronal": 10, "sagittal": 6}
    cross = np.full(shape, 255, np.uint8)
    cross[6], cross[:, 10], cross[:, :, 4] = 0, 0, 0
    cross[6, 4:12, 2:9] = 2  # the second class only: the first is not drawn on this scan
    image = fio.load_image(logic.project.image_path("patient01"))
    fio.save_like(cross, image, logic.project.crosslabel_path("patient01"), np.uint8)

    logic.start_labelling("patient01")
    drawing = logic.params.labelSegmentation
    assert drawing is not None and logic.label_segmentation() is drawing and logic.drawing_is_saved_crosslabel()
    segmentation = drawing.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["atrium", "scar"]  # the project's classes in order: "Class to draw" picks the nth
    classes = segmentations.class_of_segments(drawing, logic.project.classes)
    drawn, _ = segmentations.segmentation_to_canonical(logic.seg_logic, scene, drawing, volume, classes)
    np.testing.assert_array_equal(drawn, np.where(cross == 2, 2, 0))
    assert {v: e["index"] for v, e in logic.slices_for("patient01", volume).items()} == planes

    report = logic.save_crosslabel("patient01", drawing, volume, planes)
    assert report.path == logic.project.crosslabel_path("patient01")
    np.testing.assert_array_equal(logic.project.load_crosslabel("patient01").array, cross)
