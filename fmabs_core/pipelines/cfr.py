"""CFR (concatenate, fine-tune, re-train) as three stages of one run, all in one run folder.

1. ``finetune``: the engine trains method ``sam-lora`` (a SAM-family model with LoRA on tiled axial
   slices) on the labelled scans; its output is the LoRA adapter ``generalist_adapter.pt``.
2. ``pseudo``: the fine-tuned generalist segments every training scan, prompt-free, with sliding
   windows; each label is saved as ``pseudo/<case>_generalist.nii.gz``. Offline (once per scan)
   rather than per batch as the authors' code does: a CPU cannot afford a generalist pass per batch,
   the labels are the same every time they are drawn (the generalist is frozen by then), and the
   files are what the Review panel shows.
3. ``retrain``: the engine trains the CFR method itself (``cfr-mt``, ``cfr-acmt``, ``cfr-st``) with
   those pseudo-labels; it ships the run's ``model.pt``.

A resumed run skips what is done: stage 1 once its adapter exists (or resumes from its own
checkpoints), stage 2 scan by scan, stage 3 from its checkpoints. ``status.json`` names the stage
and ``events.jsonl`` has a ``stage`` event at each start. The run's lock is held from start to end.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import replace

import numpy as np

from fmabs_core.contract import (ADAPTER_FILE, CANCELLED, DONE, GENERALIST_LAYER, MODEL_FILE, PSEUDO_DIR, RUNNING,
                                 STAGE_TITLES, STARTING)
from fmabs_core.data import io
from fmabs_core.data.project import Project
from fmabs_core.device import resolve_device
from fmabs_core.errors import InputError
from fmabs_core.runs.events import RunLog
from fmabs_core.runs.lock import RunLock
from fmabs_core.training import distributed
from fmabs_core.training.api import Outcome, Progress
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Stage, Trainer
from fmabs_core.data.intensity import zscore

log = logging.getLogger(__name__)

STAGES = ("finetune", "pseudo", "retrain")
#: the options of a CFR method that configure its fine-tuning stage (method ``sam-lora``)
FINETUNE_OPTIONS = ("generalist", "generalist_checkpoint", "rank", "grid", "labels", "gradient_checkpointing")

#: the run options that set stage 1's TrainConfig fields (named in its messages)
FINETUNE_OPTION_NAMES = {"batch_size": "--finetune-batch", "labelled_bs": "--finetune-batch",
                         "iterations": "--finetune-iterations", "lr": "--finetune-lr"}


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """Stage 1's configuration, derived from the run's: the CFR paper's AdamW schedule on the same crops.

    Validation and checkpoints keep the run's cadence as fractions of the stage's iterations.
    """
    opts = cfg.method_options
    iterations = int(opts["finetune_iterations"])
    batch = int(opts["finetune_batch"])

    def same_fraction(every: int) -> int:
        return max(1, round(every / cfg.iterations * iterations))

    return replace(cfg, method="sam-lora", method_options={k: opts[k] for k in FINETUNE_OPTIONS if k in opts},
                   iterations=iterations, lr=float(opts["finetune_lr"]), batch_size=batch, labelled_bs=batch,
                   lr_schedule="poly", val_every=same_fraction(cfg.val_every), ckpt_every=same_fraction(cfg.ckpt_every),
                   active=None, budget=None)


class _CancelFlag:
    """SIGTERM/SIGINT during the pseudo-label stage: stop after the current scan (a second one: at once)."""

    def __init__(self, install: bool):
        self.set = False
        self.signal: int | None = None
        if install:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:  # noqa: ARG002
        if self.set:
            raise KeyboardInterrupt
        log.warning("cancel requested (signal %d): stopping after this scan", signum)
        self.set, self.signal = True, signum


def run(project: Project, run: str, cfg: TrainConfig, progress: Progress | None = None,
        install_signal_handlers: bool = False) -> Outcome:
    """Run (or resume) the three stages; returns the first outcome that is not ``done``, else the last."""
    run_dir = project.run_dir(run)
    if (run_dir / MODEL_FILE).exists():
        raise InputError(f"{run_dir}: this run is finished; choose a new --run name.")
    main = distributed.env_info().rank == 0
    lock = RunLock(run_dir)
    if main:
        lock.acquire()
    try:
        runlog = RunLog(run_dir, enabled=main)
        adapter = run_dir / ADAPTER_FILE
        if not adapter.exists():
            _stage_event(runlog, "finetune")
            stage = Stage("finetune", last=False, output=adapter, lock=lock, options=FINETUNE_OPTION_NAMES)
            outcome = Trainer(project, run, finetune_config(cfg), progress, install_signal_handlers, stage).train()
            if outcome.state != DONE:
                return outcome
        else:
            log.info("CFR stage 1 done before: %s", adapter)
        _stage_event(runlog, "pseudo")
        outcome = pseudo_label_stage(project, run, cfg, runlog, progress, install_signal_handlers)
        if outcome.state != DONE:
            return outcome
        _stage_event(runlog, "retrain")
        stage = Stage("retrain", last=True, lock=lock)
        return Trainer(project, run, cfg, progress, install_signal_handlers, stage).train()
    finally:
        lock.release()


def _stage_event(runlog: RunLog, name: str) -> None:
    runlog.event("stage", iteration=0, stage=name, stages=list(STAGES), index=STAGES.index(name),
                 title=STAGE_TITLES[name])
    runlog.update_status(durable=True, stage=name, phase=STAGE_TITLES[name])


def pseudo_label_stage(project: Project, run: str, cfg: TrainConfig, runlog: RunLog,
                       progress: Progress | None = None, install_signal_handlers: bool = False) -> Outcome:
    """Stage 2: the fine-tuned generalist's label of every training scan (those already written are kept)."""
    from fmabs_core.generalist.tiled import load_tuned
    from fmabs_core.inference.predict import predict_proba

    run_dir = project.run_dir(run)
    out_dir = run_dir / PSEUDO_DIR
    cases = project.split("train")
    todo = [c for c in distributed.shard(cases) if not (out_dir / f"{c}_{GENERALIST_LAYER}.nii.gz").exists()]
    cancel = _CancelFlag(install_signal_handlers)
    runlog.update_status(durable=True, state=RUNNING, stage="pseudo", iteration=len(cases) - len(todo),
                         iterations=len(cases), eta_s=None)
    if todo:
        device = resolve_device(cfg.device)
        model = load_tuned(run_dir / ADAPTER_FILE, device)
        model.eval()
        start, times = time.time(), []
        items = progress(todo, desc="CFR pseudo-labels", total=len(todo)) if progress else todo
        for i, cid in enumerate(items):
            if cancel.set:  # each rank of a torchrun job gets the signal and stops after its scan
                runlog.event("cancelled", iteration=0, checkpoint=None, signal=cancel.signal, stage="pseudo")
                runlog.update_status(durable=True, state=CANCELLED, phase=None, eta_s=None)
                return Outcome.cancelled(0, f"cancelled during the pseudo-label stage; {len(todo) - i} scan(s) "
                                            "left: resume with the same command")
            t0 = time.time()
            ref = project.load_image(cid)
            probs = predict_proba(model, zscore(ref.array), tuple(cfg.patch_size), cfg.val_overlap, device,
                                  normalise=False)
            io.save_like(probs.argmax(0).astype(np.uint8), ref, out_dir / f"{cid}_{GENERALIST_LAYER}.nii.gz")
            times.append(time.time() - t0)
            left = len(todo) - i - 1
            runlog.update_status(iteration=len(cases) - left, iterations=len(cases),
                                 eta_s=float(np.mean(times)) * left)
        runlog.event("pseudo_label", iteration=0, round=1, cases=len(todo), seconds=time.time() - start,
                     stage="pseudo")
    distributed.barrier()
    runlog.update_status(durable=True, state=STARTING)
    return Outcome(DONE, 0, "pseudo-labels written")
