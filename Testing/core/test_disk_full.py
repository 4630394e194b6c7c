"""A disk that fills while a long command writes: a clear error naming the file (exit 2), nothing corrupt or
half-written left behind, and once space is freed the same command finishes with what an uninterrupted run gives.

The small disk is a real filesystem: a tmpfs of a few MB mounted by the test (root, or a user namespace), grown
with a remount to "free space"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fmabs_core.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from faults import TINY, leftovers  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MOUNT_REASON = "cannot mount a small tmpfs here (needs root)"


class SmallDisk:
    def __init__(self, where: Path, mb: float):
        self.path = where
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mb * 1024)}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"{MOUNT_REASON}: {done.stderr.strip()}")

    def grow(self, mb: float) -> None:
        """Free space: the same filesystem, larger."""
        subprocess.run(["mount", "-o", f"remount,size={int(mb * 1024)}k", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture()
def small_disk(tmp_path):
    disks = []

    def make(mb: float) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", mb))
        return disks[-1]

    yield make
    for d in disks:
        d.close()


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _all_readable(folder: Path) -> list[str]:
    """Every file a command left: checkpoints and models load, NIfTI files read, JSON parses."""
    bad = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        try:
            if p.suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.name.endswith((".nii.gz", ".nii")):
                np.asarray(nib.load(str(p)).dataobj)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the finding
            bad.append(f"{p}: {type(exc).__name__}: {exc}")
    return bad


def _project(tmp_path: Path, template: Path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(template, root)
    return root


def _train_argv(project: Path) -> list[str]:
    return ["train", "--project", str(project), "--run", "r", "--method", "mt", "--iterations", "12",
            "--ckpt-every", "2", *TINY]


def test_training_on_a_disk_that_fills(template, tmp_path, small_disk, capsys):
    ref = _project(tmp_path / "ref", template)
    assert main(_train_argv(ref)) == 0
    need = _size_mb(ref)
    disk = small_disk(_size_mb(template) + 0.4 * need)  # fills before the run's second checkpoint
    proj = disk.path / "proj"
    shutil.copytree(template, proj)
    capsys.readouterr()
    assert main(_train_argv(proj)) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and str(proj / "runs" / "r") in err and "Traceback" not in err
    assert not _all_readable(proj) and not leftovers(proj)
    disk.grow(_size_mb(template) + 3 * need)
    assert main(_train_argv(proj)) == 0
    a = torch.load(ref / "runs" / "r" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(proj / "runs" / "r" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one, bit for bit


def test_predict_into_a_folder_on_a_disk_that_fills(template, tmp_path, small_disk, phantom_data, capsys):
    ref = _project(tmp_path / "ref", template)
    assert main(["train", "--project", str(ref), "--run", "m", "--method", "sup", "--iterations", "2", *TINY]) == 0
    args = ["predict", "--model", str(ref / "runs" / "m"), "--input", str(phantom_data / "imagesTr"),
            "--probabilities", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "want")]) == 0
    disk = small_disk(0.6 * _size_mb(tmp_path / "want"))
    out = disk.path / "seg"
    capsys.readouterr()
    assert main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and str(out) in err and "Traceback" not in err
    assert not _all_readable(out) and not leftovers(out)
    disk.grow(4 * _size_mb(tmp_path / "want"))
    assert main([*args, "--output", str(out)]) == 0  # the same command: keeps what it finished, does the rest
    want = sorted(p.name for p in (tmp_path / "want").glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == want
    for name in want:
        assert np.array_equal(np.asarray(nib.load(str(out / name)).dataobj),
                              np.asarray(nib.load(str(tmp_path / "want" / name)).dataobj))


def test_import_onto_a_disk_that_fills(tmp_path, small_disk, phantom_data, capsys):
    assert main(["import", str(phantom_data), "--project", str(tmp_path / "ref")]) == 0
    need = _size_mb(tmp_path / "ref")
    disk = small_disk(0.5 * need)
    proj = disk.path / "proj"
    capsys.readouterr()
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and str(proj) in err and "Traceback" not in err
    assert not _all_readable(proj) and not leftovers(proj)
    disk.grow(4 * need)
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    assert main(["check", "--project", str(proj)]) == 0
    ref, got = (json.loads((p / "fmabs.json").read_text()) for p in (tmp_path / "ref", proj))
    assert (got["cases"], got["split"]) == (ref["cases"], ref["split"])
