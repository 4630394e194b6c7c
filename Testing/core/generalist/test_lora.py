"""LoRA on q and v of the image encoder's fused qkv (CFR fine-tuning), on the real LiteMedSAM weights.

The encoder passes are the cost here (about 3 s each on one CPU core): the module fixture ``tuned``
runs the five that the exactness tests need (original, B = 0, one training step, tuned, reloaded) once.
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import pytest
import torch

from fmabs_core.errors import InputError, WeightsError
from fmabs_core.generalist import get_generalist
from fmabs_core.generalist import lora as L
from fmabs_core.generalist.lora import (
    LoRAQKV,
    adapter_state,
    add_lora,
    base_sha256,
    load_adapter,
    lora_layers,
    remove_lora,
    save_adapter,
)

RANK = 4
OTHER_SHA = "0" * 64


pytestmark = pytest.mark.slow  # the real LiteMedSAM encoder


@pytest.fixture(scope="module")
def base():
    """The frozen LiteMedSAM model from the wheel (never modified: tests work on deep copies)."""
    return get_generalist("litemedsam", device="cpu").model


@pytest.fixture(scope="module")
def sha():
    return base_sha256("litemedsam")


def _qkv_layers(model):
    return [(n, m.qkv) for n, m in model.named_modules() if isinstance(getattr(m, "qkv", None), (torch.nn.Linear, LoRAQKV))]


@pytest.fixture(scope="module")
def tuned(base, sha, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable timing on a shared two-core machine
    try:
        x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        model = copy.deepcopy(base).eval()
        enc = model.image_encoder
        with torch.no_grad():
            y0 = enc(x)
        params = add_lora(enc, RANK)
        with torch.no_grad():
            y1 = enc(x)
        frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
        # every parameter goes to AdamW (with weight decay): only the LoRA ones may move
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        loss = (enc(x) - y0 - 0.1).square().mean()
        loss.backward()
        opt.step()
        after_step = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
        with torch.no_grad():
            y2 = enc(x)
            # stand-in for a trained mask decoder (CFR trains it too): it must round-trip with the adapter
            for p in model.mask_decoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        for p in model.mask_decoder.parameters():
            p.requires_grad_(True)
        path = save_adapter(tmp_path_factory.mktemp("adapter") / "cfr_adapter.pt", model, "litemedsam", sha,
                            {"num_classes": 1, "grid": 9})
        fresh = copy.deepcopy(base).eval()
        info = load_adapter(path, fresh, "litemedsam", sha)
        with torch.no_grad():
            y3 = fresh.image_encoder(x)
        yield dict(x=x, model=model, params=params, frozen=frozen, after_step=after_step, y0=y0, y1=y1, y2=y2, y3=y3, path=path,
                   fresh=fresh, info=info)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- structure
def test_parameter_count_and_freezing(base):
    model = copy.deepcopy(base)
    shapes = [(qkv.in_features, qkv.out_features) for _, qkv in _qkv_layers(model.image_encoder)]
    assert len(shapes) == 10  # LiteMedSAM's TinyViT: 2 + 6 + 2 attention blocks
    params = add_lora(model.image_encoder, RANK)
    # per block: q and v each get A (r x in) and B (out/3 x r)
    expected = sum(2 * (RANK * i + RANK * (o // 3)) for i, o in shapes)
    assert expected == 29696
    assert sum(p.numel() for p in params) == expected
    trainable = [p for p in model.image_encoder.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert all(isinstance(q, LoRAQKV) for _, q in _qkv_layers(model.image_encoder))
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_q_B) == 0 and torch.count_nonzero(layer.lora_v_B) == 0
        bound = 1.0 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on r x in: U(-1/sqrt(in), 1/sqrt(in))
        assert 0 < layer.lora_q_A.abs().max() <= bound and layer.lora_q_A.std() > bound / 3
    # base keys keep their names: the original checkpoint still loads into the adapted model
    base_keys = set(base.state_dict())
    assert base_keys <= set(model.state_dict())
    assert set(model.state_dict()) - base_keys == {f"{n}.{a}" for n, _ in lora_layers(model) for a in L._LORA_NAMES}
    with pytest.raises(InputError, match="already has LoRA"):
        add_lora(model.image_encoder, RANK)
    assert remove_lora(model.image_encoder) == 10
    assert not lora_layers(model) and set(model.state_dict()) == base_keys


def _changed(a, b):
    return bool((a != b).any())


def test_tinyvit_update_hits_only_q_and_v_per_head(base):
    model = copy.deepcopy(base)
    attn = model.image_encoder.layers[2].blocks[0].attn
    x = torch.randn(2, 49, attn.qkv.in_features)
    ref = attn.qkv(x)
    add_lora(model.image_encoder, RANK)
    layer = attn.qkv

    def split(out):  # TinyViT's own convention (Attention.forward)
        return out.view(2, 49, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)

    with torch.no_grad():
        assert torch.equal(layer(x), ref)  # B = 0: exactly the base layer
        layer.lora_q_B.normal_()
        q, k, v = split(layer(x))
        q0, k0, v0 = split(ref)
        assert _changed(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
        assert bool((q != q0).all(dim=-1).all())  # every head's q moves, not only a third of the heads
        layer.lora_q_B.zero_()
        layer.lora_v_B.normal_()
        q, k, v = split(layer(x))
        assert torch.equal(q, q0) and torch.equal(k, k0) and _changed(v, v0)
        # the merged weight computes the same (export / inference path)
        torch.testing.assert_close(torch.nn.functional.linear(x, layer.merged_weight(), layer.bias), layer(x))


def test_sam_vit_update_hits_only_q_and_v_thirds():
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=4, out_chans=16).eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y0 = enc(img)
    params = add_lora(enc, RANK)
    assert sum(p.numel() for p in params) == 2 * 2 * (RANK * 48 + RANK * 48)
    assert {layer.layout for _, layer in lora_layers(enc)} == {"sam_thirds"}
    attn = enc.blocks[0].attn
    x = torch.randn(1, 4, 4, 48)
    with torch.no_grad():
        assert torch.equal(enc(img), y0)
        ref = attn.qkv(x)

        def split(out):  # segment_anything's convention: reshape(B, HW, 3, heads, hd)
            return out.reshape(1, 16, 3, 4, -1).unbind(2)

        attn.qkv.lora_v_B.normal_()
        q, k, v = split(attn.qkv(x))
        q0, k0, v0 = split(ref)
        assert torch.equal(q, q0) and torch.equal(k, k0) and bool((v != v0).all())


# ---------------------------------------------------------------------------------- exactness
def test_zero_b_leaves_the_encoder_output_unchanged(tuned):
    assert torch.equal(tuned["y1"], tuned["y0"])


def test_optimiser_step_moves_only_lora(tuned):
    model = tuned["model"]
    after = tuned["after_step"]
    assert set(after) == set(tuned["frozen"])
    for k, v in after.items():  # every base parameter and buffer (BN statistics too), bit for bit
        assert torch.equal(v, tuned["frozen"][k]), k
    assert any(torch.count_nonzero(layer.lora_q_B) > 0 for _, layer in lora_layers(model))
    assert not torch.equal(tuned["y2"], tuned["y0"])  # the step changed the encoder's function


def test_adapter_round_trip_reproduces_the_tuned_model(tuned, base):
    assert torch.equal(tuned["y3"], tuned["y2"])  # the reloaded encoder: bit-identical output
    fresh, model = tuned["fresh"], tuned["model"]
    for k, v in model.mask_decoder.state_dict().items():
        assert torch.equal(fresh.mask_decoder.state_dict()[k], v), k
    for k, v in fresh.prompt_encoder.state_dict().items():  # prompt encoder not trained: not saved, unchanged
        assert torch.equal(v, base.prompt_encoder.state_dict()[k])
    info = tuned["info"]
    assert info["meta"] == {"num_classes": 1, "grid": 9} and info["rank"] == RANK and info["base_name"] == "litemedsam"
    state = adapter_state(model)
    assert all(".lora_" in k or k.startswith("mask_decoder.") for k in state)
    assert not any(k.startswith("prompt_encoder.") for k in state)
    assert not [p for p in tuned["path"].parent.iterdir() if p.name != tuned["path"].name]  # no temp file left


# ---------------------------------------------------------------------------------- refusals
@pytest.fixture()
def small_adapter(base, sha, tmp_path):
    """A LoRA'd copy (random B, so the tensors are not all zero) and its saved adapter; no encoder pass."""
    model = copy.deepcopy(base)
    add_lora(model.image_encoder, RANK)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_q_B.normal_()
            layer.lora_v_B.normal_()
    return model, save_adapter(tmp_path / "a.pt", model, "litemedsam", sha)


