"""Slice embeddings kept across pseudo-label rounds: each slice is encoded at most once per run.

Why: between FM-ABS rounds the scans never change, only the prompts (the teacher's guesses) do, and
the image encoder is >95 % of a round's cost. Keeping every encoded slice makes later rounds
decode-only.

Key: the generalist's identity (name, weights, adapter sha256, precision), the scan's content
hash, the view, the slice orientation, the intensity window and the slice index. A different scan,
adapter or precision can never hit another's entry.

Where entries live is chosen by size (``tier="auto"``) once the size of one slice is known: the
generalist's GPU when the expected need (or the user's bound, if smaller) takes at most half of
the free GPU memory, else host memory under the same rule, else a memory-mapped file in the run
folder. Entries are stored in bf16 or fp16 (``dtype="auto"``: bf16 when the encoder computes in
bf16, so nothing is lost; else fp16, which keeps 3 more mantissa bits) and evicted least recently
used once the bound is reached.

The file tier survives a resume safely: its index (JSON, written atomically at each
:meth:`EmbeddingCache.flush`) records per entry a BLAKE2 digest of the stored bytes, checked on the
first read after opening; a header that does not match (slot shape, dtype, capacity, file size)
discards the whole file. A stale or torn entry is therefore re-encoded, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

Tier = Literal["auto", "device", "host", "disk"]
TIERS = ("auto", "device", "host", "disk")
DTYPES = ("auto", "bfloat16", "float16", "float32")
INDEX_FORMAT = "fmabs.embedding_cache"
INDEX_VERSION = 1
_FP16_MAX = 65000.0
_STORE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def scan_digest(image: np.ndarray) -> str:
    """Content hash of a scan (shape, dtype and voxels): the scan part of every key."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}|{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _digest(raw: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(raw)).cast("B"), digest_size=16).hexdigest()


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's raw storage as numpy (bf16/fp16 as int16 bit patterns: numpy has no bf16)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


