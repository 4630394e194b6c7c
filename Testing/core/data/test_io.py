"""NIfTI I/O on the canonical grid: round trips, overlay exactness, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.data import io
from fmabs_core.errors import InputError


def test_round_trip_oblique_affine_is_voxel_exact(tmp_path, write_nifti, oblique_affine):
    rng = np.random.default_rng(0)
    data = rng.random((11, 13, 7)).astype(np.float32)
    src = write_nifti(tmp_path / "scan.nii.gz", data)
    vol = io.load_image(src)
    # the canonical array is a pure axis permutation/flip of the file's data
    assert sorted(vol.array.shape) == sorted(data.shape)
    assert np.isclose(vol.array.sum(), data.sum(), rtol=1e-5)
    # canonical voxel -> world maps to the same world point as the file's voxel
    codes = nib.aff2axcodes(vol.affine)
    assert codes == ("R", "A", "S")
    out = io.save_like(vol.array, vol, tmp_path / "out" / "pred.nii.gz", np.float32)
    back = nib.load(str(out))
    assert back.shape == data.shape
    np.testing.assert_allclose(back.affine, oblique_affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


def test_canonical_array_matches_world_coordinates(tmp_path, write_nifti, oblique_affine):
    data = np.zeros((9, 10, 11), dtype=np.float32)
    data[2, 7, 3] = 1.0
    vol = io.load_image(write_nifti(tmp_path / "a.nii", data))
    ijk = np.argwhere(vol.array == 1.0)[0]
    world_canon = vol.affine @ np.r_[ijk, 1]
    world_file = oblique_affine @ np.array([2, 7, 3, 1])
    np.testing.assert_allclose(world_canon, world_file, atol=1e-5)


def test_prediction_overlays_input_voxel_for_voxel(tmp_path, write_nifti):
    """A mask computed on the canonical grid lands on the same voxels of the input file."""
    data = np.zeros((12, 9, 8), dtype=np.float32)
    data[3:6, 2:4, 5:7] = 10.0
    src = write_nifti(tmp_path / "img.nii.gz", data)
    vol = io.load_image(src)
    mask = (vol.array > 5).astype(np.uint8)
    out = io.save_like(mask, vol, tmp_path / "mask.nii.gz")
    written = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(written, (data > 5).astype(np.uint8))


def test_refuses_to_overwrite_input(tmp_path, write_nifti):
    src = write_nifti(tmp_path / "img.nii.gz", np.ones((4, 4, 4), np.float32))
    vol = io.load_image(src)
    before = src.read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        io.save_like(vol.array, vol, src)
    assert src.read_bytes() == before


@pytest.mark.parametrize("shape,match", [((8, 8), "expected a 3D volume"), ((8, 8, 8, 2), "4D"),
                                         ((8, 8, 1), "single slice")])
def test_rejects_non_3d(tmp_path, write_nifti, shape, match):
    path = write_nifti(tmp_path / "bad.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(InputError, match=match) as err:
        io.load_image(path)
    assert "bad.nii.gz" in str(err.value)


def test_rejects_nan_and_inf(tmp_path, write_nifti):
    data = np.ones((5, 5, 5), np.float32)
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match=r"nan.nii.gz: 2 voxels are NaN or inf"):
        io.load_image(path)


def test_rejects_unreadable_and_non_nifti(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError, match="junk.nii.gz: cannot be read as NIfTI"):
        io.load_image(junk)
    other = tmp_path / "scan.mha"
    other.write_text("x")
    with pytest.raises(InputError, match="not a NIfTI file"):
        io.load_image(other)
    with pytest.raises(InputError, match="no such file"):
        io.load_image(tmp_path / "missing.nii.gz")


def test_label_values_checked(tmp_path, write_nifti):
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1, 1, 1] = 3
    path = write_nifti(tmp_path / "lab.nii.gz", lab)
    with pytest.raises(InputError, match=r"lab.nii.gz: label values \[3\] are outside the expected 0..1"):
        io.load_label(path, num_classes=1)
    cross = np.full((6, 6, 6), 255, np.uint8)
    cross[2] = 1
    path = write_nifti(tmp_path / "cross.nii.gz", cross)
    assert io.load_label(path, 1, allow_unlabelled=True).array.max() == 255
    with pytest.raises(InputError, match="255"):
        io.load_label(path, 1)


def test_check_pair_shape_and_affine(tmp_path, write_nifti, oblique_affine):
    img = io.load_image(write_nifti(tmp_path / "img.nii.gz", np.ones((6, 6, 6), np.float32)))
    other_shape = io.load_label(write_nifti(tmp_path / "l1.nii.gz", np.zeros((6, 6, 5), np.uint8)), 1)
    shifted = oblique_affine.copy()
    shifted[0, 3] += 2.0
    other_affine = io.load_label(write_nifti(tmp_path / "l2.nii.gz", np.zeros((6, 6, 6), np.uint8), shifted), 1)
    assert "shape" in io.check_pair(img, other_shape)[0]
    assert "affine differs" in io.check_pair(img, other_affine)[0]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
