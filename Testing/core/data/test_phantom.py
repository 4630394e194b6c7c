"""The phantoms of the demo and the tests: the default ones unchanged, the hard ones hard in the intended ways."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fmabs_core.data import phantom


def test_default_phantom_is_unchanged_by_the_hard_option():
    a = phantom.make_phantom((32, 32, 24), np.random.default_rng(5))
    b = phantom.make_phantom((32, 32, 24), np.random.default_rng(5), hard=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_hard_phantom_has_an_unlabelled_look_alike_and_a_thin_tube(monkeypatch):
    parts = {}
    real = phantom._hard_parts

    def spy(*args):
        parts["inside"], parts["neighbour"] = real(*args)
        return parts["inside"], parts["neighbour"]

    monkeypatch.setattr(phantom, "_hard_parts", spy)
    image, label = phantom.make_phantom((48, 48, 40), np.random.default_rng(1), hard=True)
    neighbour = parts["neighbour"]
    assert neighbour.sum() > 100 and not (neighbour & (label > 0)).any()
    # a dark gap of at least 2 voxels between the neighbour and the structure
    assert not (ndimage.binary_dilation(label > 0, iterations=2) & neighbour).any()
    # inside, nearly as bright as the structure, far brighter than the background
    core = ndimage.binary_erosion(neighbour, iterations=1)
    fg = image[ndimage.binary_erosion(label > 0, iterations=1)].mean()
    nb, bg = image[core].mean(), image[(label == 0) & ~neighbour].mean()
    assert nb > 0.6 * fg and nb > bg + 0.2  # (the bias field differs between the two places)
    # the tube: voxels of the label that an opening with a 3-voxel ball removes (thin parts)
    opened = ndimage.binary_opening(label > 0, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    assert ((label > 0) & ~opened).sum() > 20


def test_write_dataset_passes_hard_on(tmp_path):
    soft = phantom.write_dataset(tmp_path / "soft", 1, (24, 24, 16), seed=0)
    hard = phantom.write_dataset(tmp_path / "hard", 1, (24, 24, 16), seed=0, hard=True)
    import nibabel as nib

    a = np.asarray(nib.load(str(soft / "imagesTr" / "phantom_000.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(hard / "imagesTr" / "phantom_000.nii.gz")).dataobj)
    assert a.shape == b.shape and not np.array_equal(a, b)