class EmbeddingCache:
    """LRU store of per-slice embeddings (``C x h x w`` each) under string keys.

    ``capacity_gb``: the bound (None: no bound beyond what the tier's memory allows). ``folder``:
    where the file tier lives (the run folder's ``embedding_cache/``); without one the file tier
    is not used. ``name``: the file's stem (one file per generalist identity and process rank).
    """

    def __init__(self, device: torch.device | str = "cpu", capacity_gb: float | None = None, tier: Tier = "auto",
                 dtype: str = "auto", folder: str | Path | None = None, name: str = "embeddings",
                 compute_dtype: torch.dtype | None = None) -> None:
        if tier not in TIERS:
            raise InputError(f"embedding cache tier {tier!r}: choose one of {', '.join(TIERS)}.")
        if dtype not in DTYPES:
            raise InputError(f"embedding cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        if capacity_gb is not None and not capacity_gb > 0:
            raise InputError(f"embedding cache bound must be > 0 GB, got {capacity_gb}.")
        if tier == "disk" and folder is None:
            raise InputError("the disk tier of the embedding cache needs a folder (the run folder).")
        self.device = torch.device(device)
        self.bound = None if capacity_gb is None else int(capacity_gb * 2**30)
        self.requested_tier: str = tier
        self.tier: str | None = None  # chosen at the first put, when one slice's size is known
        if dtype == "auto":
            dtype = "bfloat16" if compute_dtype is torch.bfloat16 else "float16"
        self.dtype = _STORE[dtype]
        self.folder = Path(folder) if folder is not None else None
        self.name = name
        self.expected_slices: int | None = None
        self.capacity = 0  # bytes
        self.slot_shape: tuple[int, ...] | None = None
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._slots: OrderedDict[str, int] = OrderedDict()  # disk tier: key -> slot (LRU order)
        self._digests: dict[str, str] = {}
        self._unverified: set[str] = set()
        self._free: list[int] = []
        self._map: np.memmap | None = None
        self.hits = self.misses = self.evictions = 0
        self._warned_range = False

    # ---------------------------------------------------------------------------------------- sizing
    def expect(self, slices: int) -> None:
        """How many slices the run may encode in all (the sizing hint for the tier choice)."""
        self.expected_slices = int(slices)

    @property
    def slot_bytes(self) -> int:
        assert self.slot_shape is not None
        return int(np.prod(self.slot_shape)) * torch.empty((), dtype=self.dtype).element_size()

    def _choose(self, shape: tuple[int, ...]) -> None:
        self.slot_shape = tuple(int(s) for s in shape)
        per = self.slot_bytes
        need = per * self.expected_slices if self.expected_slices else None
        want = min(x for x in (need, self.bound) if x is not None) if (need or self.bound) else None
        gpu_free = 0
        if self.device.type == "cuda":  # free bytes on this cache's GPU (index None: the current one)
            gpu_free = torch.cuda.mem_get_info(self.device.index)[0]
        try:
            import psutil

            host_free = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - no probe: assume little
            host_free = 2**30
        tier = self.requested_tier
        if tier == "auto":
            if want is not None and want <= gpu_free // 2:
                tier = "device"
            elif want is not None and want <= host_free // 2:
                tier = "host"
            elif self.folder is not None:
                tier = "disk"
            else:
                tier = "host"
        limits = {"device": gpu_free // 2, "host": host_free // 2}
        cap = want if want is not None else limits.get(tier, 0)
        if tier in limits:
            cap = min(cap, limits[tier]) if cap else limits[tier]
        elif not cap:  # disk without a size hint or bound: room for 4096 slices
            cap = 4096 * per
        if tier == "device" and self.device.type != "cuda":
            tier = "host"
        self.tier, self.capacity = tier, max(per, int(cap))
        log.info("embedding cache: %s tier, %.2f GB bound (%d slices of %s, %s)", tier, self.capacity / 2**30,
                 self.capacity // per, "x".join(map(str, self.slot_shape)), str(self.dtype).replace("torch.", ""))
        if tier == "disk":
            self._open_file()

    # ---------------------------------------------------------------------------------------- file tier
    @property
    def _paths(self) -> tuple[Path, Path]:
        assert self.folder is not None
        return self.folder / f"{self.name}.bin", self.folder / f"{self.name}.json"

    def _header(self, n_slots: int) -> dict:
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "slot_shape": list(self.slot_shape or ()),
                "dtype": str(self.dtype), "slots": n_slots}

    def _open_file(self) -> None:
        data, index = self._paths
        self.folder.mkdir(parents=True, exist_ok=True)
        n = max(1, self.capacity // self.slot_bytes)
        header = self._header(n)
        entries: dict = {}
        try:
            saved = json.loads(index.read_text())
            if ({k: saved.get(k) for k in header} == header and data.is_file()
                    and data.stat().st_size == n * self.slot_bytes):
                entries = saved.get("entries", {})
            else:
                log.info("embedding cache %s: another layout; starting afresh", data)
        except (OSError, ValueError):
            pass
        np_dtype = np.float32 if self.dtype == torch.float32 else np.int16
        elems = int(np.prod(self.slot_shape))
        mode = "r+" if entries else "w+"
        self._map = np.memmap(data, dtype=np_dtype, mode=mode, shape=(n, elems))
        used = set()
        for key, (slot, digest) in entries.items():
            if isinstance(slot, int) and 0 <= slot < n and slot not in used:
                self._slots[key] = slot
                self._digests[key] = str(digest)
                self._unverified.add(key)
                used.add(slot)
        self._free = [s for s in range(n - 1, -1, -1) if s not in used]
        if entries:
            log.info("embedding cache %s: %d entries from before (each checked on first use)", data, len(self._slots))

    def flush(self) -> None:
        """Make the file tier's entries reusable after a restart (index written atomically)."""
        if self.tier != "disk" or self._map is None:
            return
        from fmabs_core.data.io import atomic_write_text

        self._map.flush()
        doc = {**self._header(self._map.shape[0]),
               "entries": {k: [s, self._digests[k]] for k, s in self._slots.items()}}
        atomic_write_text(self._paths[1], json.dumps(doc))

    # ---------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._slots) if self.tier == "disk" else len(self._mem)

    @property
    def nbytes(self) -> int:
        if self.tier == "disk":
            return len(self._slots) * self.slot_bytes
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    def get(self, key: str) -> torch.Tensor | None:
        """The entry as a float32 tensor on the cache's device (None on a miss)."""
        if self.tier is None:
            self.misses += 1
            return None
        if self.tier == "disk":
            slot = self._slots.get(key)
            if slot is None:
                self.misses += 1
                return None
            raw = np.array(self._map[slot])
            if key in self._unverified:
                self._unverified.discard(key)
                if _digest(raw) != self._digests.get(key):
                    log.warning("embedding cache: stored bytes of an entry do not match its digest; re-encoding it")
                    self._drop(key)
                    self.misses += 1
                    return None
            self._slots.move_to_end(key)
            t = torch.from_numpy(raw)
            t = (t.view(self.dtype) if self.dtype != torch.float32 else t).reshape(self.slot_shape)
        else:
            t = self._mem.get(key)
            if t is None:
                self.misses += 1
                return None
            self._mem.move_to_end(key)
        self.hits += 1
        return t.to(self.device, non_blocking=True).float()

    def put(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Keep ``value`` (one slice, ``C x h x w``) under ``key``, evicting the least recently used.

        Returns what :meth:`get` will return for it (the stored precision, as float32 on the cache's
        device): decoding from that whether the slice was just encoded or found keeps a round's result
        independent of what the cache held (a resumed run equals an uninterrupted one).
        """
        if self.tier is None:
            self._choose(tuple(value.shape))
        if tuple(value.shape) != self.slot_shape:
            raise InputError(f"embedding cache: entry of shape {tuple(value.shape)}, the cache holds {self.slot_shape}.")
        stored = value.detach()
        if self.dtype == torch.float16 and float(stored.abs().max()) > _FP16_MAX:
            if not self._warned_range:
                log.warning("embedding cache: values beyond fp16's range; such slices are not cached (use bfloat16)")
                self._warned_range = True
            return value
        stored = stored.to(self.dtype)
        out = stored.to(self.device).float()
        if self.tier == "disk":
            self._put_file(key, stored)
            return out
        target = self.device if self.tier == "device" else torch.device("cpu")
        stored = stored.to(target).contiguous()
        if key in self._mem:
            del self._mem[key]
        size = stored.numel() * stored.element_size()
        while self._mem and self.nbytes + size > self.capacity:
            self._mem.popitem(last=False)
            self.evictions += 1
        self._mem[key] = stored
        return out

    def _put_file(self, key: str, stored: torch.Tensor) -> None:
        if key in self._slots:
            self._drop(key)
        if not self._free:
            old, slot = self._slots.popitem(last=False)
            self._digests.pop(old, None)
            self._unverified.discard(old)
            self._free.append(slot)
            self.evictions += 1
        slot = self._free.pop()
        raw = _bits(stored).reshape(-1)
        self._map[slot] = raw
        self._slots[key] = slot
        self._digests[key] = _digest(raw)

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        self._digests.pop(key, None)
        self._unverified.discard(key)
        if slot is not None:
            self._free.append(slot)

    def close(self, remove: bool = False) -> None:
        """Release the file (and delete it with ``remove``: the run is over)."""
        if self._map is not None:
            if not remove:
                self.flush()
            self._map = None
        if remove and self.folder is not None:
            for p in self._paths:
                p.unlink(missing_ok=True)
        self._mem.clear()

    def stats(self) -> dict:
        return {"tier": self.tier, "entries": len(self), "gb": round(self.nbytes / 2**30, 3), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}


def slice_key(identity: str, scan: str, view: str, orientation: str, window: tuple[float, float], index: int) -> str:
    return f"{identity}|{scan}|{view}|{orientation}|{window[0]!r},{window[1]!r}|{int(index)}"


def encode_cached(cache: EmbeddingCache | None, encode: Callable[[np.ndarray], torch.Tensor], slices: np.ndarray,
                  indices: Sequence[int], keys: Sequence[str]) -> torch.Tensor:
    """Features ``N x C x h x w`` of ``slices[indices]``: cached ones looked up, the others encoded
    (one ``encode`` call for all misses) and stored."""
    if cache is None:
        return encode(np.ascontiguousarray(slices[np.asarray(indices)]))
    found = [cache.get(k) for k in keys]
    missing = [j for j, f in enumerate(found) if f is None]
    if missing:
        fresh = encode(np.ascontiguousarray(slices[np.asarray([indices[j] for j in missing])]))
        for j, f in zip(missing, fresh):
            found[j] = cache.put(keys[j], f)
    device = next(f.device for f in found if f is not None)
    return torch.stack([f.to(device) for f in found])


def default_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / "embedding_cache"


def file_name(identity: str, rank: int = 0) -> str:
    """One file per generalist identity and process (hash: identities hold paths and '|')."""
    return f"emb-{hashlib.sha256(identity.encode()).hexdigest()[:16]}-r{rank}"
