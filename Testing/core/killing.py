"""A stand-in for ``kill -9`` in the resume tests: a hook that stops the loop dead at a chosen iteration."""

from __future__ import annotations

from fmabs_core.training.api import Hook


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (no checkpoint, no cancelled event)."""


class KillAt(Hook):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_step(self, tr, it):
        if it == self.iteration:
            raise Killed()
