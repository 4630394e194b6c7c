"""The one training loop. Methods (``methods.py``) plug in losses and hooks; nothing here is per-method."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from . import io
from .checkpoint import CheckpointStore
from .config import TrainConfig
from .data import Case, PatchSampler, effective_patch, zscore
from .datastore import Project
from .errors import InputError
from .events import RunLog
from .infer import MODEL_FILE, predict_proba, save_model
from .methods import Method, get_method
from .metrics import dice_jaccard
from .nets import build_network, size_divisor

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one falls back to CPU, said once."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA was requested but is not available here: training on the CPU instead")
        return torch.device("cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Hook:
    """Something that acts between steps regardless of the method (active cross-labelling rounds, ...)."""

    def prepare(self, tr: "Trainer") -> None:
        """Before the data is loaded (e.g. the warm-up selection of the first scans to cross-label)."""

    def setup(self, tr: "Trainer") -> None:
        """After the network, optimiser and resume state exist."""

    def before_step(self, tr: "Trainer", it: int) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def default_hooks(cfg: TrainConfig) -> list[Hook]:
    hooks: list[Hook] = []
    if cfg.active:
        from .active.hook import ActiveLearningHook

        hooks.append(ActiveLearningHook())
    return hooks


class Cancelled(Exception):
    """Raised inside the loop after a cancel request was honoured (checkpoint written)."""


class Trainer:
    """Owns the network, optimiser, sampler and run folder; calls the method's hooks each step."""

    def __init__(self, project: Project, run: str, cfg: TrainConfig,
                 progress: Callable[..., Iterable] | None = None, install_signal_handlers: bool = False):
        self.project = project
        self.cfg = cfg
        self.run_dir = project.run_dir(run)
        self.run_name = run
        self.device = resolve_device(cfg.device)
        self.method: Method = get_method(cfg.method)
        self.runlog = RunLog(self.run_dir)
        self.ckpts = CheckpointStore(self.run_dir / "checkpoints", keep_last=cfg.keep_last)
        self._progress = progress
        self._cancel = False
        self.hooks: list[Hook] = default_hooks(cfg)
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._request_cancel)

    # ---- small services the methods use ----------------------------------------------------------
    def _request_cancel(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("cancel requested (signal %d): checkpointing after this step", signum)
        self._cancel = True

    def progress(self, items: Iterable, desc: str = "", total: int | None = None) -> Iterable:
        return self._progress(items, desc=desc, total=total) if self._progress else items

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict(self, model: torch.nn.Module, image: np.ndarray, overlap: float | None = None) -> np.ndarray:
        return predict_proba(model, image, self.patch, overlap if overlap is not None else self.cfg.val_overlap,
                             self.device, normalise=False)

    def save_pseudolabels(self, case: Case, result: dict[str, np.ndarray]) -> None:
        ref = self.project.load_image(case.id)
        out = self.run_dir / "pseudo"
        for key, arr in result.items():
            io.save_like(arr.astype(np.uint8), ref, out / f"{case.id}_{key}.nii.gz")

    def restore_pseudolabels(self) -> None:
        """After a resume: the fused pseudo-labels of the last round, as written (uint8, lossless)."""
        for case in self.train_cases:
            path = self.run_dir / "pseudo" / f"{case.id}_fused.nii.gz"
            if path.exists():
                case.pseudo = io.load_label(path, self.project.num_classes).array

    # ---- data ---------------------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg, project = self.cfg, self.project
        train = project.split("train")
        if not train:
            raise InputError(f"{project.root}: the training split is empty; import scans first.")
        self.train_cases: list[Case] = []
        labelled, unlabelled = [], []
        for cid in self.progress(train, desc="loading scans"):
            case = Case(cid, zscore(project.load_image(cid).array))
            if project.has_label(cid):
                case.extra["label"] = project.load_label(cid).array
            if self.method.supervision == "dense":
                if "label" in case.extra:
                    case.target = case.extra["label"]
            elif project.crosslabel_path(cid).exists():
                case.target = project.load_crosslabel(cid).array
            (labelled if case.target is not None else unlabelled).append(case)
            self.train_cases.append(case)
        if not labelled:
            kind = "dense labels" if self.method.supervision == "dense" else "cross-labels"
            raise InputError(f"{project.root}: no training scan has {kind}; "
                             "run 'fmabs crosslabel simulate' or draw cross-labels first.")
        self.labelled, self.unlabelled = labelled, unlabelled
        self.patch = effective_patch(tuple(cfg.patch_size), [c.image.shape for c in self.train_cases],
                                     size_divisor(cfg.net))
        self.sampler = PatchSampler(labelled, unlabelled if self.method.uses_unlabelled else [], self.patch,
                                    cfg.batch_size, cfg.labelled_bs, cfg.seed, cfg.augment)
        self.val_cases = [c for c in project.split("val") if project.has_label(c)][: cfg.max_val_cases]
        log.info("%d labelled and %d unlabelled training scans, %d validation scans, patch %s",
                 len(labelled), len(unlabelled), len(self.val_cases), self.patch)

    def refresh_crosslabels(self, case_ids: list[str]) -> None:
        """Move newly cross-labelled scans from the unlabelled to the labelled pool (active rounds)."""
        if self.method.supervision == "dense":
            return
        by_id = {c.id: c for c in self.train_cases}
        for cid in case_ids:
            case = by_id[cid]
            case.target = self.project.load_crosslabel(cid).array
            if case in self.unlabelled:
                self.unlabelled.remove(case)
            if case not in self.labelled:
                self.labelled.append(case)
        self.sampler.labelled_bs = self.cfg.labelled_bs if self.sampler.unlabelled else self.cfg.batch_size

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict:
        return {
            "iteration": iteration,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "eval_model": self.method.eval_model(self).state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best_dice": self.best_dice,
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: dict) -> int:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"], self)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.best_dice = float(state.get("best_dice", -1.0))
        for hook, hook_state in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(hook_state)
        return int(state["iteration"])

    def checkpoint(self, iteration: int) -> Path:
        path = self.ckpts.save(self.state_dict(iteration), iteration)
        self.runlog.event("checkpoint", iteration=iteration, path=str(path))
        return path

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self, iteration: int) -> float | None:
        if not self.val_cases:
            return None
        model = self.method.eval_model(self)
        dices = []
        for cid in self.val_cases:
            image = zscore(self.project.load_image(cid).array)
            pred = self.predict(model, image).argmax(0)
            dices.append(dice_jaccard(pred, self.project.load_label(cid).array)[0])
        dice = float(np.mean(dices))
        self.runlog.event("validation", iteration=iteration, dice=dice, per_case=dict(zip(self.val_cases, dices)))
        self.runlog.update_status(val_dice=dice)
        if dice > self.best_dice:
            self.best_dice = dice
            self.ckpts.save_best(self.state_dict(iteration))
        return dice

    # ---- the loop -------------------------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        return self.cfg.lr * (1 - it / self.cfg.iterations) ** self.cfg.poly_power

    def setup(self) -> int:
        """Build everything and resume from the newest good checkpoint; returns the first iteration."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        for hook in self.hooks:
            hook.prepare(self)
        self.load_data()
        self.net = build_network(cfg.net).to(self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.best_dice = -1.0
        start = 0
        config_path = self.run_dir / "config.json"
        state = self.ckpts.load_latest(map_location=self.device)
        if state is not None:
            start = self.load_state_dict(state)
            log.info("resuming %s from iteration %d", self.run_dir, start)
        elif config_path.exists() and (self.run_dir / MODEL_FILE).exists():
            raise InputError(f"{self.run_dir}: this run is finished; choose a new --run name.")
        io.atomic_write_text(config_path, cfg.to_json())
        self.method.setup(self)
        for hook in self.hooks:
            hook.setup(self)
        return start

    def train(self) -> Path:
        start = self.setup()
        cfg = self.cfg
        self.runlog.update_status(state="running", iteration=start, iterations=cfg.iterations, device=str(self.device),
                                  method=cfg.method, run=self.run_name)
        self.runlog.event("started", iteration=start, iterations=cfg.iterations, device=str(self.device),
                          resumed=start > 0)
        self.net.train()
        step_times: list[float] = []
        it = start
        try:
            bar = self.progress(range(start, cfg.iterations), desc=f"training {cfg.method}",
                                total=cfg.iterations - start)
            for it in bar:
                t0 = time.time()
                for hook in self.hooks:
                    hook.before_step(self, it)
                self.method.before_step(self, it)
                batch = {k: v.to(self.device, non_blocking=True) for k, v in self.sampler.next_batch().items()}
                lr = self.lr_at(it)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with self.autocast():
                    logits = self.net(batch["image"])
                loss, logs = self.method.loss(self, batch, logits, it)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at iteration {it}; lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.method.after_step(self, it)
                done = it + 1
                step_times.append(time.time() - t0)
                eta = float(np.mean(step_times[-50:])) * (cfg.iterations - done)
                logs = {"loss": float(loss.detach()), **logs}
                self.runlog.event("progress", iteration=done, lr=lr, eta_s=eta, **logs)
                self.runlog.update_status(iteration=done, eta_s=eta, lr=lr, losses=logs)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if done % cfg.val_every == 0 or done == cfg.iterations:
                    self.validate(done)
                if self._cancel:
                    self.checkpoint(done)
                    raise Cancelled()
                if done % cfg.ckpt_every == 0 and done < cfg.iterations:
                    self.checkpoint(done)
        except Cancelled:
            self.runlog.update_status(state="cancelled")
            self.runlog.event("cancelled", iteration=it + 1)
            raise
        except Exception as exc:
            self.runlog.update_status(state="failed", error=str(exc))
            self.runlog.event("failed", iteration=it, message=f"{type(exc).__name__}: {exc}")
            raise
        self.checkpoint(cfg.iterations)
        model_path = self.run_dir / MODEL_FILE
        save_model(model_path, self.method.eval_model(self).state_dict(), cfg.net, self.patch, self.project.classes)
        self.runlog.update_status(state="done", iteration=cfg.iterations, eta_s=0.0, model=str(model_path))
        self.runlog.event("done", iteration=cfg.iterations, model=str(model_path), best_val_dice=self.best_dice)
        return model_path


def train(project: Project, run: str, cfg: TrainConfig, progress: Callable[..., Iterable] | None = None,
          install_signal_handlers: bool = False) -> Path:
    """Train (or resume) one run; returns the path of the shipped model."""
    return Trainer(project, run, cfg, progress, install_signal_handlers).train()
