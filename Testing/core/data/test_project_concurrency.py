"""Several processes changing one project at once (two people, or the Slicer module and a terminal): fmabs.json is
never lost or corrupted, every scan added is listed once, and a case id is never given one scan's image under
another's entry."""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import pytest

from fmabs_core.data.phantom import write_dataset
from fmabs_core.data.project import Project
from fmabs_core.errors import FmabsError


def _add_at(root: str, image: str, case: str, start_at: float) -> str:
    time.sleep(max(0.0, start_at - time.time()))  # both processes reach the check at the same moment
    try:
        Project(root).add_case(image, case=case)
        return "added"
    except FmabsError as exc:
        return str(exc)


def test_two_imports_under_one_case_id_give_one_scan_and_one_refusal(tmp_path):
    root = Project.create(tmp_path / "proj", {1: "atrium"}).root
    sources = [write_dataset(tmp_path / f"d{k}", n_cases=1, shape=(64, 64, 48), seed=k) / "imagesTr" / "phantom_000.nii.gz"
               for k in range(2)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        start_at = time.time() + 3.0
        outcomes = pool.starmap(_add_at, [(str(root), str(src), "scan1", start_at) for src in sources])
    assert sorted(o == "added" for o in outcomes) == [False, True], outcomes
    refusal = next(o for o in outcomes if o != "added")
    assert "already exists" in refusal
    project = Project(root)
    assert project.cases == ["scan1"] and project.split("train") == ["scan1"]
    winner = sources[outcomes.index("added")]
    assert project.image_path("scan1").read_bytes() == winner.read_bytes()  # the entry's own image


def _worker(root: str, images: list[str], seed: int, start_at: float) -> list[str]:
    rng = random.Random(seed)
    time.sleep(max(0.0, start_at - time.time()))
    project = Project(root)
    added = []
    for image in images:
        time.sleep(rng.uniform(0, 0.02))
        case = Path(image).name.split(".")[0]
        project.add_case(image, case=case)
        added.append(case)
        project.update(lambda meta: meta.setdefault("names", {}).update({case: f"{case} from worker {seed}"}))
        assert case in Project(root).cases  # every read in between is a whole, valid document
    return added


def test_random_interleavings_of_imports_and_updates_lose_nothing(tmp_path):
    root = Project.create(tmp_path / "proj", {1: "atrium"}).root
    data = write_dataset(tmp_path / "data", n_cases=12, shape=(24, 24, 16), seed=1)
    images = sorted(str(p) for p in (data / "imagesTr").glob("*.nii.gz"))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        start_at = time.time() + 3.0
        added = pool.starmap(_worker, [(str(root), images[k::3], k, start_at) for k in range(3)])
    project = Project(root)
    expected = sorted(c for part in added for c in part)
    assert sorted(project.cases) == expected and len(set(project.cases)) == 12
    names = project.read().get("names", {})
    assert sorted(names) == expected and all(names[c].startswith(c) for c in expected)
    assert not list(Path(root).glob("*.tmp")) and not list((Path(root) / "images").glob(".*"))
