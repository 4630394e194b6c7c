"""CFR's tiled SAM-family segmenter and the ``sam-lora`` method, on the real LiteMedSAM weights.

Every forward pass costs about a second per 256-px canvas on this project's CPUs, so the crops are
tiny and the module shares one network per class count (``net1``, ``net2``) and one short training
run (``tuned``) between its tests.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from fmabs_core.cli import main
from fmabs_core.data.phantom import make_phantom
from fmabs_core.data.project import Project
from fmabs_core.errors import InputError
from fmabs_core.generalist import lora
from fmabs_core.generalist.tiled import (TiledSegmenter, build_tiled_segmenter, load_tuned, multiclass_decoder,
                                         read_adapter_meta)
from fmabs_core.methods import get_method, losses
from fmabs_core.methods.sam_lora import bezier_augment
from fmabs_core.data.intensity import zscore
from fmabs_core.training.config import method_default

pytestmark = pytest.mark.slow  # the real LiteMedSAM encoder, and a real training run


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the machine is shared: never more than its two cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net1() -> TiledSegmenter:
    torch.manual_seed(0)
    return build_tiled_segmenter("litemedsam", 2, None, rank=4, grid=None).eval()  # C = 1, default grid 4


@pytest.fixture(scope="module")
def net2() -> TiledSegmenter:
    torch.manual_seed(1)
    return build_tiled_segmenter("litemedsam", 3, None, rank=2, grid=2).eval()  # C = 2, 2 x 2 tiles per canvas


def _crop(shape, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, X, Y, Z) z-scored phantom crop and its (1, X, Y, Z) label."""
    img, lab = make_phantom(tuple(shape), np.random.default_rng(seed))
    return torch.from_numpy(zscore(img))[None, None], torch.from_numpy(lab.astype(np.int64))[None]


# ----------------------------------------------------------------------------------------- network
def test_output_shape_one_class_odd_crop_and_batch(net1):
    x = torch.randn(2, 1, 21, 17, 7)
    with torch.no_grad():
        out = net1(x)
    assert out.shape == (2, 2, 21, 17, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net1.layouts((21, 17, 7))[0][2].grid == 4  # LiteMedSAM's default grid, one canvas for 7 slices


def test_output_shape_two_classes_chunked_and_chunks_are_independent(net2):
    x = torch.randn(1, 1, 13, 11, 9)  # 9 slices on 2 x 2 grids: 3 canvases (3 + 3 + 3 slices)
    x[0, 0, 0, 0, 0], x[0, 0, 0, 0, 1] = -9.0, 9.0  # the crop's extremes in the first chunk: the same [0, 1] scaling
    plan = net2.layouts((13, 11, 9))
    assert [(a, b) for a, b, _ in plan] == [(0, 3), (3, 6), (6, 9)]
    with torch.no_grad():
        out = net2(x)
        first = net2(x[..., 0:3])
    assert out.shape == (1, 3, 13, 11, 9)
    # each canvas is segmented on its own: the first chunk alone gives the same logits
    torch.testing.assert_close(out[..., 0:3], first, atol=1e-4, rtol=1e-4)


def test_one_canvas_per_crop_without_grid():
    net = build_tiled_segmenter("litemedsam", 2, None, rank=1, grid=None, use_default_grid=False)
    assert net.grid is None and net.layouts((8, 8, 10))[0][2].grid == 4 and len(net.layouts((8, 8, 10))) == 1
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 8, 8, 10)).shape == (1, 2, 8, 8, 10)


def test_only_lora_prompt_encoder_and_mask_decoder_train(net1):
    trainable = [n for n, p in net1.named_parameters() if p.requires_grad]
    assert trainable
    for n in trainable:
        assert (n.startswith("image_encoder.") and n.rsplit(".", 1)[-1] in ("lora_q_A", "lora_q_B", "lora_v_A", "lora_v_B")
                ) or n.startswith(("prompt_encoder.", "mask_decoder.")), n
    assert any(n.startswith("image_encoder.") for n in trainable)
    assert "prompt_encoder.no_mask_embed.weight" in trainable
    assert any(n.startswith("mask_decoder.transformer.") for n in trainable)
    assert not any("qkv.weight" in n or "qkv.bias" in n for n in trainable)


