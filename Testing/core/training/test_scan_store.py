"""Training from the preprocessed, memory-mapped scans (``--scan-store disk``, the default) is bitwise the same
as training from scans read into memory (``ram``), and a resume may switch between the two."""

from __future__ import annotations

import pytest
import torch

from fmabs_core.data.project import Project
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(store: str, **kw) -> TrainConfig:
    base = dict(method="mt", iterations=4, seed=3, device="cpu", patch_size=(16, 16, 16), batch_size=2, labelled_bs=1,
                net=NetConfig(width=4, dropout=0.2, out_channels=2), val_every=2, ckpt_every=2, max_val_cases=1,
                scan_store=store)
    base.update(kw)
    return TrainConfig(**base)


def _weights(project: Project, run: str) -> dict[str, torch.Tensor]:
    return torch.load(project.run_dir(run) / "model.pt", weights_only=True)["state_dict"]


def test_disk_and_ram_train_the_same_model(project):
    Trainer(project, "ram", _config("ram")).train()
    assert not (project.root / "preprocessed").exists()  # ram reads the scans, writes nothing
    Trainer(project, "disk", _config("disk")).train()
    stored = sorted(p.name for p in (project.root / "preprocessed").glob("*.npy"))
    assert stored and all(p.endswith((".image.npy", ".label.npy", ".cross.npy")) for p in stored)
    ram, disk = _weights(project, "ram"), _weights(project, "disk")
    assert ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)


def test_the_disk_store_refuses_a_label_off_its_grid_before_any_step(project):
    import nibabel as nib
    import numpy as np

    case = project.split("train")[0]
    path = project.label_path(case)
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(path))  # one slice short
    from fmabs_core.runs.events import read_status

    Trainer(project, "off", _config("disk")).train()
    status = read_status(project.run_dir("off"))
    assert status["state"] == "failed" and f"{case}.nii.gz: shape" in status["error"]
    assert status.get("iteration", 0) == 0 and not project.run_dir("off").joinpath("checkpoints").exists()
    assert not (project.root / "preprocessed" / f"{case}.label.npy").exists()  # refused, not stored


@pytest.mark.slow  # runs LiteMedSAM in two pseudo-label rounds
def test_pseudo_labels_held_on_disk_train_the_same_model_as_in_ram(project):
    """FM-ABS rounds: with ``disk`` each round's labels go to memory-mapped files (pseudo/held/) and training reads
    them there; the model is bitwise the one trained with the labels in RAM."""
    import numpy as np

    from fmabs_core.data import io

    options = {"pseudo_warmup": 0.25, "pseudo_every": 0.25, "pseudo_stop": 0.6, "pseudo_max_slices": 1}
    cfg = dict(method="fmabs", iterations=8, method_options=options, val_every=100, ckpt_every=100)
    Trainer(project, "ram", _config("ram", **cfg)).train().raise_for_failure()
    assert not (project.run_dir("ram") / "pseudo" / "held").exists()
    tr = Trainer(project, "disk", _config("disk", **cfg))
    tr.train().raise_for_failure()
    held = sorted((project.run_dir("disk") / "pseudo" / "held").glob("*.npy"))
    assert len(held) == len(project.split("train"))
    assert all(isinstance(c.pseudo, np.memmap) for c in tr.train_cases)  # read from the files, not held in RAM
    for case in tr.train_cases:
        fused = io.load_label(project.run_dir("disk") / "pseudo" / f"{case.id}_fused.nii.gz", 1).array
        assert np.array_equal(np.asarray(case.pseudo), fused)
    ram, disk = _weights(project, "ram"), _weights(project, "disk")
    assert all(torch.equal(ram[k], disk[k]) for k in ram)
