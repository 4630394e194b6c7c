"""What a method or a hook may use of a training run, and what a run ends with.

Methods (``fmabs_core.methods``) and hooks (active cross-labelling rounds) import this module,
never the engine: the engine imports them. :class:`TrainContext` is the part of the engine's
Trainer they may touch; :class:`Outcome` is what one training call returns, mapped to an exit
code in one place (``fmabs_core.contract.EXIT_CODES``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from fmabs_core.contract import CANCELLED, DONE, EXIT_CODES, EXIT_USAGE, FAILED, OUTCOMES, WAITING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fmabs_core.data.project import Project
    from fmabs_core.runs.events import RunLog
    from fmabs_core.training.config import TrainConfig
    from fmabs_core.training.distributed import DistInfo
    from fmabs_core.training.sampler import Case, PatchSampler


@dataclass
class Outcome:
    """How a training call ended: ``done``, ``cancelled``, ``waiting_for_labels`` or ``failed``.

    ``details`` carries what the caller needs to act on it (the scans and slices to cross-label
    for ``waiting_for_labels``); ``exception`` the error of a failed run, for the caller to re-raise.
    """

    state: str
    iteration: int = 0
    message: str = ""
    model: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)
    exception: BaseException | None = None

    def __post_init__(self) -> None:
        if self.state not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.state!r} (one of {', '.join(OUTCOMES)})")

    @property
    def exit_code(self) -> int:
        """The ``fmabs`` exit code: a failure caused by bad input is a usage error, not a crash."""
        from fmabs_core.errors import FmabsError

        if self.state == FAILED and isinstance(self.exception, FmabsError):
            return EXIT_USAGE
        return EXIT_CODES[self.state]

    def raise_for_failure(self) -> "Outcome":
        """Re-raise the error of a failed run (library callers and tests that want exceptions)."""
        if self.state == FAILED and self.exception is not None:
            raise self.exception
        return self

    @classmethod
    def done(cls, iteration: int, model: Path) -> "Outcome":
        return cls(DONE, iteration, f"model: {model}", model=model)

    @classmethod
    def cancelled(cls, iteration: int, message: str = "") -> "Outcome":
        return cls(CANCELLED, iteration, message)

    @classmethod
    def waiting(cls, iteration: int, message: str, **details: Any) -> "Outcome":
        return cls(WAITING, iteration, message, details=details)


class TrainContext(Protocol):
    """The engine's services and state that methods and hooks use (the Trainer implements it).

    ``net`` is the plain network (EMA teachers, saving and validation use it) and ``train_net`` the
    one the step trains (a DistributedDataParallel wrapper under torchrun). Only rank 0 writes the run
    folder: ``runlog`` is a no-op sink on the other ranks.
    """

    cfg: "TrainConfig"
    project: "Project"
    run_name: str
    run_dir: Path
    device: "torch.device"
    dist: "DistInfo"
    net: "torch.nn.Module"
    train_net: "torch.nn.Module"
    optimizer: "torch.optim.Optimizer"
    sampler: "PatchSampler"
    runlog: "RunLog"
    train_cases: list["Case"]
    labelled: list["Case"]
    unlabelled: list["Case"]
    patch: tuple[int, int, int]

    def option(self, name: str) -> str: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def wrap(self, module: "torch.nn.Module") -> "torch.nn.Module": ...
    def lr_at(self, it: int) -> float: ...
    def predict(self, model: "torch.nn.Module", image: "np.ndarray", overlap: float | None = None) -> "np.ndarray": ...
    def progress(self, items: Iterable, desc: str = "", total: int | None = None) -> Iterable: ...
    def checkpoint(self, iteration: int) -> Path: ...
    def save_pseudolabels(self, case: "Case", result: dict[str, "np.ndarray"],
                          teacher_probs: "np.ndarray | None" = None) -> None: ...
    def load_pseudolabel(self, case: "Case", key: str = "fused") -> "np.ndarray": ...
    def hold_pseudolabel(self, case: "Case", label: "np.ndarray") -> "np.ndarray": ...
    def pseudolabel_to_send(self, held: "np.ndarray") -> "np.ndarray | None": ...
    def pseudolabel_received(self, case: "Case", sent: "np.ndarray | None") -> "np.ndarray": ...
    def restore_pseudolabels(self) -> None: ...
    def refresh_crosslabels(self, case_ids: list[str]) -> None: ...
    def request_stop(self, outcome: Outcome) -> None: ...
    def cancel_requested(self) -> bool: ...


class Hook:
    """Acts between steps whatever the method (active cross-labelling rounds, ...).

    A hook that must end the run (to wait for the expert's labels) calls ``tr.request_stop(outcome)``;
    the engine stops before the next step and returns that outcome.
    """

    def prepare(self, tr: TrainContext) -> None:
        """Before the data is loaded (e.g. the warm-up choice of the first scans to cross-label)."""

    def setup(self, tr: TrainContext) -> None:
        """After the network, optimiser and resume state exist."""

    def before_step(self, tr: TrainContext, it: int) -> None:
        """Before the batch of iteration ``it`` is drawn."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint)."""


#: a progress-bar factory (``tqdm``-like); the CLI passes one, the library logs instead
Progress = Callable[..., Iterable]
