"""CPS as a plug-in method: registry and CLI options, its loss and second network, a tiny CLI run, exact resume."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fmabs_core import methods
from fmabs_core.cli import build_parser, main
from fmabs_core.methods import cps
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig, build_network
from killing import Killed, KillAt

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_option_strings() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices["train"]._actions for s in a.option_strings}


def test_registered_and_options_in_train_help():
    cls = methods.available()["cps"]
    assert cls is cps.CPS and cls.uses_unlabelled and cls.supervision == "cross"
    assert cls.describe().startswith("CPS")
    assert {"--cps-weight", "--rampup"} <= _train_option_strings()
    cfg = methods.get_method("cps", {"cps_weight": 0.2}).config
    assert (cfg.cps_weight, cfg.rampup) == (0.2, 1.0)
    pkg = Path(cps.__file__).parents[1]
    others = [p for p in pkg.rglob("*.py") if p.name != "cps.py" and "methods.cps" in p.read_text(encoding="utf-8")]
    assert not others


def test_cross_pseudo_loss_values():
    shape = (2, 2, 3, 3, 3)
    # both uniform: argmax is class 0 for both, CE = ln 2 each
    z = torch.zeros(shape)
    assert float(cps.cross_pseudo_loss(z, z)) == pytest.approx(2 * math.log(2))
    # confident agreement: almost nothing to learn
    agree = torch.zeros(shape)
    agree[:, 1] = 20.0
    assert float(cps.cross_pseudo_loss(agree, agree.clone())) < 1e-6
    # confident disagreement: each learns the other's class (a network learning its own argmax would give ~0)
    a = torch.zeros(shape, requires_grad=True)
    b = torch.zeros(shape)
    with torch.no_grad():
        a[:, 0] = 5.0
        b[:, 1] = 5.0
    b.requires_grad_(True)
    loss = cps.cross_pseudo_loss(a, b)
    assert float(loss.detach()) == pytest.approx(2 * (5 + math.log(1 + math.exp(-5))), rel=1e-5)
    loss.backward()
    # the gradient pushes A towards B's class 1 and B towards A's class 0
    assert (a.grad[:, 1] < 0).all() and (a.grad[:, 0] > 0).all()
    assert (b.grad[:, 0] < 0).all() and (b.grad[:, 1] > 0).all()


def _fake_tr(**cfg_kw):
    cfg = TrainConfig(seed=11, lr=0.02, momentum=0.8, weight_decay=3e-4, iterations=10,
                      net=NetConfig(width=4, dropout=0.0), **cfg_kw)
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.net)
    return SimpleNamespace(cfg=cfg, device=torch.device("cpu"), net=net, train_net=net, wrap=lambda m: m,
                           autocast=contextlib.nullcontext)


def test_network_b_differs_from_a_is_reproducible_and_leaves_the_rng_alone():
    tr = _fake_tr()
    rng = torch.get_rng_state()
    m1 = methods.get_method("cps", {})
    m1.setup(tr)
    assert torch.equal(rng, torch.get_rng_state())
    m2 = methods.get_method("cps", {})
    m2.setup(tr)
    a, b1, b2 = tr.net.state_dict(), m1.net_b.state_dict(), m2.net_b.state_dict()
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    weights = [k for k in a if k.endswith("weight") and a[k].ndim > 1]
    assert weights and not any(torch.equal(a[k], b1[k]) for k in weights)
    (opt,) = m1.optimizers()
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.02, 0.8, 3e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in m1.net_b.parameters()}
    assert m1.eval_model(tr) is tr.net


def test_cps_loss_on_every_crop_and_state_restored_before_setup():
    tr = _fake_tr()
    method = methods.get_method("cps", {})
    method.setup(tr)
    target = torch.full((2, 16, 16, 16), 255, dtype=torch.long)
    target[:, 3] = 1
    torch.manual_seed(0)
    image = torch.randn(2, 1, 16, 16, 16)
    results = {}
    for lab in ((True, False), (False, False)):
        batch = {"image": image, "target": target, "labelled": torch.tensor(lab)}
        results[lab] = method.train_step(tr, batch, 10)
    (loss_l, logs_l), (loss_u, logs_u) = results[(True, False)], results[(False, False)]
    # the CPS term is over all crops: the same whichever crops are labelled (BN: same batch, same stats)
    assert logs_l["loss_cps"] == pytest.approx(logs_u["loss_cps"], rel=1e-6) and logs_u["loss_cps"] > 0
    assert logs_u["loss_sup"] == logs_u["loss_sup_b"] == 0.0 and logs_l["loss_sup"] > 0 and logs_l["loss_sup_b"] > 0
    assert logs_l["lambda_cps"] == pytest.approx(0.1)  # the end of the ramp (iteration 10 of 10)
    assert float(loss_l) == pytest.approx(logs_l["loss_sup"] + logs_l["loss_sup_b"] + 0.1 * logs_l["loss_cps"],
                                          rel=1e-5)
    assert float(loss_u) == pytest.approx(0.1 * logs_u["loss_cps"], rel=1e-5)
    loss = loss_l
    # one SGD step of B, then its state survives a load_state_dict made before setup (the resume order)
    loss.backward()
    method.optimizer_b.step()
    state = method.state_dict()
    fresh = methods.get_method("cps", {})
    fresh.load_state_dict(state, tr)
    fresh.setup(tr)
    assert all(torch.equal(v, fresh.net_b.state_dict()[k]) for k, v in state["net_b"].items())
    mom = [s["momentum_buffer"] for s in fresh.optimizer_b.state_dict()["state"].values()]
    ref = [s["momentum_buffer"] for s in state["optimizer_b"]["state"].values()]
    assert mom and all(torch.equal(x, y) for x, y in zip(mom, ref))


@pytest.mark.slow
def test_tiny_cli_run(project):
    run = project.run_dir("cps")
    rc = main(["train", "--project", str(project.root), "--method", "cps", "--iterations", "4", "--run", "cps",
               "--patch-size", "16", "16", "16", "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1",
               "--device", "cpu", "--val-every", "4", "--max-val-cases", "1"])
    assert rc == 0
    assert (run / "model.pt").exists()
    progress = [e for e in read_events(run) if e["type"] == "progress"]
    assert len(progress) == 4
    for e in progress:
        assert {"loss_sup", "loss_sup_b", "loss_cps", "lambda_cps"} <= set(e["losses"])
    assert progress[-1]["losses"]["lambda_cps"] > progress[0]["losses"]["lambda_cps"]


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(project):
    cfg = TrainConfig(method="cps", iterations=7, seed=5, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                      labelled_bs=1, net=NetConfig(width=4, dropout=0.2, out_channels=2), val_every=3, ckpt_every=2,
                      max_val_cases=1)
    ref_model = Trainer(project, "ref", cfg).train().model

    killed = Trainer(project, "crash", cfg)
    killed.hooks.append(KillAt(5))  # last checkpoint: 4
    with pytest.raises(Killed):
        killed.train()
    assert read_status(project.run_dir("crash"))["state"] == "failed"
    assert killed.ckpts.iteration_files()[-1][0] == 4

    resumed_model = Trainer(project, "crash", cfg).train().model
    ref = torch.load(ref_model, weights_only=True)["state_dict"]
    out = torch.load(resumed_model, weights_only=True)["state_dict"]
    assert _equal(ref, out), "the resumed model differs"
    ref_ck = torch.load(project.run_dir("ref") / "checkpoints" / "iter_0000007.pt", weights_only=True)
    out_ck = torch.load(project.run_dir("crash") / "checkpoints" / "iter_0000007.pt", weights_only=True)
    # network B and its optimiser are in the checkpoint, and equal after the resume
    net_b = ref_ck["method"]["net_b"]
    assert set(net_b) == set(ref_ck["model"]) and not _equal(net_b, ref_ck["model"])
    assert _equal(net_b, out_ck["method"]["net_b"])
    assert _equal(ref_ck["model"], out_ck["model"])
    for p_ref, p_out in zip(ref_ck["optimizer"]["state"].values(), out_ck["optimizer"]["state"].values()):
        assert torch.equal(p_ref["momentum_buffer"], p_out["momentum_buffer"])
    b_ref = list(ref_ck["method"]["optimizer_b"]["state"].values())
    b_out = list(out_ck["method"]["optimizer_b"]["state"].values())
    assert b_ref and len(b_ref) == len(b_out)
    assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"]) for x, y in zip(b_ref, b_out))

    events = read_events(project.run_dir("crash"))
    starts = [e for e in events if e["type"] == "started"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["iteration"] == 4
    losses = {e["iteration"]: e["losses"] for e in read_events(project.run_dir("ref")) if e["type"] == "progress"}
    after = [e for e in events[events.index(starts[1]):] if e["type"] == "progress"]
    assert after and [e["losses"] for e in after] == [losses[e["iteration"]] for e in after]
