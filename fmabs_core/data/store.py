"""Scans preprocessed once per project, read by memory mapping: training memory bounded by the patch.

Training used to hold every scan of the project in RAM as float32 (and every DDP rank its own copy). Here
each scan is turned once into what training reads (canonical orientation, z-scored float32 image, uint8
label and cross-label) and written as ``.npy`` files in ``<project>/preprocessed/``; training opens them
with ``numpy.load(mmap_mode="r")``, so a patch reads only its own pages, the page cache is shared by the
ranks and by later runs, and the operating system drops pages under memory pressure instead of the
kernel killing the run. nnU-Net v2 and MONAI's PersistentDataset make the same choice (uncompressed,
memory-mappable arrays on local disk).

``manifest.json`` records, per scan and per kind, the source file's size, modification time and sha256 and
the preprocessing version. An entry is used while the source file has the same size and modification time;
otherwise its hash is computed again and the arrays rebuilt when it changed. Files are written under a
lock (``filelock``: processes and ranks build each scan once) and moved into place atomically, the
manifest last, so a kill leaves either the old entry or the new one, never a half-written array in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from filelock import FileLock

from fmabs_core.data import io
from fmabs_core.data.intensity import zscore

log = logging.getLogger(__name__)

#: the project's folder of preprocessed scans
STORE_DIR = "preprocessed"
#: bump when what is stored changes (a stored array of an older version is rebuilt)
VERSION = 1
#: kinds of arrays per scan: the z-scored image, the dense label, the cross-label
KINDS = ("image", "label", "cross")


def file_signature(path: Path) -> dict[str, int]:
    """What tells, without reading it, that a file may have changed: its size and modification time."""
    st = Path(path).stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def grid_of(entry: dict[str, Any], path: Path) -> io.Volume:
    """The scan's grid (a :meth:`io.Volume.grid` placeholder) from its manifest entry: no voxel read."""
    shape = tuple(int(s) for s in entry["shape"])
    return io.Volume(np.broadcast_to(np.zeros((), np.uint8), shape), np.asarray(entry["affine"], float),
                     np.asarray(entry["source_affine"], float), tuple(int(s) for s in entry["source_shape"]), path)


@dataclass
class Stored:
    """One kind of one scan: the memory-mapped array and the grid of the file it came from."""

    array: np.ndarray
    grid: io.Volume


class ScanStore:
    """``get(case, kind, source, load)``: the array of ``load(source)`` as a read-only memory map, built once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest_path = self.folder / "manifest.json"
        #: the manifest as last read or written by this object: an entry found here is still checked against its
        #: source file, so reading the file once (not once per scan and kind) is enough for the scans it knows
        self._known: dict[str, Any] | None = None

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / ".lock"))

    def _manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # torn or edited: rebuilt, not trusted
            log.warning("%s: unreadable (%s); the preprocessed scans are rebuilt", self.manifest_path, exc)
            return {}
        return data if isinstance(data, dict) and data.get("version") == VERSION else {}

    def _array_path(self, case: str, kind: str) -> Path:
        return self.folder / f"{case}.{kind}.npy"

    def _current(self, manifest: dict[str, Any], case: str, kind: str, source: Path) -> dict[str, Any] | None:
        entry = manifest.get("scans", {}).get(case, {}).get(kind)
        if not entry or Path(entry.get("source", "")) != source.resolve():
            return None
        if not self._array_path(case, kind).is_file():
            return None
        if entry.get("signature") == file_signature(source):
            return entry
        if entry.get("sha256") == sha256_of(source):  # touched, not changed (a copy, a restored backup)
            return {**entry, "signature": file_signature(source), "_touched": True}
        return None

    def get(self, case: str, kind: str, source: Path, load: Callable[[Path], io.Volume],
            check: Callable[[io.Volume], None] | None = None) -> Stored:
        """The stored array of ``case``'s ``kind`` made from ``source`` by ``load`` (and accepted by ``check``,
        which raises to refuse it before anything is stored)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {KINDS}")
        source = Path(source)
        if self._known is None:
            self._known = self._manifest()
        entry = self._current(self._known, case, kind, source)
        if entry is None or entry.get("_touched"):
            entry = self._settle(case, kind, source, load, check, rebuild=False)
        try:
            array = np.load(self._array_path(case, kind), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # damaged behind the manifest's back: rebuilt, not trusted
            log.warning("%s: unreadable (%s); preprocessed again", self._array_path(case, kind), exc)
            entry = self._settle(case, kind, source, load, check, rebuild=True)
            array = np.load(self._array_path(case, kind), mmap_mode="r", allow_pickle=False)
        return Stored(array, grid_of(entry, source))

    def _settle(self, case: str, kind: str, source: Path, load: Callable[[Path], io.Volume],
                check: Callable[[io.Volume], None] | None, rebuild: bool) -> dict[str, Any]:
        """Under the lock (one builder per scan across processes and ranks; the others wait, then read): the
        current entry, built when missing, stale or ``rebuild``, and recorded in the manifest."""
        with self._lock():
            manifest = self._manifest()  # every writer holds this lock: what is read here stays current
            entry = None if rebuild else self._current(manifest, case, kind, source)
            if entry is None:
                entry = self._build(case, kind, source, load, check)
            entry.pop("_touched", None)
            manifest.setdefault("version", VERSION)
            manifest.setdefault("scans", {}).setdefault(case, {})[kind] = entry
            io.atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
            self._known = manifest
        return entry

    def _build(self, case: str, kind: str, source: Path, load: Callable[[Path], io.Volume],
               check: Callable[[io.Volume], None] | None) -> dict[str, Any]:
        signature = file_signature(source)
        volume = load(source)
        if check is not None:
            check(volume)
        array = zscore(volume.array) if kind == "image" else np.asarray(volume.array, np.uint8)
        path = self._array_path(case, kind)
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        log.debug("preprocessed %s (%s) into %s", case, kind, path)
        return {"source": str(source.resolve()), "signature": signature, "sha256": sha256_of(source),
                "dtype": str(array.dtype), "shape": list(volume.array.shape), "affine": volume.affine.tolist(),
                "source_affine": volume.source_affine.tolist(), "source_shape": list(volume.source_shape)}

    def drop(self, keep: set[str]) -> None:
        """Delete the arrays of scans no longer in the project (``keep``: the case ids that remain)."""
        with self._lock():
            manifest = self._manifest()
            gone = sorted(set(manifest.get("scans", {})) - keep)
            for case in gone:
                for kind in KINDS:
                    self._array_path(case, kind).unlink(missing_ok=True)
                del manifest["scans"][case]
            if gone:
                io.atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
            self._known = manifest


def store_of(project_root: Path) -> ScanStore:
    return ScanStore(Path(project_root) / STORE_DIR)
