"""The method interface: what the engine calls each step. A method adds losses and state, never a loop."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from fmabs_core.methods import losses
from fmabs_core.training.api import TrainContext
from fmabs_core.training.config import from_dict

if TYPE_CHECKING:
    import numpy as np


def option(default: Any, help: str, low: float | None = None, high: float | None = None,  # noqa: A002
           above: float | None = None) -> Any:
    """A method option: a dataclass field whose ``help`` becomes the ``fmabs train`` option's help text.

    ``low``/``high``: the inclusive bounds of a number; ``above``: a strict lower bound. A value outside them
    is refused by :func:`check_bounds` when the options are read, before anything is saved.
    """
    return field(default=default, metadata={"help": help, "low": low, "high": high, "above": above})


def check_bounds(config: Any) -> Any:
    """``config`` if every numeric option is finite and within its declared bounds, else an InputError naming the
    option as the command line spells it (``None`` stands for "the default" where the field allows it)."""
    import math

    from fmabs_core.errors import InputError

    for f in fields(config):
        low, high, above = (f.metadata.get(k) for k in ("low", "high", "above"))
        value = getattr(config, f.name)
        if (low is None and high is None and above is None) or value is None or isinstance(value, bool):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{flag} {value}: give a finite number")
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and value <= above):
            parts = [f"above {above:g}" if above is not None else None,
                     f"at least {low:g}" if low is not None else None,
                     f"at most {high:g}" if high is not None else None]
            raise InputError(f"{flag} {value:g}: it must be {' and '.join(p for p in parts if p)}")
    if callable(getattr(config, "check", None)):  # a Config's own checks across its options
        config.check()
    return config


@dataclass
class MethodConfig:
    """A method's own options (none here): a dataclass whose fields are declared with :func:`option`."""


class Method:
    """Base: the supervised loss on the labelled crops of the batch.

    The engine calls, per run: ``setup``; per iteration: ``before_step`` (pseudo-label rounds),
    ``train_step`` (forward and loss; the engine does backward and steps the optimisers: its own
    plus ``optimizers()``), ``after_step`` (EMA updates). ``eval_model`` is what is validated and
    shipped. A method with its own networks builds them in ``setup`` (wrapped with ``tr.wrap`` for
    DDP) and saves them in ``state_dict``.
    """

    name: ClassVar[str] = ""
    supervision: ClassVar[str] = "cross"  # which labels the labelled pool uses: cross | dense
    uses_unlabelled: ClassVar[bool] = False
    Config: ClassVar[type] = MethodConfig
    #: whether training on the CPU keeps freed memory in glibc's heap (:func:`fmabs_core.device.tune_cpu_allocator`):
    #: faster for V-Nets, but a heap that keeps its peak fragments under networks with many differently sized
    #: activations (see :class:`~fmabs_core.methods.sam_lora.SamLora`)
    cpu_allocator_tuning: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(cls, options: Mapping[str, Any]) -> Any:
        """The method's options, checked (types, bounds, the Config's own ``check``) before any run folder is written."""
        return check_bounds(from_dict(cls.Config, dict(options), f"options of method '{cls.name}'"))

    @classmethod
    def describe(cls) -> str:
        """The first line of the class docstring: what ``fmabs methods`` and the Train panel show."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

    # ---- per run --------------------------------------------------------------------------------------
    def build_network(self, tr: TrainContext) -> nn.Module:
        """The network the engine trains and ships (default: the run's ``--network``, a V-Net)."""
        from fmabs_core.training.nets import build_network

        return build_network(tr.cfg.net)

    def build_optimizer(self, tr: TrainContext, net: nn.Module) -> torch.optim.Optimizer:
        """The engine's optimiser (default: SGD with momentum, as UA-MT and FM-ABS)."""
        cfg = tr.cfg
        return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def predict(self, tr: TrainContext, model: nn.Module, image: "np.ndarray") -> "np.ndarray":
        """Class probabilities (C+1, X, Y, Z) of a whole z-scored scan (validation; default: sliding windows)."""
        return tr.predict(model, image)

    def export(self, tr: TrainContext, path: Path) -> None:
        """Write what the run ships once trained (default: the eval model as a ``fmabs predict`` model file)."""
        from fmabs_core.inference.predict import save_model

        save_model(path, self.eval_model(tr).state_dict(), tr.cfg.net, tr.patch, tr.project.classes)

    def step_memory(self, tr: TrainContext) -> int | None:
        """Bytes one training step needs on the CPU beyond the built network, when the method can say (the
        engine refuses to start when they are not free); None: no estimate, no check."""
        return None

    def memory_terms(self, tr: TrainContext) -> str:
        """What :meth:`step_memory` grows with, in the user's options (for the refusal message)."""
        return f"{tr.option('batch_size')} {tr.cfg.batch_size}, --patch-size {' '.join(map(str, tr.patch))}"

    def memory_advice(self, tr: TrainContext) -> str:
        """What to change when :meth:`step_memory` is not free."""
        return f"Lower {tr.option('batch_size')} or --patch-size, or close other programs."

    def setup(self, tr: TrainContext) -> None:
        """Called once before the first step (after resume state is known)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers besides the engine's (a method with its own networks); the engine steps them all."""
        return []

    def eval_model(self, tr: TrainContext) -> nn.Module:
        """The network validated, saved as the run's model and used for pseudo-labels/suggestions."""
        return tr.net

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, tr: TrainContext) -> None:
        """Restore :meth:`state_dict` (called before :meth:`setup` on resume)."""

    # ---- per iteration --------------------------------------------------------------------------------
    def before_step(self, tr: TrainContext, it: int) -> None:
        """Called before drawing the batch of iteration ``it`` (pseudo-label rounds live here)."""

    def train_step(self, tr: TrainContext, batch: dict[str, torch.Tensor], it: int
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and total loss of one step: ``(loss, {name: value})``. Override for several networks."""
        with tr.autocast():
            logits = tr.train_net(batch["image"])
        return self.loss(tr, batch, logits, it)

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.partial_cross_entropy(logits, target)

    def loss(self, tr: TrainContext, batch: dict[str, torch.Tensor], logits: torch.Tensor, it: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        lab = batch["labelled"]
        sup = self.supervised_loss(logits[lab], batch["target"][lab])
        return sup, {"loss_sup": float(sup.detach())}

    def after_step(self, tr: TrainContext, it: int) -> None:
        """Called after the optimiser step (EMA updates live here)."""
