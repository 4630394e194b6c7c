"""sam-lora (CFR's fine-tuning) before its first step: the memory it says a step needs, the refusal when that
is not free (on this machine's real free memory: the batch is made larger than all of it), the option the
message names inside the CFR pipeline, and glibc's allocator left at its defaults for this network."""

from __future__ import annotations

import math
from dataclasses import asdict

import psutil
import pytest

from fmabs_core import device, methods
from fmabs_core.contract import ADAPTER_FILE
from fmabs_core.generalist.tiled import STEP_MEMORY_GIB, build_tiled_segmenter
from fmabs_core.pipelines import train
from fmabs_core.runs.events import read_events, read_status
from fmabs_core.training.config import NetConfig, TrainConfig
from fmabs_core.training.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30


def test_step_memory_follows_the_measured_figures():
    fixed, with_recompute, without = STEP_MEMORY_GIB["litemedsam"]
    net = build_tiled_segmenter("litemedsam", 2, recompute=True)
    assert net.canvases((112, 112, 80)) == 5 and net.canvases((48, 48, 32)) == 2 and net.canvases((16, 16, 16)) == 1
    assert net.step_memory((112, 112, 80), 2) == int((fixed + with_recompute * 10) * GIB)
    plain = build_tiled_segmenter("litemedsam", 2, recompute=False)
    assert plain.step_memory((112, 112, 80), 2) == int((fixed + without * 10) * GIB)
    assert plain.step_memory((112, 112, 80), 2) > 2 * net.step_memory((112, 112, 80), 2)
    net.generalist = "mobilesam"  # not measured: no estimate, so no check
    assert net.step_memory((112, 112, 80), 2) is None


def _too_many_crops(per_crop_gib: float) -> int:
    """A batch whose estimate is larger than this machine's whole memory (so never free)."""
    return math.ceil(psutil.virtual_memory().total / (per_crop_gib * GIB)) + 1


def test_a_step_that_cannot_fit_is_refused_before_training(project):
    batch = _too_many_crops(STEP_MEMORY_GIB["litemedsam"][1])
    cfg = TrainConfig(method="sam-lora", method_options=asdict(methods.get_method("sam-lora", {}).config),
                      iterations=2, device="cpu", patch_size=(16, 16, 16), batch_size=batch, labelled_bs=batch,
                      val_every=100, ckpt_every=100, max_val_cases=0)
    trainer = Trainer(project, "big", cfg)
    assert device._ALLOCATOR_TUNED is False  # glibc's defaults for the tiled generalist (Method.cpu_allocator_tuning)
    outcome = trainer.train()
    assert outcome.state == "failed" and outcome.exit_code == 2
    message = outcome.message
    assert "one training step needs about" in message and f"--batch-size {batch} crops of 16x16x16" in message
    assert "GiB free now" in message and "Lower --batch-size" in message and "Nothing was trained" in message
    run_dir = project.run_dir("big")
    assert not [p for p in run_dir.rglob("*.pt")]  # no checkpoint, no adapter
    assert read_status(run_dir)["state"] == "failed"
    assert not [e for e in read_events(run_dir) if e["type"] == "progress"]
    # a V-Net method in the same process keeps freed memory in the heap again (faster on the CPU)
    Trainer(project, "vnet", TrainConfig(method="sup", iterations=1, device="cpu", patch_size=(16, 16, 16)))
    assert device._ALLOCATOR_TUNED is device.tune_cpu_allocator()


@pytest.mark.slow
def test_the_cfr_pipeline_names_its_own_batch_option(project):
    batch = _too_many_crops(STEP_MEMORY_GIB["litemedsam"][1])
    opts = {"labels": "cross", "finetune_iterations": 2, "finetune_batch": batch}
    cfg = TrainConfig(method="cfr-mt", method_options=asdict(methods.get_method("cfr-mt", opts).config),
                      iterations=2, device="cpu", patch_size=(16, 16, 16), batch_size=2, labelled_bs=1,
                      net=NetConfig(width=4, out_channels=2), val_every=100, ckpt_every=100, max_val_cases=0)
    outcome = train(project, "cfr", cfg)
    assert outcome.state == "failed" and f"--finetune-batch {batch} crops" in outcome.message
    assert "Lower --finetune-batch" in outcome.message and "--batch-size" not in outcome.message
    assert not (project.run_dir("cfr") / ADAPTER_FILE).exists()


@pytest.mark.slow  # trains the tiled LiteMedSAM
def test_validation_inside_a_run_keeps_the_allocator_as_the_method_wants(project):
    """The sliding-window validation tunes glibc's allocator for V-Nets; inside a sam-lora run it must not (the
    steps after it would fragment a heap that keeps its peak)."""
    cfg = TrainConfig(method="sam-lora", method_options=asdict(methods.get_method("sam-lora", {}).config),
                      iterations=1, device="cpu", patch_size=(16, 16, 16), batch_size=1, labelled_bs=1,
                      val_every=1, ckpt_every=100, max_val_cases=1)
    Trainer(project, "val", cfg).train().raise_for_failure()
    assert [e["type"] for e in read_events(project.run_dir("val")) if e["type"] == "validation"] == ["validation"]
    assert device._ALLOCATOR_TUNED is False
