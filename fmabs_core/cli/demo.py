"""``fmabs demo``: the whole path (import, simulated cross-labels, train, predict, evaluate) in minutes on a CPU.

Sizes are scaled down so that it fits in under 10 minutes on 2 CPU cores; every scaled setting is
reported, so that nobody mistakes the demo's numbers for the papers' protocol.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable

from fmabs_core import methods
from fmabs_core.training.config import TrainConfig
from fmabs_core.data.project import Project, import_folder
from fmabs_core.device import resolve_device
from fmabs_core.pipelines import train
from fmabs_core.errors import InputError
from fmabs_core.inference.predict import InferenceConfig, predict_files
from fmabs_core.inference.metrics import CaseScores, summarise
from fmabs_core.training.config import NetConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The demo's settings, chosen on seed 7 (never on the default seed, whose figures the docs quote).

    800 iterations with crops of most of the scan: long enough that a model trained on three slices
    per scan alone over-fits them and falls far short of the dense upper bound (``sup-dense``), as in
    the papers; with 120 iterations every method tied, dense labels included. 40x40x32 phantoms keep
    the four methods within about 9 minutes on 2 cores.
    """

    output: Path = Path("fmabs_demo")
    data: Path | None = None  # an imagesTr/labelsTr folder; None = generated phantoms
    n_phantoms: int = 12
    phantom_shape: tuple[int, int, int] = (40, 40, 32)
    hard: bool = True  # phantoms with a thin tube and a look-alike neighbour (data.phantom.make_phantom)
    limit: int | None = None  # scans imported from --data
    crosslabelled: int = 4  # scans the simulated expert cross-labels
    #: sup-dense: every training scan densely labelled, the upper bound the others fall short of
    methods: tuple[str, ...] = ("sup", "mt", "fmabs", "sup-dense")
    iterations: int = 800
    patch_size: tuple[int, int, int] = (32, 32, 32)  # V-Net sizes are multiples of 16
    width: int = 8
    batch_size: int = 2
    labelled_bs: int = 1
    device: str = "auto"
    seed: int = 1337
    pseudo_max_cases: int = 4
    pseudo_max_slices: int = 8
    #: box enlargement per side in pixels: the papers' 10 px is for ~300-px LA slices; on 48-px phantom slices
    #: it made the generalist's labels worse than the teacher (GT-prompted fused Dice 0.870 vs 0.935 at 2 px)
    box_jitter: int = 2
    extra: dict = field(default_factory=dict)


def scaled_settings(cfg: DemoConfig) -> list[str]:
    """What the demo changes from the papers' protocol, said plainly."""
    return [
        f"network: V-Net width {cfg.width} (papers: 16)",
        f"patch: {'x'.join(map(str, cfg.patch_size))} (papers: 112x112x80), batch {cfg.batch_size} "
        f"= {cfg.labelled_bs} cross-labelled + {cfg.batch_size - cfg.labelled_bs} unlabelled (papers: 2 + 2)",
        f"iterations: {cfg.iterations} (papers: 20000)",
        f"cross-labelled scans: {cfg.crosslabelled} (papers: 20 of 80)"
        + ("" if cfg.data else f"; {cfg.n_phantoms} phantoms of {'x'.join(map(str, cfg.phantom_shape))} voxels, "
           "a quarter of them held out to score"),
        f"FM-ABS pseudo-labels: {cfg.pseudo_max_cases} scans per round, {cfg.pseudo_max_slices} generalist "
        "slices per view and scan (papers: every training scan, every slice with foreground)",
        f"box prompts enlarged by up to {cfg.box_jitter} px per side (papers: 10 px on ~300-px slices)",
    ]


