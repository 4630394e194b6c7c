"""Errors that reach the user: each names the file or value at fault and what to do about it."""

from __future__ import annotations


class FmabsError(Exception):
    """Base class for errors the CLI prints without a traceback."""


class InputError(FmabsError, ValueError):
    """A user-supplied file or value is unusable (unreadable, wrong shape, NaN, ...)."""


class WeightsError(FmabsError):
    """Model weights are missing, of the wrong size, or fail their checksum."""


class ProjectError(FmabsError):
    """The project folder or its fmabs.json is missing or inconsistent."""
