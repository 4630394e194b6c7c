"""``fmabs suggest``: which scans (and slices) the expert should cross-label next.

``suggest`` prints only JSON on stdout (the Slicer module reads the first ``{`` of the job's output),
so it shows no progress bar unless stderr is a terminal.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any, Callable

from fmabs_core.active import budget as B
from fmabs_core.active.strategies import STRATEGIES, get_strategy
from fmabs_core.active.suggest import SLICE_MODES, describe, select, suggest_slices
from fmabs_core.data.project import Project
from fmabs_core.errors import InputError
from fmabs_core.cli.common import (OVERLAP, POSITIVE_INT, UNIT, add_device_option, add_json_option, add_overwrite_option,
                                   add_renamed, check_json_output, check_status, emit, print_json, progress)

log = logging.getLogger(__name__)

def run_progress(project: Project, run: str) -> float:
    """Where the run is in its training (t/T for HER's threshold): 1.0 once finished or unknown.

    A damaged status.json (wrong types, unknown state) is an error naming the file and key."""
    status = check_status(project.run_dir(run))
    if status.get("state") == "done":
        return 1.0
    try:
        return min(1.0, max(0.0, float(status["iteration"]) / float(status["iterations"])))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1.0


def suggest(project: Project, run: str, strategy: str, k: int, slices: str = "centre", device: str = "auto",
            seed: int = 0, overlap: float = 0.25, at: float | None = None, record: bool = True,
            show: Callable | None = None) -> dict[str, Any]:
    """Score the training scans without a cross-label with the run's model; the top ``k`` and their slices.

    When the project has a budget, ``k`` is capped to what is left of it (an error once spent).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"-k must be at least 1 (got {k})")
    if slices not in SLICE_MODES:
        raise InputError(f"--slices {slices}: choose from {', '.join(SLICE_MODES)}")
    if not (isinstance(overlap, (int, float)) and math.isfinite(overlap) and 0 <= overlap < 1):
        raise InputError(f"--overlap must be a number in [0, 1) (got {overlap})")
    if at is not None and not (isinstance(at, (int, float)) and math.isfinite(at) and 0 <= at <= 1):
        raise InputError(f"--progress must be a number in [0, 1] (got {at})")
    strat = get_strategy(strategy, seed=seed)
    run_dir = project.run_dir(run)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run; train one first with 'fmabs train --run {run}'.")
    from fmabs_core.device import resolve_device
    from fmabs_core.inference.predict import check_patch, load_model, predict_proba

    dev = resolve_device(device)
    net, meta = load_model(run_dir, dev)
    patch = check_patch(tuple(meta["patch_size"]), meta["divisor"], meta["network"], f"{meta['path']}: 'patch_size'")
    train = project.split("train")
    labelled = set(project.crosslabelled())
    candidates = [c for c in train if c not in labelled]
    if not candidates:
        raise InputError(f"{project.root}: every training scan is cross-labelled already; nothing to suggest.")
    total = project.read().get("budget")
    if total:
        left = B.budget_state(project, int(total)).remaining
        if left == 0:
            raise InputError(f"{project.root}: the budget of {total} scans is spent "
                             f"({len(labelled & set(train))} cross-labelled); raise it to label more.")
        if k > left:
            log.warning("only %d scans of the budget of %d are left: suggesting %d, not %d", left, total, left, k)
            k = left
    t = run_progress(project, run) if at is None else float(at)

    def predict(cid: str):
        return predict_proba(net, project.load_image(cid).array, patch, overlap, dev)

    sel = select(candidates, k, strat, t, predict, show=show)
    placed = {}
    for cid in sel.cases:
        probs = sel.probs.get(cid)
        if probs is None:
            probs = predict(cid)
        placed[cid] = suggest_slices(probs, project.load_image(cid), slices)  # type: ignore[arg-type]
    cases = describe(sel, placed)
    result = {"run": run, "strategy": strategy, "progress": t, "k": k, "slices": slices, "cases": cases,
              "scores": sel.scores}
    if record:
        number = len(B.rounds(project, run, "suggest")) + 1
        B.record_round(project, {"run": run, "round": number, "kind": "suggest", "strategy": strategy,
                                 "iteration": None, "progress": t, "cases": sel.cases, "scores": sel.scores,
                                 "slices": placed, "expert": "human", "budget": total, "status": "suggested"})
    return result


def cmd_suggest(args: argparse.Namespace) -> int:
    project = Project(args.project)
    check_json_output(args)
    show = progress if sys.stderr.isatty() else None
    result = suggest(project, args.run, args.active, args.active_k, slices=args.slices, device=args.device,
                     seed=args.seed, overlap=args.overlap, at=args.progress, record=not args.no_record, show=show)
    if args.json:
        emit(args, result)
    else:
        print_json(result)
    return 0


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("suggest", help="which unlabelled scans (and slices) to cross-label next, by a run's model")
    p.add_argument("--project", required=True)
    p.add_argument("--run", required=True, help="the run whose model scores the scans")
    p.add_argument("--active", choices=sorted(STRATEGIES), default="her",
                   help="how the scans are chosen, as fmabs train's --active (default her)")
    add_renamed(p, "--strategy", "--active")
    p.add_argument("--active-k", type=POSITIVE_INT, default=2, metavar="K", help="scans to suggest, at least 1 "
                   "(capped by the project's budget)")
    add_renamed(p, "-k", "--active-k")
    p.add_argument("--slices", choices=SLICE_MODES, default="centre",
                   help="centre of the predicted object per view (default), or the most uncertain slice")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=0, help="for --active random")
    p.add_argument("--overlap", type=OVERLAP, default=0.5, help="sliding-window overlap, in [0, 1) (default 0.5, "
                   "as fmabs predict)")
    p.add_argument("--progress", type=UNIT, help="training progress t/T in [0, 1] for HER's threshold "
                   "(default: the run's, 1.0 when finished)")
    p.add_argument("--no-record", action="store_true", help="do not add the suggestion to fmabs.json")
    add_json_option(p, "the suggestions (printed as JSON when not given)")
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=cmd_suggest)

