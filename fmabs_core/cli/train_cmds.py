"""``fmabs train``, ``fmabs predict`` and ``fmabs evaluate``."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

from fmabs_core import methods
from fmabs_core.cli.common import (OVERLAP, PATCH_SIDE, POSITIVE_INT, STDOUT, add_device_option, add_json_option,
                                   add_overwrite_option, bounded, check_json_output, check_patch_memory, emit, print_json,
                                   progress)
from fmabs_core.contract import CONFIG_FILE, DEVICE_HINT, DONE, EVENTS_FILE, EXPERTS, FAILED, STRATEGIES, WAITING
from fmabs_core.data import io
from fmabs_core.data.project import Project
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.training.api import Outcome
from fmabs_core.training.config import (CROP_MODES, EXPERT_SLICES, MUTABLE_ON_RESUME, SCAN_STORES, NetConfig, TrainConfig,
                                       default_iterations, method_default)

# torch/MONAI are imported inside the commands (the method registry imports torch for `fmabs train` only)

log = logging.getLogger(__name__)


#: ``fmabs train`` options that set a TrainConfig field directly (option dest -> field)
_FIELDS = {"iterations": "iterations", "seed": "seed", "device": "device", "batch_size": "batch_size",
           "labelled_batch_size": "labelled_bs", "lr": "lr", "val_every": "val_every", "ckpt_every": "ckpt_every",
           "keep_last": "keep_last", "max_val_cases": "max_val_cases", "val_overlap": "val_overlap",
           "active": "active", "budget": "budget", "active_k": "active_k", "active_every": "active_every",
           "expert": "expert", "crop": "crop", "expert_slices": "expert_slices", "scan_store": "scan_store"}
_NET_FIELDS = {"network": "name", "width": "width", "dropout": "dropout", "norm": "norm"}
_METHOD_PREFIX = "method_option_"


def config_from_args(args: argparse.Namespace, project: Project) -> TrainConfig:
    """The run's TrainConfig: the options given on the command line over the defaults, or over the saved
    configuration when the run exists (a resume). A resume that changes an option that may not change
    mid-run (everything but the device and the validation/checkpoint cadence) is refused, naming it."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "project", "run")}
    saved_path = project.run_dir(args.run) / CONFIG_FILE
    saved = TrainConfig.load(saved_path) if saved_path.exists() else None
    method = given.get("method") or (saved.method if saved else "sup")
    if saved is None:
        iterations = given["iterations"] if "iterations" in given else default_iterations(method)
        base = TrainConfig(method=method, net=NetConfig(out_channels=project.num_classes + 1),
                           val_every=max(1, iterations // 10), ckpt_every=max(1, iterations // 10))
    else:
        base = saved
    cfg = _apply(base, given, method)
    cfg.check()
    if saved is not None:
        changed = {k: v for k, v in saved.differences(cfg).items() if k not in MUTABLE_ON_RESUME}
        if changed:
            said = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise InputError(f"run '{args.run}' exists with other options ({said}). Re-run with the saved options "
                             f"(see {saved_path}) to resume it, or choose a new --run. Only "
                             f"{', '.join(MUTABLE_ON_RESUME)} may change on resume.")
        log.info("run '%s' exists: resuming with its saved configuration", args.run)
    return cfg


def _apply(base: TrainConfig, given: dict, method: str) -> TrainConfig:
    """``base`` with the given command-line options set (the method's own ones checked against it)."""
    cls = methods.available().get(method)
    if cls is None:
        raise InputError(f"unknown method '{method}' (choose from {', '.join(methods.available())})")
    own = {f.name for f in fields(cls.Config)}
    options = dict(base.method_options) if base.method == method else {}
    for key, value in given.items():
        if key.startswith(_METHOD_PREFIX):
            name = key[len(_METHOD_PREFIX):]
            if name not in own:
                owners = [m for m, c in methods.available().items() if name in {f.name for f in fields(c.Config)}]
                raise InputError(f"--{name.replace('_', '-')} is an option of method(s) {', '.join(owners)}, "
                                 f"not of '{method}'")
            options[name] = value
    options = asdict(cls.make_config(options))  # refuses ill-typed values by name; saves every value
    changes = {_FIELDS[k]: v for k, v in given.items() if k in _FIELDS}
    net = replace(base.net, **{_NET_FIELDS[k]: v for k, v in given.items() if k in _NET_FIELDS})
    if "patch_size" in given:
        changes["patch_size"] = tuple(given["patch_size"])
    if "flip_axes" in given:
        changes["flip_axes"] = tuple(given["flip_axes"])
    if "labelled_cases" in given:
        changes["labelled_cases"] = tuple(given["labelled_cases"])
    if given.get("no_augment"):
        changes["augment"] = False
    return replace(base, method=method, method_options=options, net=net, **changes)


def report(outcome: Outcome, run_dir: Path) -> int:
    """Say how the run ended; returns the exit code. An unexpected failure is one line: its traceback is
    in the run's events.jsonl (the ``failed`` event), where the Slicer panel shows it too."""
    if outcome.state == DONE:
        print(f"model: {outcome.model}")
    elif outcome.state == WAITING:
        print(f"fmabs: waiting for the expert: {outcome.message}", file=sys.stderr)
        print_json({"waiting_for_labels": outcome.details.get("missing", []),
                    "cases": outcome.details.get("cases", [])})
    elif outcome.state == FAILED:
        if isinstance(outcome.exception, FmabsError):
            print(f"fmabs: error: {outcome.message}", file=sys.stderr)
        else:
            print(f"fmabs: training failed ({outcome.message}); the traceback is in "
                  f"{run_dir / EVENTS_FILE} (the 'failed' event). The same command resumes from the last "
                  "checkpoint.", file=sys.stderr)
    else:
        print(outcome.message)
    return outcome.exit_code


def cmd_train(args: argparse.Namespace) -> int:
    from fmabs_core.pipelines import train

    project = Project(args.project)
    cfg = config_from_args(args, project)
    check_patch_memory(cfg.patch_size, copies=2 * cfg.batch_size)  # each crop's image and label, before the network's
    outcome = train(project, args.run, cfg, progress=progress, install_signal_handlers=True)
    return report(outcome, project.run_dir(args.run))


def cmd_methods(args: argparse.Namespace) -> int:
    check_json_output(args)
    described = methods.describe()
    if args.json:
        emit(args, described)
        return 0
    for m in described:
        print(f"{m['name']:<12} {m['description']}  [labels: {m['supervision']}]")
        for opt in m["options"]:
            print(f"    --{opt['name'].replace('_', '-'):<24} {opt['help']} (default: {opt['default']})")
    return 0


def _inputs(path: str) -> list[Path]:
    """The scans ``--input`` names (a file, or a folder of them), each checked up to its header now:
    a damaged scan is named before the model loads or anything is written."""
    p = Path(path)
    if p.is_dir():
        files = io.list_niftis(p)
        if not files:
            raise InputError(f"--input {p}: no .nii or .nii.gz scans found in this folder.")
    elif not p.exists():
        raise InputError(f"--input {p}: no such file or folder.")
    else:
        files = [p]
    for f in files:
        io.read_header(f)
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    from fmabs_core.device import resolve_device
    from fmabs_core.inference.predict import InferenceConfig, predict_files

    inputs = _inputs(args.input)
    device = resolve_device(args.device)
    cfg = InferenceConfig(overlap=args.overlap, largest_component=args.largest_component,
                          sw_batch_size=args.sw_batch_size, mode=args.blend, accumulate=args.accumulate,
                          stride=tuple(args.stride) if args.stride else None)
    if args.patch_size:
        cfg.patch_size = tuple(args.patch_size)
    written = predict_files(args.model, inputs, Path(args.output), cfg, device,
                            save_probabilities=args.probabilities, progress=progress, overwrite=args.overwrite)
    print(f"{len(written)} segmentation(s) written to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fmabs_core.inference.metrics import evaluate_folders, format_table

    for option, folder in (("--pred", args.pred), ("--labels", args.labels)):
        if not Path(folder).is_dir():
            what = "is a file, not a folder" if Path(folder).exists() else "no such folder"
            raise InputError(f"{option} {folder}: {what}; give the folder of the .nii/.nii.gz files.")
    if args.json and args.json != STDOUT:  # refused before any work: an input, a file, a folder, a read-only place
        for folder in (args.pred, args.labels):
            if Path(args.json).resolve() == Path(folder).resolve():
                raise InputError(f"--json {args.json}: is the folder --{'pred' if folder == args.pred else 'labels'}; "
                                 "give the name of a new file.")
        check_json_output(args, tuple(io.list_niftis(args.pred)) + tuple(io.list_niftis(args.labels)))
    scores, summary = evaluate_folders(args.pred, args.labels)
    report = {"cases": [s.as_dict() for s in scores], "summary": summary}
    emit(args, report, lambda: format_table(scores, summary))
    return 0


def add_train_arguments(p: argparse.ArgumentParser, light: bool = False) -> None:
    """The options of ``fmabs train`` (``fmabs jobs start`` takes the same ones).

    Options left out keep the default (or, on resume, the saved value): their default is SUPPRESS,
    so the namespace holds only what the user gave. The method options come from the registry,
    which imports torch: ``light`` leaves them out for a parser that will not parse a training command.
    """
    d = TrainConfig()
    S = argparse.SUPPRESS
    p.add_argument("--project", required=True)
    # --run-name: torchrun's own parser rejects "--run" as an ambiguous abbreviation of its --run-path
    p.add_argument("--run", "--run-name", dest="run", required=True,
                   help="run name (folder under runs/); an existing run resumes")
    p.add_argument("--method", choices=None if light else list(methods.available()), default=S,
                   help=f"training method (default: {d.method}; see 'fmabs methods')")
    p.add_argument("--iterations", type=int, default=S, help="default: the method's paper's count (fmabs, mt, sup, ua-mt, cps: 20000; cfr-*: 6000)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=S,
                   help=f"default: {' '.join(map(str, d.patch_size))}")
    p.add_argument("--batch-size", type=int, default=S,
                   help=f"default: {d.batch_size} (sam-lora: {method_default('sam-lora', 'batch_size')})")
    p.add_argument("--labelled-cases", nargs="+", metavar="CASE", default=S,
                   help="learn from the labels of these training scans only (e.g. CFR's one densely labelled scan; "
                        "default: every scan with labels of the method's kind)")
    p.add_argument("--labelled-batch-size", type=int, default=S,
                   help=f"crops from labelled scans per batch (default: {d.labelled_bs})")
    p.add_argument("--device", default=S, help=DEVICE_HINT)
    p.add_argument("--seed", type=int, default=S, help=f"default: {d.seed}")
    p.add_argument("--lr", type=float, default=S,
                   help=f"default: {d.lr} (SGD; sam-lora: {method_default('sam-lora', 'lr')}, AdamW)")
    p.add_argument("--network", default=S, help="vnet (default), unet, segresnet, basicunet")
    p.add_argument("--width", type=int, default=S, help=f"base filters (default {d.net.width}, the papers' V-Net)")
    p.add_argument("--dropout", type=float, default=S, help=f"default: {d.net.dropout}")
    p.add_argument("--norm", choices=["batch", "instance", "none"], default=S,
                   help="normalisation layers (default: batch, the papers' V-Net)")
    p.add_argument("--no-augment", action="store_true", default=S, help="no random rotation/flip of patches")
    p.add_argument("--flip-axes", type=int, nargs="*", choices=[0, 1, 2], metavar="AXIS", default=S,
                   help="axes patches are flipped along (0 R-L, 1 A-P, 2 S-I; none: no flips); default: "
                   f"{' '.join(map(str, d.flip_axes))} (in-plane, as the papers' code)")
    p.add_argument("--crop", choices=list(CROP_MODES), default=S,
                   help=f"labelled crops: uniform (redrawn until they hold a labelled voxel, the references) or "
                   f"anchored (on a random labelled voxel); default: {d.crop}")
    p.add_argument("--scan-store", choices=list(SCAN_STORES), default=S,
                   help="where training reads the scans: disk (preprocessed once into the project's preprocessed/ "
                   "folder and memory-mapped: memory bounded by the patch, not by the number of scans) or ram "
                   f"(every scan read into memory at start); default: {d.scan_store}")
    p.add_argument("--val-every", type=int, default=S, help="default: a tenth of the iterations")
    p.add_argument("--val-overlap", type=float, default=S, help=f"sliding-window overlap (default {d.val_overlap})")
    p.add_argument("--ckpt-every", type=int, default=S, help="default: a tenth of the iterations")
    p.add_argument("--keep-last", type=int, default=S, help=f"iteration checkpoints kept, plus best.pt "
                                                             f"(default {d.keep_last})")
    p.add_argument("--max-val-cases", type=int, default=S, help="validate on at most this many scans")
    g = p.add_argument_group("active cross-labelling (any cross-label method)")
    g.add_argument("--active", choices=STRATEGIES, default=S, help="next-scan strategy (default: none)")
    g.add_argument("--budget", type=int, default=S, help="scans the expert cross-labels in all")
    g.add_argument("--active-k", type=int, default=S, help=f"scans per round (default {d.active_k})")
    g.add_argument("--active-every", type=int, default=S, help="iterations between rounds "
                                                               "(default: spread over the first half)")
    g.add_argument("--expert", choices=EXPERTS, default=S, help=f"default: {d.expert}")
    g.add_argument("--expert-slices", choices=list(EXPERT_SLICES), default=S,
                   help="where the simulated expert draws: truth (the ground truth's centre, the papers' code) or "
                   f"suggested (the slices the tool suggests from the model); default: {d.expert_slices}")
    if not light:
        _add_method_options(p)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One option per field of each method's Config; a field shared by several methods appears once."""
    seen: dict[str, list[str]] = {}
    for name, cls in methods.available().items():
        for f in fields(cls.Config):
            seen.setdefault(f.name, []).append(name)
    added: set[str] = set()
    for name, cls in methods.available().items():
        own = [f for f in fields(cls.Config) if f.name not in added]
        if not own:
            continue
        g = p.add_argument_group(f"options of method {name}")
        for f in own:
            added.add(f.name)
            kind = _option_type(f.type)
            default = f.default if f.default is not MISSING else None
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=_METHOD_PREFIX + f.name, type=kind,
                           metavar=f.name.upper(),
                           default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {default}; methods: {', '.join(seen[f.name])})")


def _option_type(tp: object) -> type:
    """The argparse type of a Config field: its non-None type (int, float or str)."""
    text = str(tp)
    for kind in (int, float, bool, str):
        if tp is kind or text.startswith(kind.__name__):
            return {bool: _bool, float: FINITE_FLOAT}.get(kind, kind)  # bounds: methods.base.check_bounds
    return str


#: a method's float option: a finite number (its declared bounds are checked with the other options)
FINITE_FLOAT = bounded(float)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("train", help="train (or resume) a specialist on a project")
    add_train_arguments(p, light)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("methods", help="the training methods and their options")
    add_json_option(p, "the methods and their options (what the Slicer Train panel reads)")
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("predict", help="segment scans with a trained model")
    p.add_argument("--model", required=True, help="a run folder or a model file")
    p.add_argument("--input", required=True, help="a NIfTI file or a folder of them")
    p.add_argument("--output", required=True,
                   help="folder for <case>.nii.gz (created if its parent exists; never a folder of the inputs)")
    p.add_argument("--patch-size", type=PATCH_SIDE, nargs=3, metavar=("X", "Y", "Z"),
                   help="sliding-window size, positive multiples of the network's divisor (default: the model's)")
    p.add_argument("--overlap", type=OVERLAP, default=0.5, help="sliding-window overlap, in [0, 1) (default 0.5)")
    p.add_argument("--stride", type=POSITIVE_INT, nargs=3, metavar=("X", "Y", "Z"),
                   help="windows this many voxels apart (the papers' code: 18 18 4); overrides --overlap")
    p.add_argument("--blend", choices=["constant", "gaussian"], default="constant",
                   help="how the windows' probabilities are weighted where they overlap: plainly (default, as the papers' "
                        "code) or more at each window's centre (gaussian)")
    p.add_argument("--sw-batch-size", type=POSITIVE_INT, default=2, help="windows per forward pass, at least 1")
    p.add_argument("--accumulate", choices=["float32", "float16"], default="float32",
                   help="number format the windows' probabilities are averaged in: float32 (default, as the papers' "
                        "code) or float16, half the memory for very large scans (labels may differ where two classes "
                        "nearly tie; docs/performance.md)")
    p.add_argument("--largest-component", action="store_true")
    p.add_argument("--probabilities", action="store_true", help="also write foreground probabilities")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist in --output")
    add_device_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, Jaccard, 95HD, ASD of predictions against labels")
    p.add_argument("--pred", required=True)
    p.add_argument("--labels", required=True)
    add_json_option(p, "the report")
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=cmd_evaluate)
