"""Runs of several stages, each trained by the one engine (CFR: fine-tune the generalist, pseudo-label,
re-train). A method whose class names a ``pipeline`` is run by ``fmabs_core.pipelines.<pipeline>``;
every other method is one engine run.
"""

from __future__ import annotations

import importlib

from fmabs_core import methods
from fmabs_core.data.project import Project
from fmabs_core.training import engine
from fmabs_core.training.api import Outcome, Progress
from fmabs_core.training.config import TrainConfig


def train(project: Project, run: str, cfg: TrainConfig, progress: Progress | None = None,
          install_signal_handlers: bool = False) -> Outcome:
    """Train (or resume) a run of any method; returns how it ended."""
    pipeline = getattr(methods.available().get(cfg.method), "pipeline", None)
    if not pipeline:
        return engine.train(project, run, cfg, progress, install_signal_handlers)
    module = importlib.import_module(f"{__name__}.{pipeline}")
    return module.run(project, run, cfg, progress, install_signal_handlers)
