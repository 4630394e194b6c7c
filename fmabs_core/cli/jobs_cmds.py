"""``fmabs jobs start|status|cancel|list``: training runs in the background.

``start`` takes exactly the options of ``fmabs train`` and runs it detached; the other
sub-commands only read the run folder (and ``cancel`` sends SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fmabs_core.contract import DONE, MODEL_FILE, RUNS_DIR, STATUS_FILE
from fmabs_core.runs import jobs
from fmabs_core.data.project import Project
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.cli.common import (POSITIVE_SECONDS, STDOUT, add_json_option, add_overwrite_option, check_json_output,
                                   check_run_files, check_status, emit)
from fmabs_core.cli.train_cmds import add_train_arguments, config_from_args

log = logging.getLogger(__name__)


def train_argv(args: argparse.Namespace) -> list[str]:
    """The ``fmabs train`` command line that reproduces ``args`` (options left at their default are omitted)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    out: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        if not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _run_dir(args: argparse.Namespace):
    project = Project(args.project)
    run_dir = project.run_dir(args.run)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run in {project.root} (see 'fmabs jobs list --project {args.project}')")
    check_run_files(run_dir)  # status.json and job.json: a damaged one is named, never a traceback
    return run_dir


def cmd_start(args: argparse.Namespace) -> int:
    project = Project(args.project)  # fails early, in the foreground, on a bad project
    project.run_dir(args.run)  # a safe run name inside the project
    config_from_args(args, project)  # every option checked here, before anything is written or started
    run_dir = project.run_dir(args.run)
    if (run_dir / STATUS_FILE).is_file() and check_status(run_dir).get("state") == DONE:
        raise InputError(f"run '{args.run}' ({run_dir}) has finished: its model is {run_dir / MODEL_FILE}. "
                         "Nothing is started; choose a new --run to train again.")
    argv = train_argv(args)
    argv[argv.index("--project") + 1] = str(project.root.resolve())
    job = jobs.start_job(project.run_dir(args.run), argv)
    failed = jobs.confirm_started(job)
    if failed:
        print(f"fmabs jobs start: run '{args.run}': {failed}", file=sys.stderr)
        return 1
    print(f"started pid {job.pid}")
    print(f"run folder: {job.run_dir}")
    print(f"log: {job.log_path}")
    print(f"follow with: fmabs jobs status --project {project.root} --run {args.run}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    check_json_output(args)
    status = jobs.job_status(run_dir)
    rounds = jobs.planes_rounds(run_dir)  # pseudo-labels vs teacher on the expert's drawn slices, per round
    if args.json != STDOUT:
        print(jobs.summary_line(status))
        for r in rounds:
            print(f"  {r['line']}")
    if args.json:
        emit(args, {**status, "pseudo_label_rounds": rounds})
    return 1 if status["state"] in ("failed", "crashed") else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        status = jobs.cancel_job(_run_dir(args), timeout_s=args.timeout, kill_after=args.kill)
    except TimeoutError as exc:
        raise FmabsError(str(exc)) from None
    print(jobs.summary_line(status))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    project = Project(args.project)
    check_json_output(args)
    runs_dir = project.root / RUNS_DIR
    damaged = []
    for run_dir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if run_dir.is_dir():
            try:
                check_run_files(run_dir)
            except InputError as exc:
                damaged.append(str(exc))
    if damaged:  # list_runs would stumble on them; name every one instead
        raise InputError(f"{len(damaged)} run(s) of {project.root} have damaged files:\n  - " + "\n  - ".join(damaged))
    runs = jobs.list_runs(project.root)
    if args.json != STDOUT:
        if not runs:
            print(f"no runs in {project.root}")
        for status in runs:
            print(jobs.summary_line(status))
    if args.json:
        emit(args, runs)
    return 0


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("jobs", help="background training: start, status, cancel, list")
    jsub = p.add_subparsers(dest="jobs_command", required=True)

    s = jsub.add_parser("start", help="run 'fmabs train' detached (same options); output goes to runs/<run>/train.log")
    add_train_arguments(s, light)
    s.set_defaults(func=cmd_start)

    s = jsub.add_parser("status", help="state, progress and ETA of a run (detects crashed jobs)")
    s.add_argument("--project", required=True)
    s.add_argument("--run", required=True)
    add_json_option(s, "the full status, with pseudo_label_rounds (scores on your drawn slices per round),")
    add_overwrite_option(s, "the --json file")
    s.set_defaults(func=cmd_status)

    s = jsub.add_parser("cancel", help="SIGTERM a running job: it checkpoints and exits")
    s.add_argument("--project", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--timeout", type=POSITIVE_SECONDS, default=120.0,
                   help="seconds to wait for the checkpoint, at least 0 (default 120)")
    s.add_argument("--kill", action="store_true",
                   help="SIGKILL after the timeout (loses the work since the last checkpoint)")
    s.set_defaults(func=cmd_cancel)

    s = jsub.add_parser("list", help="runs of a project with their states")
    s.add_argument("--project", required=True)
    add_json_option(s, "the runs and their states")
    add_overwrite_option(s, "the --json file")
    s.set_defaults(func=cmd_list)
