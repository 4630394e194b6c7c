"""The CFR pipeline on phantoms: fine-tune (LoRA on LiteMedSAM), pseudo-label, re-train, in one run folder;
cancelled between stages, then resumed where it stopped."""

from __future__ import annotations

import os
import signal

import nibabel as nib
import pytest

from fmabs_core.contract import ADAPTER_FILE, MODEL_FILE, PSEUDO_DIR
from fmabs_core.pipelines import cfr, train
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.config import NetConfig, TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _cfg(**options) -> TrainConfig:
    opts = {"labels": "cross", "finetune_iterations": 2, "finetune_batch": 1, "grid": 6, **options}
    from fmabs_core import methods

    return TrainConfig(method="cfr-mt", method_options=methods.get_method("cfr-mt", opts).config.__dict__,
                       iterations=3, device="cpu", patch_size=(32, 32, 32), batch_size=2, labelled_bs=1,
                       net=NetConfig(width=4, out_channels=2), val_every=100, ckpt_every=100, max_val_cases=0)


def _cancel_during(desc_wanted: str):
    """A progress wrapper that sends this process a real SIGTERM once the named loop's first item is done."""

    def progress(items, desc="", total=None):
        for i, item in enumerate(items):
            yield item
            if desc == desc_wanted and i == 0:  # the first scan is done: the signal comes before the second
                os.kill(os.getpid(), signal.SIGTERM)

    return progress


def test_stages_cancel_between_them_and_resume(project):
    cfg = _cfg()
    run_dir = project.run_dir("cfr")
    before = signal.getsignal(signal.SIGTERM)
    try:
        first = train(project, "cfr", cfg, progress=_cancel_during("CFR pseudo-labels"), install_signal_handlers=True)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert first.state == "cancelled"
    assert (run_dir / ADAPTER_FILE).exists() and not (run_dir / MODEL_FILE).exists()
    written = sorted((run_dir / PSEUDO_DIR).glob("*_generalist.nii.gz"))
    assert len(written) == 1  # the scan in hand was finished, then the stage stopped
    status = read_status(run_dir)
    assert status["state"] == "cancelled" and status["stage"] == "pseudo"
    adapter_mtime = (run_dir / ADAPTER_FILE).stat().st_mtime_ns

    second = train(project, "cfr", cfg)
    assert second.state == "done" and (run_dir / MODEL_FILE).exists()
    assert (run_dir / ADAPTER_FILE).stat().st_mtime_ns == adapter_mtime  # stage 1 was not run again
    train_ids = project.split("train")
    labels = sorted((run_dir / PSEUDO_DIR).glob("*_generalist.nii.gz"))
    assert len(labels) == len(train_ids)
    image = nib.load(str(project.image_path(train_ids[0])))
    pseudo = nib.load(str(run_dir / PSEUDO_DIR / f"{train_ids[0]}_generalist.nii.gz"))
    assert pseudo.shape == image.shape and (pseudo.affine == image.affine).all()

    events = read_events(run_dir)
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages == ["finetune", "pseudo", "pseudo", "retrain"]  # stage 1 skipped on resume after its event
    started = [e for e in events if e["type"] == "started"]
    assert [e["method"] for e in started] == ["sam-lora", "cfr-mt"]
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"
    assert read_status(run_dir)["state"] == "done" and (run_dir / "config.finetune.json").exists()
    progress = [e for e in events if e["type"] == "progress" and "loss_pl" in e["losses"]]
    assert progress, "the re-training learnt from the generalist's pseudo-labels"


def test_finetune_config_follows_the_paper():
    cfg = _cfg(finetune_iterations=6000, finetune_batch=2, finetune_lr=1e-3)
    ft = cfr.finetune_config(cfg)
    assert (ft.method, ft.iterations, ft.lr, ft.batch_size, ft.labelled_bs) == ("sam-lora", 6000, 1e-3, 2, 2)
    assert ft.method_options["labels"] == "cross" and ft.active is None
