"""The one training loop. Methods (``fmabs_core.methods``) plug in their step and losses, hooks act
between steps; nothing here is per-method. A run ends with an :class:`~fmabs_core.training.api.Outcome`."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fmabs_core.contract import (CANCELLED, CHECKPOINTS_DIR, CONFIG_FILE, DONE, FAILED, HELD_DIR, MODEL_FILE,
                                  PSEUDO_DIR, RUNNING, STARTING, TEACHER_FILE_KEY, WAITING)
from fmabs_core.data import io
from fmabs_core.data.project import Project
from fmabs_core.device import resolve_device, tune_cpu_allocator
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.inference.metrics import dice_jaccard
from fmabs_core.inference.predict import predict_proba
from fmabs_core.methods import get_method
from fmabs_core.methods.base import Method
from fmabs_core.runs.checkpoint import CheckpointStore
from fmabs_core.runs.events import RunLog, read_status
from fmabs_core.runs.lock import RunLock
from fmabs_core.training import distributed
from fmabs_core.training.api import Hook, Outcome, Progress
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.nets import size_divisor
from fmabs_core.training.prefetch import BatchPrefetcher
from fmabs_core.data.intensity import zscore
from fmabs_core.training.sampler import Case, PatchSampler, effective_patch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (network initialisation, dropout, MT perturbations)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_hooks(cfg: TrainConfig) -> list[Hook]:
    hooks: list[Hook] = []
    if cfg.active:
        from fmabs_core.active.hook import ActiveLearningHook

        hooks.append(ActiveLearningHook())
    return hooks


@dataclass
class Stage:
    """One stage of a pipeline trained by this engine (``fmabs_core.pipelines``): its own checkpoint
    folder and config file in the run folder, its own output; only the last stage ends the run."""

    name: str
    last: bool = True
    output: Path | None = None  # what the method exports (default: the run's model.pt)
    lock: RunLock | None = None  # the run's lock, held by the pipeline across its stages
    #: the command-line option that sets a TrainConfig field of this stage, where it is not the field's own
    #: (CFR's fine-tuning: ``batch_size`` is ``--finetune-batch``), for messages that tell the user what to change
    options: dict[str, str] = field(default_factory=dict)

    @property
    def config_file(self) -> str:
        return CONFIG_FILE if self.last else f"config.{self.name}.json"


class _Stop(Exception):
    """Unwinds the loop to :meth:`Trainer._train`'s handler once a stop was honoured (checkpoint written)."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.state)
        self.outcome = outcome


class OutOfMemory(FmabsError):
    """The GPU ran out of memory; the message says which option to lower."""


def _last_line(exc: BaseException) -> str:
    """The last line of the traceback (``Type: message``), what a user reads first."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _rng_state(device: torch.device) -> dict:
    """Global RNG states of this process, in types ``torch.load(weights_only=True)`` accepts.

    CUDA: only this process's device (touching the others would create a context on every GPU).
    """
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": [version, list(internal), gauss],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    npst = state.get("numpy")
    if npst:
        np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["gauss"]))
    if state.get("python"):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class _OffGrid(Exception):
    """A label or cross-label is not on its scan's grid (the problem is already recorded)."""