def _train_config(cfg: DemoConfig, method: str, out_channels: int) -> TrainConfig:
    scaled = {"pseudo_max_cases": cfg.pseudo_max_cases, "pseudo_max_slices": cfg.pseudo_max_slices,
              "box_jitter": cfg.box_jitter,
              "pseudo_warmup": 0.3, "pseudo_every": 0.3, "pseudo_stop": 0.8}
    own = {f.name for f in fields(methods.available()[method].Config)}
    tc = TrainConfig(
        method=method, iterations=cfg.iterations, seed=cfg.seed, device=cfg.device, patch_size=cfg.patch_size,
        batch_size=cfg.batch_size, labelled_bs=cfg.labelled_bs,
        net=NetConfig(width=cfg.width, out_channels=out_channels),
        val_every=cfg.iterations, ckpt_every=max(1, cfg.iterations // 2), val_overlap=0.25,
        method_options={k: v for k, v in scaled.items() if k in own},
    )
    return replace(tc, **cfg.extra)


def run_demo(cfg: DemoConfig, progress: Callable[..., Iterable] | None = None) -> dict:
    """Run the demo end to end; returns the comparison and where the outputs are."""
    from fmabs_core.data import phantom
    from fmabs_core.cli.project_cmds import simulate_crosslabels

    start = time.time()
    out = Path(cfg.output)
    unknown = [m for m in cfg.methods if m not in methods.available()]
    if unknown or not cfg.methods:  # before anything is written: a corrected command must not meet "already ran"
        raise InputError(f"--methods {','.join(cfg.methods)}: {', '.join(unknown) or 'none given'} not a method; "
                         f"choose among {', '.join(methods.available())}")
    if (out / "project" / "fmabs.json").exists():
        raise InputError(f"{out}: a demo already ran here; remove the folder or choose another --output.")
    if cfg.data is None:
        data = phantom.write_dataset(out / "data", cfg.n_phantoms, cfg.phantom_shape, cfg.seed, hard=cfg.hard)
        log.info("generated %d phantom scans in %s", cfg.n_phantoms, data)
    else:
        data = Path(cfg.data)
    project, problems = import_folder(data, out / "project", limit=cfg.limit, seed=cfg.seed, val_fraction=0.25)
    if problems:
        raise InputError("the data has problems:\n" + "\n".join(f"  - {p}" for p in problems))
    train_cases = project.split("train")
    chosen = sorted(train_cases)[: cfg.crosslabelled]  # the rest stay unlabelled
    simulate_crosslabels(project, chosen, "centre", cfg.seed)
    val = project.split("val")
    results: dict = {"scaled": scaled_settings(cfg), "methods": {}, "project": str(project.root)}
    for method in cfg.methods:
        t0 = time.time()
        tc = _train_config(cfg, method, project.num_classes + 1)
        model = train(project, method, tc, progress=progress).raise_for_failure().model
        pred_dir = project.run_dir(method) / "predictions"
        device = resolve_device(cfg.device)
        predict_files(model, [project.image_path(c) for c in val], pred_dir, InferenceConfig(overlap=0.5), device)
        scores = _score(project, val, pred_dir)
        summary = summarise(scores)
        results["methods"][method] = {"dice": summary["dice"]["mean"], "hd95_mm": summary["hd95_mm"]["mean"],
                                      "dice_per_class": {f"{c} {project.classes.get(int(c), '')}".strip():
                                                         v["dice"]["mean"] for c, v in summary.get("classes", {}).items()},
                                      "failed": summary["n_failed"], "seconds": time.time() - t0,
                                      "model": str(model), "predictions": str(pred_dir),
                                      "rounds": pseudo_label_rounds(project.run_dir(method))}
        log.info("%s: val Dice %.3f (%.0f s)", method, summary["dice"]["mean"], time.time() - t0)
    results["seconds"] = time.time() - start
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results


def pseudo_label_rounds(run_dir: Path) -> list[dict]:
    """Per pseudo-label round: the teacher's and the fused pseudo-labels' Dice against the ground truth on
    the round's scans (the demo's training scans have labels; the methods never see them)."""
    from fmabs_core.runs.events import read_events

    keep = ("round", "iteration", "cases", "teacher_dice", "pseudo_dice", "seconds")
    return [{k: e[k] for k in keep if k in e} for e in read_events(run_dir) if e.get("type") == "pseudo_label"]


def _score(project: Project, cases: list[str], pred_dir: Path) -> list[CaseScores]:
    from fmabs_core.data import io
    from fmabs_core.inference.metrics import score_case

    scores = []
    for cid in cases:
        gt = project.load_label(cid)
        pred = io.load_label(pred_dir / f"{cid}.nii.gz", project.num_classes)
        scores.append(score_case(cid, pred.array, gt.array, gt.spacing))
    return scores
