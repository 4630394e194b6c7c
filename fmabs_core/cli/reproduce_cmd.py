"""``fmabs reproduce PROTOCOL --train DIR [--test DIR]``: a paper's table, one resumable run folder per cell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmabs_core.cli.common import POSITIVE_INT, add_device_option, progress


def cmd_reproduce(args: argparse.Namespace) -> int:
    from fmabs_core.reproduce import protocol as P
    from fmabs_core.reproduce.runner import reproduce

    if args.list:
        for name, paper in P.shipped().items():
            print(f"{name:<12} {paper}")
        return 0
    if not args.protocol:
        print("fmabs: error: give a PROTOCOL (see --list)", file=sys.stderr)
        return 2
    proto = P.load(args.protocol)
    if args.show:
        print(proto.to_json())
        return 0
    if not args.train:
        print("fmabs: error: give --train DIR (an imagesTr/labelsTr folder)", file=sys.stderr)
        return 2
    scale_name = args.scale
    if args.iterations is not None:
        proto, scale_name = proto.with_iterations(args.scale, args.iterations)
    scale = proto.scale(scale_name)
    print(f"fmabs reproduce: {proto.paper}\n  scale '{scale_name}': {scale.description}\n  output: {args.out}")

    def on_cell(i: int, n: int, cell) -> None:
        print(f"[cell {i + 1}/{n}] {cell.setting.label} | {cell.row.label} | seed {cell.seed}", flush=True)

    report = reproduce(proto, Path(args.train), Path(args.test) if args.test else None, Path(args.out),
                       seeds=args.seeds, scale_name=scale_name, rows=args.methods, device=args.device,
                       progress=progress, on_cell=on_cell)
    print()
    print(report["table"])
    out = Path(args.out)
    print(f"written: {out / 'table.md'}, {out / 'results.json'}, {out / 'results.csv'}, {out / 'cases.csv'}, "
          f"{out / 'plot.png'}")
    return 0


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's table (shipped protocols: --list); resumable")
    p.add_argument("protocol", nargs="?", help="a shipped protocol (la-fmabs, la-cfr) or a protocol .json file")
    p.add_argument("--train", help="imagesTr/labelsTr folder of the training scans (every scan needs its label)")
    p.add_argument("--test", help="imagesTr/labelsTr folder of the test scans (default: the protocol holds test "
                                  "scans out of --train, seeded, written to split.json)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=2, help="training seeds per cell (0..N-1; default 2)")
    p.add_argument("--scale", default="cpu", help="the protocol's scale: cpu (reduced) or paper (default: cpu)")
    p.add_argument("--iterations", type=POSITIVE_INT, help="train every cell for this many iterations instead of "
                                                          "the scale's (what fits a time budget; the table and "
                                                          "the cells' names say so)")
    p.add_argument("--methods", nargs="+", metavar="ROW", help="rows to run (the protocol's row keys; default: "
                                                                 "the scale's rows)")
    p.add_argument("--out", default="fmabs_reproduce", help="output folder (run again to resume; default "
                                                            "fmabs_reproduce)")
    add_device_option(p)
    p.add_argument("--list", action="store_true", help="list the shipped protocols")
    p.add_argument("--show", action="store_true", help="print the protocol as JSON (copy it to tune a scale)")
    p.set_defaults(func=cmd_reproduce)