class Trainer:
    """Owns the network, optimiser, sampler and run folder; calls the method's hooks each step.

    Under ``torchrun`` every rank builds a Trainer: ``net`` is the plain module (EMA teachers, saving
    and validation use it), ``train_net`` the DistributedDataParallel wrapper the loop trains with;
    only rank 0 writes the run folder (``runlog`` is a no-op sink elsewhere).
    """

    def __init__(self, project: Project, run: str, cfg: TrainConfig,
                 progress: Progress | None = None, install_signal_handlers: bool = False,
                 stage: Stage | None = None):
        self.project = project
        self.cfg = cfg
        self.stage = stage
        self.run_dir = project.run_dir(run)
        self.run_name = run
        self._owns_group = distributed.env_info().enabled and not distributed.is_initialized()
        self.dist, self.device = distributed.init(resolve_device(cfg.device))
        self.method: Method = get_method(cfg.method, cfg.method_options)
        if self.device.type == "cpu":  # a V-Net step measured 1.35-1.75x faster (its 3D activations are 30-60 MB)
            tune_cpu_allocator(self.method.cpu_allocator_tuning)
        self.runlog = RunLog(self.run_dir, enabled=self.dist.is_main)
        ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.ckpts = CheckpointStore(ckpt_dir / stage.name if stage else ckpt_dir, keep_last=cfg.keep_last)
        # a pipeline holds the run's lock across its stages; a plain run takes it itself
        self.lock = stage.lock if stage and stage.lock else RunLock(self.run_dir)
        self._owns_lock = not (stage and stage.lock)
        self._progress = progress
        self._cancel = False
        self._cancel_signal: int | None = None
        self._stop: Outcome | None = None
        self._cancel_agreed = False
        self.hooks: list[Hook] = default_hooks(cfg)
        #: prepare the next batch on a background thread during the step (FMABS_PREFETCH=0: off)
        self.prefetch = os.environ.get("FMABS_PREFETCH", "1") != "0"
        #: GPU speed switches (``fmabs bench suite`` measures them): cuDNN's autotuner suits the fixed
        #: patch shape; channels-last-3d and torch.compile are off until measured to pay on a machine
        self.cudnn_benchmark = os.environ.get("FMABS_CUDNN_BENCHMARK", "1") != "0"
        self.channels_last = os.environ.get("FMABS_CHANNELS_LAST", "0") == "1"
        self.compile = os.environ.get("FMABS_COMPILE", "0") == "1"
        self._batches: BatchPrefetcher | None = None
        #: each training scan's grid (filled by load_data), so that a round writes its pseudo-labels
        #: without reading the scan again
        self._grids: dict[str, io.Volume] = {}
        self._scan_store = None  # --scan-store disk: the project's store, made at the first scan read
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._request_cancel)

    # ---- small services the methods use ----------------------------------------------------------
    def _request_cancel(self, signum: int, frame: object) -> None:  # noqa: ARG002
        """First SIGTERM/SIGINT: checkpoint after the current step and exit; a second one: stop now."""
        if self._cancel:
            log.warning("second cancel request (signal %d): stopping without a checkpoint", signum)
            raise KeyboardInterrupt
        log.warning("cancel requested (signal %d): checkpointing after this step", signum)
        self._cancel = True
        self._cancel_signal = signum

    def request_cancel(self) -> None:
        """Ask the loop to checkpoint and stop after the current step (thread-safe: sets a flag)."""
        self._cancel = True

    def cancel_requested(self) -> bool:
        """Whether a cancel is pending (a long hook, e.g. a pseudo-label round, checks it between scans)."""
        return self._cancel

    def request_stop(self, outcome: Outcome) -> None:
        """End the run before the next step with ``outcome`` (a hook waiting for the expert's labels)."""
        self._stop = outcome

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as the step trains it: DistributedDataParallel under torchrun, else itself."""
        return distributed.wrap(module, self.device)

    def progress(self, items: Iterable, desc: str = "", total: int | None = None) -> Iterable:
        return self._progress(items, desc=desc, total=total) if self._progress else items

    def option(self, name: str) -> str:
        """The command-line option that sets ``TrainConfig.<name>`` for this run (or stage)."""
        return (self.stage.options.get(name) if self.stage else None) or "--" + name.replace("_", "-")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict(self, model: torch.nn.Module, image: np.ndarray, overlap: float | None = None) -> np.ndarray:
        return predict_proba(model, image, self.patch, overlap if overlap is not None else self.cfg.val_overlap,
                             self.device, normalise=False, tune_allocator=self.method.cpu_allocator_tuning)

    def save_pseudolabels(self, case: Case, result: dict[str, np.ndarray], teacher_probs: np.ndarray | None = None
                          ) -> None:
        """``pseudo/<case>_<key>.nii.gz`` per label of ``result``; with ``teacher_probs`` also
        ``<case>_teacher.nii.gz``, the teacher's probabilities (X, Y, Z, C+1 as uint8), so a round can be replayed."""
        from fmabs_core.generalist.fusion import probs_to_uint8

        ref = self._grids.get(case.id) or self.project.load_image(case.id)
        out = self.run_dir / PSEUDO_DIR
        for key, arr in result.items():
            io.save_like(arr.astype(np.uint8), ref, out / f"{case.id}_{key}.nii.gz")
        if teacher_probs is not None:
            io.save_like(probs_to_uint8(teacher_probs), ref, out / f"{case.id}_{TEACHER_FILE_KEY}.nii.gz")

    def load_pseudolabel(self, case: Case, key: str = "fused") -> np.ndarray:
        """A pseudo-label this run wrote for ``case`` (uint8, as written)."""
        return io.load_label(self.run_dir / PSEUDO_DIR / f"{case.id}_{key}.nii.gz", self.project.num_classes).array

    @property
    def pseudo_on_disk(self) -> bool:
        """Whether pseudo-labels are held as memory-mapped files (``--scan-store disk``) rather than in RAM."""
        return self.cfg.scan_store == "disk"

    def hold_pseudolabel(self, case: Case, label: np.ndarray) -> np.ndarray:
        """What training reads of ``case``'s pseudo-label: with ``--scan-store disk`` the label written (atomically)
        to ``pseudo/held/<case>.npy`` and memory-mapped back, so that the rounds' labels of a large data set stay
        on disk (the page cache, shared by the ranks); with ``ram``, the array itself."""
        if not self.pseudo_on_disk:
            return label
        path = self.run_dir / PSEUDO_DIR / HELD_DIR / f"{case.id}.npy"
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(label, dtype=np.uint8), allow_pickle=False)
        return self.held_pseudolabel(case)

    def held_pseudolabel(self, case: Case) -> np.ndarray:
        """The label :meth:`hold_pseudolabel` wrote for ``case`` (by any rank), memory-mapped read-only."""
        return np.load(self.run_dir / PSEUDO_DIR / HELD_DIR / f"{case.id}.npy", mmap_mode="r", allow_pickle=False)

    def pseudolabel_to_send(self, held: np.ndarray) -> np.ndarray | None:
        """What the other ranks need of a label this rank held: nothing when it is on disk (they map the file,
        so a round's labels never travel or pile up in memory), else the array."""
        return None if self.pseudo_on_disk else held

    def pseudolabel_received(self, case: Case, sent: np.ndarray | None) -> np.ndarray:
        """``case``'s label as :meth:`pseudolabel_to_send` sent it from the rank that made it."""
        return self.held_pseudolabel(case) if sent is None else sent

    def restore_pseudolabels(self) -> None:
        """After a resume: the fused pseudo-labels of the last round, as written (uint8, lossless)."""
        for case in self.train_cases:
            path = self.run_dir / PSEUDO_DIR / f"{case.id}_fused.nii.gz"
            if path.exists():
                case.pseudo = self.hold_pseudolabel(case, io.load_label(path, self.project.num_classes).array)

    # ---- data ---------------------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg, project = self.cfg, self.project
        train = project.split("train")
        if not train:
            raise InputError(f"{project.root}: the training split is empty; import scans first.")
        chosen = set(cfg.labelled_cases) if cfg.labelled_cases is not None else None
        if chosen is not None and not chosen <= set(train):
            raise InputError(f"--labelled-cases: {', '.join(sorted(chosen - set(train)))} not in the training split "
                             f"of {project.root}")
        self.train_cases: list[Case] = []
        self._grids.clear()
        labelled, unlabelled = [], []
        problems: list[str] = []  # labels off their scan's grid: all of them named at once, before any step
        read = self._read_scan_store if cfg.scan_store == "disk" else self._read_in_ram
        for cid in self.progress(train, desc="loading scans" if cfg.scan_store == "ram" else "preprocessed scans"):
            usable = chosen is None or cid in chosen
            cross = self.method.supervision != "dense" and usable and project.crosslabel_path(cid).exists()
            image, grid, label, target = read(cid, cross, problems)
            case = Case(cid, image)
            self._grids[cid] = grid
            if label is not None:
                case.extra["label"] = label  # evaluation and the simulated expert
            if self.method.supervision == "dense":
                if label is not None and usable:
                    case.target = label
            elif target is not None:
                case.target = target
            (labelled if case.target is not None else unlabelled).append(case)
            self.train_cases.append(case)
        if problems:
            raise InputError(" ".join(problems) + " (`fmabs check` lists every such problem of the project.)")
        if cfg.scan_store == "disk" and self.dist.rank == 0:
            self._store().drop(set(project.cases))  # scans removed from the project
        if not labelled:
            kind = "dense labels" if self.method.supervision == "dense" else "cross-labels"
            raise InputError(f"{project.root}: no training scan has {kind}; "
                             "run 'fmabs crosslabel simulate' or draw cross-labels first.")
        self.labelled, self.unlabelled = labelled, unlabelled
        self.patch = effective_patch(tuple(cfg.patch_size), [c.image.shape for c in self.train_cases],
                                     size_divisor(cfg.net))
        # One generator seed on every rank: each rank plans the same global batch and keeps its share.
        self.sampler = PatchSampler(labelled, unlabelled if self.method.uses_unlabelled else [], self.patch,
                                    cfg.batch_size, cfg.labelled_bs, cfg.seed, cfg.augment,
                                    flip_axes=cfg.flip_axes, crop=cfg.crop)
        self._split_batch()
        self.val_cases = [c for c in project.split("val") if project.has_label(c)][: cfg.max_val_cases]
        log.info("%d labelled and %d unlabelled training scans, %d validation scans, patch %s",
                 len(labelled), len(unlabelled), len(self.val_cases), self.patch)

    def _read_in_ram(self, cid: str, cross: bool, problems: list[str]) -> tuple:
        """``--scan-store ram``: (z-scored image, grid, label or None, cross-label or None) read into memory."""
        project = self.project
        volume = project.load_image(cid)
        label = target = None
        if project.has_label(cid):
            lab = project.load_label(cid)
            problems += io.check_pair(volume, lab)
            label = lab.array
        if cross:
            vol = project.load_crosslabel(cid)
            problems += io.check_pair(volume, vol)
            target = vol.array
        return zscore(volume.array), volume.grid(), label, target

    def _store(self):
        """The project's scan store (one object per trainer: it reads its manifest once)."""
        if self._scan_store is None:
            from fmabs_core.data.store import store_of

            self._scan_store = store_of(self.project.root)
        return self._scan_store

    def _read_scan_store(self, cid: str, cross: bool, problems: list[str]) -> tuple:
        """``--scan-store disk``: the same arrays, memory-mapped from the project's preprocessed files (built
        the first time, and again when a scan's file changes; see data/store.py). A label off its scan's grid
        is named in ``problems`` and not stored."""
        project = self.project
        store = self._store()
        image = store.get(cid, "image", project.image_path(cid), io.load_image)

        def on_grid(volume: io.Volume) -> None:
            found = io.check_pair(image.grid, volume)
            if found:
                problems.extend(found)
                raise _OffGrid

        label = target = None
        try:
            if project.has_label(cid):
                label = store.get(cid, "label", project.label_path(cid),
                                  lambda path: io.load_label(path, project.num_classes), on_grid).array
            if cross:
                target = store.get(cid, "cross", project.crosslabel_path(cid),
                                   lambda path: project.load_crosslabel(cid), on_grid).array
        except _OffGrid:
            pass  # named in problems: every such scan is named at once, before any step
        return image.array, image.grid, label, target

    def refresh_crosslabels(self, case_ids: list[str]) -> None:
        """Move newly cross-labelled scans from the unlabelled to the labelled pool (active rounds)."""
        if self.method.supervision == "dense":
            return
        by_id = {c.id: c for c in self.train_cases}
        for cid in case_ids:
            case = by_id[cid]
            cross = self.project.load_crosslabel(cid)
            problems = io.check_pair(self._grids.get(cid) or self.project.load_image(cid), cross)
            if problems:
                raise InputError(" ".join(problems))
            case.target = cross.array
            if case in self.unlabelled:
                self.unlabelled.remove(case)
            if case not in self.labelled:
                self.labelled.append(case)
        self.sampler.labelled_bs = self.cfg.labelled_bs if self.sampler.unlabelled else self.cfg.batch_size
        self._split_batch()

    def _split_batch(self) -> None:
        """Distributed runs: which patches of the global batch (``--batch-size``) this rank trains on."""
        if self.dist.enabled:
            self.sampler.keep, _ = distributed.split_batch(self.sampler.batch_size, self.sampler.labelled_bs)


    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self, iteration: int, gather: bool = True) -> dict:
        """Everything a resume needs. ``gather`` collects every rank's RNG state (a collective call:
        all ranks must make it); ``best.pt``, written by rank 0 alone, does without."""
        rng = _rng_state(self.device)
        return {
            "iteration": iteration,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "eval_model": self.method.eval_model(self).state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": rng["torch"],
            "rng": distributed.all_gather_object(rng) if gather else [rng],
            "world_size": self.dist.world_size,
            "best_dice": self.best_dice,
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: dict) -> int:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"], self)
        self.sampler.load_state_dict(state["sampler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank], self.device)
        elif not rngs and "torch_rng" in state and self.dist.world_size == 1:
            torch.set_rng_state(state["torch_rng"])  # a checkpoint from before per-rank RNG states
        else:
            # Another number of processes: patches are still those of the shared sampler, but dropout
            # and perturbation draws cannot continue exactly; start them afresh per rank.
            log.warning("checkpoint written by %d process(es), resuming with %d: random perturbations are "
                        "reseeded, so this resume is not bitwise identical to an uninterrupted run",
                        int(state.get("world_size", 1)), self.dist.world_size)
            seed_everything(self.cfg.seed + 7919 * (int(state["iteration"]) + 1) + self.dist.rank)
        self.best_dice = float(state.get("best_dice", -1.0))
        for hook, hook_state in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(hook_state)
        return int(state["iteration"])

    def checkpoint(self, iteration: int) -> Path:
        """Write the checkpoint of ``iteration`` (rank 0; a collective call in distributed runs)."""
        t0 = time.time()
        state = self.state_dict(iteration)
        path = self.ckpts.path_for(iteration)
        if self.dist.is_main:
            path = self.ckpts.save(state, iteration)
            seconds = time.time() - t0
            self.runlog.update_status(checkpoint=str(path), checkpoint_iteration=iteration)
            self.runlog.event("checkpoint", iteration=iteration, path=str(path), seconds=seconds)
        # No rank runs ahead (or exits, which makes torchrun kill rank 0) while rank 0 is writing.
        distributed.barrier()
        self._last_ckpt = iteration
        return path

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self, iteration: int) -> float | None:
        """Mean Dice of the eval model on the validation scans (rank 0; the others wait).

        Stops early, without a score, when a cancel is requested, so that a cancel never waits
        for a whole validation. Uses no random numbers, so a resume sees the same RNG states.
        """
        dice = None
        if self.dist.is_main and self.val_cases:
            dice = self._validate(iteration)
        distributed.barrier()
        return dice

    def _validate(self, iteration: int) -> float | None:
        model = self.method.eval_model(self)
        self.runlog.update_status(phase="validation")
        dices = []
        for cid in self.val_cases:
            if self._cancel:
                log.info("validation at iteration %d skipped: cancel requested", iteration)
                self.runlog.update_status(phase="training")
                return None
            image = zscore(self.project.load_image(cid).array)
            pred = self.method.predict(self, model, image).argmax(0)
            dices.append(dice_jaccard(pred, self.project.load_label(cid).array)[0])
        dice = float(np.mean(dices))
        if dice > self.best_dice:
            self.best_dice = dice
            self.ckpts.save_best(self.state_dict(iteration, gather=False))
        self.runlog.event("validation", iteration=iteration, dice=dice, per_case=dict(zip(self.val_cases, dices)),
                          best_dice=self.best_dice)
        self.runlog.update_status(phase="training", val_dice=dice,
                                  metrics={"val_dice": dice, "best_val_dice": self.best_dice,
                                           "val_iteration": iteration})
        return dice

    # ---- the loop -------------------------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        """Poly decay (UA-MT, FM-ABS), or a step decay (``lr_schedule='step'``: x lr_gamma every lr_step)."""
        cfg = self.cfg
        if cfg.lr_schedule == "step":
            return cfg.lr * cfg.lr_gamma ** (it // cfg.lr_step)
        return cfg.lr * (1 - it / cfg.iterations) ** cfg.poly_power

    def setup(self) -> int:
        """Build everything and resume from the newest good checkpoint; returns the first iteration."""
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)  # rank 0 draws as a single process would
        for hook in self.hooks:
            hook.prepare(self)
        if self._stop is not None:
            return 0
        self.load_data()
        self.net = self.method.build_network(self).to(self.device)
        self._check_step_memory()
        self.optimizer = self.method.build_optimizer(self, self.net)
        self.best_dice = -1.0
        start = 0
        # On the CPU: RNG states must stay there, and load_state_dict copies the rest onto the device.
        state = self.ckpts.load_latest(map_location="cpu") if self.dist.is_main else None
        if self.dist.enabled:
            # Rank 0 alone reads the folder (it may be local to its machine) and shares the state.
            state = distributed.broadcast_object(state)
        if state is not None:
            start = self.load_state_dict(state)
            log.info("resuming %s from iteration %d", self.run_dir, start)
        self._last_ckpt = start
        if self.dist.is_main:
            io.atomic_write_text(self.run_dir / (self.stage.config_file if self.stage else CONFIG_FILE), cfg.to_json())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        self.train_net = self.wrap(self.net)
        if self.compile:
            self.train_net = torch.compile(self.train_net)
        self.method.setup(self)
        for hook in self.hooks:
            hook.setup(self)
        return start

    def _check_step_memory(self) -> None:
        """Refuse to start on the CPU when one training step needs more memory than is free (the method's
        estimate, :meth:`Method.step_memory`): the kernel would kill the run without a word. On a GPU,
        CUDA's out-of-memory error is caught and explained instead (:meth:`_oom_advice`)."""
        if self.device.type != "cpu":
            return
        need = self.method.step_memory(self)
        if need is None:
            return
        import psutil

        free = int(psutil.virtual_memory().available)
        log.info("one training step needs about %.1f GiB; %.1f GiB free", need / 2**30, free / 2**30)
        if need > free:
            raise InputError(f"method {self.method.name}: one training step needs about {need / 2**30:.1f} GiB "
                             f"({self.method.memory_terms(self)}), more than the {free / 2**30:.1f} GiB free now. "
                             f"{self.method.memory_advice(self)} Nothing was trained.")

    def _preflight(self) -> None:
        """Own the run folder before touching it: the lock, a finished run, leftovers of a kill."""
        if not self.dist.is_main:
            return
        self.lock.acquire()
        if (self.run_dir / MODEL_FILE).exists():
            if self._owns_lock:
                self.lock.release()
            raise InputError(f"{self.run_dir}: this run is finished; choose a new --run name.")
        self.runlog.repair()
        self.ckpts.clean_temporary()

    def _sync_step(self, finite: bool, logs: dict[str, float]) -> tuple[bool, bool, dict[str, float]]:
        """(cancel on any rank, loss finite on all ranks, losses averaged over ranks): one collective."""
        if not self.dist.enabled:
            return self._cancel, finite, logs
        gathered = distributed.all_gather_object((self._cancel, finite, logs))
        return (any(g[0] for g in gathered), all(g[1] for g in gathered),
                distributed.mean_dicts([g[2] for g in gathered]))

    def _oom_advice(self, it: int) -> str:
        cfg = self.cfg
        smaller = tuple(max(size_divisor(cfg.net), (p // 2 // size_divisor(cfg.net)) * size_divisor(cfg.net))
                        for p in self.patch) if hasattr(self, "patch") else None
        where = f"{self.device}" + (f" (rank {self.dist.rank})" if self.dist.enabled else "")
        batch = self.option("batch_size")
        advice = (f"CUDA ran out of memory on {where} at iteration {it} with {batch} {cfg.batch_size} "
                  f"and --patch-size {' '.join(map(str, getattr(self, 'patch', cfg.patch_size)))}. "
                  f"Lower {batch} (e.g. {max(1, cfg.batch_size // 2)})")
        if smaller:
            advice += f" or --patch-size (e.g. {' '.join(map(str, smaller))})"
        advice += (", close other programs using the GPU (nvidia-smi), or train with --device cpu. "
                   "The run resumes from its last checkpoint with the same command.")
        return advice

    def _fail(self, exc: BaseException, it: int, error: str | None = None) -> Outcome:
        """Record a failure in the run folder; the outcome carries the exception for the caller."""
        error = error or (str(exc) if isinstance(exc, FmabsError) else _last_line(exc))
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        # the final event goes first: a reader that sees the final state in status.json finds the event too
        self.runlog.event("failed", iteration=it, error=error, message=error, traceback=tb[-8000:],
                          resume_from=self._last_ckpt if self._last_ckpt else None)
        self.runlog.update_status(durable=True, state=FAILED, error=error, phase=None)
        log.error("run %s failed at iteration %d: %s", self.run_name, it, error)
        return Outcome(FAILED, it, error, exception=exc)

    def train(self) -> Outcome:
        """Train (or resume) the run; owns the run folder for the whole call.

        Returns how the run ended: done, cancelled, waiting for labels, or failed (the failure is
        recorded in the run folder; ``outcome.raise_for_failure()`` re-raises it).
        """
        self._preflight()
        outcome = None
        try:
            outcome = self._train()
            return outcome
        finally:
            if self._batches is not None:
                self._batches.close()
            if self._owns_lock:
                self.lock.release()
            # a pipeline's later stages train in the same process group
            going_on = self.stage is not None and not self.stage.last and outcome is not None and outcome.state == DONE
            if self._owns_group and not going_on:
                distributed.shutdown()

    def _step(self, it: int) -> dict[str, float]:
        """One optimisation step of the method; returns its logged losses (averaged over ranks)."""
        if self._batches is None:
            self._batches = BatchPrefetcher(pin_memory=self.device.type == "cuda", enabled=self.prefetch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self._batches.next(self.sampler).items()}
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last_3d)
        lr = self.lr_at(it)
        optimizers = [self.optimizer, *self.method.optimizers()]
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        loss, logs = self.method.train_step(self, batch, it)
        logs = {"loss": float(loss.detach()), **logs}
        cancel, finite, logs = self._sync_step(bool(np.isfinite(logs["loss"])), logs)
        if not finite:
            raise FloatingPointError(f"loss became {logs['loss']} at iteration {it}; lower --lr")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        self.method.after_step(self, it)
        self._cancel_agreed = cancel
        return logs

    def _train(self) -> Outcome:
        cfg = self.cfg
        t_begin = time.time()
        self._last_ckpt = 0
        # A fresh status, keeping what a resumed run already knows (last validation and checkpoint).
        previous = read_status(self.run_dir) if self.dist.is_main else {}
        self.runlog.status = {k: previous[k] for k in ("metrics", "val_dice", "checkpoint", "checkpoint_iteration")
                              if k in previous}
        self.runlog.update_status(durable=True, state=STARTING, run=self.run_name, method=cfg.method,
                                  iteration=0, iterations=cfg.iterations, device=str(self.device),
                                  world_size=self.dist.world_size, started=t_begin, error=None,
                                  waiting_for_labels=None, stage=self.stage.name if self.stage else None)
        it = 0
        try:
            start = self.setup()
            it = start
            if self._stop is not None:
                raise _Stop(self._stop)  # a hook asked before training could start (the warm-up's labels)
            self.runlog.update_status(durable=True, state=RUNNING, phase="training", iteration=start, eta_s=None)
            self.runlog.event("started", iteration=start, iterations=cfg.iterations, device=str(self.device),
                              resumed=start > 0, pid=self.runlog.status["pid"], host=self.runlog.status["host"],
                              world_size=self.dist.world_size, method=cfg.method)
            self.train_net.train()
            step_times: list[float] = []
            if distributed.any_true(self._cancel):
                raise _Stop(Outcome.cancelled(start))  # cancelled while loading: nothing new to checkpoint
            bar = self.progress(range(start, cfg.iterations), desc=f"training {cfg.method}",
                                total=cfg.iterations - start)
            for it in bar:
                t0 = time.time()
                for hook in self.hooks:
                    hook.before_step(self, it)
                if self._stop is not None:
                    raise _Stop(self._stop)
                self.method.before_step(self, it)
                if self._stop is not None:  # e.g. a cancel honoured inside a pseudo-label round (checkpointed)
                    raise _Stop(self._stop)
                logs = self._step(it)
                done = it + 1
                step_times.append(time.time() - t0)
                eta = float(np.mean(step_times[-50:])) * (cfg.iterations - done)
                lr = self.lr_at(it)
                self.runlog.update_status(iteration=done, eta_s=eta, lr=lr, losses=logs)
                self.runlog.event("progress", iteration=done, iterations=cfg.iterations, loss=logs["loss"],
                                  losses=logs, lr=lr, eta_s=eta, step_s=step_times[-1])
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)
                if done % cfg.val_every == 0 or done == cfg.iterations:
                    self.validate(done)
                # One process reads its own flag (a signal during this step stops after it); ranks of a
                # distributed run stop on the step they agreed on at the last synchronisation.
                if self._cancel_agreed or (self._cancel and not self.dist.enabled):
                    self.checkpoint(done)
                    it = done
                    raise _Stop(Outcome.cancelled(done))
                if done % cfg.ckpt_every == 0 and done < cfg.iterations:
                    self.checkpoint(done)
            it = cfg.iterations
            self.checkpoint(cfg.iterations)
            model_path = self.stage.output if self.stage and self.stage.output else self.run_dir / MODEL_FILE
            if self.dist.is_main:
                self.method.export(self, model_path)
            distributed.barrier()
        except _Stop as stop:
            return self._stopped(stop.outcome)
        except torch.cuda.OutOfMemoryError:
            advice = self._oom_advice(it)
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
            return self._fail(OutOfMemory(advice), it)
        except Exception as exc:
            return self._fail(exc, it)
        except BaseException as exc:  # KeyboardInterrupt (second Ctrl+C), SystemExit
            self._fail(exc, it, error=f"interrupted ({type(exc).__name__}) without a checkpoint; "
                                      "resume from the last checkpoint with the same command")
            raise
        seconds = time.time() - t_begin
        if self.stage is not None and not self.stage.last:  # the pipeline goes on: no final state yet
            self.runlog.event("stage_done", iteration=cfg.iterations, stage=self.stage.name, output=str(model_path),
                              best_val_dice=self.best_dice, seconds=seconds)
            return Outcome.done(cfg.iterations, model_path)
        self.runlog.event("done", iteration=cfg.iterations, model=str(model_path), best_val_dice=self.best_dice,
                          seconds=seconds)
        self.runlog.update_status(durable=True, state="done", phase=None, iteration=cfg.iterations, eta_s=0.0,
                                  model=str(model_path))
        return Outcome.done(cfg.iterations, model_path)

    def _stopped(self, outcome: Outcome) -> Outcome:
        """Record a clean stop (cancel, or waiting for the expert) after its checkpoint was written."""
        if outcome.state == WAITING:
            self.runlog.event(WAITING, iteration=outcome.iteration, cases=outcome.details.get("missing", []),
                              request=outcome.details.get("cases", []))
            self.runlog.update_status(durable=True, state=WAITING, phase=None, eta_s=None,
                                      iteration=outcome.iteration,
                                      waiting_for_labels=list(outcome.details.get("missing", [])))
        else:
            ckpt = self.ckpts.path_for(self._last_ckpt) if self._last_ckpt else None
            self.runlog.event("cancelled", iteration=outcome.iteration, checkpoint=str(ckpt) if ckpt else None,
                              signal=self._cancel_signal)
            self.runlog.update_status(durable=True, state=CANCELLED, phase=None, eta_s=None)
            outcome.message = outcome.message or f"cancelled; resume with the same command (run folder {self.run_dir})"
        distributed.barrier()  # the other ranks exit only once rank 0 has recorded the stop
        return outcome


def train(project: Project, run: str, cfg: TrainConfig, progress: Progress | None = None,
          install_signal_handlers: bool = False) -> Outcome:
    """Train (or resume) one run; returns how it ended (``outcome.model`` is the shipped model when done)."""
    return Trainer(project, run, cfg, progress, install_signal_handlers).train()
