"""``fmabs predict`` into a folder goes on where an interrupted run of the same command stopped, and still never
takes a file it did not write (fmabs_core/inference/record.py)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.errors import InputError
from fmabs_core.inference.predict import InferenceConfig, predict_files
from fmabs_core.inference.record import LOCK_FILE, RECORD_FILE, folder_lock
from fmabs_core.training.config import TrainConfig
from fmabs_core.training.engine import Trainer
from fmabs_core.training.nets import NetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, template) -> Path:
    import shutil

    from fmabs_core.data.project import Project

    root = tmp_path_factory.mktemp("predict-resume") / "proj"
    shutil.copytree(template, root)
    cfg = TrainConfig(method="sup", iterations=2, seed=1, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                      labelled_bs=1, net=NetConfig(width=4, out_channels=2), val_every=100, ckpt_every=100)
    return Trainer(Project(root), "r", cfg).train().model


def _scans(phantom_data: Path, n: int = 3) -> list[Path]:
    return sorted((phantom_data / "imagesTr").iterdir())[:n]


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_a_rerun_keeps_finished_outputs_and_does_the_rest(model, phantom_data, tmp_path, monkeypatch):
    scans, out, ref = _scans(phantom_data), tmp_path / "out", tmp_path / "ref"
    predict_files(model, scans, ref, save_probabilities=True)
    # an interrupted run: the first scan finished and recorded, the second's temporary file left behind
    predict_files(model, scans[:1], out, save_probabilities=True)
    stale = out / f".{scans[1].name}.abc123.tmp.nii.gz"
    stale.write_bytes(b"half a file")
    first = (out / scans[0].name).stat().st_mtime_ns
    segmented = []
    import fmabs_core.inference.predict as predict

    real = predict._predict_one
    monkeypatch.setattr(predict, "_predict_one", lambda net, path, *a, **k: segmented.append(path.name) or
                        real(net, path, *a, **k))
    written = predict_files(model, scans, out, save_probabilities=True)
    assert segmented == [s.name for s in scans[1:]]  # the finished scan is not segmented again
    assert [p.name for p in written] == [s.name for s in scans]
    assert (out / scans[0].name).stat().st_mtime_ns == first
    assert not stale.exists()
    got, want = _arrays(out), _arrays(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_users_file_of_the_same_name_is_still_refused(model, phantom_data, tmp_path):
    scans, out = _scans(phantom_data, 2), tmp_path / "out"
    predict_files(model, scans[:1], out)
    mine = out / scans[1].name
    mine.write_bytes(b"the user's own segmentation")
    with pytest.raises(InputError, match=rf"{scans[1].name}.*--overwrite"):
        predict_files(model, scans, out)
    assert mine.read_bytes() == b"the user's own segmentation"


def test_an_output_changed_since_or_other_settings_are_not_taken_as_done(model, phantom_data, tmp_path):
    scans, out = _scans(phantom_data, 1), tmp_path / "out"
    predict_files(model, scans, out)
    with pytest.raises(InputError, match="--overwrite"):  # another overlap: another answer
        predict_files(model, scans, out, InferenceConfig(overlap=0.25))
    target = out / scans[0].name
    img = nib.load(str(target))
    edited = np.asarray(img.dataobj).copy()
    edited[0, 0, 0] = 1 - edited[0, 0, 0]
    nib.save(nib.Nifti1Image(edited, img.affine, img.header), str(target))  # the user corrected it by hand
    with pytest.raises(InputError, match="--overwrite"):
        predict_files(model, scans, out)
    assert np.array_equal(np.asarray(nib.load(str(target)).dataobj), edited)


def test_a_changed_scan_is_segmented_again_only_with_overwrite(model, phantom_data, tmp_path):
    scan = tmp_path / "in" / "c1.nii.gz"
    scan.parent.mkdir()
    scan.write_bytes(_scans(phantom_data, 1)[0].read_bytes())
    out = tmp_path / "out"
    predict_files(model, [scan], out)
    os.utime(scan, ns=(scan.stat().st_atime_ns, scan.stat().st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="c1.nii.gz"):
        predict_files(model, [scan], out)
    assert predict_files(model, [scan], out, overwrite=True)


def test_two_commands_do_not_write_into_one_folder_at_once(model, phantom_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = folder_lock(out)
    try:
        with pytest.raises(InputError, match="another fmabs predict is writing into this folder"):
            predict_files(model, _scans(phantom_data, 1), out)
    finally:
        held.release()
    assert not (out / RECORD_FILE).exists()
    predict_files(model, _scans(phantom_data, 1), out)
    assert (out / RECORD_FILE).is_file() and (out / LOCK_FILE).exists()


def test_an_output_begun_but_not_recorded_as_finished_is_written_again(model, phantom_data, tmp_path):
    """A kill after the file was begun and before its hash was recorded: the file is this command's, redone."""
    from dataclasses import asdict

    from fmabs_core.data.store import sha256_of
    from fmabs_core.inference.predict import json_safe
    from fmabs_core.inference.record import PredictRecord

    scans, out, ref = _scans(phantom_data, 2), tmp_path / "out", tmp_path / "ref"
    predict_files(model, scans, ref)
    out.mkdir()
    record = PredictRecord(out, sha256_of(model), {**json_safe(asdict(InferenceConfig())), "probabilities": False})
    record.begin([out / scans[0].name], scans[0])
    (out / scans[0].name).write_bytes(b"cut short")
    predict_files(model, scans, out)
    got, want = _arrays(out), _arrays(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
