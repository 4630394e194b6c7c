"""``fmabs train``, ``fmabs predict`` and ``fmabs evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from .. import io
from ..config import METHOD_NAMES, NetConfig, TrainConfig
from ..datastore import Project
from ..errors import InputError
from .common import progress

# torch/MONAI are imported inside the commands: `fmabs --help` and `fmabs jobs status` stay instant

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace, project: Project) -> TrainConfig:
    """A TrainConfig from the command line; a resumed run keeps its saved config."""
    saved = project.run_dir(args.run) / "config.json"
    if saved.exists():
        cfg = TrainConfig.load(saved)
        log.info("run '%s' exists: resuming with its saved configuration", args.run)
        return replace(cfg, device=args.device or cfg.device)
    cfg = TrainConfig(
        method=args.method, iterations=args.iterations, seed=args.seed, device=args.device or "auto",
        batch_size=args.batch_size, labelled_bs=args.labelled_batch_size,
        net=NetConfig(name=args.network, out_channels=project.num_classes + 1, width=args.width,
                      dropout=args.dropout, norm=args.norm),
        augment=not args.no_augment, keep_last=args.keep_last,
        val_every=args.val_every or max(1, args.iterations // 10),
        ckpt_every=args.ckpt_every or max(1, args.iterations // 10),
        max_val_cases=args.max_val_cases, generalist=args.generalist, generalist_checkpoint=args.generalist_checkpoint,
        fusion=args.fusion, pseudo_max_slices=args.pseudo_max_slices, pseudo_max_cases=args.pseudo_max_cases,
        active=args.active, budget=args.budget, expert=args.expert, lr=args.lr,
    )
    if args.patch_size:
        cfg = replace(cfg, patch_size=tuple(args.patch_size))
    if args.pseudo_schedule:
        warm, every, stop = args.pseudo_schedule
        cfg = replace(cfg, pseudo_warmup=warm, pseudo_every=every, pseudo_stop=stop)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine import Cancelled, train

    project = Project(args.project)
    cfg = config_from_args(args, project)
    try:
        model = train(project, args.run, cfg, progress=progress, install_signal_handlers=True)
    except Cancelled:
        print(f"cancelled; resume with the same command (run folder {project.run_dir(args.run)})")
        return 130
    print(f"model: {model}")
    return 0


def _inputs(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = io.list_niftis(p)
        if not files:
            raise InputError(f"{p}: no .nii or .nii.gz scans found.")
        return files
    return [p]


def cmd_predict(args: argparse.Namespace) -> int:
    from ..engine import resolve_device
    from ..infer import InferenceConfig, predict_files

    device = resolve_device(args.device or "auto")
    cfg = InferenceConfig(overlap=args.overlap, largest_component=args.largest_component,
                          sw_batch_size=args.sw_batch_size)
    if args.patch_size:
        cfg.patch_size = tuple(args.patch_size)
    written = predict_files(args.model, _inputs(args.input), Path(args.output), cfg, device,
                            save_probabilities=args.probabilities, progress=progress)
    print(f"{len(written)} segmentation(s) written to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..metrics import evaluate_folders, format_table

    scores, summary = evaluate_folders(args.pred, args.labels)
    print(format_table(scores, summary))
    report = {"cases": [s.as_dict() for s in scores], "summary": summary}
    if args.json:
        io.atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"JSON report: {args.json}")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fmabs train`` (``fmabs jobs start`` takes the same ones)."""
    p.add_argument("--project", required=True)
    p.add_argument("--method", choices=sorted(METHOD_NAMES), default="sup")
    p.add_argument("--iterations", type=int, default=6000)
    # --run-name: torchrun's own parser rejects "--run" as an ambiguous abbreviation of its --run-path
    p.add_argument("--run", "--run-name", dest="run", required=True,
                   help="run name (folder under runs/); an existing run resumes")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--labelled-batch-size", type=int, default=2)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--network", default="vnet", help="vnet (default), unet, segresnet, basicunet")
    p.add_argument("--width", type=int, default=16, help="base filters (16 = the papers' V-Net)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", choices=["batch", "instance", "none"], default="batch",
                   help="normalisation layers (batch = the papers' V-Net)")
    p.add_argument("--no-augment", action="store_true", help="no random rotation/flip of patches")
    p.add_argument("--val-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--keep-last", type=int, default=3, help="iteration checkpoints kept (plus best.pt)")
    p.add_argument("--max-val-cases", type=int)
    p.add_argument("--generalist", default="litemedsam")
    p.add_argument("--generalist-checkpoint")
    p.add_argument("--fusion", choices=["mv", "ua"], default="mv")
    p.add_argument("--pseudo-schedule", type=float, nargs=3, metavar=("WARMUP", "EVERY", "STOP"),
                   help="pseudo-label rounds as fractions of the iterations (default 0.06 0.06 0.8)")
    p.add_argument("--pseudo-max-slices", type=int, help="generalist calls per view and scan (CPU runs)")
    p.add_argument("--pseudo-max-cases", type=int, help="scans pseudo-labelled per round (CPU runs)")
    p.add_argument("--active", choices=["random", "lc", "he", "her"])
    p.add_argument("--budget", type=int)
    p.add_argument("--expert", choices=["simulated", "human"], default="simulated")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a specialist on a project")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment scans with a trained model")
    p.add_argument("--model", required=True, help="a run folder or a model file")
    p.add_argument("--input", required=True, help="a NIfTI file or a folder of them")
    p.add_argument("--output", required=True)
    p.add_argument("--patch-size", type=int, nargs=3)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--largest-component", action="store_true")
    p.add_argument("--probabilities", action="store_true", help="also write foreground probabilities")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, Jaccard, 95HD, ASD of predictions against labels")
    p.add_argument("--pred", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(func=cmd_evaluate)
