"""The ``fmabs`` command. Each sub-command lives in its own module with a ``register(subparsers)``.

Errors: bad input (an :class:`~fmabs_core.errors.FmabsError`, or a value the parser refuses) prints one
``fmabs: error: ...`` line naming the file, key or option, and exits with 2. Anything else is a bug:
``fmabs`` prints one line saying so and where the full traceback was saved, and exits with 1. The
report goes to ``<project>/.fmabs/crash/`` when the command has a ``--project`` that is an FM-ABS
project, else to ``fmabs-crash/`` in the system's temporary folder (``FMABS_CRASH_DIR`` overrides
both); ``-v`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fmabs_core.contract import EXIT_FAILED, EXIT_USAGE, PROJECT_FILE
from fmabs_core.errors import FmabsError

log = logging.getLogger("fmabs_core")

#: modules under fmabs_core.cli that add sub-commands; add a line to plug in a new one
COMMAND_MODULES = [
    "project_cmds",  # import, check, crosslabel
    "train_cmds",  # train, predict, evaluate
    "jobs_cmds",  # jobs start|status|cancel|list
    "active_cmds",  # suggest
    "generalist_cmds",  # weights, pseudo-label, bench
    "tiling_cmds",  # tile-grid
    "demo_cmd",  # demo
    "reproduce_cmd",  # reproduce
    "web_cmd",  # web (browser front-end; imports fmabs_core.web only when run)
]


DESCRIPTION = ("FM-ABS: a 3D segmentation model for your scans from three drawn slices per scan. Try "
               "'fmabs demo --output demo'; each command has --help.")

#: commands whose parser needs the method registry (it imports torch: about 3 s on our machines)
TRAINING_COMMANDS = ("train", "jobs", "methods")


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The whole parser; ``light`` leaves out the per-method training options (no torch import)."""
    parser = argparse.ArgumentParser(prog="fmabs", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub, light)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # `fmabs --help` lists the commands only: no command's options need torch for that
    parser = build_parser(light=command not in TRAINING_COMMANDS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a value the parser refused (it printed why)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except FmabsError as exc:
        print(f"fmabs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fmabs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if _stdout_closed():  # `fmabs ... | head`: the reader has what it wanted; a normal end
            return 0
        return internal_error(exc, argv, args)
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        return internal_error(exc, argv, args)


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone; if so, point it at /dev/null so that the exit's flush is quiet."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows) or no real stdout: trust the error
        closed = True
    if closed:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    return closed


def internal_error(exc: BaseException, argv: list[str], args: argparse.Namespace | None = None) -> int:
    """Save the traceback of an unexpected error, say where in one line, and return EXIT_FAILED."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    report = (f"fmabs {' '.join(map(str, argv))}\npython {sys.version.split()[0]} on {sys.platform}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{text}")
    saved = None
    for folder in crash_dirs(args):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            path.write_text(report, encoding="utf-8")
            saved = path
            break
        except OSError:
            continue
    what = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    if saved is not None:
        print(f"fmabs: internal error ({what}). This is a bug in fmabs, not in your input; the full traceback is "
              f"in {saved} - please attach it when you report the problem.", file=sys.stderr)
    else:
        print(f"fmabs: internal error ({what}); the traceback could not be saved, so here it is:\n{text}",
              file=sys.stderr)
    if args is not None and getattr(args, "verbose", False) and saved is not None:
        print(text, file=sys.stderr)
    return EXIT_FAILED


def crash_dirs(args: argparse.Namespace | None) -> list[Path]:
    """Where a crash report may go, best first (see the module docstring)."""
    out = []
    if os.environ.get("FMABS_CRASH_DIR"):
        out.append(Path(os.environ["FMABS_CRASH_DIR"]))
    project = getattr(args, "project", None) if args is not None else None
    if isinstance(project, str) and project:
        try:
            if (Path(project) / PROJECT_FILE).is_file():
                out.append(Path(project) / ".fmabs" / "crash")
        except (OSError, ValueError):
            pass
    out.append(Path(tempfile.gettempdir()) / "fmabs-crash")
    return out
