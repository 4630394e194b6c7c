"""FM-ABS rounds: a cancel inside a round stops after the current scan and the resumed run finishes
the round as an uninterrupted one would; embeddings are reused across rounds; a CFR LoRA adapter
can drive the rounds, and a bad one is refused by name (real LiteMedSAM, real NIfTI phantoms)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

from fmabs_core.cli import main
from fmabs_core.data import io
from fmabs_core.generalist import get_generalist
from fmabs_core.generalist.adapted import get_adapted
from fmabs_core.generalist.lora import base_sha256, lora_layers, save_adapter
from fmabs_core.runs.events import read_events
from fmabs_core.training.api import Hook
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig
from adapters import write_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # trains and runs LiteMedSAM

OPTIONS = {"pseudo_warmup": 0.5, "pseudo_every": 0.25, "pseudo_stop": 0.9, "pseudo_max_slices": 1,
           "pseudo_max_cases": 3}


def fmabs_config(**options) -> TrainConfig:
    return TrainConfig(method="fmabs", iterations=8, seed=4, lr=0.1, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                       labelled_bs=1, net=NetConfig(width=4, out_channels=2), val_every=100, ckpt_every=100,
                       method_options={**OPTIONS, **options})


class SigtermAt(Hook):
    """Sends the trainer the first SIGTERM (its real handler) just before the round of ``iteration``."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_step(self, tr, it):
        if it == self.iteration:
            tr._request_cancel(signal.SIGTERM, None)


def _fused(project, run: str) -> dict[str, np.ndarray]:
    folder = project.run_dir(run) / "pseudo"
    return {p.name: io.load_label(p, 1).array for p in sorted(folder.glob("*_fused.nii.gz"))}


