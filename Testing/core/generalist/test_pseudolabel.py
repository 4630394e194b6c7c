"""Multi-view pseudo-labels: slicing and stacking, fusion, no calls on empty slices, files, CLI."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import torch

from fmabs_core.data import io
from fmabs_core.generalist import Embeddings, SliceGeometry, get_generalist
from fmabs_core.generalist.pseudolabel import dice, from_view_slices, fuse, multiview_pseudolabel, save_pseudolabels, view_slices


class BoxGeneralist:
    """Interface double for the *logic* tests: answers each prompt with its (filled) box.

    With un-jittered boxes, a cuboid's pseudo-label in every view must be the cuboid itself, which
    checks slicing, box coordinates and stacking exactly. Real-model behaviour is tested with
    LiteMedSAM's real weights below.
    """

    default_n_points = 2

    def __init__(self):
        self.encoded: list[tuple[int, int]] = []
        self.decoder_calls = 0

    def batch_size(self, requested=None):
        return requested or 3

    def decode_slices(self, encode_batch):
        return max(encode_batch, 5)  # more than the encoder's 3: chunks of slices larger than an encoder call

    def encode(self, slices, intensity_window=None, batch_size=None):
        geom = SliceGeometry.for_shape(slices.shape[1], slices.shape[2], 256)
        self.encoded += [tuple(slices.shape[1:])] * slices.shape[0]
        return Embeddings(torch.from_numpy(np.ascontiguousarray(slices))[:, None], geom)

    def decode(self, emb, boxes, points=None, return_probs=False):
        h, w = emb.geometry.original_size
        out = np.zeros((len(boxes), h, w), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).astype(int)):
            out[i, y0 : y1 + 1, x0 : x1 + 1] = 0.9
            if points is not None and points[i] is not None:  # points must lie inside their box
                assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in points[i])
        self.decoder_calls += len(boxes)
        return out if return_probs else out > 0.5


def _cuboids(shape=(20, 16, 12)):
    m = np.zeros(shape, np.uint8)
    m[2:8, 3:9, 2:6] = 1
    m[10:17, 4:12, 5:10] = 2
    return m


@pytest.mark.parametrize("orientation", ["radiological", "array"])
def test_view_slicing_round_trip(orientation):
    vol = np.random.default_rng(0).random((5, 6, 7))
    expect = {"axial": (7, 6, 5), "coronal": (6, 7, 5), "sagittal": (5, 7, 6)}
    for view in io.VIEWS:
        s = view_slices(vol, view, orientation)
        assert s.shape == (expect[view] if orientation == "radiological" else
                           (vol.shape[io.VIEW_AXIS[view]],) + tuple(np.delete(vol.shape, io.VIEW_AXIS[view])))
        np.testing.assert_array_equal(from_view_slices(s, view, orientation), vol)


def test_radiological_display_orientation():
    """Axial display: anterior (high y) at the top, patient right (high x in RAS) on the left."""
    vol = np.zeros((5, 6, 7))
    vol[4, 5, 3] = 1  # most right, most anterior voxel
    s = view_slices(vol, "axial")
    assert s[3, 0, 0] == 1
    vol = np.zeros((5, 6, 7))
    vol[4, 2, 6] = 1  # right, superior
    assert view_slices(vol, "coronal")[2, 0, 0] == 1


def test_fusion_truth_table():
    for a, b, c in itertools.product([0, 1], repeat=3):
        views = [np.array([a], np.uint8), np.array([b], np.uint8), np.array([c], np.uint8)]
        assert fuse(views, "ua")[0] == int(a + b + c == 3)
        assert fuse(views, "mv")[0] == int(a + b + c >= 2)
    views = [np.array([1, 2, 2, 1, 0]), np.array([2, 2, 1, 0, 0]), np.array([2, 2, 0, 1, 2])]
    np.testing.assert_array_equal(fuse([v.astype(np.uint8) for v in views], "mv"), [2, 2, 0, 1, 0])
    np.testing.assert_array_equal(fuse([v.astype(np.uint8) for v in views], "ua"), [0, 2, 0, 0, 0])
    with pytest.raises(ValueError, match="fusion"):
        fuse(views, "vote")


@pytest.mark.parametrize("orientation", ["radiological", "array"])
@pytest.mark.parametrize("mode", ["component", "slice"])
def test_box_generalist_rebuilds_cuboids_exactly(orientation, mode):
    mask = _cuboids()
    image = np.random.default_rng(0).random(mask.shape).astype(np.float32)
    g = BoxGeneralist()
    res = multiview_pseudolabel(g, image, mask, np.random.default_rng(0), fusion="ua", box_jitter=0,
                                prompt_mode=mode, orientation=orientation)
    assert set(res) == {"axial", "coronal", "sagittal", "fused"}
    for key in res:
        assert res[key].dtype == np.uint8 and res[key].shape == mask.shape
        np.testing.assert_array_equal(res[key], mask)
    # one encoder pass per foreground slice of each view, none for empty slices
    n_fg = sum(int((np.moveaxis(mask, io.VIEW_AXIS[v], 0) > 0).reshape(mask.shape[io.VIEW_AXIS[v]], -1)
                   .any(1).sum()) for v in io.VIEWS)
    assert len(g.encoded) == n_fg == sum(len(s) for s in res.slices.values())


def test_overlapping_classes_take_the_more_confident(monkeypatch):
    """Class boxes that overlap in a view: the pixel goes to the class with the higher probability."""
    mask = np.zeros((12, 12, 4), np.uint8)
    mask[2:6, 2:6, :] = 1
    mask[5:10, 5:10, :] = 2  # boxes of 1 and 2 overlap at (5, 5)
    g = BoxGeneralist()
    orig = g.decode

    def decode(emb, boxes, points=None, return_probs=False):
        p = orig(emb, boxes, points, return_probs=True)
        big = [(b[2] - b[0]) > 3.5 for b in boxes]  # class 2's box (5 px wide) is more confident
        p[np.array(big)] = np.where(p[np.array(big)] > 0, 0.95, 0)
        return p

    g.decode = decode
    res = multiview_pseudolabel(g, mask.astype(np.float32), mask, np.random.default_rng(0), box_jitter=0,
                                n_points=0, orientation="array")
    assert res["axial"][5, 5, 0] == 2 and res["axial"][4, 4, 0] == 1


def test_max_slices_picks_evenly_and_leaves_rest_background():
    mask = _cuboids()
    g = BoxGeneralist()
    res = multiview_pseudolabel(g, mask.astype(np.float32), mask, np.random.default_rng(0), box_jitter=0,
                                max_slices_per_view=1)
    assert res.slices["axial"].tolist() == [6]  # the middle of axial slices 2..9
    assert all(len(s) == 1 for s in res.slices.values()) and len(g.encoded) == 3
    assert res["axial"][:, :, 6].any() and not np.delete(res["axial"], 6, axis=2).any()


def test_input_validation():
    g = BoxGeneralist()
    with pytest.raises(ValueError, match="same shape"):
        multiview_pseudolabel(g, np.zeros((4, 4, 4)), np.zeros((4, 4, 5), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="fusion"):
        multiview_pseudolabel(g, np.zeros((4, 4, 4)), np.zeros((4, 4, 4), np.uint8), np.random.default_rng(0),
                              fusion="and")


# ---------------------------------------------------------------- real LiteMedSAM
def _blob_volume(shape=(40, 36, 24)):
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    obj = ((x - 20) / 9) ** 2 + ((y - 17) / 8) ** 2 + ((z - 12) / 6) ** 2 <= 1
    img = (obj * 3.0 + np.random.default_rng(0).normal(0, 0.2, shape)).astype(np.float32)
    return img, obj.astype(np.uint8)


@pytest.mark.slow
def test_litemedsam_no_call_on_empty_slices():
    g = get_generalist("litemedsam")
    img, _ = _blob_volume()
    prompt = np.zeros(img.shape, np.uint8)
    prompt[14:26, 12:22, 12] = 1  # the teacher sees the object in one axial slice only
    enc0, dec0 = g.encoded_slices, g.decoder_calls
    res = multiview_pseudolabel(g, img, prompt, np.random.default_rng(0), fusion="mv", max_slices_per_view=1)
    assert g.encoded_slices - enc0 == 3 and g.decoder_calls - dec0 == 3  # one slice per view, no more
    ax, co, sa = res["axial"], res["coronal"], res["sagittal"]
    assert np.delete(ax, 12, axis=2).sum() == 0 and ax[:, :, 12].sum() > 50
    k_co, k_sa = res.slices["coronal"][0], res.slices["sagittal"][0]
    assert np.delete(co, k_co, axis=1).sum() == 0 and np.delete(sa, k_sa, axis=0).sum() == 0
    # axial answer resembles the object's cross-section (a clean blob)
    ref = _blob_volume()[1][:, :, 12]
    assert dice(ax[:, :, 12], ref) > 0.8


@pytest.mark.slow
@pytest.mark.la
def test_litemedsam_on_an_la_scan_middle_slices(la_dir):
    """Middle foreground slice of each view of a real LA scan, tight ground-truth boxes."""
    case = sorted((la_dir / "imagesTr").iterdir())[0].name
    image = io.load_image(la_dir / "imagesTr" / case)
    label = io.load_label(la_dir / "labelsTr" / case)
    res = multiview_pseudolabel(get_generalist("litemedsam"), image.array, label.array, np.random.default_rng(0),
                                box_jitter=0, max_slices_per_view=1)
    for view in io.VIEWS:
        k = res.slices[view][0]
        sel = [slice(None)] * 3
        sel[io.VIEW_AXIS[view]] = k
        d = dice(res[view][tuple(sel)], label.array[tuple(sel)])
        assert d > 0.75, f"{view} slice {k}: Dice {d:.3f}"


# ---------------------------------------------------------------- files and CLI
def test_save_pseudolabels_on_the_input_grid(tmp_path, write_nifti, oblique_affine):
    mask = _cuboids()
    ref_path = write_nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).random(mask.shape).astype(np.float32))
    ref = io.load_image(ref_path)
    canon = _cuboids(ref.array.shape)
    res = multiview_pseudolabel(BoxGeneralist(), ref.array, canon, np.random.default_rng(0), box_jitter=0)
    paths = save_pseudolabels(res, ref, tmp_path / "out", "case1")
    assert sorted(p.name for p in paths.values()) == sorted(
        f"case1_{k}.nii.gz" for k in ("axial", "coronal", "sagittal", "fused"))
    for key, p in paths.items():
        back = io.load_label(p)
        assert back.source_shape == ref.source_shape
        np.testing.assert_allclose(back.source_affine, oblique_affine)
        np.testing.assert_array_equal(back.array, res[key])
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_pseudolabels(res, ref, tmp_path, "img", protect=(tmp_path / "img_fused.nii.gz",))


@pytest.mark.slow
def test_cli_pseudo_label_with_ground_truth(tmp_path, write_nifti, capsys):
    from fmabs_core.cli import generalist_cmds

    img, obj = _blob_volume()
    aff = np.diag([0.625, 0.625, 0.625, 1.0])
    write_nifti(tmp_path / "scan.nii.gz", img, aff)
    write_nifti(tmp_path / "gt.nii.gz", obj, aff)
    parser = argparse.ArgumentParser(prog="fmabs")
    generalist_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "pseudo-label", "--image", str(tmp_path / "scan.nii.gz"), "--prompt-from", str(tmp_path / "gt.nii.gz"),
        "--label", str(tmp_path / "gt.nii.gz"), "--generalist", "litemedsam", "--fusion", "ua",
        "--output", str(tmp_path / "out"), "--pseudo-max-slices", "1", "--device", "cpu", "--seed", "1",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for key in ("axial", "coronal", "sagittal", "fused"):
        assert (tmp_path / "out" / f"scan_{key}.nii.gz").is_file()
        assert f"  {key}" in out
    assert "on the 1 prompted slices" in out
    assert "generalist: litemedsam, encoder fp32" in out  # what ran the encoder


def test_pseudo_label_chooses_the_runtime_as_a_training_run_does():
    """auto: OpenVINO on the CPU when this call's prompted slices reach the threshold, else torch."""
    from fmabs_core.cli.generalist_cmds import _runtime_for
    from fmabs_core.generalist.runtime import OPENVINO_MIN_SLICES

    prompt = np.zeros((100, 100, 100), np.uint8)
    prompt[10:90, 10:90, 10:90] = 1  # 80 foreground slices per view: 240 slices to encode
    assert 240 >= OPENVINO_MIN_SLICES > 30
    assert _runtime_for("auto", "cpu", prompt, None) == "openvino"  # openvino is in the test extra
    assert _runtime_for("auto", "cpu", prompt, 10) == "torch"  # 30 slices do not pay for the conversion
    assert _runtime_for("torch", "cpu", prompt, None) == "torch"


