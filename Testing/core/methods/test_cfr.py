"""CFR re-training (cfr-mt, cfr-acmt, cfr-st): registry and options, the loss pieces on hand-made tensors,
tiny engine runs on phantoms with hand-written pseudo-label files, the missing-file error, and resume."""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import asdict, fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fmabs_core import methods
from fmabs_core.cli import build_parser
from fmabs_core.contract import GENERALIST_LAYER, PSEUDO_DIR
from fmabs_core.data import io
from fmabs_core.errors import InputError
from fmabs_core.methods import cfr, losses
from fmabs_core.methods.mean_teacher import MeanTeacherConfig
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig
from killing import Killed, KillAt

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("cfr-mt", "cfr-acmt", "cfr-st")
FIELDS = ("labels", "generalist", "generalist_checkpoint", "rank", "grid", "gradient_checkpointing", "finetune_iterations", "finetune_lr",
          "finetune_batch", "pl_weight", "ema", "consistency", "noise_std", "noise_clip", "st_rounds")


def _train_option_strings() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices["train"]._actions for s in a.option_strings}


def test_registered_with_shared_options_in_train_help():
    available = methods.available()
    for name, cls in zip(NAMES, (cfr.CFRMT, cfr.CFRACMT, cfr.CFRST)):
        assert available[name] is cls and cls.pipeline == "cfr" and cls.uses_unlabelled
        assert cls.Config is cfr.CFRConfig
        assert {o["name"] for o in next(d for d in methods.describe() if d["name"] == name)["options"]} == set(FIELDS)
    assert {f"--{f.replace('_', '-')}" for f in FIELDS} <= _train_option_strings()
    cfg = methods.get_method("cfr-mt").config
    assert asdict(cfg) == {"labels": "dense", "generalist": "litemedsam", "generalist_checkpoint": None, "rank": 4,
                           "grid": None, "gradient_checkpointing": True, "finetune_iterations": 6000, "finetune_lr": 1e-4, "finetune_batch": 2,
                           "pl_weight": 1.0, "ema": 0.99, "consistency": 0.1, "noise_std": 0.1, "noise_clip": 0.2,
                           "st_rounds": 1}
    # the mean-teacher options are one shared command-line option each: same defaults and help
    mt = {f.name: f for f in fields(MeanTeacherConfig)}
    for f in fields(cfr.CFRConfig):
        if f.name in mt:
            assert (f.default, f.metadata["help"]) == (mt[f.name].default, mt[f.name].metadata["help"])
    # the labelled pool follows --labels, per instance
    assert methods.get_method("cfr-acmt", {"labels": "cross"}).supervision == "cross"
    assert methods.get_method("cfr-acmt", {"labels": "dense"}).supervision == "dense"
    with pytest.raises(InputError, match="--labels"):
        methods.get_method("cfr-st", {"labels": "sparse"})
    with pytest.raises(InputError, match="--st-rounds"):
        methods.get_method("cfr-st", {"st_rounds": 0})
    from fmabs_core.pipelines import cfr as pipeline

    assert set(pipeline.FINETUNE_OPTIONS) <= set(FIELDS)