def test_cancel_inside_a_round_then_resume_equals_uninterrupted(project):
    cfg = fmabs_config()
    ref = Trainer(project, "ref", cfg)
    ref_model = ref.train().raise_for_failure().model
    rounds = [e for e in read_events(project.run_dir("ref")) if e["type"] == "pseudo_label"]
    assert [r["iteration"] for r in rounds] == [4, 6]
    assert rounds[1]["embedding_cache"]["hits"] > 0  # the second round reused slices of the first

    cut = Trainer(project, "cut", cfg)
    cut.hooks.append(SigtermAt(6))  # the cancel arrives as the second round starts
    outcome = cut.train()
    assert outcome.state == "cancelled" and outcome.iteration == 6
    state = torch.load(cut.ckpts.path_for(6), weights_only=True)
    partial = state["method"]["partial_round"]
    assert partial["iteration"] == 6 and len(partial["done"]) == 1 and len(partial["cases"]) == 3
    events = read_events(project.run_dir("cut"))
    assert [e["type"] for e in events][-1] == "cancelled" and len([e for e in events if e["type"] == "pseudo_label"]) == 1

    resumed = Trainer(project, "cut", cfg).train().raise_for_failure()
    last = [e for e in read_events(project.run_dir("cut")) if e["type"] == "pseudo_label"][-1]
    assert last["round"] == 2 and last["resumed_after"] == 1 and last["cases"] == 3
    a = torch.load(ref_model, weights_only=True)["state_dict"]
    b = torch.load(resumed.model, weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ref_fused, cut_fused = _fused(project, "ref"), _fused(project, "cut")
    assert ref_fused.keys() == cut_fused.keys()
    assert all(np.array_equal(ref_fused[k], cut_fused[k]) for k in ref_fused)


def test_kill_inside_a_round_then_resume_equals_uninterrupted(project):
    """kill -9 after a round has rewritten one scan's pseudo-label: the resumed run must not train on that
    label with the state of an older checkpoint (each round starts with a checkpoint; the round is redone)."""
    from killing import Killed

    cfg = fmabs_config()
    cfg.ckpt_every = 5  # a checkpoint between the rounds (4 and 6), older than the killed round
    ref_model = Trainer(project, "ref", cfg).train().raise_for_failure().model

    cut = Trainer(project, "cut", cfg)
    label_case = cut.method._label_case
    labelled: list[int] = []

    def dies_in_round_two(tr, it, i, case):
        out = label_case(tr, it, i, case)  # the scan's files are written
        labelled.append(it)
        if labelled.count(6) == 1 and it == 6:
            raise Killed()
        return out

    cut.method._label_case = dies_in_round_two
    with pytest.raises(Killed):
        cut.train()
    assert [it for it, _p in cut.ckpts.iteration_files()][-1] == 6  # the round's own checkpoint
    resumed = Trainer(project, "cut", cfg).train().raise_for_failure()
    a = torch.load(ref_model, weights_only=True)["state_dict"]
    b = torch.load(resumed.model, weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ref_fused, cut_fused = _fused(project, "ref"), _fused(project, "cut")
    assert ref_fused.keys() == cut_fused.keys()
    assert all(np.array_equal(ref_fused[k], cut_fused[k]) for k in ref_fused)


# ------------------------------------------------------------------------------------- adapters
def test_adapter_is_merged_into_the_prompted_encoder(tmp_path):
    lora_model = write_adapter(tmp_path / "a.pt").eval()
    tuned = get_adapted("litemedsam", tmp_path / "a.pt", device="cpu", dtype="float32")
    plain = get_generalist("litemedsam", device="cpu", dtype="float32")
    assert tuned is not plain and "adapter=" in tuned.identity and tuned.identity != plain.identity
    assert not lora_layers(tuned.model)  # merged: plain Linear layers, no per-slice LoRA cost
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        want = lora_model.image_encoder(x)
        got = tuned.model.image_encoder(x)
        base = plain.model.image_encoder(x)
    assert (got - want).abs().max() < 1e-3 * want.abs().max() and (base - want).abs().max() > 1e-2


def _phantom_fmabs(tmp_path, phantom_data, iterations: str, patch: tuple[str, str, str], *more: str):
    """A phantom project with 2 cross-labelled scans and the argv of a tiny fmabs run (one scan per round)."""
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"])
    return proj, ["train", "--project", str(proj), "--method", "fmabs", "--iterations", iterations, "--patch-size",
                  *patch, "--width", "4", "--batch-size", "2", "--labelled-batch-size", "1", "--device", "cpu",
                  "--pseudo-max-cases", "1", "--val-every", "100", *more]


def test_fmabs_round_with_an_adapter_and_a_bad_adapter_refused(tmp_path, phantom_data, capsys):
    write_adapter(tmp_path / "tuned.pt", seed=1)
    proj, base = _phantom_fmabs(tmp_path, phantom_data, "2", ("16", "16", "16"), "--pseudo-warmup", "0.5",
                                "--pseudo-max-slices", "1")
    assert main([*base, "--run", "tuned", "--adapter", str(tmp_path / "tuned.pt")]) == 0
    rounds = [e for e in read_events(proj / "runs" / "tuned") if e["type"] == "pseudo_label"]
    assert len(rounds) == 1 and rounds[0]["cases"] == 1

    broken = tmp_path / "broken.pt"
    broken.write_bytes((tmp_path / "tuned.pt").read_bytes()[:-100])
    capsys.readouterr()
    assert main([*base, "--run", "bad", "--adapter", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "weights-only" in err and err.strip().count("\n") < 3


def test_fmabs_round_with_a_tiled_adapter_labels_prompt_free(tmp_path, phantom_data):
    """--adapter-mode tiled: each round's label is the tuned generalist's own (CFR's), the same every round."""
    import nibabel as nib

    from fmabs_core.generalist.tiled import build_tiled_segmenter

    torch.manual_seed(0)
    net = build_tiled_segmenter("litemedsam", 2, None, rank=2, grid=4)  # a 32 x 32 x 16 window: one canvas
    save_adapter(tmp_path / "tiled.pt", net, "litemedsam", base_sha256("litemedsam"), extra_meta=net.meta())
    proj, base = _phantom_fmabs(tmp_path, phantom_data, "3", ("32", "32", "16"), "--pseudo-warmup", "0.3",
                                "--pseudo-every", "0.3")
    assert main([*base, "--run", "tiled", "--adapter", str(tmp_path / "tiled.pt"), "--adapter-mode", "tiled"]) == 0
    run = proj / "runs" / "tiled"
    rounds = [e for e in read_events(run) if e["type"] == "pseudo_label"]
    assert len(rounds) >= 1 and all(r["cases"] == 1 for r in rounds)
    layers = sorted(p.name for p in (run / "pseudo").glob("*.nii.gz"))
    assert layers and all(n.endswith(("_generalist.nii.gz", "_fused.nii.gz")) for n in layers)  # no per-view layers
    for fused in (run / "pseudo").glob("*_fused.nii.gz"):
        gen = fused.with_name(fused.name.replace("_fused", "_generalist"))
        assert np.array_equal(np.asarray(nib.load(str(fused)).dataobj), np.asarray(nib.load(str(gen)).dataobj))
    # tiled mode without an adapter, or an unknown mode: refused before any work
    assert main([*base, "--run", "x", "--adapter-mode", "tiled"]) == 2
    assert main([*base, "--run", "y", "--adapter", str(tmp_path / "tiled.pt"), "--adapter-mode", "grid"]) == 2


def test_the_teacher_ablation_uses_the_teachers_mask_and_no_generalist(tmp_path, phantom_data, capsys, monkeypatch):
    """--pseudo-source teacher: self-training with the teacher's own mask, to measure what the generalist adds."""
    from fmabs_core.generalist import adapted

    monkeypatch.setattr(adapted, "get_adapted", lambda *a, **k: pytest.fail("the ablation loaded a generalist"))
    proj, base = _phantom_fmabs(tmp_path, phantom_data, "3", ("16", "16", "16"), "--pseudo-warmup", "0.3",
                                "--pseudo-every", "0.3")
    assert main([*base, "--run", "self", "--pseudo-source", "teacher"]) == 0
    run = proj / "runs" / "self"
    rounds = [e for e in read_events(run) if e["type"] == "pseudo_label"]
    assert len(rounds) >= 1 and all(r["pseudo_dice"] == r["teacher_dice"] for r in rounds)
    assert all("embedding_cache" not in r for r in rounds)
    assert {p.name.split("_")[-1] for p in (run / "pseudo").glob("*.nii.gz")} == {"fused.nii.gz"}
    capsys.readouterr()
    assert main([*base, "--run", "bad", "--pseudo-source", "sam"]) == 2
    assert "--pseudo-source 'sam'" in capsys.readouterr().err
    assert main([*base, "--run", "bad2", "--pseudo-source", "teacher", "--adapter", str(tmp_path / "x.pt")]) == 2
    assert "drop --adapter" in capsys.readouterr().err
