"""Small pieces the sub-commands share: progress bars, output helpers, checked option types, and the
checks of a run's own documents (status.json, job.json) before anything reads them."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from fmabs_core.contract import JOB_FILE, STATES, STATUS_FILE
from fmabs_core.errors import InputError


def progress(items: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    """A tqdm bar on stderr; quiet when stderr is not a terminal except for the final summary."""
    return tqdm(items, desc=desc, total=total, dynamic_ncols=True, leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- the one vocabulary for writing files: --json PATH and --overwrite --------------------------------
STDOUT = "-"


def add_json_option(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    """``--json PATH``: ``what`` as JSON in a new file; ``-`` (or ``--json`` alone) prints it instead."""
    parser.add_argument("--json", nargs="?", const=STDOUT, metavar="PATH",
                        help=f"write {what} as JSON to PATH (a new file, unless --overwrite); '-' or no PATH: "
                             "print the JSON instead of the table")


class _Renamed(argparse.Action):
    """An option's former name, kept hidden for one release: it works and says the new name on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"fmabs: {option_string} is now {self.new} (the old name goes in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Keep ``old`` as a hidden alias of the option ``new`` (same destination, type, choices and count)."""
    target = next(a for a in parser._actions if new in a.option_strings)
    kwargs: dict[str, Any] = {"dest": target.dest, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS, "new": new}
    if target.nargs == 0:
        kwargs.update(nargs=0, const=target.const)
    else:
        kwargs.update(nargs=target.nargs, type=target.type, choices=target.choices, metavar=target.metavar)
    parser.add_argument(old, action=_Renamed, **kwargs)


def add_device_option(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--device``, described once (contract.DEVICE_HINT)."""
    from fmabs_core.contract import DEVICE_HINT

    parser.add_argument("--device", default=default,
                        help=DEVICE_HINT + (f"; default {default}" if isinstance(default, str) else ""))


def add_generalist_checkpoint_option(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """``--generalist-checkpoint``: the generalist's weights from a local file (train's name for it)."""
    parser.add_argument("--generalist-checkpoint", metavar="FILE",
                        help="local weights file for the generalist (offline use; checked against its sha256)" + extra)
    add_renamed(parser, "--checkpoint", "--generalist-checkpoint")


def add_overwrite_option(parser: argparse.ArgumentParser, what: str = "files this command writes") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} when they exist")


def check_json_output(args: argparse.Namespace, inputs: Iterable[Path] = ()) -> None:
    """Refuse an unusable ``--json PATH`` before any work (an input, a folder, an existing file without
    ``--overwrite``, a missing or read-only folder)."""
    from fmabs_core.data.io import check_output_file

    if args.json and args.json != STDOUT:
        check_output_file(args.json, tuple(Path(p) for p in inputs), getattr(args, "overwrite", False), "--json")


def emit(args: argparse.Namespace, report: Any, table: Callable[[], str] | None = None) -> None:
    """The command's answer: its table on stdout and, with ``--json PATH``, the JSON file (atomic);
    with ``--json -`` the JSON alone on stdout (the table then goes to stderr)."""
    from fmabs_core.data.io import atomic_write_text

    json_path = getattr(args, "json", None)
    if table is not None:
        print(table(), file=sys.stderr if json_path == STDOUT else sys.stdout)
    if json_path == STDOUT:
        print_json(report)
    elif json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=str))
        print(f"JSON: {json_path}", file=sys.stderr)


# ---- option types: the parser refuses a value out of range, saying the range -------------------------
def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(kind: type, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float) within ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``).

    Floats must be finite. argparse prints ``argument --overlap: must be a number in [0, 1), got '1.0'``.
    """
    if lo is not None and hi is not None:
        allowed = f"in [{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"at least {_fmt(lo)}"
    elif hi is not None:
        allowed = f"{'below' if hi_open else 'at most'} {_fmt(hi)}"
    else:
        allowed = "finite"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {noun} {allowed}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {noun} {allowed}, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"must be {noun} {allowed}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: the shared ones
POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
OVERLAP = bounded(float, 0.0, 1.0, hi_open=True)
FRACTION = bounded(float, 0.0, 1.0, hi_open=True)
UNIT = bounded(float, 0.0, 1.0)
PATCH_SIDE = bounded(int, 1, 4096)
POSITIVE_SECONDS = bounded(float, 0.0)


