"""Run a protocol: one run folder per table cell (setting x row x seed), resumable, then the report.

Layout of the output folder (nothing is written elsewhere)::

    protocol.json     the protocol and scale this reproduction runs (a later call must match it)
    split.json        the fixed split, written before any training
    data/<scale>/     the scans on the canonical grid, resampled for the scale (images/, labels/)
    cells/<cell>/     project/ (hard links to data/, its own cross-labels), project/runs/run/ (the run
                      folder: config.json, events.jsonl, checkpoints/, model.pt), scores.json (finished)
    table.md, results.json, results.csv, cases.csv, plot.png   (the report, see ``report.py``)

A cell whose ``scores.json`` exists is finished and skipped; a cell with a run folder resumes from its
newest checkpoint; a cell whose saved configuration differs from the protocol's is refused by name.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from fmabs_core import methods
from fmabs_core.contract import ADAPTER_FILE, CONFIG_FILE, DONE, MODEL_FILE
from fmabs_core.data import io
from fmabs_core.data.store import STORE_DIR
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.inference.metrics import CaseScores, score_case, summarise
from fmabs_core.reproduce import data as D
from fmabs_core.reproduce.protocol import Protocol, Row, Scale, Setting
from fmabs_core.reproduce.report import clean, write_report
from fmabs_core.training.config import MUTABLE_ON_RESUME, NetConfig, TrainConfig, default_iterations, from_dict

log = logging.getLogger(__name__)
RUN = "run"
SCORES_FILE = "scores.json"
Progress = Callable[..., Iterable]


@dataclass
class Cell:
    setting: Setting
    row: Row
    seed: int
    setting_index: int

    @property
    def name(self) -> str:
        return f"{self.setting.key}.{self.row.key}.seed{self.seed}"


def plan(protocol: Protocol, scale: Scale, seeds: int, rows: list[str] | None) -> list[Cell]:
    """The cells to run, in table order (setting, row, seed)."""
    keys = [r.key for r in protocol.rows]
    chosen = rows or list(scale.rows or keys)
    unknown = [r for r in chosen if r not in keys]
    if unknown:
        raise InputError(f"--methods {' '.join(unknown)}: not rows of protocol '{protocol.name}' (rows: "
                         f"{', '.join(keys)})")
    cells = []
    for i, setting in enumerate(protocol.settings):
        for row in protocol.rows:
            if row.key in chosen and (row.settings is None or setting.key in row.settings):
                cells += [Cell(setting, row, s, i) for s in range(seeds)]
    if not cells:
        raise InputError(f"--methods: no row of protocol '{protocol.name}' runs in any of its settings")
    missing = sorted({f"{c.row.key} (needs {c.row.generalist_of})" for c in cells
                      if c.row.generalist_of and c.row.generalist_of not in chosen})
    if missing:
        raise InputError(f"--methods: {', '.join(missing)}: a row that scores another row's tuned generalist needs "
                         "that row too")
    return cells


def train_config(protocol: Protocol, scale: Scale, cell: Cell, labelled: list[str] | None, device: str) -> TrainConfig:
    """The cell's TrainConfig; a row's or scale's option that the method or TrainConfig lacks is refused by name."""
    row = cell.row
    cls = methods.available().get(row.method)
    if cls is None:
        raise InputError(f"{protocol.source}: row '{row.key}': unknown method '{row.method}' (choose from "
                         f"{', '.join(methods.available())})")
    options = {**row.options, **scale.method_options.get(row.method, {})}
    try:
        options = asdict(cls.make_config(options))
    except InputError as exc:
        raise InputError(f"{protocol.source}: row '{row.key}': {exc}") from None
    iterations = scale.iterations or default_iterations(row.method)
    n_classes = len(protocol.classes)
    cfg = TrainConfig(method=row.method, method_options=options, iterations=iterations, seed=cell.seed, device=device,
                      patch_size=tuple(scale.patch_size), batch_size=scale.batch_size, labelled_bs=scale.labelled_bs,
                      net=NetConfig(width=scale.width, dropout=scale.dropout, out_channels=n_classes + 1),
                      # validation only when the protocol holds scans out for it (the papers do not)
                      val_every=max(1, iterations // 10) if protocol.split.val else iterations,
                      ckpt_every=max(1, iterations // 10),
                      labelled_cases=tuple(labelled) if labelled is not None else None,
                      active=row.active, budget=_budget(protocol, scale, cell) if row.active else None)
    if scale.train or row.train:
        cfg = from_dict(TrainConfig, {**json.loads(cfg.to_json()), **scale.train, **row.train},
                        f"{protocol.source}: the 'train' options of the scale or of row '{row.key}'")
    return cfg.check()


def _budget(protocol: Protocol, scale: Scale, cell: Cell) -> int:
    return int(scale.labelled.get(cell.setting.key, cell.setting.labelled))


def _labels_kind(cell: Cell) -> str:
    return cell.row.labels or cell.setting.labels


def setup_labels(project, cell: Cell, labelled: list[str]) -> None:
    """Cross-labels of the cell's labelled scans: three slices at the ground truth's centre (``cross``), or
    the whole label (``dense``: a cross-label without unlabelled voxels, for methods that read cross-labels)."""
    from fmabs_core.active.expert import simulated_crosslabel

    for cid in labelled:
        path = project.crosslabel_path(cid)
        if path.exists():
            continue
        dense = project.load_label(cid)
        cross = simulated_crosslabel(dense.array, {}, "truth")[0] if _labels_kind(cell) == "cross" else dense.array
        io.save_like(cross.astype(np.uint8), dense, path)


def _check_resume(run_dir: Path, cfg: TrainConfig, cell: Cell) -> None:
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        return
    changed = {k: v for k, v in TrainConfig.load(saved).differences(cfg).items() if k not in MUTABLE_ON_RESUME}
    if changed:
        said = "; ".join(f"{k}: saved {a!r}, protocol {b!r}" for k, (a, b) in changed.items())
        raise InputError(f"cell {cell.name}: its run ({run_dir}) was started with other options ({said}); "
                         "restore the protocol, or use a new --out")


def run_cell(protocol: Protocol, scale: Scale, cell: Cell, out: Path, split: D.Split, prepared: Path,
             device: str, progress: Progress | None) -> dict:
    """Train (or resume) one cell, then score its final model on the test scans; returns its scores."""
    from fmabs_core.pipelines import train

    folder = out / "cells" / cell.name
    done = folder / SCORES_FILE
    if done.exists():
        log.info("cell %s: finished before, skipped", cell.name)
        return json.loads(done.read_text(encoding="utf-8"))
    if cell.row.generalist_of:
        return _score_generalist_of(cell, out, split, prepared, scale, device, progress)
    project = D.cell_project(folder / "project", prepared, split, protocol.classes)
    labelled: list[str] | None
    if cell.row.all_labelled:
        labelled = list(split.train)
    elif cell.row.active:
        labelled = None  # the active hook chooses (and the simulated expert labels) during training
    else:
        labelled = D.choose_labelled(split.train, _budget(protocol, scale, cell), cell.seed, cell.setting_index,
                                     split.seed)
    if labelled is not None:
        setup_labels(project, cell, labelled)
    cfg = train_config(protocol, scale, cell, labelled if not cell.row.all_labelled else None, device)
    run_dir = project.run_dir(RUN)
    t0 = time.time()
    resumed = run_dir.exists()
    if not (run_dir / MODEL_FILE).exists():
        _check_resume(run_dir, cfg, cell)
        log.info("cell %s: training %s (%d iterations)%s", cell.name, cfg.method, cfg.iterations,
                 ", resuming" if resumed else "")
        outcome = train(project, RUN, cfg, progress=progress)
        if outcome.state != DONE:
            raise FmabsError(f"cell {cell.name}: training ended {outcome.state} ({outcome.message}); the run folder "
                             f"is {run_dir}. Run the same command again to resume it.")
    train_s = time.time() - t0
    t1 = time.time()
    scores = score_cell(run_dir, split, prepared, scale, device, progress)
    result = {"cell": cell.name, "setting": cell.setting.key, "row": cell.row.key, "method": cell.row.method,
              "seed": cell.seed, "iterations": cfg.iterations, "labelled": labelled if labelled is not None else
              _active_choice(project), "resumed": resumed, "train_seconds_this_call": train_s,
              "predict_seconds": time.time() - t1, "run": str(run_dir),
              "cases": [s.as_dict() for s in scores], "summary": summarise(scores)}
    io.atomic_write_text(done, json.dumps(clean(result), indent=2))
    # the cell's preprocessed scans (--scan-store disk) are a cache of its linked scans: at the paper's scale about
    # 1 GB per cell, so a finished cell does not keep them
    shutil.rmtree(project.root / STORE_DIR, ignore_errors=True)
    return clean(result)


def _score_generalist_of(cell: Cell, out: Path, split: D.Split, prepared: Path, scale: Scale, device: str,
                         progress: Progress | None) -> dict:
    """A ``generalist_of`` row: the tuned generalist of the same setting and seed's CFR cell (run before it, in
    table order), scored on the test scans; nothing is trained."""
    source_name = f"{cell.setting.key}.{cell.row.generalist_of}.seed{cell.seed}"
    source = out / "cells" / source_name
    if not (source / SCORES_FILE).exists():
        raise FmabsError(f"cell {cell.name}: cell {source_name} has not finished; run the same command again")
    ran = json.loads((source / SCORES_FILE).read_text(encoding="utf-8"))
    run_dir = source / "project" / "runs" / RUN
    t1 = time.time()
    scores = score_cell(run_dir, split, prepared, scale, device, progress, generalist=True)
    result = {"cell": cell.name, "setting": cell.setting.key, "row": cell.row.key, "method": cell.row.method,
              "seed": cell.seed, "iterations": ran["iterations"], "labelled": ran["labelled"], "resumed": False,
              "train_seconds_this_call": 0.0, "predict_seconds": time.time() - t1, "run": str(run_dir),
              "scored": "tuned generalist", "cases": [s.as_dict() for s in scores], "summary": summarise(scores)}
    (out / "cells" / cell.name).mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "cells" / cell.name / SCORES_FILE, json.dumps(clean(result), indent=2))
    return clean(result)


def _active_choice(project) -> list[str]:
    return sorted(project.crosslabelled())


def score_cell(run_dir: Path, split: D.Split, prepared: Path, scale: Scale, device: str,
               progress: Progress | None, generalist: bool = False) -> list[CaseScores]:
    """The final model on every test scan: predicted at the scale's resolution, scored at the scan's own
    (probabilities resampled back), against its original label. ``generalist``: the run's tuned generalist
    (a CFR run's LoRA adapter) instead, prompt-free on tiled slices, by the same sliding windows."""
    from fmabs_core.device import resolve_device
    from fmabs_core.inference.predict import load_model, overlap_for_stride, predict_proba

    dev = resolve_device(device)
    if generalist:
        from fmabs_core.generalist.tiled import load_tuned

        net = load_tuned(run_dir / ADAPTER_FILE, dev)
        patch = tuple(net.adapter_meta.get("patch_size") or scale.patch_size)
    else:
        net, meta = load_model(run_dir, dev)
        patch = tuple(meta["patch_size"])
    overlap = overlap_for_stride(patch, tuple(scale.stride)) if scale.stride else scale.overlap
    test_dir = prepared / "test"
    scores = []
    for cid in (progress or (lambda items, **kw: items))(split.test, desc="scoring test scans"):
        image = io.load_image(test_dir / "images" / f"{cid}.nii.gz")
        probs = predict_proba(net, image.array, patch, overlap, dev, mode=scale.blend)
        truth = io.load_label(test_dir / "truth" / f"{cid}.nii.gz")
        probs = D.upsample_probabilities(probs, truth.array.shape)
        scores.append(score_case(cid, probs.argmax(0).astype(np.uint8), truth.array, truth.spacing))
    return scores


def _write_once(path: Path, text: str, what: str) -> None:
    """Write ``text``; if the file exists it must say the same (a reproduction never changes its protocol)."""
    if path.exists():
        if json.loads(path.read_text(encoding="utf-8")) != json.loads(text):
            raise InputError(f"{path}: this output folder holds a reproduction with another {what}; use a new --out "
                             "(or the same protocol, scale and data as before)")
        return
    io.atomic_write_text(path, text)


def check_out(out: Path, train_dir: Path, test_dir: Path | None) -> None:
    out_r = out.resolve()
    for option, folder in (("--train", train_dir), ("--test", test_dir)):
        if folder is None:
            continue
        f = Path(folder).resolve()
        if out_r == f or f in out_r.parents or out_r in f.parents:
            raise InputError(f"--out {out}: overlaps {option} {folder}; choose a folder outside your data")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and not (out / "protocol.json").exists():
        found = sorted(p.name for p in out.iterdir())
        if found:  # not an earlier reproduction's folder: the report's files would replace the user's
            raise InputError(f"--out {out}: holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}, "
                             "and is not the folder of an earlier reproduction; choose a new or empty folder "
                             "(or an earlier reproduction's, to resume it)")
    if not out.exists() and not out.parent.is_dir():
        raise InputError(f"--out {out}: its parent folder {out.parent} does not exist")


def reproduce(protocol: Protocol, train_dir: Path, test_dir: Path | None, out: Path, seeds: int = 2,
              scale_name: str = "cpu", rows: list[str] | None = None, device: str = "auto",
              progress: Progress | None = None, on_cell: Callable[[int, int, Cell], None] | None = None) -> dict:
    """Run (or resume) every cell of ``protocol`` at ``scale_name``, then write the report; returns it."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1 (got {seeds})")
    scale = protocol.scale(scale_name)
    train_dir, out = Path(train_dir), Path(out)
    check_out(out, train_dir, test_dir)
    cells = plan(protocol, scale, seeds, rows)
    for cell in cells:  # every row's and the scale's options checked before anything is written
        train_config(protocol, scale, cell, None, device)
    split, pairs = D.make_split(protocol, scale, train_dir, Path(test_dir) if test_dir else None)
    D.check_resample({c: pairs[c] for c in split.train + split.val + split.test}, scale.resample)
    out.mkdir(exist_ok=True)
    _write_once(out / "protocol.json", json.dumps({"protocol": protocol.to_dict(), "scale": scale_name}, indent=2),
                "protocol or scale")
    _write_once(out / "split.json", split.to_json(), "split (other data?)")
    log.info("split: %d training (%d validation), %d test scans; %s", len(split.train) + len(split.val),
             len(split.val), len(split.test), split.how)
    prepared = out / "data" / scale_name
    D.prepare(pairs, split.train + split.val, prepared, scale.resample, progress or (lambda i, **k: i))
    _prepare_test(pairs, split.test, prepared / "test", scale.resample, progress)
    results = []
    for i, cell in enumerate(cells):
        if on_cell:
            on_cell(i, len(cells), cell)
        results.append(run_cell(protocol, scale, cell, out, split, prepared, device, progress))
    return write_report(protocol, scale_name, cells, results, split, out)


def _prepare_test(pairs, cases: list[str], folder: Path, factor: float, progress: Progress | None) -> None:
    """Test scans: the image at the scale's resolution, the truth at its own (scores are at full resolution)."""
    todo = [c for c in cases if not ((folder / "images" / f"{c}.nii.gz").exists()
                                     and (folder / "truth" / f"{c}.nii.gz").exists())]
    one = functools.partial(_prepare_one_test, pairs, folder=folder, factor=factor)
    for _ in (progress or (lambda items, **kw: items))(D.in_threads(one, todo), total=len(todo),
                                                        desc="preparing test scans"):
        pass


def _prepare_one_test(pairs, cid: str, *, folder: Path, factor: float) -> str:
    image, label = pairs[cid]
    img, lab = io.load_image(image), io.load_label(label, None)
    problems = io.check_pair(img, lab)
    if problems:
        raise InputError("; ".join(problems))
    canon = io.Volume(lab.array, lab.affine, lab.affine, lab.array.shape, None)
    io.save_like(lab.array.astype(np.uint8), canon, folder / "truth" / f"{cid}.nii.gz", np.uint8)
    small = D.resample(img, factor, 1)
    io.save_like(small.array.astype(np.float32), small, folder / "images" / f"{cid}.nii.gz", np.float32)
    return cid
