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


class DiskFull(FmabsError):
    """No space (or quota) left where a file is being written; nothing half-written is kept."""


def disk_full(path: object, exc: BaseException) -> "DiskFull | None":
    """A :class:`DiskFull` naming ``path`` if ``exc`` is the system's "no space"/"quota" error, else None."""
    import errno
    import shutil
    from pathlib import Path

    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    try:
        free = f"{shutil.disk_usage(Path(str(path)).parent).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    what = "no space left on the disk" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return DiskFull(f"{path}: {what} ({free}); nothing half-written was kept. Free space there, then run the "
                    "same command again.")
