"""What ``fmabs predict`` has written into an output folder, so that the same command run again after a kill
(or a closed laptop) goes on where it stopped instead of refusing its own outputs or redoing them.

The record (``<output>/.fmabs-predict.json``) names the model by its sha256 and the settings that change an
output; per output file, the sha256 it was written with. A file in ``--output`` counts as done only if the record
has it with the same model, settings and input, and its bytes still hash to what was written: anything else that
exists there is the user's and is refused (or replaced with ``--overwrite``). An entry is made before its files are
written and completed with their hashes after they are in place, so a file a killed command wrote but did not
finish recording is known as its own and written again.
A lock (``.fmabs-predict.lock``) keeps two commands from writing into one folder at once; under it, temporary files
a killed command left behind are removed (``io.remove_stale_temporaries``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from fmabs_core.data.io import atomic_write_text
from fmabs_core.data.store import sha256_of
from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

RECORD_FILE = ".fmabs-predict.json"
LOCK_FILE = ".fmabs-predict.lock"
RECORD_VERSION = 1


class PredictRecord:
    """The done outputs of one model and one set of settings in ``folder`` (see the module doc)."""

    def __init__(self, folder: Path, model_sha256: str, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.key = {"model_sha256": model_sha256, "settings": settings}
        self.path = self.folder / RECORD_FILE
        self.done: dict[str, dict[str, str]] = {}
        #: output name -> ((size, mtime_ns), sha256): planning and the loop ask about the same file, hashed once
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}
        doc = self._read()
        if doc is not None and doc.get("key") == self.key and isinstance(doc.get("done"), dict):
            self.done = {k: v for k, v in doc["done"].items() if isinstance(v, dict)}

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("%s is unreadable; outputs it listed are treated as not written by this command", self.path)
            return None
        return doc if isinstance(doc, dict) and doc.get("version") == RECORD_VERSION else None

    def is_done(self, output: Path, source: Path) -> bool:
        """Whether ``output`` is this command's finished answer for ``source`` (unchanged since it was written)."""
        entry = self.done.get(Path(output).name)
        if entry is None or entry.get("input") != _input_id(source) or not entry.get("sha256") or \
                not Path(output).is_file():
            return False
        return entry.get("sha256") == self._hash(Path(output))

    def is_ours(self, output: Path, source: Path) -> bool:
        """Whether ``output`` is this command's for ``source``: begun and not finished (a kill came between), or
        finished and unchanged since. Either may be written again; a finished file changed since is the user's."""
        entry = self.done.get(Path(output).name)
        if entry is None or entry.get("input") != _input_id(source):
            return False
        return not entry.get("sha256") or self.is_done(output, source)

    def begin(self, outputs: list[Path], source: Path) -> None:
        """Record that ``outputs`` are about to be written for ``source`` (before the first byte of them)."""
        for out in outputs:
            self.done[Path(out).name] = {"input": _input_id(source), "sha256": None}
        self._write()

    def add(self, outputs: list[Path], source: Path) -> None:
        """Record ``outputs`` (in place already) as the finished answer for ``source``."""
        for out in outputs:
            self.done[Path(out).name] = {"input": _input_id(source), "sha256": self._hash(Path(out))}
        self._write()

    def _hash(self, output: Path) -> str:
        """sha256 of ``output``, computed again only when its size or modification time changed."""
        st = output.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        known = self._hashes.get(output.name)
        if known is None or known[0] != stamp:
            known = (stamp, sha256_of(output))
            self._hashes[output.name] = known
        return known[1]

    def _write(self) -> None:
        doc = {"version": RECORD_VERSION, "key": self.key, "done": self.done}
        atomic_write_text(self.path, json.dumps(doc, indent=1, sort_keys=True))


def _input_id(source: Path) -> str:
    """An input by its place, size and modification time (a changed scan is segmented again)."""
    st = os.stat(source)
    return f"{Path(source).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def folder_lock(folder: Path) -> FileLock:
    """Held while a command writes into ``folder``; a second command is refused at once, naming the folder."""
    lock = FileLock(str(Path(folder) / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"--output {folder}: another fmabs predict is writing into this folder; wait for it to end "
                         "or choose another --output.") from None
    return lock