def test_pseudo_label_loss_ignores_255_and_labelled_crops():
    pseudo = torch.full((2, 4, 4, 4), 255, dtype=torch.long)
    pseudo[1, :2] = 1  # the unlabelled crop: class 1 on its first half, no pseudo-label on the rest
    pseudo[0] = 0  # the labelled crop's pseudo-label is not used
    labelled = torch.tensor([True, False])
    logits = torch.zeros(2, 2, 4, 4, 4)
    logits[1, 1, :2] = 30.0  # agrees where a pseudo-label exists
    logits[1, 0, 2:] = 30.0  # disagrees where there is none (255)
    logits[0, 1] = 30.0  # the labelled crop disagrees with its (unused) pseudo-label
    logits.requires_grad_(True)
    pl = cfr.pseudo_label_loss(logits, pseudo, labelled)
    assert float(pl.detach()) < 1e-6
    pl.backward()
    assert float(logits.grad[0].abs().sum()) == 0.0 and float(logits.grad[1, :, 2:].abs().sum()) == 0.0
    # a known value: uniform prediction on the pseudo-labelled voxels = 0.5 (CE + Dice) on them alone
    flat = torch.zeros(2, 2, 4, 4, 4)
    pl = cfr.pseudo_label_loss(flat, pseudo, labelled)
    # CE = ln 2; Dice: class 1: 1 - 2*0.5*32/(0.5*32 + 32) = 1/3, class 0 (absent) ~ 1 - 0/(16) = 1
    assert float(pl) == pytest.approx(0.5 * (math.log(2) + 0.5 * (1 / 3 + 1)), rel=1e-4)
    assert float(pl) == pytest.approx(float(losses.partial_dice_ce(flat[1:], pseudo[1:])))
    assert float(cfr.pseudo_label_loss(flat, pseudo, torch.tensor([True, True]))) == 0.0  # no unlabelled crop
    # on a fully labelled target the partial loss is the usual dense 0.5 (CE + Dice)
    dense = torch.randint(0, 2, (2, 4, 4, 4))
    noisy = torch.randn(2, 2, 4, 4, 4)
    assert float(losses.partial_dice_ce(noisy, dense)) == pytest.approx(float(losses.dice_ce(noisy, dense)), rel=1e-5)


class _Fixed(nn.Module):
    """A stand-in teacher that answers given logits whatever its input (and records it)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return self.logits.clone()


def _tr(iterations=10):
    return SimpleNamespace(cfg=SimpleNamespace(iterations=iterations), autocast=contextlib.nullcontext)


def _batch():
    target = torch.full((2, 4, 4, 4), 255, dtype=torch.long)
    target[0, 0] = 1
    target[0, 1] = 0
    pseudo = torch.full((2, 4, 4, 4), 255, dtype=torch.long)
    pseudo[1, :2] = 1
    return {"image": torch.randn(2, 1, 4, 4, 4), "target": target, "pseudo": pseudo,
            "labelled": torch.tensor([True, False])}


def test_mt_consistency_zero_when_teacher_equals_student_and_weighted_by_the_ramp():
    method = methods.get_method("cfr-mt", {"pl_weight": 2.0})
    logits = torch.randn(2, 2, 4, 4, 4)
    method.teacher = _Fixed(logits)
    batch = _batch()
    total, logs = method.loss(_tr(), batch, logits, 10)
    assert logs["loss_cons"] == 0.0 and logs["lambda_c"] == pytest.approx(0.1)
    assert {"loss_sup", "loss_pl", "loss_cons", "lambda_c", "pl_weight"} <= set(logs)
    assert float(total) == pytest.approx(logs["loss_sup"] + 2.0 * logs["loss_pl"], rel=1e-6)
    # the teacher sees every crop (labelled and unlabelled) with clipped noise
    seen = method.teacher.inputs[0]
    assert seen.shape == batch["image"].shape and 0 < float((seen - batch["image"]).abs().max()) <= 0.2 + 1e-6
    # student (0.5, 0.5) vs teacher one-hot: 0.25 per voxel and class
    teacher = torch.zeros(2, 2, 4, 4, 4)
    teacher[:, 0] = 30.0
    method.teacher = _Fixed(teacher)
    student = torch.zeros(2, 2, 4, 4, 4)
    total, logs = method.loss(_tr(), batch, student, 5)
    ramp = 0.1 * math.exp(-5 * 0.25)
    assert logs["loss_cons"] == pytest.approx(0.25, rel=1e-6) and logs["lambda_c"] == pytest.approx(ramp)
    assert float(total) == pytest.approx(logs["loss_sup"] + 2.0 * logs["loss_pl"] + ramp * 0.25, rel=1e-6)


def test_acmt_mask_selects_only_high_entropy_voxels():
    assert cfr.ambiguity_threshold(0, 100) == pytest.approx(0.75 + 0.2 * math.exp(-5))
    assert cfr.ambiguity_threshold(100, 100) == pytest.approx(0.95)
    teacher = torch.zeros(1, 2, 4, 4, 4)
    teacher[:, 0] = 0.99
    teacher[:, 1] = 0.01  # certain: normalised entropy ~0.08
    teacher[..., :2] = 0.5  # ambiguous on the first half: entropy 1
    ent = cfr.normalised_entropy(teacher)
    assert torch.allclose(ent[..., :2], torch.ones(1, 1, 4, 4, 2), atol=1e-4) and float(ent[..., 2:].max()) < 0.1
    student = torch.zeros(1, 2, 4, 4, 4)
    student[:, 1] = 30.0  # confident class 1 everywhere: far from the certain teacher voxels
    student.requires_grad_(True)
    cons, mask = cfr.ambiguous_softmax_mse(student, teacher, 0.9)
    assert float(mask.mean()) == 0.5 and bool((mask[..., :2] == 1).all())
    # only the ambiguous voxels count, normalised by them: (1 - 0.5)^2 in both classes
    assert float(cons.detach()) == pytest.approx(0.25, rel=1e-5)
    cons.backward()
    assert float(student.grad[..., 2:].abs().sum()) == 0.0
    # no ambiguous voxel: nothing to teach
    cons, mask = cfr.ambiguous_softmax_mse(student.detach(), teacher, 1.1)
    assert float(cons) == 0.0 and float(mask.sum()) == 0.0
    # through the method: the teacher's entropy chooses the voxels, logged with the threshold
    method = methods.get_method("cfr-acmt", {"noise_std": 0.0})
    method.teacher = _Fixed(torch.log(teacher.repeat(2, 1, 1, 1, 1)))
    _, logs = method.loss(_tr(), _batch(), torch.zeros(2, 2, 4, 4, 4), 10)
    assert logs["ambiguous"] == 0.5 and logs["threshold"] == pytest.approx(0.95)
    assert logs["loss_cons"] == pytest.approx(0.0, abs=1e-7)  # the student (0.5, 0.5) agrees where ambiguous


# ---- engine runs on phantoms ---------------------------------------------------------------------------
def write_pseudolabels(project, run: str, skip: tuple[str, ...] = ()) -> list[str]:
    """What the pipeline's stage 2 would write: the dense label of each training scan, every 7th voxel flipped."""
    out = project.run_dir(run) / PSEUDO_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cid in project.split("train"):
        if cid in skip:
            continue
        label = project.load_label(cid).array.copy()
        flat = label.reshape(-1)
        flat[::7] = 1 - np.minimum(flat[::7], 1)
        io.save_like(label.astype(np.uint8), project.load_image(cid), out / f"{cid}_{GENERALIST_LAYER}.nii.gz")
        written.append(cid)
    return written


