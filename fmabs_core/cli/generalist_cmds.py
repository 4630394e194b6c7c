"""``fmabs weights``, ``fmabs pseudo-label`` and ``fmabs bench`` (pseudo-label, precision, suite, ceiling)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from fmabs_core.cli.common import (NON_NEGATIVE_INT, POSITIVE_INT, add_device_option,
                                   add_generalist_checkpoint_option, add_json_option, add_overwrite_option,
                                   add_renamed, check_json_output, emit)
from fmabs_core.contract import FUSIONS, check_name
from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

#: the keys of fmabs_core.generalist.models.GENERALISTS, listed here so `fmabs --help` needs no torch
#: (a test checks that both agree)
GENERALIST_NAMES = ("litemedsam", "medsam", "mobilesam", "sam_vit_b", "sam_vit_h", "sam_vit_l")


def register(subparsers: argparse._SubParsersAction, light: bool = False) -> None:
    names = sorted(GENERALIST_NAMES)

    # ---- weights
    w = subparsers.add_parser("weights", help="list, download or check generalist weights")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser("list", help="registry: file, size, sha256, URL and whether present")
    p.set_defaults(func=_weights_list)
    p = wsub.add_parser("fetch", help="download NAME into the cache ($FMABS_CACHE or ~/.cache/fmabs), checked")
    p.add_argument("name")
    p.add_argument("--dest", help="folder to save into (default: the cache)")
    p.add_argument("--url", help="download from this URL instead (a mirror); the same checks apply")
    add_overwrite_option(p, "an existing file that fails its check")
    add_renamed(p, "--force", "--overwrite")
    p.set_defaults(func=_weights_fetch)
    p = wsub.add_parser("trust", help="record the sha256 of NAME's file as one you trust (weights whose sha256 "
                                      "fmabs_core does not record are refused until then)")
    p.add_argument("name")
    p.add_argument("--path", required=True, help="the weights file")
    p.add_argument("--sha256", metavar="HEX", help="the sha256 its publisher lists: the file must have it")
    add_overwrite_option(p, "a hash recorded for NAME before")
    p.set_defaults(func=_weights_trust)
    p = wsub.add_parser("verify", help="check NAME's file (size, sha256, name hash)")
    p.add_argument("name")
    p.add_argument("--path", help="a local file to check (default: the bundled or cached file)")
    p.set_defaults(func=_weights_verify)

    # ---- pseudo-label
    p = subparsers.add_parser(
        "pseudo-label",
        help="generalist pseudo-labels of one scan: prompted from a mask, or prompt-free with a tuned adapter",
        description="Prompt a generalist slice by slice in the axial, coronal and sagittal views from a mask "
        "(the teacher's prediction, or any label such as the ground truth) and fuse the three answers. "
        "With --adapter (a LoRA adapter from a 'sam-lora' run, CFR's fine-tuning stage) the tuned generalist "
        "segments the scan prompt-free instead: tiled axial slices in sliding 3D windows.",
    )
    p.add_argument("--image", required=True, help="scan (NIfTI)")
    p.add_argument("--prompt-from", help="mask on the scan's grid (0 background, 1..C) that prompts "
                   "(required without --adapter)")
    p.add_argument("--adapter", help="LoRA adapter of a 'sam-lora' run (its model.pt): prompt-free tiled mode; "
                   "the adapter names its generalist, classes and grid")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="with --adapter: sliding-window size (default: the patch it was trained on)")
    p.add_argument("--overlap", type=float, default=0.5, help="with --adapter: sliding-window overlap (default 0.5)")
    p.add_argument("--generalist", help=f"one of {', '.join(names)} (default litemedsam; with --adapter: the "
                   "adapter's)")
    add_generalist_checkpoint_option(p, "; with --adapter: the base weights it was tuned on")
    p.add_argument("--teacher-probs", help="a teacher's probabilities (a round's pseudo/<case>_teacher.nii.gz): they "
                   "prompt, as --prompt-from does, and take part in the soft, gate and staple fusions; with the "
                   "round's --seed and options this writes the round's label again")
    p.add_argument("--fusion", default="mv", choices=[*FUSIONS, "teacher"], help="mv: >= 2 of 3 views; ua: all 3; "
                   "soft, gate, staple: the teacher takes part; auto (needs --crosslabel): the rule that scores best on "
                   "this scan's drawn planes; teacher: the teacher's own mask (what a round of auto may keep)")
    p.add_argument("--teacher-weight", type=float, default=0.5, help="with --fusion soft: the teacher's share")
    p.add_argument("--gate-confidence", type=float, default=0.9, help="with --fusion gate: the teacher's "
                   "probability above which its label stands")
    p.add_argument("--crosslabel", help="the scan's cross-label: print the teacher's and the pseudo-label's Dice on "
                   "the drawn planes")
    p.add_argument("--embedding-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="precision the slice embeddings are decoded from, as fmabs train's --embedding-dtype "
                   "(float32 for a run trained with --embedding-cache off)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--output", required=True, help="output folder for <case>_{axial,coronal,sagittal,fused}.nii.gz "
                   "(with --adapter: a .nii.gz file, or a folder for <case>_tiled.nii.gz)")
    p.add_argument("--case", help="case name in the output files (default: from the image file name)")
    p.add_argument("--label", help="ground truth: print the Dice of each view and of the fused result")
    p.add_argument("--pseudo-max-slices", type=POSITIVE_INT, metavar="N",
                   help="prompt at most N foreground slices per view "
                   "(as fmabs train's option; default: every one)")
    add_renamed(p, "--max-slices", "--pseudo-max-slices")
    add_device_option(p)
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="generator seed; a round's scan uses SEED "
                   "ITERATION INDEX (pseudo/round.json lists them)")
    p.add_argument("--box-jitter", type=NON_NEGATIVE_INT, default=10,
                   help="max random box expansion per side, px (default 10)")
    add_renamed(p, "--jitter", "--box-jitter")
    p.add_argument("--box-jitter-fraction", type=float, help="max random box expansion as a share of the box's "
                   "longer side, instead of --box-jitter pixels (as fmabs train's option)")
    p.add_argument("--n-points", type=NON_NEGATIVE_INT, help="positive points per box (default: the generalist's)")
    add_renamed(p, "--points", "--n-points")
    p.add_argument("--prompt-mode", default="component", choices=["component", "slice"])
    p.add_argument("--batch-size", type=POSITIVE_INT, help="slices per encoder call (default: 1 on CPU, more on CUDA)")
    p.add_argument("--generalist-runtime", default="auto", choices=["auto", "torch", "openvino"],
                   help="what runs the encoder, as fmabs train's option: auto (OpenVINO on a CPU when it is installed "
                        "and this scan's prompted slices make its conversion pay, else torch), torch, openvino")
    p.set_defaults(func=_pseudo_label)

    # ---- bench
    b = subparsers.add_parser("bench", help="speed benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("pseudo-label", help="batched pseudo-labelling vs a one-slice-at-a-time loop")
    p.add_argument("--generalist", default="litemedsam", help=f"one of {', '.join(names)} (default litemedsam)")
    add_generalist_checkpoint_option(p)
    p.add_argument("--slices", type=int, default=8, help="slices timed per mode (default 8)")
    add_device_option(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, help="encoder batch for the batched path (default: generalist's)")
    p.add_argument("--image", help="scan to use (default: first LA 2018 scan if present, else synthetic)")
    p.add_argument("--label", help="mask for the prompts (with --image)")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench)
    p = bsub.add_parser("precision", help="generalist pseudo-label Dice and time, fp32 against bf16, on LA scans")
    p.add_argument("--scans", type=int, default=2, help="LA scans (default 2)")
    p.add_argument("--pseudo-max-slices", type=int, default=4, metavar="N",
                   help="prompted slices per view and scan (default 4)")
    add_renamed(p, "--slices", "--pseudo-max-slices")
    add_device_option(p, "cpu")
    p.add_argument("--la", help="folder with imagesTr/ and labelsTr/ (default ../shared/data/la2018)")
    p.add_argument("--configs", nargs="+", help="which of fp32-before (the reference: contiguous, no CPU tuning), "
                   "fp32+cl-before, fp32 (the default now), fp32+fp16cache, fp32+openvino, bf16+cl, bf16+openvino; "
                   "the first is the reference (default: all this machine can run)")
    p.add_argument("--encoder-slices", type=int, default=6, help="axial slices timed through the encoder alone "
                   "(default 6)")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_precision)
    p = bsub.add_parser("suite", help="training it/s, pseudo-label rounds, inference and peak memory, side by side "
                                      "(about 10 minutes on one GPU, a few on a CPU)")
    add_device_option(p)
    p.add_argument("--la", help="folder with imagesTr/ and labelsTr/ (default ../shared/data/la2018)")
    p.add_argument("--scans", type=int, help="LA scans in the pseudo-label round (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--pseudo-max-slices", type=int, metavar="N", help="slices per view and scan in the rounds (0: every slice with "
                                                    "foreground, as the paper; default: all on CUDA, 2 on CPU)")
    p.add_argument("--parts", nargs="+", default=["train", "round", "infer"], choices=["train", "round", "infer"])
    p.add_argument("--methods", nargs="+", default=["sup", "mt", "fmabs"], choices=["sup", "mt", "fmabs"])
    add_renamed(p, "--round-slices", "--pseudo-max-slices")
    p.add_argument("--quick", action="store_true", help="the CPU sizes on any device (a smoke run)")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_suite)
    p = bsub.add_parser("memory", help="peak memory of import and training as the number of scans grows, training "
                                       "from memory (--scan-store ram) and from the preprocessed files (disk)")
    p.add_argument("--work", required=True, help="folder for the synthetic scans and their projects (made if missing; "
                                                "reused by a later run)")
    p.add_argument("--scans", type=int, nargs="+", default=[10, 50], help="project sizes (default 10 50)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], metavar=("X", "Y", "Z"),
                   help="voxels per synthetic scan (default 256 256 160; a clinical CT: 512 512 300)")
    p.add_argument("--iterations", type=int, default=20, help="training iterations per run (default 20)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--predict-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="also segment one synthetic scan of this size with fmabs predict (a clinical CT: 512 512 600); "
                        "its windows do not overlap, so the figure is the memory of one scan, not of the windows")
    add_device_option(p)
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_memory)
    p = bsub.add_parser("ceiling", help="the generalist's pseudo-label Dice when prompted with the truth, and with "
                                        "the truth grown and shrunk (a teacher off by a few voxels); LA scans")
    p.add_argument("--la", help="folder with imagesTr/ and labelsTr/ (default ../shared/data/la2018); use "
                                "training scans, never the scans you report as test")
    p.add_argument("--scans", type=int, default=2, help="scans, the first in sorted order (default 2)")
    p.add_argument("--cases", nargs="+", metavar="ID", help="these scans instead (e.g. training scans of a "
                                                          "reproduction's split.json)")
    p.add_argument("--generalist", default="litemedsam", help=f"one of {', '.join(names)} (default litemedsam)")
    add_generalist_checkpoint_option(p)
    add_device_option(p)
    p.add_argument("--margin", type=int, default=2, help="voxels the truth is grown and shrunk by (default 2)")
    p.add_argument("--fusion", default="mv", choices=["mv", "ua"])
    p.add_argument("--box-jitter", type=int, default=10, help="random box enlargement, px per side (default 10, "
                                                              "as fmabs)")
    p.add_argument("--pseudo-max-slices", type=int, metavar="N", help="prompted slices per view (default: every "
                   "foreground slice, as a round; fewer for a quick look)")
    add_renamed(p, "--max-slices", "--pseudo-max-slices")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_ceiling)
    p = bsub.add_parser("command", help="fmabs pseudo-label as a user runs it against a plain reference-style "
                                        "LiteMedSAM loop over the same slices, whole processes side by side (CPU)")
    p.add_argument("--image", help="scan (NIfTI; default: the first LA 2018 scan)")
    p.add_argument("--label", help="the mask that prompts (with --image; default: that scan's label)")
    p.add_argument("--la", help="folder with imagesTr/ and labelsTr/ (default ../shared/data/la2018)")
    p.add_argument("--pseudo-max-slices", type=int, metavar="N", default=10,
                   help="prompted slices per view (default 10; 0: every foreground slice, a whole scan)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (default 2; the median counts)")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_command)
    p = bsub.add_parser("teachers", help="the generalist's pseudo-labels against the teacher that prompted them, for "
                                         "teachers of several qualities and kinds, under every fusion rule")
    p.add_argument("--project", required=True, help="project folder whose labelled training scans are used (a "
                                                   "reproduction cell's project is the protocol's training split)")
    p.add_argument("--cases", nargs="+", metavar="ID", help="these training scans (default: the first --scans)")
    p.add_argument("--scans", type=int, default=6, help="training scans, in the project's order (default 6)")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="run folders whose checkpoints are real teachers")
    p.add_argument("--iterations", nargs="+", type=int, help="the checkpoints of --runs to use (default: all)")
    p.add_argument("--no-made", action="store_true", help="only the real teachers of --runs")
    p.add_argument("--generalist", default="litemedsam", help=f"one of {', '.join(names)} (default litemedsam)")
    add_generalist_checkpoint_option(p)
    add_device_option(p)
    p.add_argument("--box-jitter", type=int, default=10, help="random box enlargement, px per side (default 10)")
    p.add_argument("--box-jitter-fraction", type=float, help="random box enlargement as a share of the box's longer "
                                                             "side, instead of --box-jitter pixels (e.g. 0.1)")
    p.add_argument("--pseudo-max-slices", type=int, metavar="N", help="prompted slices per view (default: every "
                   "foreground slice)")
    add_renamed(p, "--max-slices", "--pseudo-max-slices")
    p.add_argument("--largest-component", action="store_true", help="cut each teacher to its largest part per class "
                   "before it prompts (as fmabs's --largest-component): the gains then include the cut, and the "
                   "column 'cut' is the cut teacher alone")
    p.add_argument("--adapter", metavar="FILE", help="LoRA adapter of a sam-lora run (its model.pt) merged into the "
                   "generalist's encoder and prompted as fmabs --adapter does (e.g. tuned on the drawn slices: "
                   "sam-lora --labels cross)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="keep slice embeddings in this folder, so a later run encodes nothing")
    add_json_option(p)
    add_overwrite_option(p, "the --json file")
    p.set_defaults(func=_bench_teachers)


def _weights_list(args: argparse.Namespace) -> int:
    from fmabs_core.generalist import weights as W

    print(f"cache folder: {W.cache_dir()}  (set FMABS_CACHE to change)")
    header = f"{'name':<11} {'file':<22} {'size (bytes)':>13}  {'sha256':<16} {'present':<8} source"
    print(header)
    print("-" * len(header))
    records = W.trusted_records()
    for e in W.REGISTRY.values():
        try:
            path = W.default_path(e)
            present = "yes" if path.is_file() else "no"
        except Exception:
            present = "no"
        sha = ((e.sha256[:12] + "...") if e.sha256 else ("yours: " + records[e.name]["sha256"][:8] + "...")
               if e.name in records else "not recorded")
        size = str(e.size) if e.size else "not recorded"
        src = e.note if e.bundled else (e.url or e.note)
        print(f"{e.name:<11} {e.filename:<22} {size:>13}  {sha:<16} {present:<8} {src}")
    print("sha256 'not recorded': no value is known for certain here (never guessed), so the file is refused until "
          "you record one you trust: fmabs weights trust NAME --path FILE [--sha256 HEX] (or fmabs weights fetch NAME, "
          f"which records what it downloads). 'yours': recorded in {W.trust_file()}.")
    return 0


def _weights_fetch(args: argparse.Namespace) -> int:
    from fmabs_core.generalist import weights as W

    from tqdm import tqdm

    def bar(total, desc):
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not sys.stderr.isatty())

    path = W.fetch(args.name, dest_dir=args.dest, url=args.url, force=args.overwrite, progress=bar)
    print(path)
    return 0


def _weights_verify(args: argparse.Namespace) -> int:
    from fmabs_core.generalist import weights as W

    path = W.verify(args.name, args.path)
    e = W.get_entry(args.name)
    checks = ["present"] + (["size"] if e.size else []) + ["sha256" if e.sha256 else "sha256 (your record)"] + (
        ["name hash"] if e.name_hash else [])
    print(f"{path}: ok ({', '.join(checks)})")
    return 0


def _weights_trust(args: argparse.Namespace) -> int:
    from fmabs_core.generalist import weights as W

    done = W.trust(args.name, args.path, args.sha256, replace_record=args.overwrite)
    print(f"{args.name}: sha256 {done['sha256']} ({done['source']}); recorded in {W.trust_file()}")
    return 0


def _runtime_for(runtime: str, device: str, prompt: np.ndarray, max_slices: int | None) -> str:
    """The encoder's runtime as a training run chooses it: ``auto`` by how many slices this call encodes
    (the prompt's foreground slices per view, capped at ``max_slices``)."""
    from fmabs_core.device import resolve_device
    from fmabs_core.generalist.runtime import resolve_runtime

    fg = prompt > 0
    per_view = [int(fg.any(axis=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
    expected = sum(min(n, max_slices or n) for n in per_view)
    return resolve_runtime(runtime, resolve_device(device), expected)


def _case_name(args: argparse.Namespace) -> str:
    """``--case`` (or the image's file name) as it becomes part of output file names: one safe name, never a path."""
    from fmabs_core.data import io

    try:
        return check_name(args.case or io.case_id(args.image), "--case" if args.case else f"{args.image}: the case id")
    except ValueError as exc:
        raise InputError(f"{exc}; give --case NAME.") from None


def _pseudo_label(args: argparse.Namespace) -> int:
    if args.adapter:
        return _pseudo_label_tuned(args)
    from fmabs_core.data import io
    from fmabs_core.generalist import get_generalist
    from fmabs_core.cli.common import progress
    from fmabs_core.generalist.pseudolabel import dice, multiview_pseudolabel, planned_slices, save_pseudolabels

    from fmabs_core.generalist.embcache import EmbeddingCache
    from fmabs_core.generalist.prompts import check_jitter_fraction
    from fmabs_core.generalist.fusion import (AUTO_CANDIDATES, FusionRule, choose_rule, combine, fill_unprompted,
                                              plane_dice, plane_sample, probs_from_uint8, teacher_probs_of)
    from fmabs_core.data.intensity import zscore

    if bool(args.prompt_from) == bool(args.teacher_probs):
        raise InputError("pseudo-label needs one of --prompt-from (a mask that prompts the generalist) or "
                         "--teacher-probs (a round's <case>_teacher.nii.gz), or --adapter (a tuned LoRA adapter, "
                         "prompt-free).")
    if args.patch_size is not None:
        raise InputError("--patch-size is for the prompt-free mode (--adapter) only.")
    rule = FusionRule(args.fusion, args.teacher_weight, args.gate_confidence)
    if args.fusion != "teacher":
        rule.check()
    if args.fusion == "auto" and not args.crosslabel:
        raise InputError("--fusion auto chooses the rule on the drawn planes: give --crosslabel (the scan's "
                         "cross-label), or name a rule.")
    args.generalist = args.generalist or "litemedsam"
    image = io.load_image(args.image)
    given = io.load_probabilities(args.teacher_probs) if args.teacher_probs else io.load_label(
        args.prompt_from, allow_unlabelled=True)
    problems = io.check_pair(image, given)
    gt = cross = None
    if args.label:
        gt = io.load_label(args.label)
        problems += io.check_pair(image, gt)
    if args.crosslabel:
        cross = io.load_label(args.crosslabel, allow_unlabelled=True)
        problems += io.check_pair(image, cross)
    if problems:
        raise InputError(" ".join(problems))
    check_jitter_fraction(args.box_jitter_fraction)
    case = _case_name(args)
    out = Path(args.output)
    targets = [out / f"{case}_{key}.nii.gz" for key in (*io.VIEWS, "fused")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{', '.join(existing)} exist(s); give --overwrite to replace them, or another --output.")
    teacher = probs_from_uint8(given.array) if args.teacher_probs else teacher_probs_of(given.array)
    prompt = teacher.argmax(0).astype(np.uint8)
    g = get_generalist(args.generalist, device=args.device, checkpoint=args.generalist_checkpoint,
                       runtime=_runtime_for(args.generalist_runtime, args.device, prompt, args.pseudo_max_slices))
    print(f"generalist: {g.name}, encoder {g.precision}")
    # The same steps as a round: the scan z-scored as training sees it, and the slices decoded from embeddings
    # stored at the round's precision (its embedding cache), so a round's inputs give the round's label.
    cache = EmbeddingCache(g.device, tier="host", dtype=args.embedding_dtype, compute_dtype=g.amp_dtype)
    with progress(None, desc="slices", total=planned_slices(prompt, args.pseudo_max_slices)) as bar:
        result = multiview_pseudolabel(
            g, zscore(image.array), prompt, np.random.default_rng(args.seed), fusion="mv",
            box_jitter=args.box_jitter, n_points=args.n_points, max_slices_per_view=args.pseudo_max_slices,
            batch_size=args.batch_size, prompt_mode=args.prompt_mode, keep_probs=rule.needs_probs, cache=cache,
            box_jitter_fraction=args.box_jitter_fraction, on_slices=bar.update,
        )
    if args.pseudo_max_slices is not None:
        fill_unprompted(result, teacher)
    views = {v: result[v] for v in io.VIEWS}
    if rule.fusion == "auto":
        name, _ = choose_rule([plane_sample(cross.array, teacher, views, result.probs)])
        print(f"--fusion auto: {name} scores best on the drawn planes of {args.crosslabel}")
        rule = AUTO_CANDIDATES[name]
    result["fused"] = combine(views, teacher, rule, result.probs)
    protect = tuple(Path(p) for p in (args.image, args.prompt_from, args.teacher_probs, args.label, args.crosslabel)
                    if p)
    save_pseudolabels(result, image, out, case, protect=protect)
    if cross is not None:
        t, f = plane_dice(prompt, cross.array), plane_dice(result["fused"], cross.array)
        print(f"on the drawn planes of {args.crosslabel}: teacher {t:.4f}, pseudo-label {f:.4f} ({f - t:+.4f})")
    n = sum(v.size for v in result.slices.values())
    print(f"{case}: {n} slices, {result.prompts} prompts, {result.seconds:.1f} s -> {out}")
    if gt is not None:
        print(f"Dice vs {args.label}:")
        for key in ("axial", "coronal", "sagittal", "fused"):
            line = f"  {key:<9} {dice(result[key], gt.array):.4f}"
            if args.pseudo_max_slices is not None and key != "fused":
                sel = np.zeros(gt.array.shape[io.VIEW_AXIS[key]], bool)
                sel[result.slices[key]] = True  # indices along the view's canonical axis
                shape = [1, 1, 1]
                shape[io.VIEW_AXIS[key]] = -1
                mask = np.broadcast_to(sel.reshape(shape), gt.array.shape)
                line += f"   (on the {sel.sum()} prompted slices: {dice(result[key], gt.array, mask):.4f})"
            print(line)
        if args.pseudo_max_slices is not None:
            print("  (--pseudo-max-slices leaves unprompted slices background: whole-scan Dice is a lower bound)")
    return 0


#: options of the prompted mode that mean nothing to the prompt-free one (flag -> its default)
_PROMPTED_ONLY = {"--pseudo-max-slices": ("pseudo_max_slices", None), "--n-points": ("n_points", None),
                  "--box-jitter": ("box_jitter", 10), "--prompt-mode": ("prompt_mode", "component"),
                  "--fusion": ("fusion", "mv"), "--batch-size": ("batch_size", None),
                  "--teacher-probs": ("teacher_probs", None), "--teacher-weight": ("teacher_weight", 0.5),
                  "--gate-confidence": ("gate_confidence", 0.9), "--crosslabel": ("crosslabel", None),
                  "--embedding-dtype": ("embedding_dtype", "auto"),
                  "--box-jitter-fraction": ("box_jitter_fraction", None),
                  "--generalist-runtime": ("generalist_runtime", "auto")}


def _pseudo_label_tuned(args: argparse.Namespace) -> int:
    """``--adapter``: the fine-tuned generalist (CFR) segments the whole scan, prompt-free, by sliding
    3D windows, each tiled into canvases exactly as in training."""
    import time

    import torch

    from fmabs_core.data import io
    from fmabs_core.device import resolve_device
    from fmabs_core.generalist.models import canonical_name
    from fmabs_core.generalist.pseudolabel import dice
    from fmabs_core.generalist.tiled import load_tuned, read_adapter_meta
    from fmabs_core.inference.predict import predict_proba
    from fmabs_core.data.intensity import zscore

    if args.prompt_from:
        raise InputError("--adapter segments prompt-free (the tuned generalist sees tiled slices, no prompt): "
                         "drop --prompt-from, or drop --adapter for the prompted multi-view mode.")
    given = [flag for flag, (dest, default) in _PROMPTED_ONLY.items() if getattr(args, dest) != default]
    if given:
        raise InputError(f"{', '.join(given)} belong(s) to the prompted mode; --adapter segments prompt-free.")
    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}.")
    head = read_adapter_meta(args.adapter)
    meta = head["meta"]
    if args.generalist and canonical_name(args.generalist) != canonical_name(meta["generalist"]):
        raise InputError(f"{args.adapter} was tuned on {meta['generalist']}, not {args.generalist}; "
                         "drop --generalist (the adapter names its own).")
    patch = args.patch_size or meta.get("patch_size")
    if not patch:
        raise InputError(f"{args.adapter} does not record the patch size it was trained on; give --patch-size X Y Z.")
    patch = tuple(int(p) for p in patch)
    if min(patch) < 1:
        raise InputError(f"--patch-size must be positive, got {' '.join(map(str, patch))}.")
    image = io.load_image(args.image)
    gt = None
    if args.label:
        gt = io.load_label(args.label)
        problems = io.check_pair(image, gt)
        if problems:
            raise InputError(" ".join(problems))
    case = _case_name(args)
    out = Path(args.output)
    if not io.is_nifti(out):
        out = out / f"{case}_tiled.nii.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    protect = tuple(Path(p) for p in (args.image, args.label, args.adapter) if p)
    io.check_output_file(out, protect, args.overwrite, "--output")  # before the minutes of work, not after
    device = resolve_device(args.device, fallback=False)
    model = load_tuned(args.adapter, device, checkpoint=args.generalist_checkpoint)
    t0 = time.time()
    with torch.no_grad():
        probs = predict_proba(model, zscore(image.array), patch, args.overlap, device, normalise=False)
    seg = probs.argmax(0).astype(np.uint8)
    seconds = time.time() - t0
    io.save_like(seg, image, out, np.uint8, protect=protect)
    print(f"{case}: prompt-free {meta['generalist']} + LoRA adapter, patch {' x '.join(map(str, patch))}, "
          f"{seconds:.1f} s -> {out}")
    if gt is not None:
        print(f"Dice vs {args.label}: {dice(seg, gt.array):.4f}")
    return 0


def _bench_precision(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench import bench_precision, format_precision

    check_json_output(args)
    from fmabs_core.cli.common import progress

    report = bench_precision(args.scans, args.pseudo_max_slices, args.device, args.la, args.configs, args.encoder_slices,
                             progress=progress)
    emit(args, report, lambda: format_precision(report))
    return 0


def _bench_ceiling(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench_ceiling import bench_ceiling, format_ceiling

    check_json_output(args)
    from fmabs_core.cli.common import progress

    report = bench_ceiling(args.la, args.scans, args.generalist, args.device, args.generalist_checkpoint, args.margin,
                           args.fusion, args.box_jitter, args.pseudo_max_slices, case_ids=args.cases, progress=progress)
    emit(args, report, lambda: format_ceiling(report))
    return 0


def _bench_teachers(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench_teachers import bench_teachers, format_teachers
    from fmabs_core.cli.common import progress
    from fmabs_core.generalist.prompts import check_jitter_fraction

    check_json_output(args)
    if args.scans is not None and args.scans < 1:
        raise InputError(f"--scans must be >= 1 (got {args.scans}).")
    check_jitter_fraction(args.box_jitter_fraction)
    report = bench_teachers(args.project, args.cases, args.scans, args.runs, args.iterations, not args.no_made,
                            args.generalist, args.generalist_checkpoint, args.device, args.box_jitter, args.pseudo_max_slices,
                            args.seed, args.cache_dir, progress=progress, box_jitter_fraction=args.box_jitter_fraction,
                            largest_component=args.largest_component, adapter=args.adapter)
    emit(args, report, lambda: format_teachers(report))
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench_command import bench_command, format_command
    from fmabs_core.cli.common import progress

    check_json_output(args)
    if args.pseudo_max_slices < 0:
        raise InputError(f"--pseudo-max-slices must be >= 0, got {args.pseudo_max_slices}.")
    image, label = args.image, args.label
    if not image:
        from fmabs_core.cli.bench import LA_DIR_CANDIDATES
        from fmabs_core.data import io

        dirs = [Path(args.la)] if args.la else [Path(d) for d in LA_DIR_CANDIDATES if d]
        found = [d for d in dirs if (d / "imagesTr").is_dir() and io.list_niftis(d / "imagesTr")]
        if not found:
            raise InputError("no scan: give --image and --label, or --la DIR (a folder with imagesTr/ and labelsTr/).")
        image = io.list_niftis(found[0] / "imagesTr")[0]
        label = found[0] / "labelsTr" / image.name
    elif not label:
        raise InputError("--image needs --label (the mask that prompts).")
    report = bench_command(str(image), str(label), args.pseudo_max_slices or None, args.repeats, progress=progress)
    emit(args, report, lambda: format_command(report))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench_memory import bench_memory, format_memory

    check_json_output(args)
    if min(args.scans) < 1 or min(args.shape) < 8 or args.iterations < 2:
        raise InputError("--scans must be >= 1, --shape >= 8 per axis and --iterations >= 2")
    if args.predict_shape and min(args.predict_shape) < 8:
        raise InputError("--predict-shape must be >= 8 per axis")
    report = bench_memory(Path(args.work), args.scans, tuple(args.shape), args.iterations, args.device,
                          tuple(args.patch_size), progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                          predict_shape=tuple(args.predict_shape) if args.predict_shape else None)
    emit(args, report, lambda: format_memory(report))
    return 0


def _bench_suite(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench_suite import format_suite, run_suite

    if args.scans is not None and args.scans < 1:
        raise InputError(f"--scans must be >= 1 (got {args.scans}).")
    check_json_output(args)
    report = run_suite(args.device, args.la, args.scans, args.quick, tuple(args.parts), tuple(args.methods),
                       progress=lambda msg: print(msg, flush=True), round_slices=args.pseudo_max_slices)
    emit(args, report, lambda: format_suite(report))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fmabs_core.cli.bench import bench_pseudolabel, format_table

    check_json_output(args, [p for p in (args.image, args.label) if p])
    report = bench_pseudolabel(
        generalist=args.generalist, n_slices=args.slices, device=args.device, batch_size=args.batch_size,
        image=args.image, label=args.label, checkpoint=args.generalist_checkpoint,
    )
    emit(args, report, lambda: format_table(report))
    return 0
