"""Generalist layer: coordinate mapping, batched decoding, the real LiteMedSAM weights, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmabs_core.errors import InputError, WeightsError
from fmabs_core.generalist import SliceGeometry, get_generalist, jitter_box, mask_box, sample_points, slice_prompts
from fmabs_core.generalist.decoder import decode_batched


@pytest.fixture(scope="module")
def lite():
    return get_generalist("litemedsam", device="cpu")


# ---------------------------------------------------------------- coordinate mapping (no model)
SHAPES = [(97, 131), (140, 88), (183, 140), (256, 256), (40, 64), (255, 3)]


@pytest.mark.parametrize("shape", SHAPES + [(300, 500), (1024, 700)])
@pytest.mark.parametrize("size", [256, 1024])
def test_box_round_trip_is_exact(shape, size):
    g = SliceGeometry.for_shape(*shape, size)
    assert max(g.input_size) == size and g.input_size[0] <= size and g.input_size[1] <= size
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, min(shape), size=(20, 4))
    back = g.boxes_from_model(g.boxes_to_model(boxes))
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-9)
    # the image edges coincide: slice pixel edges -0.5 and W-0.5 map to model edges -0.5 and w-0.5
    h, w = shape
    ends = g.points_to_model(np.array([[-0.5, -0.5], [w - 0.5, h - 0.5]]))
    np.testing.assert_allclose(ends, [[-0.5, -0.5], [g.input_size[1] - 0.5, g.input_size[0] - 0.5]], atol=1e-9)


def _model_frame_rect(g: SliceGeometry, box) -> np.ndarray:
    """Model-frame pixels whose centre maps back inside the slice-grid box's pixels."""
    x0, y0, x1, y1 = box
    v, u = np.mgrid[0 : g.image_size, 0 : g.image_size].astype(float)
    back = g.points_from_model(np.stack([u, v], -1))
    inside = (back[..., 0] > x0 - 0.5) & (back[..., 0] < x1 + 0.5) & (back[..., 1] > y0 - 0.5) & (back[..., 1] < y1 + 0.5)
    inside[g.input_size[0]:, :] = False
    inside[:, g.input_size[1]:] = False
    return inside


def _boxes_to_try(shape, rng):
    """Full-height and full-width bands (edges along one axis: exact) and random rectangles."""
    h, w = shape
    for _ in range(4):
        x0, x1 = np.sort(rng.integers(0, w, 2))
        y0, y1 = np.sort(rng.integers(0, h, 2))
        yield (x0, 0, x1, h - 1), True
        yield (0, y0, w - 1, y1), True
        yield (x0, y0, x1, y1), False


@pytest.mark.parametrize("shape", SHAPES)
def test_masks_map_back_exactly(shape):
    """A model-frame mask of a slice-grid box comes back as exactly that box (resize + padding undone).

    Exact along each axis (bands); at a rectangle's 4 corners bilinear interpolation multiplies the
    two axes' weights, so a corner pixel may flip.
    """
    g = SliceGeometry.for_shape(*shape, 256)
    for (x0, y0, x1, y1), band in _boxes_to_try(shape, np.random.default_rng(1)):
        inside = _model_frame_rect(g, (x0, y0, x1, y1))
        logits = torch.from_numpy(np.where(inside, 1.0, -1.0)).float()[None, None]
        back = g.masks_to_original(logits)[0].numpy() > 0
        want = np.zeros(shape, bool)
        want[y0 : y1 + 1, x0 : x1 + 1] = True
        assert (back != want).sum() <= (0 if band else 4)
        # low-res (L/4) logits, as the decoder gives them, land within about a pixel
        low = torch.nn.functional.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)
        back_low = g.masks_to_original(low)[0].numpy() > 0
        assert (back_low != want).sum() <= 2 * (shape[0] + shape[1])


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(97, 131), (140, 88), (40, 64)])
def test_image_and_boxes_share_one_frame(lite, shape):
    """The preprocessed image puts a bright box exactly where the box mapping says it is."""
    for (x0, y0, x1, y1), band in _boxes_to_try(shape, np.random.default_rng(2)):
        img = np.zeros((1, *shape), np.float32)
        img[0, y0 : y1 + 1, x0 : x1 + 1] = 1.0
        img[0, 0, 0] = 0.0 if (x0, y0) != (0, 0) else img[0, 0, 0]
        x, g = lite.preprocess(img, intensity_window=(0.0, 1.0))
        assert x.shape == (1, 3, 256, 256)
        bright = x[0, 0].cpu().numpy() > 0.5
        want = _model_frame_rect(g, (x0, y0, x1, y1))
        if img.min() == img.max():  # a box covering the whole slice: per-slice min-max makes it flat
            continue
        assert (bright != want).sum() <= (0 if band else 4)
        assert not bright[g.input_size[0]:, :].any() and not bright[:, g.input_size[1]:].any()  # padding


