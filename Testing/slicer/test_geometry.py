"""Volume nodes <-> arrays and slice-view placement, on real MRML nodes (slicer-core)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from slicer_helpers import AFFINES, write_nifti


@pytest.fixture
def logic(scene):
    from SlicerFMABSLib.logic import FMABSLogic

    return FMABSLogic(scene)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_node_canonical_equals_fmabs_core(tmp_path, logic, name):
    """Whatever the file's orientation, node -> canonical equals fmabs_core.io.load_image of the file."""
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import geometry

    data = np.arange(7 * 9 * 5, dtype=np.float32).reshape(7, 9, 5)
    path = tmp_path / f"{name}.nii.gz"
    file_affine = write_nifti(path, data, AFFINES[name])
    node = logic.load_volume_file(path)
    array, affine = geometry.node_to_canonical(node)
    ref = fio.load_image(path)
    np.testing.assert_array_equal(array, ref.array)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    # Slicer's IJK either is the file's voxel order (right-handed affines) or reverses K (left-handed)
    ijk = geometry.ijk_to_ras(node)
    if np.linalg.det(file_affine[:3, :3]) > 0:
        np.testing.assert_allclose(ijk, file_affine, atol=1e-4)
        np.testing.assert_array_equal(geometry.node_array_ijk(node), data)
    else:
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = data.shape[2] - 1
        np.testing.assert_allclose(ijk, file_affine @ flip, atol=1e-4)
        np.testing.assert_array_equal(geometry.node_array_ijk(node), data[:, :, ::-1])


def test_round_trip_array_node_nifti(tmp_path, logic, scene):
    """canonical array -> node -> NIfTI file -> nibabel/fmabs_core gives the same voxels and world grid."""
    from fmabs_core.data import io as fio
    from SlicerFMABSLib import geometry

    rng = np.random.default_rng(1)
    array = rng.integers(0, 1000, size=(6, 8, 4)).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = AFFINES["oblique"]
    affine[:3, 3] = [5.0, 6.0, -7.0]
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "rt")
    geometry.set_node_array_ijk(node, array, affine)
    np.testing.assert_allclose(geometry.ijk_to_ras(node), affine)
    np.testing.assert_array_equal(geometry.node_array_ijk(node), array)
    out = logic.write_volume_nifti(node, tmp_path / "rt.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), array)
    canon, canon_affine = geometry.node_to_canonical(node)
    ref = fio.load_image(out)
    np.testing.assert_array_equal(canon, ref.array)
    np.testing.assert_allclose(canon_affine, ref.affine, atol=1e-5)
    # and back: from_canonical restores the node's voxel order
    np.testing.assert_array_equal(geometry.from_canonical(canon, affine), array)


def test_header_disagreement_is_an_error(tmp_path, logic):
    """qform and sform that disagree: Slicer and nibabel see different grids, so loading refuses."""
    from SlicerFMABSLib import geometry

    data = np.zeros((5, 6, 7), np.float32)
    s_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    q_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(data, s_aff)
    img.set_sform(s_aff, code=2)
    img.set_qform(q_aff, code=1)
    path = tmp_path / "bad.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(geometry.GeometryError, match="read different geometry") as info:
        logic.load_volume_file(path)
    assert str(path) in str(info.value)
    assert logic.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is None  # nothing half-loaded is left


@pytest.mark.parametrize("name", ["oblique_lefthanded", "PIR"])
def test_views_land_on_suggested_planes(tmp_path, logic, scene, name):
    """Red/green/yellow are turned to the voxel planes and moved to the suggested indices."""
    from SlicerFMABSLib import geometry

    data = np.zeros((16, 14, 10), np.float32)
    path = tmp_path / "v.nii.gz"
    write_nifti(path, data, AFFINES[name])
    node = logic.load_volume_file(path)
    slice_nodes = {}
    for view, layout in geometry.SLICE_VIEW_OF.items():
        sn = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        sn.SetLayoutName(layout)
        sn.SetOrientation(geometry.ORIENTATION_PRESET[view])
        slice_nodes[view] = sn
    affine, shape = geometry.canonical_grid(node)
    want = {"axial": shape[2] - 3, "coronal": 4, "sagittal": shape[0] // 2 + 1}
    # the suggestion carries RAS points of voxel centres (as `fmabs suggest` prints) and indices
    suggestion = {}
    for view, index in want.items():
        voxel = (np.array(shape) - 1) / 2.0
        voxel[geometry.VIEW_AXIS[view]] = index
        suggestion[view] = {"index": index, "ras": (affine @ np.append(voxel, 1))[:3].tolist()}
    offsets = logic.place_views(node, suggestion, slice_nodes)
    assert set(offsets) == set(want)
    assert logic.shown_slices(node, slice_nodes) == want
    for view, sn in slice_nodes.items():
        s2r = geometry.matrix_to_array(sn.GetSliceToRAS())
        normal = s2r[:3, 2]
        axis_dir = affine[:3, geometry.VIEW_AXIS[view]]
        assert abs(abs(normal @ axis_dir) / np.linalg.norm(axis_dir) - 1) < 1e-6  # aligned with voxel planes
        # every voxel centre of the wanted plane lies on the slice plane
        corners = np.array([[0, 0, 0], [shape[0] - 1, shape[1] - 1, shape[2] - 1], [0, shape[1] - 1, 0]], float)
        corners[:, geometry.VIEW_AXIS[view]] = want[view]
        for c in corners:
            p = (affine @ np.append(c, 1))[:3]
            assert abs(normal @ (p - s2r[:3, 3])) < 1e-4
        assert abs(sn.GetSliceOffset() - offsets[view]) < 1e-6

    # RAS only (no index): snapped to the nearest plane
    voxel = (np.array(shape) - 1) / 2.0
    voxel[2] = 2.3
    ras = (affine @ np.append(voxel, 1))[:3]
    logic.place_views(node, {"axial": {"index": None, "ras": ras.tolist()}}, {"axial": slice_nodes["axial"]})
    assert logic.shown_slices(node, {"axial": slice_nodes["axial"]}) == {"axial": 2}

    with pytest.raises(geometry.GeometryError, match="outside the volume"):
        logic.place_views(node, {"axial": {"index": shape[2] + 5, "ras": None}}, slice_nodes)


def test_unaligned_view_is_reported(tmp_path, logic, scene):
    from SlicerFMABSLib import geometry

    path = tmp_path / "v.nii.gz"
    write_nifti(path, np.zeros((8, 8, 8), np.float32), AFFINES["oblique"])
    node = logic.load_volume_file(path)
    sn = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    sn.SetLayoutName("Red")
    sn.SetOrientation("Axial")  # RAS-aligned, oblique to this scan's voxel planes
    with pytest.raises(geometry.GeometryError, match="not aligned"):
        logic.shown_slices(node, {"axial": sn})