def test_encoder_batchnorm_stays_in_eval_mode(net1):
    bns = [m for m in net1.image_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns  # TinyViT has BatchNorm
    try:
        net1.train()
        assert net1.training and net1.mask_decoder.training and net1.prompt_encoder.training
        assert not any(m.training for m in net1.image_encoder.modules())
        before = [m.running_mean.clone() for m in bns]
        net1(torch.randn(1, 1, 9, 9, 3))
        assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    finally:
        net1.eval()


def test_multiclass_decoder_starts_from_the_pretrained_tokens(net2):
    from fmabs_core.generalist.models import get_generalist

    pre = get_generalist("litemedsam", device="cpu").model.mask_decoder
    for init, source in (("shared", lambda i: 0), ("cycled", lambda i: i % 4)):  # cycled: the first version
        dec = multiclass_decoder(pre, 6, init)  # more masks than the 4 pretrained tokens
        assert dec.num_mask_tokens == 6 and dec.num_multimask_outputs == 5 and pre.num_mask_tokens == 4
        for i in range(6):
            torch.testing.assert_close(dec.mask_tokens.weight[i], pre.mask_tokens.weight[source(i)], atol=0, rtol=0)
            a, b = dec.output_hypernetworks_mlps[i].state_dict(), pre.output_hypernetworks_mlps[source(i)].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="head initialisation"):
        multiclass_decoder(pre, 3, "random")
    assert dec.iou_prediction_head.layers[-1].out_features == 6
    assert all(torch.equal(dec.transformer.state_dict()[k], v) for k, v in pre.transformer.state_dict().items())
    # the same module as SAM's MaskDecoder(num_multimask_outputs=C): identical state-dict keys and shapes
    ref = type(pre)(transformer_dim=256, transformer=pre.transformer, num_multimask_outputs=5)
    assert {k: v.shape for k, v in dec.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with pytest.raises(InputError, match="at least 2"):
        multiclass_decoder(pre, 1)
    assert net2.mask_decoder.num_mask_tokens == 3


def test_bad_input_shape_and_grid_are_refused(net1):
    with pytest.raises(InputError, match=r"\(B, 1, X, Y, Z\)"):
        net1(torch.randn(1, 2, 8, 8, 3))
    with pytest.raises(InputError, match="grid"):
        build_tiled_segmenter("litemedsam", 2, None, rank=4, grid=0)


# ------------------------------------------------------------------------------- losses, augmentation
def test_partial_dice_ce_matches_dice_ce_on_dense_labels_and_ignores_255():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=g)
    target = torch.randint(0, 3, (2, 6, 5, 4), generator=g)
    torch.testing.assert_close(losses.partial_dice_ce(logits, target), losses.dice_ce(logits, target))
    partial = target.clone()
    partial[:, :, :, 2:] = 255
    other = logits.clone()
    other[:, :, :, :, 2:] = torch.randn(2, 3, 6, 5, 2, generator=g) * 10  # what happens there must not count
    torch.testing.assert_close(losses.partial_dice_ce(logits, partial), losses.partial_dice_ce(other, partial))
    none = torch.full_like(target, 255)
    leaf = logits.clone().requires_grad_(True)
    z = losses.partial_dice_ce(leaf, none)
    z.backward()
    assert float(z.detach()) == 0.0 and leaf.grad is not None


def test_bezier_augment_keeps_range_and_is_monotonic():
    torch.manual_seed(0)
    x = torch.linspace(-2.0, 3.0, 200).reshape(1, 1, 200, 1, 1).repeat(4, 1, 1, 1, 1)
    assert torch.equal(bezier_augment(x, 0.0), x)
    y = bezier_augment(x, 1.0)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert float(y.min()) >= -2.0 - 1e-5 and float(y.max()) <= 3.0 + 1e-5
    for i in range(4):
        d = torch.diff(y[i].flatten())
        assert bool((d >= -1e-6).all()) or bool((d <= 1e-6).all())  # one curve: increasing or inverted


# ---------------------------------------------------------------------------------- method, adapter
#: fine-tuning on two phantom scans must reach this prompt-free Dice on two others within LEARN_STEPS steps
LEARN_FLOOR, LEARN_STEPS = 0.6, 20