def test_scaled_jitter_follows_the_box_not_the_pixel_grid():
    from fmabs_core.generalist.prompts import scaled_jitter, slice_prompts

    assert scaled_jitter(np.array([0, 0, 99, 49]), 0.1) == 10 and scaled_jitter(np.array([5, 5, 6, 6]), 0.1) == 1
    mask = np.zeros((200, 200), bool)
    mask[50:150, 80:120] = True  # 100 rows x 40 columns: up to 10 px per side
    rng = np.random.default_rng(0)
    grow = [p.box - np.array([80, 50, 119, 149]) for _ in range(50)
            for p in slice_prompts(mask, rng, jitter=0, n_points=0, jitter_fraction=0.1)]
    grow = np.abs(np.array(grow))
    assert grow.max() == 10 and grow.min() == 0


@pytest.mark.parametrize("cap", [None, 2])
def test_progress_counts_every_prompted_slice_once(cap):
    """The progress hook `fmabs pseudo-label` draws its bar with: the slices it reports add up to the slices
    prompted, and planned_slices (the bar's total) says that number before the work starts."""
    from fmabs_core.generalist.pseudolabel import planned_slices

    mask = _cuboids()
    done: list[int] = []
    res = multiview_pseudolabel(BoxGeneralist(), mask.astype(np.float32), mask, np.random.default_rng(0),
                                box_jitter=0, max_slices_per_view=cap, on_slices=done.append)
    prompted = sum(v.size for v in res.slices.values())
    assert prompted > 0 and sum(done) == prompted == planned_slices(mask, cap)