def check_patch_memory(patch: Sequence[int], copies: int, option: str = "--patch-size") -> None:
    """Refuse a crop size whose ``copies`` float32 arrays alone would not fit in the memory available now,
    before anything is allocated (4096^3 is 256 GiB per array: the process would be killed, not told)."""
    import psutil

    need = math.prod(int(v) for v in patch) * 4 * copies
    free = psutil.virtual_memory().available
    if need > free:
        raise InputError(f"{option} {' '.join(map(str, patch))}: {copies} float32 crop(s) of that size need "
                         f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB available; give a smaller "
                         f"{option}.")


# ---- a run's documents -------------------------------------------------------------------------------
_NUMBER = (int, float)
#: status.json keys that readers use, with the JSON types they must have (null is always allowed)
STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,), "iteration": (int,), "iterations": (int,), "eta_s": _NUMBER, "updated": _NUMBER,
    "started": _NUMBER, "lr": _NUMBER, "val_dice": _NUMBER, "losses": (dict,), "metrics": (dict,), "pid": (int,),
    "host": (str,), "error": (str,), "run": (str,), "model": (str,), "phase": (str,), "stage": (str,),
}
_TYPE_NAMES = {_NUMBER: "a number", (int,): "an integer", (str,): "a string", (dict,): "an object", (list,): "a list"}
JOB_TYPES: dict[str, tuple[type, ...]] = {"pid": (int,), "started": _NUMBER, "argv": (list,), "host": (str,),
                                          "log": (str,), "created": _NUMBER}


def read_run_document(path: Path, types: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """A run folder's JSON document checked against ``types``; {} when it does not exist.

    InputError naming the file and key otherwise: the run's files are damaged or were edited by hand.
    """
    path = Path(path)
    fix = "; the run folder is damaged: restore the file, or delete it and resume or start a new --run"
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.is_file():
        raise InputError(f"{path}: not a file{fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not readable JSON ({type(exc).__name__}: {str(exc)[:200]}){fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}{fix}")
    for key, kinds in types.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            name = _TYPE_NAMES.get(kinds, "value of another type")
            raise InputError(f"{path}: key '{key}' must be {name}, found {json.dumps(value)[:60]}{fix}")
        if isinstance(value, float) and not math.isfinite(value) and key not in ("lr", "val_dice"):
            raise InputError(f"{path}: key '{key}' must be a finite number, found {value}{fix}")
    return data


def check_status(run_dir: Path) -> dict[str, Any]:
    """status.json of a run, checked: the keys readers use have their types, and the state is known."""
    path = Path(run_dir) / STATUS_FILE
    status = read_run_document(path, STATUS_TYPES)
    fix = "; the run folder is damaged: restore the file, or delete it and resume or start a new --run"
    state = status.get("state")
    if state is not None and state not in STATES:
        raise InputError(f"{path}: key 'state' is {state!r}, not one of {', '.join(STATES)}{fix}")
    for key in ("iteration", "iterations"):
        if status.get(key) is not None and status[key] < 0:
            raise InputError(f"{path}: key '{key}' must not be negative, found {status[key]}{fix}")
    for key, name in (("losses", "loss"), ("metrics", "val_dice")):
        for sub, value in (status.get(key) or {}).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER)):
                raise InputError(f"{path}: key '{key}'.{sub} must be a number, found {json.dumps(value)[:60]}{fix}")
    return status


def check_job(run_dir: Path) -> dict[str, Any]:
    """job.json of a run (written by ``fmabs jobs start``), checked."""
    path = Path(run_dir) / JOB_FILE
    job = read_run_document(path, JOB_TYPES)
    if job.get("pid") is not None and job["pid"] < 1:
        raise InputError(f"{path}: key 'pid' must be a process id >= 1, found {job['pid']}; the run folder is "
                         "damaged: delete job.json and resume the run")
    return job


def check_run_files(run_dir: Path) -> None:
    """Refuse a run whose status.json or job.json is damaged, naming the file and key."""
    check_status(run_dir)
    check_job(run_dir)