def _dice(net: TiledSegmenter, scans) -> float:
    with torch.no_grad():
        preds = [(net(x).argmax(1) == 1, y == 1) for x, y in scans]
    return float(np.mean([2 * (p & t).sum().item() / max(1, p.sum().item() + t.sum().item()) for p, t in preds]))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """sam-lora with its default learning rate, head and input scaling: LEARN_STEPS AdamW steps on two whole
    24x24x16 phantom scans (one canvas each), then the exported adapter, and the prompt-free Dice on two
    other phantoms before and after."""
    torch.manual_seed(0)
    method = get_method("sam-lora", {"bezier": 0.0, "rank": 2})
    train = [_crop((24, 24, 16), seed=s) for s in (0, 1)]
    held = [_crop((24, 24, 16), seed=s) for s in (5, 6)]
    x, y = torch.cat([a for a, _ in train]), torch.cat([b for _, b in train])
    tr = SimpleNamespace(cfg=SimpleNamespace(lr=method_default("sam-lora", "lr"), iterations=LEARN_STEPS),
                         project=SimpleNamespace(num_classes=1, classes={1: "phantom"}), patch=(24, 24, 16))
    net = method.build_network(tr)
    tr.net = net
    opt = method.build_optimizer(tr, net)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net.trainable_parameters()}
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    untuned = _dice(net.eval(), held)
    net.train()
    before = [m.running_var.clone() for m in net.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    frozen = {n: p.detach().clone() for n, p in net.image_encoder.named_parameters() if not p.requires_grad}
    history = []
    for _ in range(LEARN_STEPS):
        loss = method.supervised_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    net.eval()
    path = tmp_path_factory.mktemp("adapter") / "model.pt"
    method.export(tr, path)
    return SimpleNamespace(method=method, net=net, x=held[0][0], history=history, path=path, before=before,
                           frozen=frozen, untuned=untuned, dice=_dice(net, held))


def test_fine_tuning_learns_past_the_floor_without_collapsing(tuned):
    """The failure this guards against: with SGD's learning rate, z-scored input and the head copied from
    SAM's four tokens, the head fell to all background within a few steps (Dice 0 here, and on LA)."""
    assert tuned.untuned < 0.3
    assert tuned.dice >= LEARN_FLOOR, (tuned.untuned, tuned.dice, tuned.history)
    assert tuned.dice >= tuned.untuned + 0.3


def test_the_head_starts_with_equal_logits_and_the_encoder_sees_unit_intensities(net1, net2):
    x, _ = _crop((24, 24, 16), seed=3)
    with torch.no_grad():
        for net in (net1, net2):
            logits = net(x)
            assert torch.allclose(logits, logits[:, :1].expand_as(logits))  # p = 1 / (C + 1) everywhere at first
    assert net1.input_norm == "unit" and net1.head_init == "shared"
    seen = {}
    hook = net1.image_encoder.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            net1(x * 50.0 + 7.0)  # any intensity scale reaches the encoder in [0, 1]
    finally:
        hook.remove()
    assert float(seen["x"].min()) >= 0.0 and float(seen["x"].max()) <= 1.0 + 1e-6
    old = build_tiled_segmenter("litemedsam", 2, None, rank=2, input_norm="zscore", head_init="cycled")
    with torch.no_grad():
        logits = old(x)
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_the_adapter_keys():
    x, y = _crop((24, 24, 16), seed=4)
    grads, keys = [], []
    for recompute in (False, True):
        torch.manual_seed(2)
        net = build_tiled_segmenter("litemedsam", 2, None, rank=2, recompute=recompute).train()
        assert net.recompute is recompute
        with torch.no_grad():  # LoRA's B starts at zero: give the encoder's path a gradient worth comparing
            for _n, layer in lora.lora_layers(net.image_encoder):
                layer.lora_q_B.normal_(0, 0.01)
        losses.partial_dice_ce(net(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
        keys.append(sorted(lora.adapter_state(net)))
    assert keys[0] == keys[1]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for n, g in grads[1].items() if "lora_q_A" in n)


def test_a_few_adamw_steps_reduce_the_loss(tuned):
    assert all(np.isfinite(tuned.history))
    assert tuned.history[-1] < tuned.history[0]
    after = [m.running_var for m in tuned.net.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(tuned.before, after))  # BN statistics did not drift
    now = dict(tuned.net.image_encoder.named_parameters())
    assert all(torch.equal(v, now[n]) for n, v in tuned.frozen.items())  # base weights untouched


def test_exported_adapter_reloads_to_the_same_logits(tuned):
    head = read_adapter_meta(tuned.path)
    meta = head["meta"]
    assert head["base_name"] == "litemedsam" and head["rank"] == 2
    assert meta["num_classes"] == 2 and meta["grid"] == 4 and meta["rank"] == 2 and meta["generalist"] == "litemedsam"
    assert meta["classes"] == {"1": "phantom"} and meta["patch_size"] == [24, 24, 16]
    assert meta["input_norm"] == "unit" and meta["head_init"] == "shared"
    loaded = load_tuned(tuned.path, "cpu")
    assert not loaded.training and loaded.grid == 4 and loaded.num_classes == 2
    with torch.no_grad():
        a = tuned.net(tuned.x)
        b = loaded(tuned.x)
    assert torch.equal(a, b)


def test_an_adapter_from_before_input_norm_and_head_init_rebuilds_as_it_was_trained(tuned, tmp_path):
    old = tmp_path / "old.pt"
    meta = {k: v for k, v in tuned.net.meta().items() if k not in ("input_norm", "head_init")}
    lora.save_adapter(old, tuned.net, "litemedsam", lora.base_sha256("litemedsam"), extra_meta=meta)
    loaded = load_tuned(old, "cpu")
    assert (loaded.input_norm, loaded.head_init) == ("zscore", "cycled")
    bad = tmp_path / "bad.pt"
    lora.save_adapter(bad, tuned.net, "litemedsam", lora.base_sha256("litemedsam"), extra_meta={**meta, "input_norm": "hu"})
    with pytest.raises(Exception, match="input_norm"):
        load_tuned(bad, "cpu")


def test_load_tuned_refuses_other_base_weights(tuned, tmp_path):
    other = tmp_path / "other.pt"
    lora.save_adapter(other, tuned.net, "litemedsam", "0" * 64, extra_meta=tuned.net.meta())
    with pytest.raises(Exception, match="sha256"):
        load_tuned(other, "cpu")


def test_sam_lora_options_are_checked():
    assert get_method("sam-lora", {"labels": "cross"}).supervision == "cross"
    assert get_method("sam-lora").supervision == "dense"
    for bad in ({"labels": "sparse"}, {"bezier": 1.5}, {"rank": 0}, {"grid": 0}, {"generalist": "nope"}):
        with pytest.raises(InputError):
            get_method("sam-lora", bad)


# ------------------------------------------------------------------------------------- end to end
def test_fmabs_train_sam_lora_then_pseudo_label_with_the_adapter(tmp_path, phantom_data, capsys):
    proj = tmp_path / "proj"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    rc = main(["train", "--project", str(proj), "--method", "sam-lora", "--iterations", "3", "--run", "cfr",
               "--patch-size", "32", "32", "16", "--batch-size", "1", "--labelled-batch-size", "1", "--device", "cpu",
               "--labels", "dense", "--lr", "0.001", "--val-every", "3", "--max-val-cases", "1"])
    assert rc == 0
    project = Project(proj)
    run = project.run_dir("cfr")
    model = run / "model.pt"
    head = read_adapter_meta(model)  # the run ships a LoRA adapter, not a V-Net
    assert head["meta"]["method"] == "sam-lora" and head["meta"]["num_classes"] == 2
    assert head["meta"]["patch_size"] == [32, 32, 16]
    assert json.loads((run / "config.json").read_text())["method_options"]["labels"] == "dense"

    case = project.split("val")[0]
    image, label = project.image_path(case), project.label_path(case)
    out = tmp_path / "pl" / "seg.nii.gz"
    capsys.readouterr()
    assert main(["pseudo-label", "--adapter", str(model), "--image", str(image), "--label", str(label),
                 "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "prompt-free" in printed and "Dice vs" in printed
    seg, ref = nib.load(str(out)), nib.load(str(image))
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1}
    # the written label is the user's now: the same command refuses to replace it, before any work
    before = out.read_bytes()
    assert main(["pseudo-label", "--adapter", str(model), "--image", str(image), "--output", str(out),
                 "--device", "cpu"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["pseudo-label", "--adapter", str(model), "--image", str(image), "--output", str(out),
                 "--device", "cpu", "--overwrite"]) == 0
    # with --adapter the prompts have no meaning: refused, not silently ignored
    assert main(["pseudo-label", "--adapter", str(model), "--image", str(image), "--prompt-from", str(label),
                 "--output", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "prompt-free" in capsys.readouterr().err
    # `fmabs predict` takes the adapter too (the Slicer Segment panel runs it on a run's model.pt):
    # the same sliding windows of the tuned generalist, so the same labels as pseudo-label --adapter
    pred_dir = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--input", str(image), "--output", str(pred_dir),
                 "--overlap", "0.5", "--device", "cpu"]) == 0
    pred = nib.load(str(pred_dir / image.name))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(pred.dataobj), np.asarray(seg.dataobj))