def cfr_config(method: str, options: dict | None = None, **train) -> TrainConfig:
    opts = {"labels": "cross", **(options or {})}
    base = dict(iterations=4, seed=5, device="cpu", patch_size=(16, 16, 16), batch_size=2, labelled_bs=1,
                net=NetConfig(width=4, out_channels=2), val_every=100, ckpt_every=100, max_val_cases=1)
    return TrainConfig(method=method, method_options=asdict(methods.get_method(method, opts).config),
                       **{**base, **train})


@pytest.mark.slow
def test_each_method_trains_with_the_pseudolabels(project):
    crosslabelled = [c for c in project.split("train") if project.crosslabel_path(c).exists()]
    runs = {"cfr-mt": cfr_config("cfr-mt"),
            # dense labels of one scan only (the paper's scarce setting), the rest unlabelled
            "cfr-acmt": cfr_config("cfr-acmt", {"labels": "dense"}, labelled_cases=(crosslabelled[0],)),
            "cfr-st": cfr_config("cfr-st", {"st_rounds": 2})}
    for name, cfg in runs.items():
        write_pseudolabels(project, name)
        trainer = Trainer(project, name, cfg)
        outcome = trainer.train().raise_for_failure()
        assert outcome.state == "done", name
        assert len(trainer.unlabelled) == len(project.split("train")) - (1 if name == "cfr-acmt" else 3)
        assert all(c.pseudo is not None for c in trainer.train_cases)
        progress = [e for e in read_events(project.run_dir(name)) if e["type"] == "progress"]
        assert len(progress) == 4 and all("loss_pl" in e["losses"] for e in progress), name
        assert any(e["losses"]["loss_pl"] > 0 for e in progress), name
        if name != "cfr-st":
            assert all("loss_cons" in e["losses"] and "lambda_c" in e["losses"] for e in progress)
    assert all("ambiguous" in e["losses"] for e in read_events(project.run_dir("cfr-acmt")) if e["type"] == "progress")
    # cfr-st's second round (iteration 2 of 4) relabelled the unlabelled scans with the network's own predictions
    st = project.run_dir("cfr-st")
    rounds = [e for e in read_events(st) if e["type"] == "pseudo_label"]
    assert [(r["round"], r["iteration"]) for r in rounds] == [(2, 2)]
    unlabelled = [c for c in project.split("train") if c not in crosslabelled]
    assert sorted(p.name for p in (st / PSEUDO_DIR).glob("*_st1.nii.gz")) == sorted(f"{c}_st1.nii.gz" for c in unlabelled)
    assert [e["losses"]["st_round"] for e in read_events(st) if e["type"] == "progress"] == [1, 1, 2, 2]