def _flip_byte_in_record(path: Path, suffix: str) -> None:
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    raw = bytearray(path.read_bytes())
    n_name, n_extra = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
        raw[info.header_offset + 28 : info.header_offset + 30], "little")
    pos = info.header_offset + 30 + n_name + n_extra + info.file_size // 2
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


def _rewrite(path: Path, change, fix_digest: bool) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    if fix_digest:
        payload["digest"] = L._digest(payload)
    torch.save(payload, path)


def _fresh(base):
    return copy.deepcopy(base)


def test_flipped_byte_is_refused(small_adapter, base, sha):
    _, path = small_adapter
    _flip_byte_in_record(path, "data/0")  # torch's zip reader does not check CRCs: our content hash must
    with pytest.raises(WeightsError, match="a.pt: content checksum mismatch"):
        load_adapter(path, _fresh(base), "litemedsam", sha)


def test_renamed_key_is_refused(small_adapter, base, sha):
    _, path = small_adapter
    old = next(iter(torch.load(path, weights_only=True)["state"]))

    def rename(p):
        p["state"][old.replace("lora_q_A", "lora_k_A")] = p["state"].pop(old)

    _rewrite(path, rename, fix_digest=False)
    with pytest.raises(WeightsError, match="checksum"):
        load_adapter(path, _fresh(base), "litemedsam", sha)
    _rewrite(path, lambda p: None, fix_digest=True)  # a consistent file with the wrong key: named
    model = _fresh(base)
    with pytest.raises(WeightsError, match=r"1 missing: .*lora_q_A; 1 unexpected: .*lora_k_A"):
        load_adapter(path, model, "litemedsam", sha)
    assert not lora_layers(model)  # refused before any change: the LoRA it added is gone again


