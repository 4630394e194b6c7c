"""``fmabs import``, ``fmabs check`` and ``fmabs crosslabel simulate``."""

from __future__ import annotations

import argparse
import logging

import numpy as np

from fmabs_core.data import crosslabel, io
from fmabs_core.data.project import Project, import_folder
from fmabs_core.errors import InputError
from fmabs_core.cli.common import FRACTION, NON_NEGATIVE_INT, print_json, progress
from fmabs_core.contract import CROSSLABELS_DIR, parse_classes

log = logging.getLogger(__name__)


def cmd_import(args: argparse.Namespace) -> int:
    skipped: list[str] = []
    project, problems = import_folder(args.src, args.project, classes=_classes(args.classes),
                                      val_fraction=args.val_fraction, seed=args.seed, limit=args.limit,
                                      progress=lambda it: progress(it, desc="checking scans"), skipped=skipped)
    if skipped:
        print(f"{len(skipped)} file(s) skipped:")
        for s in skipped:
            print(f"  - {s}")
    if problems:
        print(f"{len(problems)} problem(s) found; nothing was imported:")
        for p in problems:
            print(f"  - {p}")
        return 2
    renamed = project.original_names()
    if renamed:
        print(f"{len(renamed)} scan(s) imported under a case id other than their file name (kept in the project):")
        for case, original in sorted(renamed.items()):
            print(f"  - {original} -> {case}")
    print(f"project {project.root}: {len(project.cases)} scans, "
          f"{len(project.split('train'))} train / {len(project.split('val'))} validation")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    problems = Project(args.project).check(progress=progress)
    for p in problems:
        print(f"  - {p}")
    print(f"{len(problems)} problem(s) found")
    return 2 if problems else 0


def simulate_crosslabels(project: Project, cases: list[str], placement: str, seed: int) -> dict[str, dict[str, int]]:
    """Cross-label the given scans from their dense labels; returns the slices used per case."""
    rng = np.random.default_rng(seed)
    used = {}
    for cid in progress(cases, desc="cross-labels"):
        if not project.has_label(cid):
            raise InputError(f"{project.label_path(cid)}: no dense label for '{cid}', so the simulated expert "
                             "cannot cross-label it. Choose cases that have labels.")
        dense = project.load_label(cid)
        cross, slices = crosslabel.simulate(dense.array, placement, rng)
        io.save_like(cross, dense, project.crosslabel_path(cid))
        used[cid] = slices
    return used


def cmd_simulate(args: argparse.Namespace) -> int:
    project = Project(args.project)
    train = project.split("train")
    drawn = set(project.crosslabelled())
    if args.cases:
        unknown = sorted(set(args.cases) - set(project.cases))
        if unknown:
            raise InputError(f"--cases: {unknown} are not cases of {project.root}")
        cases = args.cases
    elif args.count is not None:
        if args.count < 0:
            raise InputError(f"--count must be at least 0 (got {args.count})")
        pool = train if args.overwrite else [c for c in train if c not in drawn]  # never redraw by chance
        rng = np.random.default_rng(args.seed)
        cases = sorted(rng.choice(pool, size=min(args.count, len(pool)), replace=False).tolist()) if pool else []
    else:
        cases = train
    existing = [c for c in cases if c in drawn]
    if existing and not args.overwrite:
        raise InputError(f"{project.root / CROSSLABELS_DIR}: {', '.join(existing)} already have a cross-label "
                         "(perhaps drawn by hand); refusing to overwrite them. Leave them out (--cases, --count), "
                         "or add --overwrite.")
    used = simulate_crosslabels(project, cases, args.placement, args.seed)
    print_json({"crosslabelled": used})
    return 0


def _classes(text: str | None) -> dict[int, str] | None:
    """``--classes`` as {value: name}; None when not given (the project's default)."""
    if not text:
        return None
    try:
        return parse_classes(text)
    except ValueError as exc:
        raise InputError(f"--classes {text!r}: {exc}") from None


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("import", help="import scans (imagesTr/labelsTr or a folder of scans) into a project")
    p.add_argument("src")
    p.add_argument("--project", required=True)
    p.add_argument("--classes", help="e.g. 1:left_atrium (default 1:foreground)")
    p.add_argument("--val-fraction", type=FRACTION, default=0.2, help="share of scans for validation, in [0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=NON_NEGATIVE_INT, help="import only the first N scans")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("check", help="check every image/label/cross-label pair of a project")
    p.add_argument("--project", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("crosslabel", help="cross-label tools")
    csub = p.add_subparsers(dest="crosslabel_command", required=True)
    s = csub.add_parser("simulate", help="a simulated expert: three slices per scan from the dense labels")
    s.add_argument("--project", required=True)
    group = s.add_mutually_exclusive_group()
    group.add_argument("--cases", nargs="+", help="cross-label only these scans")
    group.add_argument("--count", type=NON_NEGATIVE_INT,
                       help="cross-label N random training scans that have no cross-label yet")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--placement", choices=["centre", "random"], default="centre",
                   help="slices through the object's bounding-box centre, or random slices through the object")
    s.add_argument("--overwrite", action="store_true",
                   help="replace cross-labels that exist (they may have been drawn by hand)")
    s.set_defaults(func=cmd_simulate)