def test_missing_pseudolabel_of_an_unlabelled_scan_is_a_clear_error(project):
    crosslabelled = [c for c in project.split("train") if project.crosslabel_path(c).exists()]
    unlabelled = [c for c in project.split("train") if c not in crosslabelled]
    # a labelled scan without one is fine (its crops learn from its labels); an unlabelled one is not
    write_pseudolabels(project, "miss", skip=(crosslabelled[0], unlabelled[1]))
    outcome = Trainer(project, "miss", cfr_config("cfr-mt")).train()
    assert outcome.state == "failed" and isinstance(outcome.exception, InputError)
    assert f"{unlabelled[1]}_generalist.nii.gz" in outcome.message and "pseudo-label stage" in outcome.message
    assert outcome.exit_code == 2 and read_status(project.run_dir("miss"))["state"] == "failed"


def _differ(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cfr-mt", "cfr-st"])
def test_kill_then_resume_equals_uninterrupted(project, name):
    # cfr-mt: teacher, dropout and noise across the kill; cfr-st: its second round (at iteration 3) is
    # before the checkpoint it resumes from (4): its labels are reloaded from their files
    cfg = cfr_config(name, {"st_rounds": 2}, iterations=6, ckpt_every=2, val_every=3,
                     net=NetConfig(width=4, dropout=0.2, out_channels=2))
    for run in ("ref", "crash"):
        write_pseudolabels(project, run)
    ref = Trainer(project, "ref", cfg).train().raise_for_failure().model
    killed = Trainer(project, "crash", cfg)
    killed.hooks.append(KillAt(5))
    with pytest.raises(Killed):
        killed.train()
    assert killed.ckpts.iteration_files()[-1][0] == 4
    out = Trainer(project, "crash", cfg).train().raise_for_failure().model
    assert not _differ(torch.load(ref, weights_only=True)["state_dict"], torch.load(out, weights_only=True)["state_dict"])
    ref_ck = torch.load(project.run_dir("ref") / "checkpoints" / "iter_0000006.pt", weights_only=True)
    out_ck = torch.load(project.run_dir("crash") / "checkpoints" / "iter_0000006.pt", weights_only=True)
    assert not _differ(ref_ck["model"], out_ck["model"])
    if name == "cfr-mt":
        assert not _differ(ref_ck["method"]["teacher"], out_ck["method"]["teacher"])
    else:
        assert ref_ck["method"]["rounds_done"] == out_ck["method"]["rounds_done"] == 1
    events = read_events(project.run_dir("crash"))
    starts = [e for e in events if e["type"] == "started"]
    assert [s["iteration"] for s in starts] == [0, 4]
    losses_ref = {e["iteration"]: e["losses"] for e in read_events(project.run_dir("ref")) if e["type"] == "progress"}
    after = [e for e in events[events.index(starts[1]):] if e["type"] == "progress"]
    assert [e["losses"] for e in after] == [losses_ref[e["iteration"]] for e in after]