def test_wrong_shapes_are_refused(small_adapter, base, sha, tmp_path):
    model, path = small_adapter
    key = next(k for k in torch.load(path, weights_only=True)["state"] if k.endswith("lora_v_B"))
    _rewrite(path, lambda p: p["state"].__setitem__(key, torch.zeros(7, RANK)), fix_digest=True)
    with pytest.raises(WeightsError, match="wrong shape.*lora_v_B"):
        load_adapter(path, _fresh(base), "litemedsam", sha)
    # a rank-8 adapter does not fit a rank-4 model
    m8 = _fresh(base)
    add_lora(m8.image_encoder, 8)
    p8 = save_adapter(tmp_path / "r8.pt", m8, "litemedsam", sha)
    target = _fresh(base)
    add_lora(target.image_encoder, RANK)
    with pytest.raises(WeightsError, match="r8.pt.*wrong shape"):
        load_adapter(p8, target, "litemedsam", sha)


def test_other_base_weights_are_refused(small_adapter, base, sha):
    _, path = small_adapter
    with pytest.raises(WeightsError, match=f"sha256 {sha}.*sha256 {OTHER_SHA}"):
        load_adapter(path, _fresh(base), "litemedsam", OTHER_SHA)
    with pytest.raises(WeightsError, match="'litemedsam', not 'mobilesam'"):
        load_adapter(path, _fresh(base), "mobilesam", sha)
    with pytest.raises(InputError, match="64-digit hex"):
        load_adapter(path, _fresh(base), "litemedsam", "abc")


def test_non_adapters_are_refused(base, sha, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(WeightsError, match="plain.pt: is not an FM-ABS LoRA adapter"):
        load_adapter(plain, _fresh(base), "litemedsam", sha)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip" * 100)
    with pytest.raises(WeightsError, match="junk.pt: cannot be read"):
        load_adapter(junk, _fresh(base), "litemedsam", sha)
    with pytest.raises(WeightsError, match="not found"):
        load_adapter(tmp_path / "absent.pt", _fresh(base), "litemedsam", sha)


_MARK: list[str] = []


def _payload_code(marker: str) -> str:  # what a malicious pickle would run
    _MARK.append(marker)
    Path(marker).write_text("ran")
    return marker


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_payload_code, (self.marker,))


def test_malicious_pickle_is_refused_without_running(base, sha, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": L.ADAPTER_FORMAT, "version": 1, "x": _Evil(str(marker))}, evil)
    with pytest.raises(WeightsError, match="evil.pt: cannot be read as a weights-only"):
        load_adapter(evil, _fresh(base), "litemedsam", sha)
    assert not marker.exists() and not _MARK


def test_save_is_atomic(small_adapter, sha):
    model, path = small_adapter
    before = path.read_bytes()
    with pytest.raises(InputError, match="JSON"):
        save_adapter(path, model, "litemedsam", sha, {"bad": object()})
    with pytest.raises(InputError, match="64-digit hex"):
        save_adapter(path, model, "litemedsam", "nothex")
    assert path.read_bytes() == before  # the old adapter is intact
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]  # and no temp file is left


@pytest.mark.parametrize("change, words", [
    ({"meta": "5"}, "'meta' is not a JSON object"),
    ({"meta": "{"}, "'meta' is not a JSON object"),
    ({"alpha": float("nan")}, "alpha nan"),
    ({"rank": 0}, "rank 0"),
    ({"meta": '{"generalist": "litemedsam", "num_classes": "two"}'}, "num_classes"),
    ({"meta": '{"generalist": "litemedsam", "num_classes": 2, "grid": 0}'}, "grid 0"),
])
def test_damaged_adapter_metadata_is_named_with_the_file(tmp_path, change, words):
    """An adapter whose digest is right but whose header is nonsense (edited and re-hashed, or written by other
    code) is a clear error naming the file, not a crash (before: TypeError, JSONDecodeError or a NaN scale)."""
    from fmabs_core.errors import WeightsError
    from fmabs_core.generalist.tiled import read_adapter_meta

    payload = {"format": L.ADAPTER_FORMAT, "version": L.ADAPTER_VERSION, "base_name": "litemedsam",
               "base_sha256": "0" * 64, "rank": 4, "alpha": 4.0,
               "meta": '{"generalist": "litemedsam", "num_classes": 2}', "state": {"w": torch.zeros(2)}}
    payload.update(change)
    payload["digest"] = L._digest(payload)
    path = tmp_path / "adapter.pt"
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=words) as exc:
        read_adapter_meta(path)
    assert str(path) in str(exc.value)
