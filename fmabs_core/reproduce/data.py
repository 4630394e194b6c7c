"""The reproduction's data: the fixed split, scans resampled for a scale, and one project per table cell.

Everything is written under the output folder; the user's scans are only read. A cell's project holds
hard links to the prepared scans (copies where links are impossible), so that each cell has its own
cross-labels and round history (an active row writes cross-labels as it trains) at no disk cost.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from scipy import ndimage

from fmabs_core.contract import CROSSLABELS_DIR, IMAGES_DIR, LABELS_DIR, PROJECT_FILE, RUNS_DIR
from fmabs_core.data import io
from fmabs_core.data.store import STORE_DIR
from fmabs_core.data.project import Project, plan_import
from fmabs_core.errors import InputError
from fmabs_core.reproduce.protocol import Protocol, Scale

log = logging.getLogger(__name__)


@dataclass
class Split:
    """The scans of one reproduction, fixed before any training (``split.json``)."""

    train_dir: str
    test_dir: str
    held_out: bool  # the test scans were held out of ``train_dir`` (no separate test folder)
    seed: int
    train: list[str]  # training scans (labelled ones are chosen per setting and seed among them)
    val: list[str]  # training scans held out for validation (the papers: none)
    test: list[str]
    how: str  # the rule, in words

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _pairs(folder: Path, option: str) -> dict[str, tuple[Path, Path]]:
    """case id -> (image, label); every scan must have its label (the expert is simulated, scores need truth)."""
    if not Path(folder).is_dir():
        raise InputError(f"{option} {folder}: no such folder; give an imagesTr/labelsTr folder (or a folder of scans "
                         "with a labelsTr/ beside)")
    plan = plan_import(folder)
    if plan.problems:
        raise InputError(f"{option} {folder}: {plan.problems[0].message}")
    out = {}
    for image, label in plan.pairs:
        cid = io.case_id(image)
        if label is None:
            raise InputError(f"{option} {folder}: scan {image.name} has no label; a reproduction needs every scan's "
                             "dense label (labelsTr/<case>.nii.gz)")
        out[cid] = (image, label)
    return out


def make_split(protocol: Protocol, scale: Scale, train_dir: Path, test_dir: Path | None) -> tuple[Split, dict]:
    """The split of ``protocol`` at ``scale``: seeded shuffles of sorted case ids, so the same data and protocol
    give the same split on any machine. Returns (split, case id -> (image, label) of every scan used)."""
    sp = protocol.split
    train_pairs = _pairs(train_dir, "--train")
    held_out = test_dir is None or Path(test_dir).resolve() == Path(train_dir).resolve()
    if held_out:
        ids = sorted(train_pairs)
        random.Random(sp.seed).shuffle(ids)
        if sp.test >= len(ids):
            raise InputError(f"--train {train_dir}: {len(ids)} scans, but the protocol holds out {sp.test} as test "
                             "scans; give a --test folder or more scans")
        test, pool = sorted(ids[: sp.test]), sorted(ids[sp.test:])
        test_pairs = train_pairs
        how = (f"the {sp.test} test scans are the first of --train's sorted case ids shuffled with "
               f"random.Random({sp.seed}); the rest is the training pool")
    else:
        test_pairs = _pairs(Path(test_dir), "--test")
        both = sorted(set(train_pairs) & set(test_pairs))
        if both:
            raise InputError(f"--test {test_dir}: case(s) {', '.join(both[:5])} are also in --train {train_dir}; a "
                             "test scan must not be trained on")
        test, pool = sorted(test_pairs), sorted(train_pairs)
        how = "every scan of --test is a test scan, every scan of --train a training scan"
    if scale.n_train is not None and scale.n_train < len(pool):
        pool = sorted(random.Random(sp.seed + 1).sample(pool, scale.n_train))
        how += f"; {scale.n_train} training scans drawn with random.Random({sp.seed + 1}).sample"
    if scale.n_test is not None and scale.n_test < len(test):
        test = sorted(random.Random(sp.seed + 2).sample(test, scale.n_test))
        how += f"; {scale.n_test} test scans drawn with random.Random({sp.seed + 2}).sample"
    val = sorted(random.Random(sp.seed + 3).sample(pool, sp.val)) if sp.val else []
    if sp.val:
        how += f"; {sp.val} validation scans drawn from the training scans with random.Random({sp.seed + 3}).sample"
    train = [c for c in pool if c not in set(val)]
    if not train:
        raise InputError(f"--train {train_dir}: no training scan left after the split")
    pairs = {c: train_pairs[c] for c in pool}
    pairs.update({c: test_pairs[c] for c in test})
    return Split(str(train_dir), str(test_dir or train_dir), held_out, sp.seed, train, val, test, how), pairs


def choose_labelled(train: list[str], n: int, seed: int, setting_index: int, split_seed: int) -> list[str]:
    """The labelled scans of one setting and seed: the same for every row (paired comparisons)."""
    if n > len(train):
        raise InputError(f"the protocol labels {n} scans but only {len(train)} training scans are used; lower the "
                         "scale's 'labelled' or raise 'n_train'")
    rng = np.random.default_rng([split_seed, seed, setting_index])
    return sorted(rng.choice(sorted(train), size=n, replace=False).tolist())


# ---- resampling -------------------------------------------------------------------------------------
#: the fewest voxels a resampled scan keeps along an axis (below, no 3D model or metric means anything)
MIN_RESAMPLED_SIDE = 8


def resampled_shape(shape: Any, factor: float) -> np.ndarray:
    """The voxels per axis of a scan of ``shape`` resampled by ``factor`` (at least 1 each)."""
    return np.maximum(1, np.round(np.array(shape[:3]) * factor)).astype(int)


def check_resample(pairs: dict[str, tuple[Path, Path]], factor: float) -> None:
    """Every scan keeps at least MIN_RESAMPLED_SIDE voxels per axis at the scale's factor: read from the headers,
    before the reproduction writes anything (a bad scale must not leave a protocol.json that blocks the fix)."""
    import nibabel as nib

    for image, _label in pairs.values():
        old = nib.load(str(image)).shape[:3]
        new = resampled_shape(old, factor)
        if new.min() < MIN_RESAMPLED_SIDE:
            raise InputError(f"the scale's 'resample' {factor:g} makes {image} of {tuple(int(v) for v in old)} "
                             f"voxels {tuple(int(v) for v in new)}: fewer than {MIN_RESAMPLED_SIDE} along an axis. "
                             "Give the protocol's scale a larger 'resample' (a fraction of each axis, e.g. 0.5).")


def resample(vol: io.Volume, factor: float, order: int) -> io.Volume:
    """``vol`` with each axis scaled by ``factor`` (voxel edges aligned, affine adjusted); 1: itself."""
    if factor == 1.0:
        return vol
    old = np.array(vol.array.shape[:3])
    new = resampled_shape(old, factor)
    arr = ndimage.zoom(vol.array, new / old, order=order, grid_mode=True, mode="grid-constant" if order == 0
                       else "nearest")
    scale = old / new
    affine = vol.affine.copy()
    affine[:3, :3] = vol.affine[:3, :3] * scale  # each column: one voxel step, now longer
    affine[:3, 3] = vol.affine[:3, :3] @ ((scale - 1) / 2) + vol.affine[:3, 3]  # the first voxel's centre
    return io.Volume(arr, affine, affine, tuple(arr.shape), None)


def upsample_probabilities(probs: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Class probabilities (C, ...) back on the original grid (linear, voxel edges aligned)."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    zoom = np.array(shape) / np.array(probs.shape[1:])
    return np.stack([ndimage.zoom(p, zoom, order=1, grid_mode=True, mode="nearest") for p in probs])


def prepare(pairs: dict[str, tuple[Path, Path]], cases: Iterable[str], folder: Path, factor: float,
            progress=lambda items, **kw: items) -> None:
    """Write ``folder/images|labels/<case>.nii.gz`` on the canonical grid, resampled by ``factor``; files that
    exist are kept (an interrupted preparation goes on)."""
    todo = [c for c in cases if not ((folder / "images" / f"{c}.nii.gz").exists()
                                     and (folder / "labels" / f"{c}.nii.gz").exists())]
    def one(cid: str) -> str:
        image, label = pairs[cid]
        img = io.load_image(image)
        lab = io.load_label(label, None)
        problems = io.check_pair(img, lab)
        if problems:
            raise InputError("; ".join(problems))
        small_lab = resample(lab, factor, 0)
        io.save_like(small_lab.array.astype(np.uint8), small_lab, folder / "labels" / f"{cid}.nii.gz", np.uint8)
        small = resample(img, factor, 1)
        io.save_like(small.array.astype(np.float32), small, folder / "images" / f"{cid}.nii.gz", np.float32)
        return cid

    for _ in progress(in_threads(one, todo), total=len(todo), desc="preparing scans"):
        pass


def in_threads(fn: Callable[[str], str], cases: list[str]) -> Iterator[str]:
    """``fn`` over ``cases`` on a few threads, yielding as each finishes: gzip and zoom release the GIL, so
    preparing 80 LA scans takes a fraction of the time on a machine with many cores (a typical GPU machine)."""
    workers = max(1, min(8, (os.cpu_count() or 1), len(cases)))
    if workers == 1:
        yield from map(fn, cases)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, cases)


# ---- one project per cell ------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def cell_project(root: Path, prepared: Path, split: Split, classes: dict[str, Any]) -> Project:
    """The cell's project (created, or completed after an interruption): the training and validation scans."""
    if root.exists() and not (root / PROJECT_FILE).exists():
        # our own half-made folder holds only the linked scans: redo it. Anything else (a run, a user's file)
        # is not ours to delete: say so and stop.
        ours = (IMAGES_DIR, LABELS_DIR, CROSSLABELS_DIR, RUNS_DIR, STORE_DIR)
        others = sorted([p.name for p in root.iterdir() if p.name not in ours and not p.name.startswith(".fmabs")]
                        + [f"{RUNS_DIR}/{p.name}" for p in (root / RUNS_DIR).glob("*")])
        if others:
            raise InputError(f"{root}: this cell's project has no {PROJECT_FILE} but holds {', '.join(others)}; "
                             "nothing here is deleted. Move the folder away (or delete it if you do not need it) "
                             "and run the same command again to redo the cell.")
        shutil.rmtree(root)
    project = Project.create(root, {int(k): v for k, v in classes.items()}, exist_ok=True)
    cases = split.train + split.val
    for cid in cases:
        _link(prepared / "images" / f"{cid}.nii.gz", project.image_path(cid))
        _link(prepared / "labels" / f"{cid}.nii.gz", project.label_path(cid))

    def change(meta: dict[str, Any]) -> None:
        meta["cases"] = list(cases)
        meta["split"] = {"train": list(split.train), "val": list(split.val)}

    if project.cases != cases:
        project.update(change)
    return project
