"""``fmabs tile-grid``: measure tile size against Dice on a project's labelled scans and print the grid to use."""

from __future__ import annotations

import argparse
import logging

from fmabs_core.cli.common import (STDOUT, add_device_option, add_generalist_checkpoint_option, add_json_option,
                                   add_overwrite_option, bounded, check_json_output, check_patch_memory, emit,
                                   progress)
from fmabs_core.errors import InputError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, light: bool = False) -> None:
    p = subparsers.add_parser(
        "tile-grid",
        help="measure which tile grid a generalist should use for CFR (tile size against Dice)",
        description="Tile foreground-centred crops of the project's densely labelled scans with each grid, "
        "segment every tile with the pretrained generalist prompted by its ground-truth box, and print the "
        "Dice per grid, the Dice the decoder's resolution allows at best, the canvases per crop, and the "
        "grid chosen: the fewest canvases within --tolerance of the best Dice. Pass it to "
        "'fmabs train --method sam-lora|cfr-* --grid G'.",
    )
    p.add_argument("--project", required=True, help="project folder (its training scans with dense labels are used)")
    p.add_argument("--generalist", default="litemedsam", help="SAM-family model (default litemedsam)")
    add_generalist_checkpoint_option(p)
    p.add_argument("--patch-size", type=bounded(int, 1), nargs=3, default=[112, 112, 80], metavar=("X", "Y", "Z"),
                   help="crop size, the training patch (default 112 112 80)")
    p.add_argument("--grids", type=bounded(int, 1), nargs="+", default=None,
                   help="grids to try (default 9 5 4 3 2, those that fit the crop's slices)")
    p.add_argument("--cases", type=bounded(int, 1), default=4, help="labelled scans to measure on (default 4)")
    p.add_argument("--tolerance", type=bounded(float, 0.0, 1.0), default=0.02,
                   help="Dice a cheaper grid may lose against the best (default 0.02)")
    add_device_option(p, "cpu")
    add_json_option(p, "the measurement")
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_tile_grid)


def _tile_grid(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fmabs_core.data.project import Project
    from fmabs_core.generalist import get_generalist
    from fmabs_core.generalist.grid_choice import DEFAULT_GRIDS, TABLE_HEADER, choose_grid, foreground_crop, measure_grids

    project = Project(args.project)
    check_json_output(args)
    check_patch_memory(args.patch_size, copies=3)  # the crop's image, label and its tiled canvas
    # training scans only: the grid is a choice, never made on validation scans
    pool = project.split("train") or project.cases
    labelled = [c for c in pool if project.has_label(c)][: args.cases]
    if not labelled:
        raise InputError(f"{args.project}: no scan has a dense label (labels/); the measurement needs some.")
    crops = []
    for case in progress(labelled, desc="loading crops"):
        image, label = project.load_image(case).array, project.load_label(case).array
        try:
            crops.append(foreground_crop(image, label, args.patch_size))
        except InputError:
            log.warning("%s: empty label, skipped", case)
    if not crops:
        raise InputError(f"{args.project}: every labelled scan measured has an empty label.")
    generalist = get_generalist(args.generalist, device=args.device, checkpoint=args.generalist_checkpoint)
    trials = measure_grids(generalist, crops, args.grids or DEFAULT_GRIDS)
    choice = choose_grid(trials, args.tolerance)
    if args.json:
        emit(args, {"cases": labelled[: len(crops)], "patch_size": list(args.patch_size),
                    "generalist": generalist.name, "tolerance": args.tolerance,
                    "trials": [asdict(t) for t in trials], "chosen_grid": choice.grid})
        if args.json == STDOUT:
            return 0
    print(f"{generalist.name}, {len(crops)} crops of {tuple(args.patch_size)} from: {', '.join(labelled[:len(crops)])}")
    print(TABLE_HEADER)
    for t in trials:
        print(t.row())
    print(f"chosen grid: {choice.grid} ({choice.canvases_per_crop:g} canvases per crop, prompted Dice "
          f"{choice.prompted_dice:.3f}; best {max(t.prompted_dice for t in trials):.3f}, tolerance {args.tolerance})")
    return 0
