"""``fmabs demo``: the whole path on generated phantoms (or a real imagesTr/labelsTr folder) on a CPU."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fmabs_core.cli.common import POSITIVE_INT, add_device_option, progress


def cmd_demo(args: argparse.Namespace) -> int:
    from fmabs_core.cli.demo import DemoConfig, run_demo, scaled_settings

    cfg = DemoConfig(output=Path(args.output), device=args.device, seed=args.seed)
    if args.methods:
        cfg.methods = tuple(args.methods.split(","))
    if args.data:
        # real scans are larger than the phantoms: a bigger patch, few scans and iterations so it stays in minutes
        cfg.data, cfg.limit, cfg.patch_size, cfg.iterations = Path(args.data), args.limit or 8, (64, 64, 48), 120
    if args.iterations is not None:
        cfg.iterations = args.iterations
    print("fmabs demo: scaled to run in minutes on a CPU:")
    for line in scaled_settings(cfg):
        print(f"  - {line}")
    results = run_demo(cfg, progress=progress)
    print(f"\n{'method':<12}{'val Dice':>10}{'95HD mm':>10}{'failed':>8}{'time s':>8}")
    for name, r in results["methods"].items():
        hd = "nan" if math.isnan(r["hd95_mm"]) else f"{r['hd95_mm']:.2f}"
        print(f"{name:<12}{r['dice']:>10.3f}{hd:>10}{r['failed']:>8}{r['seconds']:>8.0f}")
        if r.get("dice_per_class"):
            print(" " * 12 + "Dice per class: " + ", ".join(f"{c} {d:.3f}" for c, d in r["dice_per_class"].items()))
    for name, r in results["methods"].items():
        if r["rounds"]:
            print(f"\n{name} pseudo-label rounds (Dice against the truth on the round's scans):")
            print(f"{'round':>7}{'iteration':>11}{'scans':>7}{'teacher':>9}{'pseudo':>8}{'time s':>8}")
            for x in r["rounds"]:
                print(f"{x['round']:>7}{x['iteration']:>11}{x['cases']:>7}{x.get('teacher_dice', float('nan')):>9.3f}"
                      f"{x.get('pseudo_dice', float('nan')):>8.3f}{x['seconds']:>8.0f}")
    print(f"\nproject: {results['project']}")
    for name, r in results["methods"].items():
        print(f"  {name}: model {r['model']}; predictions {r['predictions']}")
    print(f"summary: {Path(args.output) / 'demo_results.json'}  (total {results['seconds']:.0f} s)")
    return 0


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on generated data (or --data DIR) on a CPU")
    p.add_argument("--output", default="fmabs_demo", help="a new folder for everything the demo writes")
    p.add_argument("--data", help="an imagesTr/labelsTr folder of real scans instead of phantoms")
    p.add_argument("--limit", type=int, help="scans taken from --data (default 8)")
    p.add_argument("--methods", help="comma-separated methods (default: sup,mt,fmabs,sup-dense; sup-dense is the "
                                     "upper bound, every training scan densely labelled)")
    p.add_argument("--iterations", type=POSITIVE_INT, help="training iterations per method (default: the demo's, "
                                                         "long enough for three slices alone to fall short)")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_demo)
