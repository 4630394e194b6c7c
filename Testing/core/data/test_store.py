"""fmabs_core.data.store: scans preprocessed once into memory-mapped files, exact, rebuilt when a scan changes,
built once when several processes ask at once, and never half-written in use after a kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fmabs_core.data import io
from fmabs_core.data.intensity import zscore
from fmabs_core.data.phantom import write_dataset
from fmabs_core.data.store import ScanStore


@pytest.fixture
def scans(tmp_path) -> Path:
    return write_dataset(tmp_path / "data", n_cases=2, shape=(24, 20, 16), seed=5)


def _image(scans: Path, case: str = "phantom_000") -> Path:
    return scans / "imagesTr" / f"{case}.nii.gz"


def test_stored_arrays_equal_what_training_read_into_memory(scans, tmp_path):
    store = ScanStore(tmp_path / "store")
    image = store.get("phantom_000", "image", _image(scans), io.load_image)
    label = store.get("phantom_000", "label", scans / "labelsTr" / "phantom_000.nii.gz",
                      lambda p: io.load_label(p, 1))
    in_ram = io.load_image(_image(scans))
    assert isinstance(image.array, np.memmap) and not image.array.flags.writeable
    np.testing.assert_array_equal(image.array, zscore(in_ram.array))  # bit for bit
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, io.load_label(scans / "labelsTr" / "phantom_000.nii.gz", 1).array)
    window = (slice(3, 19), slice(2, 18), slice(4, 12))  # a patch read from the file is the patch cut in memory
    np.testing.assert_array_equal(np.asarray(image.array[window]), zscore(in_ram.array)[window])
    assert image.grid.array.shape == in_ram.array.shape and image.grid.array.strides == (0, 0, 0)
    np.testing.assert_array_equal(image.grid.affine, in_ram.affine)
    assert image.grid.source_shape == in_ram.source_shape


def test_a_changed_scan_is_preprocessed_again_and_a_touched_one_is_not(scans, tmp_path):
    store = ScanStore(tmp_path / "store")
    path = _image(scans)
    first = np.array(store.get("phantom_000", "image", path, io.load_image).array)
    stored = tmp_path / "store" / "phantom_000.image.npy"
    built = stored.stat().st_mtime_ns
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same bytes, new time
    np.testing.assert_array_equal(store.get("phantom_000", "image", path, io.load_image).array, first)
    assert stored.stat().st_mtime_ns == built  # its hash was checked, nothing rebuilt
    import nibabel as nib

    img = nib.load(str(path))  # changed contents, as a user re-exporting the scan would
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * 2.0 + 1.0 + (np.arange(img.shape[0]) % 3)[:, None, None],
                             img.affine), str(path))
    changed = store.get("phantom_000", "image", path, io.load_image).array
    np.testing.assert_array_equal(changed, zscore(io.load_image(path).array))
    assert not np.array_equal(changed, first)


def _get_counting(folder: str, path: str, counter: str) -> float:
    def load(p: Path) -> io.Volume:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one builds
        return io.load_image(p)

    return float(np.asarray(ScanStore(Path(folder)).get("phantom_000", "image", Path(path), load).array).sum())


def test_two_processes_build_a_scan_once_and_read_the_same_file(scans, tmp_path):
    counter = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        sums = pool.starmap(_get_counting, [(str(tmp_path / "store"), str(_image(scans)), str(counter))] * 2)
    assert counter.read_text().splitlines() == ["built"]
    assert sums[0] == sums[1]


def _build_and_hang(folder: str, path: str, ready: str) -> None:
    def load(p: Path) -> io.Volume:
        Path(ready).write_text("building")
        time.sleep(600)  # killed here, holding the store's lock, with nothing written yet
        return io.load_image(p)

    ScanStore(Path(folder)).get("phantom_000", "image", Path(path), load)


def test_a_kill_while_preprocessing_leaves_nothing_used_later(scans, tmp_path):
    """SIGKILL during a build (the lock held, a temporary file possibly begun): the next reader builds the scan
    itself: no wait on a dead process's lock, no half-written array."""
    ready = tmp_path / "ready"
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_build_and_hang, args=(str(tmp_path / "store"), str(_image(scans)), str(ready)))
    child.start()
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never started building"
    (tmp_path / "store" / ".phantom_000.image.npy.tmp").write_bytes(b"\x93NUMPY half")  # a torn write
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    started = time.time()
    image = ScanStore(tmp_path / "store").get("phantom_000", "image", _image(scans), io.load_image)
    assert time.time() - started < 30
    np.testing.assert_array_equal(image.array, zscore(io.load_image(_image(scans)).array))


def test_an_unreadable_manifest_means_rebuild_not_trust(scans, tmp_path):
    store = ScanStore(tmp_path / "store")
    store.get("phantom_000", "image", _image(scans), io.load_image)
    (tmp_path / "store" / "phantom_000.image.npy").write_bytes(b"not an array")  # damaged behind our back
    (tmp_path / "store" / "manifest.json").write_text("{ torn")
    image = store.get("phantom_000", "image", _image(scans), io.load_image)
    np.testing.assert_array_equal(image.array, zscore(io.load_image(_image(scans)).array))


def test_a_damaged_array_under_a_valid_manifest_is_rebuilt(scans, tmp_path):
    ScanStore(tmp_path / "store").get("phantom_000", "image", _image(scans), io.load_image)
    (tmp_path / "store" / "phantom_000.image.npy").write_bytes(b"\x93NUMPY torn")  # the manifest still vouches
    image = ScanStore(tmp_path / "store").get("phantom_000", "image", _image(scans), io.load_image)
    np.testing.assert_array_equal(image.array, zscore(io.load_image(_image(scans)).array))