# ---------------------------------------------------------------- batched decoder == stock decoder
@pytest.mark.slow
def test_batched_decoder_matches_stock_decoder(lite):
    torch.manual_seed(0)
    model = lite.model
    emb = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[[10.0, 20, 100, 120]], [[50.0, 60, 200, 230]], [[0.0, 0, 255, 255]]])
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        batched, iou_b = decode_batched(model.mask_decoder, emb, pe, sparse, dense)
        for i in range(3):
            for multi in (False, True):
                stock, iou_s = model.mask_decoder(emb[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], multi)
                sel = slice(1, None) if multi else slice(0, 1)
                torch.testing.assert_close(batched[i : i + 1, sel], stock, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(iou_b[i : i + 1, sel], iou_s, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- real LiteMedSAM weights
def _disk_slice(h=120, w=150, cy=60, cx=80, r=30, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return (100 + 300 * disk + rng.normal(0, 10, (h, w))).astype(np.float32), disk


@pytest.mark.slow
def test_litemedsam_encode_decode_shapes_and_quality(lite):
    img, disk = _disk_slice()
    img2, disk2 = _disk_slice(cy=50, cx=60, r=20, seed=1)
    slices = np.stack([img, img2])
    win = (50.0, 450.0)
    emb = lite.encode(slices, intensity_window=win, batch_size=2)
    assert emb.features.shape == (2, 256, 64, 64) and len(emb) == 2
    assert emb.geometry.original_size == (120, 150) and emb.geometry.input_size == (205, 256)
    boxes = np.stack([jitter_box(mask_box(disk), disk.shape, np.random.default_rng(0), 5), mask_box(disk2)])
    masks = lite.decode(emb, boxes)
    assert masks.shape == (2, 120, 150) and masks.dtype == bool
    probs = lite.decode(emb, boxes, points=[sample_points(disk, np.random.default_rng(0), 3), None],
                        return_probs=True)
    assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1
    for m, ref in zip(masks, (disk, disk2)):
        assert 2 * (m & ref).sum() / (m.sum() + ref.sum()) > 0.9  # a clean disk is easy
    # one slice prompted twice via select(); segment() == encode + decode
    twice = lite.decode(emb.select([0, 0]), np.stack([boxes[0], boxes[0]]))
    np.testing.assert_array_equal(twice[0], twice[1])
    # segment() == encode + decode (batch 1 vs 2: float summation order may flip an edge pixel)
    single = lite.segment(img[None], boxes[:1], intensity_window=win, batch_size=1)[0]
    assert (single != masks[0]).sum() <= 10


@pytest.mark.slow
def test_generalist_is_cached_and_validates(lite):
    assert get_generalist("LiteMedSAM", device="cpu") is lite
    with pytest.raises(InputError, match="unknown generalist"):
        get_generalist("sam2")
    with pytest.raises(InputError, match="boxes"):
        lite.decode(lite.encode(np.zeros((1, 8, 8), np.float32)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="N x H x W"):
        lite.encode(np.zeros((1, 1, 8, 8), np.float32))


@pytest.mark.slow
def test_bf16_autocast_decode_path():
    """The autocast (bf16) code path used on GPUs runs and agrees with fp32 (checked on CPU here)."""
    g32 = get_generalist("litemedsam", device="cpu", dtype="float32")
    g16 = get_generalist("litemedsam", device="cpu", dtype="bfloat16")
    assert g16 is not g32 and g16.amp_dtype == torch.bfloat16 and g32.amp_dtype is None
    from fmabs_core.generalist import Embeddings

    torch.manual_seed(0)
    emb = Embeddings(torch.randn(2, 256, 64, 64) * 0.1, SliceGeometry.for_shape(90, 120, 256))
    boxes = np.array([[10, 10, 60, 50], [30, 20, 110, 85]], float)
    pts = [np.array([[30.0, 30.0]]), None]
    p32 = g32.decode(emb, boxes, pts, return_probs=True)
    p16 = g16.decode(emb, boxes, pts, return_probs=True)
    assert p16.dtype == np.float32 and p16.shape == (2, 90, 120)
    assert np.abs(p16 - p32).mean() < 0.05
    with pytest.raises(InputError, match="float16 autocast is not supported on CPU"):
        get_generalist("litemedsam", device="cpu", dtype="float16")


# ---------------------------------------------------------------- SAM family: clear errors without weights
@pytest.mark.parametrize("name", ["mobilesam", "sam_vit_b", "sam_vit_h", "medsam"])
def test_sam_family_missing_weights_is_clear(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FMABS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as exc:
        get_generalist(name)
    msg = str(exc.value)
    assert "not found" in msg and str(tmp_path / "cache") in msg
    if name != "medsam":
        assert f"fmabs weights fetch {name}" in msg


def test_wrong_checkpoint_is_clear(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="size 16 bytes, expected 375042383") as exc:
        get_generalist("sam_vit_b", checkpoint=str(junk))
    # the user's own file: they are told to check what they named, never to delete it
    assert "Delete" not in str(exc.value) and "--generalist-checkpoint" in str(exc.value)
    with pytest.raises(WeightsError, match="cannot be loaded as a weights-only"):
        get_generalist("mobilesam", checkpoint=str(junk), check=False)


@pytest.mark.slow
def test_mobilesam_builds_from_a_local_checkpoint(tmp_path, monkeypatch):
    """Offline use with a local path: a (randomly initialised) MobileSAM state dict is refused until its
    sha256 is recorded as trusted (no hash is published for it), then loads and decodes."""
    from mobile_sam import sam_model_registry

    from fmabs_core.generalist import weights as W

    monkeypatch.setenv("FMABS_CACHE", str(tmp_path / "cache"))  # never the user's own trust records
    torch.manual_seed(0)
    path = tmp_path / "mobile_sam.pt"
    torch.save(sam_model_registry["vit_t"](checkpoint=None).state_dict(), path)
    with pytest.raises(WeightsError, match="no sha256 is recorded for mobilesam"):
        get_generalist("mobilesam", checkpoint=str(path))
    W.trust("mobilesam", path)
    g = get_generalist("mobilesam", checkpoint=str(path))
    assert g.image_size == 1024 and g.multimask
    x, geom = g.preprocess(np.random.default_rng(0).normal(size=(1, 50, 70)).astype(np.float32))
    assert x.shape == (1, 3, 1024, 1024) and geom.input_size == (731, 1024)
    from fmabs_core.generalist import Embeddings

    emb = Embeddings(torch.randn(2, 256, 64, 64), geom)
    out = g.decode(emb, np.array([[5, 5, 30, 40], [0, 0, 69, 49]], float), points=[np.array([[10, 10]]), None])
    assert out.shape == (2, 50, 70)
    # a state dict of another architecture is refused with the file named
    other = tmp_path / "lite.pth"
    torch.save(get_generalist("litemedsam").model.state_dict(), other)
    with pytest.raises(WeightsError, match="does not fit the mobilesam"):
        get_generalist("mobilesam", checkpoint=str(other), check=False)


# ---------------------------------------------------------------- prompts
def test_prompt_boxes_inside_bounds_and_contain_mask():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = rng.integers(5, 60, 2)
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : y0 + rng.integers(1, 20), x0 : x0 + rng.integers(1, 20)] = True
        if trial % 3 == 0:  # a second part
            m[rng.integers(0, h), rng.integers(0, w)] = True
        for mode in ("component", "slice"):
            prompts = slice_prompts(m, rng, jitter=10, n_points=(3, 5), mode=mode, min_component_px=1)
            covered = np.zeros_like(m)
            for p in prompts:
                x0b, y0b, x1b, y1b = p.box
                assert 0 <= x0b <= x1b <= w - 1 and 0 <= y0b <= y1b <= h - 1
                covered[int(y0b) : int(y1b) + 1, int(x0b) : int(x1b) + 1] = True
                assert 1 <= len(p.points) <= 5
                assert m[p.points[:, 1].astype(int), p.points[:, 0].astype(int)].all()  # points inside the mask
                tight = mask_box(m)
                assert x0b >= tight[0] - 10 and x1b <= tight[2] + 10
            assert covered[m].all()  # every predicted pixel is inside some box
            if mode == "slice":
                assert len(prompts) == 1


def test_prompt_modes_and_empty_slices():
    rng = np.random.default_rng(0)
    assert slice_prompts(np.zeros((10, 10), bool), rng) == []
    m = np.zeros((40, 40), bool)
    m[2:12, 2:12] = True
    m[25:35, 25:38] = True
    m[20, 5] = True  # speckle: below min_component_px, no prompt of its own
    comp = slice_prompts(m, rng, jitter=0, n_points=0, mode="component")
    assert [p.box.tolist() for p in comp] == [[25, 25, 37, 34], [2, 2, 11, 11]]
    for p in slice_prompts(m, rng, jitter=0, n_points=3, mode="component"):  # points from their own component
        x0, y0, x1, y1 = p.box
        assert len(p.points) == 3 and m[p.points[:, 1].astype(int), p.points[:, 0].astype(int)].all()
        assert ((x0 <= p.points[:, 0]) & (p.points[:, 0] <= x1) & (y0 <= p.points[:, 1]) & (p.points[:, 1] <= y1)).all()
    whole = slice_prompts(m, rng, jitter=0, n_points=0, mode="slice")
    assert whole[0].box.tolist() == [2, 2, 37, 34]
    tiny = np.zeros((10, 10), bool)
    tiny[3, 3] = True  # only speckle: still prompted as a whole
    assert slice_prompts(tiny, rng, jitter=0, n_points=1)[0].box.tolist() == [3, 3, 3, 3]
    # jitter is 0..J per side and independent
    boxes = np.array([jitter_box(np.array([20, 20, 30, 30.0]), (100, 100), rng, 10) for _ in range(400)])
    d = np.abs(boxes - [20, 20, 30, 30])
    assert d.min() == 0 and d.max() == 10 and len(np.unique(d[:, 0])) == 11
