"""The ``fmabs`` command. Each sub-command lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fmabs_core.errors import FmabsError

log = logging.getLogger("fmabs_core")

#: modules under fmabs_core.cli that add sub-commands; add a line to plug in a new one
COMMAND_MODULES = [
    "project_cmds",  # import, check, crosslabel
    "train_cmds",  # train, predict, evaluate
    "jobs_cmds",  # jobs start|status|cancel|list
    "active_cmds",  # suggest
    "generalist_cmds",  # weights, pseudo-label, bench
    "demo_cmd",  # demo
]


#: commands whose parser needs the method registry (it imports torch: about 3 s on our machines)
TRAINING_COMMANDS = ("train", "jobs", "methods")


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The whole parser; ``light`` leaves out the per-method training options (no torch import)."""
    parser = argparse.ArgumentParser(prog="fmabs", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub, light)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(light=command is not None and command not in TRAINING_COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except FmabsError as exc:
        print(f"fmabs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmabs: interrupted", file=sys.stderr)
        return 130
