"""Hostile and broken input for the ``fmabs`` command: a generated corpus, one folder per case.

Each :class:`Case` builds its files in its own folder (broken NIfTI files, broken ``fmabs.json``,
run documents, model files, bad names and paths, out-of-range options, outputs that would land on
something the user owns) and returns the command line to run. The expectation is the same for
every case: exit code 2 (a user error, never a crash), a message naming the file, key or option
at fault, no traceback, every file that existed before unchanged, and no new file outside the
folders the command may write (the project, the output folder).

Nothing is stored: the corpus is made from a few tiny scans and a width-4 V-Net in a temporary
folder. ``Testing/core/test_hostile_input.py`` runs it under pytest; run this file to count the
outcomes per class (this is how the before/after totals in the issue note were taken)::

    python Testing/core/hostile_corpus.py            # totals per class, and every failing case
    python Testing/core/hostile_corpus.py -k header  # only cases whose id contains "header"
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io as _io
import json
import logging
import os
import pickle
import shutil
import struct
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHAPE = (16, 16, 16)
EYE = np.diag([1.0, 1.0, 1.0, 1.0])
#: ``fmabs train`` options that keep any run the corpus might start tiny (one iteration, 16^3, width 4)
TINY_TRAIN = ["--iterations", "1", "--patch-size", "16", "16", "16", "--width", "4", "--batch-size", "2",
              "--labelled-batch-size", "1", "--device", "cpu", "--val-every", "1", "--ckpt-every", "1"]
CLASSES = ("file-format", "header", "affine", "dtype", "label-values", "project-doc", "run-doc", "names-paths",
           "options", "output-paths", "model-files")


# ---- bytes of NIfTI files ---------------------------------------------------------------------------
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _image_array(seed: int = 0) -> np.ndarray:
    return _rng(seed).normal(100.0, 20.0, SHAPE).astype(np.float32)


def _label_array() -> np.ndarray:
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (((x - 8) ** 2 + (y - 7) ** 2 + (z - 8) ** 2) < 20).astype(np.uint8)


def nifti_bytes(data: np.ndarray, sform: np.ndarray | None = None, fields: dict | None = None,
                shape: tuple[int, ...] | None = None, dtype=None, qform_code: int = 0) -> bytes:
    """An uncompressed .nii: a header set field by field (no checks by nibabel), then the voxels."""
    data = np.asarray(data)
    h = nib.Nifti1Header()
    h.set_data_dtype(data.dtype if dtype is None else dtype)
    h.set_data_shape(data.shape if shape is None else shape)
    h["vox_offset"] = 352
    h.set_sform(EYE if sform is None else sform, code=1)
    h["qform_code"] = qform_code
    for key, value in (fields or {}).items():
        h[key] = value
    return h.binaryblock + b"\0" * 4 + data.tobytes(order="F")


def _set_dims(raw: bytes, dims: list[int]) -> bytes:
    """Overwrite dim[0..7] (offset 40, int16) of an uncompressed header, bypassing nibabel's checks."""
    b = bytearray(raw)
    struct.pack_into("<8h", b, 40, *(dims + [1] * (8 - len(dims))))
    return bytes(b)


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1, mtime=0)


def _valid_image() -> bytes:
    return nifti_bytes(_image_array())


#: a broken volume: (bytes, suffix) -- ".nii" or ".nii.gz"
Maker = Callable[[], tuple[bytes, str]]


def _file_format_makers() -> dict[str, Maker]:
    noise = _image_array(1)
    raw = nifti_bytes(noise)
    garbage = _rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()

    def patched(offset: int, fmt: str, value) -> bytes:
        b = bytearray(raw)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    return {
        "truncated-gz": lambda: (_gz(raw)[: len(_gz(raw)) // 2], ".nii.gz"),
        "truncated-gz-in-header": lambda: (_gz(raw)[:40], ".nii.gz"),
        "truncated-nii": lambda: (raw[:352 + 1000], ".nii"),
        "header-only-nii": lambda: (raw[:348], ".nii"),
        "empty-gz": lambda: (b"", ".nii.gz"),
        "empty-nii": lambda: (b"", ".nii"),
        "random-bytes-gz": lambda: (garbage, ".nii.gz"),
        "gzip-of-garbage": lambda: (_gz(garbage), ".nii.gz"),
        "text-as-nii": lambda: (b"this is not a scan\n" * 40, ".nii"),
        "uncompressed-named-gz": lambda: (raw, ".nii.gz"),
        "bad-magic": lambda: (raw[:344] + b"xyz\0" + raw[348:], ".nii"),
        "bad-sizeof-hdr": lambda: (patched(0, "<i", 999), ".nii"),
        "vox-offset-past-end": lambda: (patched(108, "<f", 1.0e6), ".nii"),
    }


def _header_makers() -> dict[str, Maker]:
    small = np.zeros(32, np.int16)
    base = nifti_bytes(_image_array(3))
    return {
        "claims-32767-cubed-nii": lambda: (nifti_bytes(small, shape=(32767,) * 3), ".nii"),
        "claims-32767-cubed-gz": lambda: (_gz(nifti_bytes(small, shape=(32767,) * 3)), ".nii.gz"),
        "claims-4000-cubed-float64-gz": lambda: (_gz(nifti_bytes(np.zeros(8), shape=(4000,) * 3)), ".nii.gz"),
        "claims-more-voxels-than-data-gz": lambda: (_gz(nifti_bytes(_image_array(4), shape=(64, 64, 64))), ".nii.gz"),
        "negative-dim": lambda: (_set_dims(base, [3, -16, 16, 16]), ".nii"),
        "zero-dim": lambda: (_set_dims(base, [3, 0, 16, 16]), ".nii"),
        "dim0-out-of-range": lambda: (_set_dims(base, [9, 16, 16, 16, 1, 1, 1, 1]), ".nii"),
        "unknown-datatype": lambda: (_patch_field(base, "datatype", 1234), ".nii"),
        "scl-slope-inf": lambda: (_gz(nifti_bytes(np.ones(SHAPE, np.int16), fields={"scl_slope": np.inf})), ".nii.gz"),
        "pixdim-nan-no-sform": lambda: (nifti_bytes(_image_array(5), fields={"sform_code": 0, "pixdim": [
            1, np.nan, 1, 1, 1, 1, 1, 1]}), ".nii"),
    }


def _patch_field(raw: bytes, name: str, value) -> bytes:
    h = nib.Nifti1Header.from_fileobj(_io.BytesIO(raw), check=False)
    h[name] = value
    return h.binaryblock + raw[348:]


def _affine_makers() -> dict[str, Maker]:
    img = _image_array(6)

    def with_sform(a: np.ndarray) -> Maker:
        return lambda: (_gz(nifti_bytes(img, sform=a)), ".nii.gz")

    rank2 = EYE.copy()
    rank2[:3, 2] = 0
    nan = EYE.copy()
    nan[1, 1] = np.nan
    inf = EYE.copy()
    inf[0, 3] = np.inf
    parallel = EYE.copy()
    parallel[:3, 1] = [1.0, 1e-13, 0.0]
    return {
        "zero-sform": with_sform(np.zeros((4, 4))),
        "rank2-sform": with_sform(rank2),
        "nan-sform": with_sform(nan),
        "inf-sform": with_sform(inf),
        "near-singular-sform": with_sform(parallel),
        "nan-quaternion": lambda: (nifti_bytes(img, fields={"sform_code": 0, "quatern_b": np.nan}, qform_code=1),
                                   ".nii"),
    }


def _dtype_makers() -> dict[str, Maker]:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgba = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    img = _image_array(7)
    nan = img.copy()
    nan[:] = np.nan
    inf = img.copy()
    inf[3, 4, 5] = np.inf
    return {
        "rgb24": lambda: (_gz(nifti_bytes(rgb)), ".nii.gz"),
        "rgba32": lambda: (_gz(nifti_bytes(rgba)), ".nii.gz"),
        "complex64": lambda: (_gz(nifti_bytes(img.astype(np.complex64))), ".nii.gz"),
        "complex128": lambda: (nifti_bytes(img.astype(np.complex128)), ".nii"),
        "4d": lambda: (_gz(nifti_bytes(np.stack([img, img], -1))), ".nii.gz"),
        "5d": lambda: (_gz(nifti_bytes(img[..., None, None].repeat(2, 4))), ".nii.gz"),
        "2d": lambda: (_gz(nifti_bytes(img[:, :, 0])), ".nii.gz"),
        "1d": lambda: (_gz(nifti_bytes(img[:, 0, 0])), ".nii.gz"),
        "single-slice": lambda: (_gz(nifti_bytes(img[:, :, :1])), ".nii.gz"),
        "all-nan": lambda: (_gz(nifti_bytes(nan)), ".nii.gz"),
        "one-inf-voxel": lambda: (_gz(nifti_bytes(inf)), ".nii.gz"),
    }


def _label_makers() -> dict[str, Maker]:
    lab = _label_array()

    def label(values: np.ndarray) -> Maker:
        return lambda: (_gz(nifti_bytes(values)), ".nii.gz")

    def put(dtype, value) -> np.ndarray:
        out = lab.astype(dtype)
        out[8, 7, 8] = value
        return out

    return {
        "label-value-2": label(put(np.uint8, 2)),
        "label-255-in-dense": label(put(np.uint8, 255)),
        "label-minus-1": label(put(np.int16, -1)),
        "label-1e6": label(put(np.int32, 1_000_000)),
        "label-nan": label(put(np.float32, np.nan)),
        "label-half": label(put(np.float32, 0.5)),
        "label-inf": label(put(np.float32, np.inf)),
        "label-2pow40": label(put(np.int64, 2 ** 40)),
        "label-uint16-300": label(put(np.uint16, 300)),
    }


# ---- the case folder ----------------------------------------------------------------------------------
class Env:
    """One case's folder, filled from the shared assets (a dataset, a project with a run, a model)."""

    def __init__(self, folder: Path, assets: Path):
        self.dir = Path(folder)
        self.assets = Path(assets)
        self.dir.mkdir(parents=True, exist_ok=True)

    def p(self, rel: str) -> Path:
        return self.dir / rel

    def data(self, name: str = "data") -> Path:
        dst = self.p(name)
        shutil.copytree(self.assets / "data", dst)
        return dst

    def project(self, name: str = "proj") -> Path:
        dst = self.p(name)
        shutil.copytree(self.assets / "proj", dst)
        return dst

    def model(self, rel: str = "model.pt") -> Path:
        dst = self.p(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.assets / "model.pt", dst)
        return dst

    def image(self, rel: str) -> Path:
        return self.write(rel, _gz(_valid_image()))

    def label(self, rel: str) -> Path:
        return self.write(rel, _gz(nifti_bytes(_label_array())))

    def write(self, rel: str | Path, data: bytes | str) -> Path:
        path = self.p(str(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode("utf-8")
        path.write_bytes(data)
        return path

    def json(self, rel: str, obj) -> Path:
        return self.write(rel, json.dumps(obj))

    def put(self, stem: str, maker: Maker, remove: tuple[str, ...] = (".nii.gz", ".nii")) -> Path:
        """Replace ``stem`` + any NIfTI suffix with the broken volume ``maker`` makes."""
        for suffix in remove:
            self.p(stem + suffix).unlink(missing_ok=True)
        data, suffix = maker()
        return self.write(stem + suffix, data)

    def readonly_dir(self, rel: str) -> Path | None:
        """A folder nobody may write in: chmod 555, or a kernel folder when running as root."""
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            return Path("/sys") if _unwritable(Path("/sys")) else None
        d = self.p(rel)
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o555)
        return d if _unwritable(d) else None


def _unwritable(folder: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(tmp)
    return False


class Skip(Exception):
    """This case cannot be set up on this machine (e.g. no read-only folder as root)."""


@dataclass
class Case:
    id: str
    cls: str
    build: Callable[[Env], list[str]]
    #: substrings the output must contain (case-insensitive): the file, key or option at fault
    expect: tuple[str, ...]
    #: folders, relative to the case folder, where the command may create files
    allowed: tuple[str, ...] = ()
    subprocess: bool = False
    in_process_only: bool = False  # argv a real process cannot take (a NUL byte)


# ---- the cases ----------------------------------------------------------------------------------------
def _ctx_import_image(maker: Maker, name: str):
    def build(env: Env) -> list[str]:
        data = env.data()
        env.put("data/imagesTr/c2", maker)
        return ["import", str(data), "--project", str(env.p("proj"))]
    return build, ("c2.nii",), ("proj",)


def _ctx_import_label(maker: Maker, name: str):
    def build(env: Env) -> list[str]:
        data = env.data()
        env.put("data/labelsTr/c2", maker)
        return ["import", str(data), "--project", str(env.p("proj"))]
    return build, ("labelsTr", "c2.nii"), ("proj",)


def _ctx_predict_input(maker: Maker, name: str):
    def build(env: Env) -> list[str]:
        model = env.model()
        bad = env.put("in/scan9", maker)
        return ["predict", "--model", str(model), "--input", str(bad), "--output", str(env.p("out")),
                "--device", "cpu"]
    return build, ("scan9.nii",), ("out",)


def _ctx_evaluate(folder: str):
    """`fmabs evaluate` with the bad file in ``folder`` (pred or labels), a good one in the other."""
    def ctx(maker: Maker, name: str):
        def build(env: Env) -> list[str]:
            env.label("pred/c1.nii.gz")
            env.label("labels/c1.nii.gz")
            env.put(f"{folder}/c1", maker)
            return ["evaluate", "--pred", str(env.p("pred")), "--labels", str(env.p("labels"))]
        return build, (folder, "c1.nii"), ()
    return ctx


def _ctx_check_crosslabel(maker: Maker, name: str):
    def build(env: Env) -> list[str]:
        proj = env.project()
        case = _crosslabelled(proj)[0]
        data, suffix = maker()
        if suffix == ".nii":
            data = _gz(data) if data else data
        env.write(proj / "crosslabels" / f"{case}.nii.gz", data)
        return ["check", "--project", str(proj)]
    return build, ("crosslabels",), ("proj",)


CONTEXTS = {"import-image": _ctx_import_image, "import-label": _ctx_import_label,
            "predict-input": _ctx_predict_input, "evaluate-pred": _ctx_evaluate("pred"),
            "evaluate-label": _ctx_evaluate("labels"), "check-crosslabel": _ctx_check_crosslabel}


def _crosslabelled(proj: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (proj / "crosslabels").glob("*.nii.gz"))


def _volume_cases() -> list[Case]:
    plan = [
        ("file-format", _file_format_makers(), ("import-image", "predict-input"),
         {"truncated-gz": ("import-label", "evaluate-label", "check-crosslabel"),
          "truncated-nii": ("import-label", "evaluate-pred"),
          "random-bytes-gz": ("import-label", "evaluate-label", "check-crosslabel"),
          "empty-gz": ("import-label",)}),
        ("header", _header_makers(), ("import-image", "predict-input"),
         {"claims-32767-cubed-gz": ("import-label", "evaluate-pred", "check-crosslabel"),
          "claims-32767-cubed-nii": ("evaluate-label",)}),
        ("affine", _affine_makers(), ("import-image", "predict-input"),
         {"zero-sform": ("import-label", "evaluate-pred", "check-crosslabel"), "nan-sform": ("import-label",)}),
        ("dtype", _dtype_makers(), ("import-image", "predict-input"),
         {"rgb24": ("import-label", "evaluate-label", "check-crosslabel"), "complex64": ("import-label",),
          "4d": ("import-label",), "2d": ("evaluate-pred",)}),
        ("label-values", _label_makers(), ("import-label", "evaluate-label"),
         {"label-value-2": ("check-crosslabel",), "label-nan": ("check-crosslabel",),
          "label-minus-1": ("check-crosslabel",)}),
    ]
    cases = []
    for cls, makers, contexts, extra in plan:
        for name, maker in makers.items():
            for ctx in contexts + extra.get(name, ()):
                if cls == "label-values" and ctx == "evaluate-label" and name == "label-value-2":
                    continue  # evaluate takes any class value 0..254: a 2 is a valid label there
                if cls == "label-values" and ctx == "evaluate-label" and name == "label-255-in-dense":
                    continue
                build, expect, allowed = CONTEXTS[ctx](maker, name)
                real_process = (name, ctx) == ("truncated-gz", "import-image")  # also through `python -m fmabs_core`
                cases.append(Case(f"{cls}/{name}/{ctx}", cls, build, expect, allowed, subprocess=real_process))
    return cases


# project documents ------------------------------------------------------------------------------------
def _meta(proj: Path) -> dict:
    return json.loads((proj / "fmabs.json").read_text())


def _doc_case(name: str, change: Callable[[dict, Env, Path], object], keys: tuple[str, ...] = (),
              command: str = "check") -> Case:
    def build(env: Env) -> list[str]:
        proj = env.project()
        meta = _meta(proj)
        new = change(meta, env, proj)
        new = meta if new is None else new
        text = new if isinstance(new, (str, bytes)) else json.dumps(new)
        path = proj / "fmabs.json"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return _project_command(command, env, proj)
    return Case(f"project-doc/{name}/{command}", "project-doc", build, ("fmabs.json",) + keys, ("proj",))


def _project_command(command: str, env: Env, proj: Path) -> list[str]:
    if command == "check":
        return ["check", "--project", str(proj)]
    if command == "suggest":
        return ["suggest", "--project", str(proj), "--run", "r1", "--active-k", "1", "--device", "cpu", "--no-record"]
    if command == "simulate":
        return ["crosslabel", "simulate", "--project", str(proj), "--count", "1"]
    if command == "import":
        return ["import", str(env.data()), "--project", str(proj)]
    if command == "jobs-list":
        return ["jobs", "list", "--project", str(proj)]
    if command == "train":
        return ["train", "--project", str(proj), "--run", "fresh", *TINY_TRAIN]
    raise ValueError(command)


def _set(key, value):
    def change(meta, env, proj):
        meta[key] = value
    return change


def _drop(key):
    def change(meta, env, proj):
        del meta[key]
    return change


def _case_ids(ids_of: Callable[[Env, Path], list]):
    def change(meta, env, proj):
        meta["cases"] = meta["cases"] + ids_of(env, proj)
    return change


def _outside_case(env: Env, proj: Path) -> list:
    env.image("outside.nii.gz")  # a valid scan outside the project, which the id points at
    return ["../../outside"]


def _absolute_case(env: Env, proj: Path) -> list:
    env.image("elsewhere/abs.nii.gz")
    return [str(env.p("elsewhere/abs"))]


def _project_doc_cases() -> list[Case]:
    first = lambda m: m["cases"][0]  # noqa: E731
    c = _doc_case
    return [
        c("list-not-object", lambda m, e, p: [m]),
        c("string-not-object", lambda m, e, p: '"hello"'),
        c("null", lambda m, e, p: "null"),
        c("number", lambda m, e, p: "3", command="suggest"),
        c("missing-cases", _drop("cases"), ("cases",)),
        c("missing-classes", _drop("classes"), ("classes",)),
        c("missing-split", _drop("split"), ("split",), command="simulate"),
        c("cases-object", _set("cases", {"a": 1}), ("cases",)),
        c("case-id-int", _case_ids(lambda e, p: [7]), ("cases",)),
        c("case-id-dotdot", _case_ids(_outside_case), ("cases", "../../outside")),
        c("case-id-dotdot", _case_ids(_outside_case), ("cases", "../../outside"), command="simulate"),
        c("case-id-absolute", _case_ids(_absolute_case), ("cases",)),
        c("case-id-empty", _case_ids(lambda e, p: [""]), ("cases",)),
        c("case-id-hidden", _case_ids(lambda e, p: [".hidden"]), ("cases",)),
        c("case-id-slash", _case_ids(lambda e, p: ["a/b"]), ("cases",)),
        c("case-id-duplicate", lambda m, e, p: m.update(cases=m["cases"] + [first(m)]), ("cases",)),
        c("classes-list", _set("classes", ["foreground"]), ("classes",)),
        c("classes-key-text", _set("classes", {"abc": "x"}), ("classes",)),
        c("classes-key-0", _set("classes", {"0": "background"}), ("classes",)),
        c("classes-key-300", _set("classes", {"300": "x"}), ("classes",)),
        c("classes-value-int", _set("classes", {"1": 5}), ("classes",)),
        c("classes-empty", _set("classes", {}), ("classes",), command="train"),
        c("split-list", _set("split", ["a"]), ("split",), command="simulate"),
        c("split-unknown-case", lambda m, e, p: m["split"]["train"].append("ghost"), ("split", "ghost"),
          command="simulate"),
        c("split-val-string", lambda m, e, p: m["split"].update(val="c1"), ("split",), command="train"),
        c("budget-infinity", lambda m, e, p: json.dumps(m).replace('"budget": null', '"budget": Infinity'),
          ("budget",), command="suggest"),
        c("budget-nan", lambda m, e, p: json.dumps(m).replace('"budget": null', '"budget": NaN'),
          ("budget",), command="suggest"),
        c("budget-negative", _set("budget", -3), ("budget",), command="suggest"),
        c("budget-text", _set("budget", "ten"), ("budget",), command="suggest"),
        c("budget-fraction", _set("budget", 2.5), ("budget",), command="suggest"),
        c("budget-bool", _set("budget", True), ("budget",)),
        c("rounds-object", _set("rounds", {"a": 1}), ("rounds",), command="suggest"),
        c("rounds-item-number", _set("rounds", [5]), ("rounds",), command="suggest"),
        c("version-newer", _set("version", 99), ("version",)),
        c("version-text", _set("version", "one"), ("version",), command="jobs-list"),
        c("invalid-json", lambda m, e, p: json.dumps(m)[:-20]),
        c("invalid-json", lambda m, e, p: json.dumps(m)[:-20], command="import"),
        c("empty-file", lambda m, e, p: ""),
        c("not-utf8", lambda m, e, p: b"\xff\xfe\x00{" + b"\x80" * 20),
        c("deeply-nested", lambda m, e, p: "[" * 100000 + "]" * 100000),
        Case("project-doc/fmabs-json-is-a-folder/check", "project-doc", _json_folder, ("fmabs.json",), ("proj",)),
    ]


def _json_folder(env: Env) -> list[str]:
    proj = env.project()
    (proj / "fmabs.json").unlink()
    (proj / "fmabs.json").mkdir()
    return ["check", "--project", str(proj)]


# run documents ----------------------------------------------------------------------------------------
def _run_doc_case(name: str, file: str, content, command: str = "status", keys: tuple[str, ...] = ()) -> Case:
    def build(env: Env) -> list[str]:
        proj = env.project()
        run = proj / "runs" / "r1"
        if command == "predict-ckpt":
            run = _checkpoint_run(env, proj)
        target = run / file
        if content is _FOLDER:
            target.unlink(missing_ok=True)
            target.mkdir()
        elif content is _DELETE:
            target.unlink(missing_ok=True)
        elif content is _LINK:
            target.unlink(missing_ok=True)
            target.symlink_to(target)  # a link to itself: "too many levels of symbolic links"
        else:
            text = content if isinstance(content, str) else json.dumps(content)
            target.write_text(text)
        if command == "status":
            return ["jobs", "status", "--project", str(proj), "--run", run.name]
        if command == "list":
            return ["jobs", "list", "--project", str(proj)]
        if command == "suggest":
            return ["suggest", "--project", str(proj), "--run", run.name, "--active-k", "1", "--device", "cpu"]
        if command == "predict-ckpt":
            env.image("in/scan.nii.gz")
            return ["predict", "--model", str(run), "--input", str(env.p("in/scan.nii.gz")), "--output",
                    str(env.p("out")), "--device", "cpu"]
        if command == "train":
            return ["train", "--project", str(proj), "--run", run.name, "--device", "cpu"]
        raise ValueError(command)
    return Case(f"run-doc/{name}/{command}", "run-doc", build, (file,) + keys, ("proj", "out"))


_FOLDER, _DELETE, _LINK = object(), object(), object()


def _checkpoint_run(env: Env, proj: Path) -> Path:
    """A run with a training checkpoint only (no model.pt): predict reads the net from config.json."""
    import torch

    run = proj / "runs" / "r2"
    (run / "checkpoints").mkdir(parents=True)
    sd = torch.load(env.assets / "model.pt", weights_only=True)["state_dict"]
    torch.save({"iteration": 1, "model": sd, "eval_model": sd}, run / "checkpoints" / "iter_0000001.pt")
    shutil.copyfile(proj / "runs" / "r1" / "config.json", run / "config.json")
    return run


def _run_doc_cases() -> list[Case]:
    r = _run_doc_case
    running = {"state": "running", "iteration": 1, "iterations": 10, "updated": 1.0}
    return [
        r("status-list", "status.json", [1, 2]),
        r("status-string", "status.json", "hello"),
        r("status-invalid-json", "status.json", '{"state": "done", "iter'),
        r("status-updated-text", "status.json", {"state": "done", "updated": "yesterday"}, keys=("updated",)),
        r("status-iteration-text", "status.json", {**running, "iteration": "x"}, keys=("iteration",)),
        r("status-state-number", "status.json", {"state": 42}, keys=("state",)),
        r("status-state-unknown", "status.json", {"state": "exploded"}, keys=("state",)),
        r("status-loss-text", "status.json", {"state": "done", "losses": {"loss": "abc"}}, keys=("loss",)),
        r("status-losses-list", "status.json", {"state": "done", "losses": [1]}, keys=("losses",)),
        r("status-val-dice-text", "status.json", {"state": "done", "metrics": {"val_dice": "x"}}, keys=("val_dice",)),
        r("status-is-folder", "status.json", _FOLDER),
        r("status-list", "status.json", [1, 2], command="list"),
        r("status-iteration-text", "status.json", {**running, "iteration": "x"}, command="suggest",
          keys=("iteration",)),
        r("job-list", "job.json", [1]),
        r("job-started-text", "job.json", {"pid": 1, "started": "x"}, keys=("started",)),
        r("job-pid-text", "job.json", {"pid": "abc", "started": 1e12}, keys=("pid",)),
        r("config-list", "config.json", [1], command="predict-ckpt"),
        r("config-missing", "config.json", _DELETE, command="predict-ckpt"),
        r("config-net-text", "config.json", {"net": "x"}, command="predict-ckpt", keys=("net",)),
        r("config-invalid-json", "config.json", "{", command="predict-ckpt"),
        r("config-list", "config.json", [1], command="train"),
        r("config-iterations-text", "config.json", {"iterations": "many"}, command="train", keys=("iterations",)),
        r("lock-is-folder", ".lock", _FOLDER, command="train"),
        r("lock-is-folder", ".lock", _FOLDER),
        r("lock-is-link", ".lock", _LINK, command="train"),
        r("lock-is-link", ".lock", _LINK),
    ]


# names and paths --------------------------------------------------------------------------------------
def _names_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, build, expect, allowed=("proj",), **kw):
        cases.append(Case(f"names-paths/{name}", "names-paths", build, expect, allowed, **kw))

    def train_run(run: str | Callable[[Env], str]):
        def build(env):
            proj = env.project()
            name = run(env) if callable(run) else run
            return ["train", "--project", str(proj), "--run", name, *TINY_TRAIN]
        return build

    for label, run in [("dotdot-escape", "../../escape"), ("empty", ""), ("dotdot", ".."), ("dot", "."),
                       ("slash", "a/b"), ("too-long", "r" * 200), ("leading-dash", "-r"), ("space", "my run")]:
        add(f"train-run-{label}", train_run(run), ("run",))
    add("train-run-absolute", train_run(lambda env: str(env.p("abs-run"))), ("run",))
    add("train-run-trailing-newline", train_run("r1\n"), ("run",))  # a regex's "$" matches before a final newline

    def pseudo_label_case(case: str | Callable[[Env], str]):
        def build(env):
            scan = env.image("in/c1.nii.gz")
            mask = env.label("in/mask.nii.gz")
            name = case(env) if callable(case) else case
            return ["pseudo-label", "--image", str(scan), "--prompt-from", str(mask), "--output", str(env.p("out")),
                    "--case", name, "--device", "cpu"]
        return build

    for label, case in [("dotdot-escape", "../../victim"), ("newline", "c1\n"), ("slash", "a/b")]:
        add(f"pseudo-label-case-{label}", pseudo_label_case(case), ("--case",), allowed=())
    add("pseudo-label-case-absolute", pseudo_label_case(lambda env: str(env.p("victim"))), ("--case",), allowed=())
    add("train-run-nul-byte", train_run("a\x00b"), ("run",), in_process_only=True)

    def jobs_run(sub: str, run: str):
        def build(env):
            proj = env.project()
            shutil.copytree(proj / "runs" / "r1", env.p("escape"))  # a run-like folder outside the project
            extra = TINY_TRAIN if sub == "start" else []
            return ["jobs", sub, "--project", str(proj), "--run", run, *extra]
        return build

    add("jobs-status-run-escape", jobs_run("status", "../../escape"), ("run",))
    add("jobs-cancel-run-escape", jobs_run("cancel", "../../escape"), ("run",))
    add("jobs-status-run-empty", jobs_run("status", ""), ("run",))
    add("jobs-start-run-escape", jobs_run("start", "../../escape"), ("run",))

    def suggest_run(run):
        def build(env):
            proj = env.project()
            shutil.copytree(proj / "runs" / "r1", env.p("escape"))
            return ["suggest", "--project", str(proj), "--run", run, "--active-k", "1", "--device", "cpu"]
        return build

    add("suggest-run-escape", suggest_run("../../escape"), ("run",))
    add("suggest-run-empty", suggest_run(""), ("run",))

    def import_named(*names, labels=()):
        def build(env):
            for n in names:
                env.image(f"src/imagesTr/{n}")
            for n in labels:
                env.label(f"src/labelsTr/{n}")
            return ["import", str(env.p("src")), "--project", str(env.p("proj"))]
        return build

    # (a scan named "my scan.nii.gz" or "-x.nii.gz" is imported under a safe id since 2026-12-07:
    #  Testing/core/data/test_project.py::test_clinicians_file_names_are_imported_under_safe_ids)
    add("import-two-images-one-id", import_named("c1.nii.gz", "c1.nii", "c2.nii.gz"), ("c1.nii", "c1.nii.gz"))
    add("import-channel-suffix-duplicate", import_named("c1_0000.nii.gz", "c1.nii.gz"),
        ("c1_0000.nii.gz", "c1.nii.gz"))
    add("import-two-labels-one-id", import_named("c1.nii.gz", "c2.nii.gz", labels=("c1.nii.gz", "c1.nii")),
        ("labelsTr", "c1.nii"))

    def plain_duplicates(env):
        env.image("scans/a.nii.gz")
        env.image("scans/a.nii")
        return ["import", str(env.p("scans")), "--project", str(env.p("proj"))]

    add("import-plain-folder-duplicate", plain_duplicates, ("a.nii",))

    def import_into_user_folder(env):
        data = env.data()
        env.label("mine/labels/c1.nii.gz")  # the user's own file where the project would write
        env.write("mine/notes.txt", "my notes")
        return ["import", str(data), "--project", str(env.p("mine"))]

    add("import-into-non-project-folder", import_into_user_folder, ("mine",), allowed=())

    def import_into_src(env):
        data = env.data()
        return ["import", str(data / "imagesTr"), "--project", str(data / "imagesTr")]

    add("import-project-is-src", import_into_src, ("imagesTr",), allowed=())

    def project_is_file(command):
        def build(env):
            f = env.write("proj", "I am a file")
            env.data()
            argv = {"check": ["check", "--project", str(f)],
                    "import": ["import", str(env.p("data")), "--project", str(f)],
                    "suggest": ["suggest", "--project", str(f), "--run", "r1"],
                    "simulate": ["crosslabel", "simulate", "--project", str(f)],
                    "jobs-list": ["jobs", "list", "--project", str(f)],
                    "jobs-status": ["jobs", "status", "--project", str(f), "--run", "r1"],
                    "train": ["train", "--project", str(f), "--run", "r", *TINY_TRAIN]}[command]
            return argv
        return build

    for command in ("check", "import", "suggest", "simulate", "jobs-list", "jobs-status", "train"):
        add(f"project-is-a-file-{command}", project_is_file(command), ("proj",), allowed=(),
            subprocess=command == "check")

    def src_is_file(env):
        f = env.image("scan.nii.gz")
        return ["import", str(f), "--project", str(env.p("proj"))]

    add("import-src-is-a-file", src_is_file, ("scan.nii.gz",))

    def simulate_unknown(env):
        proj = env.project()
        return ["crosslabel", "simulate", "--project", str(proj), "--cases", "../../x"]

    add("simulate-case-escape", simulate_unknown, ("../../x",))
    return cases


# options ------------------------------------------------------------------------------------------------
def _options_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, build, expect, allowed=("proj", "out")):
        cases.append(Case(f"options/{name}", "options", build, expect, allowed))

    def predict(*opts):
        def build(env):
            model = env.model()
            scan = env.image("in/scan.nii.gz")
            return ["predict", "--model", str(model), "--input", str(scan), "--output", str(env.p("out")),
                    "--device", "cpu", *opts]
        return build

    for v in ("1.0", "-0.5", "nan", "inf", "x"):
        add(f"predict-overlap-{v}", predict("--overlap", v), ("--overlap",))
    for v in ("0", "-3"):
        add(f"predict-sw-batch-size-{v}", predict("--sw-batch-size", v), ("--sw-batch-size",))
    for v in ("0 16 16", "-16 16 16", "20 20 20", "8 8 8"):
        add(f"predict-patch-size-{v.replace(' ', 'x')}", predict("--patch-size", *v.split()), ("--patch-size",))
    add("predict-device-bogus", predict("--device", "quantum"), ("quantum",))

    def suggest(*opts):
        def build(env):
            proj = env.project()
            return ["suggest", "--project", str(proj), "--run", "r1", "--device", "cpu", *opts]
        return build

    for opts, flag in [(("--active-k", "0"), "--active-k"), (("--active-k", "-2"), "--active-k"), (("--overlap", "1"), "--overlap"),
                       (("--overlap", "nan"), "--overlap"), (("--progress", "1.5"), "--progress"),
                       (("--progress", "nan"), "--progress"), (("--progress", "-1"), "--progress")]:
        add(f"suggest{'-'.join(opts)}", suggest(*opts), (flag,))

    def imp(*opts):
        def build(env):
            data = env.data()
            return ["import", str(data), "--project", str(env.p("proj")), *opts]
        return build

    for v in ("1.5", "1.0", "-0.1", "nan", "inf"):
        add(f"import-val-fraction-{v}", imp("--val-fraction", v), ("--val-fraction",))
    add("import-limit--1", imp("--limit", "-1"), ("--limit",))
    for v in ("x:y", "0:background", "1:a,1:b", "300:z", "1:a;;x:b"):
        add(f"import-classes-{v}", imp("--classes", v), ("--classes",))

    def simulate(*opts):
        def build(env):
            proj = env.project()
            return ["crosslabel", "simulate", "--project", str(proj), *opts]
        return build

    add("simulate-count--1", simulate("--count", "-1"), ("--count",))

    def cancel(*opts):
        def build(env):
            proj = env.project()
            return ["jobs", "cancel", "--project", str(proj), "--run", "r1", *opts]
        return build

    for v in ("-5", "nan"):
        add(f"jobs-cancel-timeout-{v}", cancel("--timeout", v), ("--timeout",))

    def train(*opts, jobs=False):
        def build(env):
            proj = env.project()
            argv = ["train", "--project", str(proj), "--run", "fresh"]
            base = list(TINY_TRAIN)
            if opts[0] in base:  # the option under test replaces its tiny default
                j = base.index(opts[0])
                del base[j:j + (4 if opts[0] == "--patch-size" else 2)]
            return (["jobs", "start"] + argv[1:] if jobs else argv) + base + list(opts)
        return build

    for opts in [("--iterations", "0"), ("--iterations", "-5"), ("--batch-size", "0"), ("--lr", "nan"),
                 ("--lr", "-0.1"), ("--lr", "inf"), ("--keep-last", "0"), ("--width", "0"), ("--dropout", "2"),
                 ("--val-overlap", "1.0"), ("--labelled-batch-size", "5"), ("--patch-size", "0", "16", "16"),
                 ("--max-val-cases", "-1"), ("--val-every", "0"), ("--ckpt-every", "0")]:
        add(f"train{'-'.join(opts[:2])}", train(*opts), (opts[0],))
    for opts in [("--iterations", "0"), ("--lr", "nan")]:
        add(f"jobs-start{'-'.join(opts)}", train(*opts, jobs=True), (opts[0],))
    # method options outside their declared bounds (base.option's low/high/above), refused before anything is saved
    for method, flag, value in [("mt", "--ema", "2"), ("mt", "--ema", "nan"), ("mt", "--noise-std", "-1"),
                                ("fmabs", "--pseudo-warmup", "2"), ("fmabs", "--sam-weight", "-1"),
                                ("fmabs", "--box-jitter", "-5"), ("fmabs", "--n-points", "-2"),
                                ("fmabs", "--pseudo-max-slices", "0"), ("fmabs", "--pseudo-max-cases", "-1"),
                                ("fmabs", "--teacher-weight", "1.5"), ("ua-mt", "--mc-passes", "0"),
                                ("cps", "--cps-weight", "-0.1"), ("cfr-mt", "--finetune-lr", "0")]:
        add(f"train-{method}{flag}-{value}", train(flag, value, "--method", method), (flag,))
    add("train-fmabs-warmup-after-stop", train("--pseudo-warmup", "0.9", "--pseudo-stop", "0.5", "--method", "fmabs"),
        ("--pseudo-warmup", "--pseudo-stop"))
    add("train-seed--1", train("--seed", "-1"), ("--seed",))
    # choices checked when the options are read: the run folder is not written, so the corrected command is not
    # refused as "a run that exists with other options" (before: config.json saved with the bad value)
    add("train-fmabs-embedding-dtype-bogus", train("--method", "fmabs", "--embedding-dtype", "bogus"),
        ("--embedding-dtype",), allowed=("out",))
    add("train-fmabs-fusion-bogus", train("--method", "fmabs", "--fusion", "bogus"), ("--fusion",), allowed=("out",))
    add("train-cfr-labels-bogus", train("--method", "cfr-mt", "--labels", "bogus"), ("--labels",), allowed=("out",))

    def tiled_junk_adapter(env):
        junk = env.write("junk.pth", "not an adapter")
        return train("--method", "fmabs", "--adapter-mode", "tiled", "--adapter", str(junk))(env)

    add("train-fmabs-tiled-junk-adapter", tiled_junk_adapter, ("junk.pth",), allowed=("out",))

    def demo_unknown_method(env):
        return ["demo", "--methods", "banana", "--output", str(env.p("demo"))]

    add("demo-methods-banana", demo_unknown_method, ("--methods", "banana"), allowed=())
    add("train-patch-size-256GiB", train("--patch-size", "4096", "4096", "4096"), ("--patch-size", "GiB"))

    def tile_grid_huge(env):
        return ["tile-grid", "--project", str(env.project()), "--device", "cpu", "--patch-size", "4096", "4096", "4096"]

    add("tile-grid-patch-size-256GiB", tile_grid_huge, ("--patch-size", "GiB"))

    def pseudo_label(*opts):
        def build(env):
            scan = env.image("in/c1.nii.gz")
            mask = env.label("in/mask.nii.gz")
            return ["pseudo-label", "--image", str(scan), "--prompt-from", str(mask), "--output", str(env.p("out")),
                    "--device", "cpu", *opts]
        return build

    for flag, value in [("--box-jitter", "-5"), ("--jitter", "-30"), ("--n-points", "-2"), ("--points", "-2"),
                        ("--pseudo-max-slices", "0")]:
        add(f"pseudo-label{flag}-{value}", pseudo_label(flag, value), (flag,), allowed=())
    return cases


# output paths -------------------------------------------------------------------------------------------
def _output_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, build, expect, allowed=()):
        cases.append(Case(f"output-paths/{name}", "output-paths", build, expect, allowed))

    def evaluate(json_path: Callable[[Env], Path | None]):
        def build(env):
            env.label("pred/c1.nii.gz")
            env.label("labels/c1.nii.gz")
            target = json_path(env)
            if target is None:
                raise Skip("no read-only folder on this machine")
            return ["evaluate", "--pred", str(env.p("pred")), "--labels", str(env.p("labels")), "--json", str(target)]
        return build

    add("evaluate-json-is-a-label", evaluate(lambda e: e.p("labels/c1.nii.gz")), ("--json", "c1.nii.gz"))
    add("evaluate-json-is-a-prediction", evaluate(lambda e: e.p("pred/c1.nii.gz")), ("--json", "c1.nii.gz"))
    add("evaluate-json-exists", evaluate(lambda e: e.write("report.json", '{"mine": 1}')), ("report.json",))
    add("evaluate-json-is-a-folder", evaluate(lambda e: (e.p("rep").mkdir(), e.p("rep"))[1]), ("rep",))
    add("evaluate-json-is-pred-folder", evaluate(lambda e: e.p("pred")), ("pred",))
    add("evaluate-json-missing-folder", evaluate(lambda e: e.p("nowhere/deeper/report.json")), ("nowhere",))
    add("evaluate-json-read-only", evaluate(lambda e: (lambda d: d and d / "fmabs-report.json")(e.readonly_dir("ro"))),
        ("fmabs-report.json",))

    def pseudo_label_output_exists(env):
        scan = env.image("in/c1.nii.gz")
        mask = env.label("in/mask.nii.gz")
        env.write("out/c1_fused.nii.gz", "mine")
        return ["pseudo-label", "--image", str(scan), "--prompt-from", str(mask), "--output", str(env.p("out")),
                "--device", "cpu"]

    def json_exists(*command):
        def build(env):
            env.write("mine.json", '{"mine": 1}')
            args = [str(env.project()) if a == "PROJ" else a for a in command]
            return [*args, "--json", str(env.p("mine.json"))]
        return build

    add("pseudo-label-output-exists", pseudo_label_output_exists, ("c1_fused.nii.gz", "--overwrite"), ("out",))
    add("methods-json-exists", json_exists("methods"), ("mine.json", "--overwrite"))
    add("jobs-list-json-exists", json_exists("jobs", "list", "--project", "PROJ"), ("mine.json", "--overwrite"),
        ("proj",))
    add("bench-teachers-json-exists", json_exists("bench", "teachers", "--project", "PROJ", "--device", "cpu"),
        ("mine.json", "--overwrite"), ("proj",))
    add("tile-grid-json-exists", json_exists("tile-grid", "--project", "PROJ", "--device", "cpu"),
        ("mine.json", "--overwrite"), ("proj",))

    def predict(setup: Callable[[Env], tuple[list[str], Path | None]], *opts):
        def build(env):
            model = env.model()
            inputs, out = setup(env)
            if out is None:
                raise Skip("no read-only folder on this machine")
            return ["predict", "--model", str(model), "--input", *map(str, inputs), "--output", str(out),
                    "--device", "cpu", *opts]
        return build

    def existing_output(env):
        scan = env.image("in/c1.nii.gz")
        env.label("out/c1.nii.gz")
        return [scan], env.p("out")

    def existing_probs(env):
        scan = env.image("in/c1.nii.gz")
        env.write("out/c1_probs.nii.gz", "mine")
        return [scan], env.p("out")

    def output_is_input_folder_channel(env):
        env.image("in/c1_0000.nii.gz")
        return [env.p("in")], env.p("in")

    def output_is_input_folder(env):
        env.image("in/c1.nii.gz")
        return [env.p("in")], env.p("in")

    def output_is_a_file(env):
        scan = env.image("in/c1.nii.gz")
        return [scan], env.write("out", "a file")

    def output_is_the_input_file(env):
        scan = env.image("in/c1.nii.gz")
        return [scan], scan

    def output_read_only(env):
        scan = env.image("in/c1.nii.gz")
        d = env.readonly_dir("ro")
        return [scan], (d / "fmabs-out" if d is not None and d == Path("/sys") else d)

    def output_missing_parent(env):
        scan = env.image("in/c1.nii.gz")
        return [scan], env.p("nowhere/deeper/out")

    def same_case_twice(env):
        env.image("in/c1.nii.gz")
        env.write("in/c1.nii", _valid_image())
        return [env.p("in")], env.p("out")

    add("predict-output-exists", predict(existing_output), ("c1.nii.gz", "--output"), ("out",))
    add("predict-probabilities-exist", predict(existing_probs, "--probabilities"), ("c1_probs.nii.gz",), ("out",))
    add("predict-output-is-input-folder-new-name", predict(output_is_input_folder_channel), ("in",))
    add("predict-output-is-input-folder", predict(output_is_input_folder), ("in",))
    add("predict-output-is-a-file", predict(output_is_a_file), ("out",))
    add("predict-output-is-the-input-file", predict(output_is_the_input_file), ("c1.nii.gz",))
    add("predict-output-read-only", predict(output_read_only), ("--output",))
    add("predict-output-missing-parent", predict(output_missing_parent), ("nowhere",))
    add("predict-two-inputs-one-case", predict(same_case_twice), ("c1.nii",), ("out",))

    def simulate(cases_opt: bool):
        def build(env):
            proj = env.project()
            crossed = _crosslabelled(proj)
            return ["crosslabel", "simulate", "--project", str(proj)] + (["--cases", crossed[0]] if cases_opt else [])
        return build

    add("simulate-overwrites-drawn-crosslabel", simulate(True), ("crosslabels",), ("proj",))
    add("simulate-all-overwrites-crosslabels", simulate(False), ("crosslabels",), ("proj",))
    return cases


# model files --------------------------------------------------------------------------------------------
def _model_cases() -> list[Case]:
    import torch

    cases: list[Case] = []

    def add(name, make: Callable[[Env, Path], None], expect=("model.pt",), command="predict"):
        def build(env):
            if command == "suggest":
                proj = env.project()
                path = proj / "runs" / "r1" / "model.pt"
                make(env, path)
                return ["suggest", "--project", str(proj), "--run", "r1", "--active-k", "1", "--device", "cpu", "--no-record"]
            path = env.p("model.pt")
            make(env, path)
            scan = env.image("in/scan.nii.gz")
            return ["predict", "--model", str(path), "--input", str(scan), "--output", str(env.p("out")),
                    "--device", "cpu"]
        cases.append(Case(f"model-files/{name}/{command}", "model-files", build, expect, ("out", "proj")))

    def good(env) -> dict:
        return torch.load(env.assets / "model.pt", weights_only=True)

    def saving(change: Callable[[dict, Env], object]):
        def make(env, path):
            state = good(env)
            new = change(state, env)  # a new object to save, or None: the changed state
            torch.save(state if new is None else new, path)
        return make

    def net(**kw):
        return saving(lambda s, e: s["net"].update(kw))

    def other_arch(state, env):
        from fmabs_core.training.nets import NetConfig, build_network
        state["state_dict"] = build_network(NetConfig(width=8)).state_dict()

    def raw(data: bytes):
        def make(env, path):
            path.write_bytes(data)
        return make

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    def evil(env, path):
        path.write_bytes(pickle.dumps({"state_dict": Evil()}))

    def truncated(env, path):
        torch.save(good(env), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    add("bare-tensor", saving(lambda s, e: torch.zeros(3)))
    add("bare-tensor", saving(lambda s, e: torch.zeros(3)), command="suggest")
    add("no-net-no-checkpoint", saving(lambda s, e: {"foo": torch.zeros(1)}))
    add("other-architecture", saving(other_arch))
    add("other-architecture", saving(other_arch), command="suggest")
    add("net-unet-vnet-weights", net(name="unet"))
    add("net-unknown-name", net(name="resnet9000"), ("model.pt", "resnet9000"))
    add("net-unknown-key", net(colour="blue"), ("model.pt", "colour"))
    add("net-width-text", net(width="x"), ("model.pt", "width"))
    add("net-width-0", net(width=0), ("model.pt", "width"))
    add("net-in-channels-3", net(in_channels=3))
    add("net-out-channels-0", net(out_channels=0))
    add("net-is-a-list", saving(lambda s, e: s.update(net=[1, 2])), ("model.pt", "net"))
    add("patch-size-missing", saving(lambda s, e: s.pop("patch_size") and None), ("model.pt", "patch_size"))
    add("patch-size-zero", saving(lambda s, e: s.update(patch_size=[0, 0, 0])), ("model.pt", "patch_size"))
    add("patch-size-text", saving(lambda s, e: s.update(patch_size="abc")), ("model.pt", "patch_size"))
    add("state-dict-missing", saving(lambda s, e: s.pop("state_dict") and None), ("model.pt", "state_dict"))
    add("state-dict-is-a-list", saving(lambda s, e: s.update(state_dict=[1])), ("model.pt", "state_dict"))
    add("top-level-list", saving(lambda s, e: [s]))
    add("garbage-bytes", raw(_rng(9).integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    add("empty-file", raw(b""))
    add("truncated", truncated)
    add("malicious-pickle", evil)

    def build_ckpt(env):
        proj = env.project()
        run = _checkpoint_run(env, proj)
        (run / "config.json").unlink()
        scan = env.image("in/scan.nii.gz")
        return ["predict", "--model", str(run), "--input", str(scan), "--output", str(env.p("out")),
                "--device", "cpu"]

    cases.append(Case("model-files/checkpoint-without-config/predict", "model-files", build_ckpt,
                      ("iter_0000001.pt",), ("out", "proj")))
    return cases


def _training_label_grid_cases() -> list[Case]:
    """A project's cross-label or dense label off its scan's grid: `fmabs check` reports it; training must refuse it
    too (it used to train on it and exit 0)."""
    cases: list[Case] = []
    shifted = EYE.copy()
    shifted[:3, 3] = (5.0, 0.0, 0.0)

    def build_with(kind: str, data: bytes):
        def build(env):
            proj = env.project()
            case = _crosslabelled(proj)[0]
            folder = "crosslabels" if kind == "crosslabel" else "labels"
            env.write(proj / folder / f"{case}.nii.gz", _gz(data))
            method = ["--method", "sup-dense"] if kind == "label" else []
            return ["train", "--project", str(proj), "--run", "fresh", *TINY_TRAIN, *method]
        return build

    for kind in ("crosslabel", "label"):
        cases.append(Case(f"affine/train-{kind}-shifted", "affine",
                          build_with(kind, nifti_bytes(_label_array(), sform=shifted)), ("affine differs",), ("proj",)))
        cases.append(Case(f"affine/train-{kind}-other-shape", "affine",
                          build_with(kind, nifti_bytes(_label_array()[:, :, :12])), ("differs from its image",),
                          ("proj",)))
    return cases


def all_cases() -> list[Case]:
    cases = (_volume_cases() + _project_doc_cases() + _run_doc_cases() + _names_cases() + _options_cases()
             + _training_label_grid_cases()
             + _output_cases() + _model_cases())
    seen: set[str] = set()
    for c in cases:
        assert c.id not in seen, f"duplicate case id {c.id}"
        seen.add(c.id)
    return cases


# ---- shared assets ------------------------------------------------------------------------------------
def make_assets(folder: Path) -> Path:
    """Four 16^3 scans with labels, a project from them (two cross-labelled scans, a run r1 with a
    width-4 V-Net model) and the model file alone."""
    import torch

    from fmabs_core.cli.project_cmds import simulate_crosslabels
    from fmabs_core.contract import CONFIG_FILE, MODEL_FILE, STATUS_FILE
    from fmabs_core.data.project import import_folder
    from fmabs_core.inference.predict import save_model
    from fmabs_core.training.config import NetConfig, TrainConfig
    from fmabs_core.training.nets import build_network

    folder = Path(folder)
    data = folder / "data"
    for i in range(1, 5):
        (data / "imagesTr").mkdir(parents=True, exist_ok=True)
        (data / "labelsTr").mkdir(parents=True, exist_ok=True)
        (data / "imagesTr" / f"c{i}.nii.gz").write_bytes(_gz(nifti_bytes(_image_array(10 + i))))
        (data / "labelsTr" / f"c{i}.nii.gz").write_bytes(_gz(nifti_bytes(_label_array())))
    project, problems = import_folder(data, folder / "proj", val_fraction=0.25, seed=0)
    assert not problems, problems
    simulate_crosslabels(project, project.split("train")[:2], "centre", 0)
    torch.manual_seed(0)
    net_cfg = NetConfig(width=4, out_channels=2)
    net = build_network(net_cfg)
    save_model(folder / "model.pt", net.state_dict(), net_cfg, (16, 16, 16), {1: "foreground"})
    run = project.run_dir("r1")
    run.mkdir(parents=True)
    shutil.copyfile(folder / "model.pt", run / MODEL_FILE)
    cfg = TrainConfig(net=net_cfg, patch_size=(16, 16, 16), iterations=1, val_every=1, ckpt_every=1)
    (run / CONFIG_FILE).write_text(cfg.to_json())
    (run / STATUS_FILE).write_text(json.dumps({"state": "done", "run": "r1", "iteration": 1, "iterations": 1,
                                               "updated": 1.0}))
    return folder


# ---- running a case -----------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest; folders as 'dir')."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for f in files:
            path = os.path.join(root, f)
            if os.path.islink(path):
                out[os.path.relpath(path, folder)] = "link"
                continue
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                h.update(fh.read())
            out[os.path.relpath(path, folder)] = h.hexdigest()
    return out


@dataclass
class Outcome:
    rc: int | None
    output: str
    crashed: str = ""  # the traceback of an exception that escaped main()
    failures: list[str] = field(default_factory=list)


def check_outcome(case: Case, outcome: Outcome, before: dict[str, str], after: dict[str, str],
                  outside_before: list[str], outside_after: list[str]) -> list[str]:
    """Every way the case's outcome falls short of the rules (empty: it passed)."""
    problems = []
    text = outcome.output + outcome.crashed
    if outcome.crashed:
        problems.append("exception escaped: " + outcome.crashed.strip().splitlines()[-1][:200])
    elif outcome.rc != 2:
        problems.append(f"exit code {outcome.rc}, expected 2")
    if "Traceback" in text and not outcome.crashed:
        problems.append("traceback printed")
    low = text.lower()
    missing = [e for e in case.expect if e.lower() not in low]
    if missing and not outcome.crashed:
        problems.append(f"message does not name {missing}: {outcome.output.strip()[-300:]!r}")
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    if changed:
        problems.append(f"pre-existing files changed or removed: {changed[:5]}")
    new = sorted(k for k in after if k not in before
                 and not any(k == a or k.startswith(a + os.sep) for a in case.allowed))
    if new:
        problems.append(f"new files outside {list(case.allowed) or 'any allowed folder'}: {new[:5]}")
    if outside_after != outside_before:
        problems.append(f"the folder around the case changed: {sorted(set(outside_after) ^ set(outside_before))[:5]}")
    return problems


def run_in_process(argv: list[str]) -> Outcome:
    """``fmabs ARGV`` in this process, output captured (script mode; the pytest suite uses capsys)."""
    from fmabs_core.cli import main

    buf = _io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    root.addHandler(handler)
    crashed = ""
    rc: int | None
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            except Exception:  # noqa: BLE001 - the point is to see it
                rc, crashed = None, traceback.format_exc()
    finally:
        root.removeHandler(handler)
    return Outcome(rc, buf.getvalue(), crashed)


def run_subprocess(argv: list[str], cwd: Path) -> Outcome:
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fmabs_core", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    return Outcome(proc.returncode, proc.stdout + proc.stderr)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only cases whose id contains this")
    ap.add_argument("--keep", help="build the corpus here and keep it")
    ap.add_argument("-q", "--quiet", action="store_true", help="totals only")
    args = ap.parse_args(argv)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fmabs-hostile-"))
    base.mkdir(parents=True, exist_ok=True)
    assets = make_assets(base / "assets")
    totals: dict[str, list[int]] = {c: [0, 0, 0] for c in CLASSES}  # passed, failed, skipped
    failed_cases = []
    t0 = time.time()
    for i, case in enumerate(c for c in all_cases() if args.k in c.id):
        folder = base / "cases" / f"{i:03d}" / "case"
        env = Env(folder, assets)
        try:
            argv_case = case.build(env)
        except Skip:
            totals[case.cls][2] += 1
            continue
        before, outside_before = snapshot(folder), sorted(os.listdir(folder.parent))
        outcome = run_subprocess(argv_case, folder) if case.subprocess else run_in_process(argv_case)
        problems = check_outcome(case, outcome, before, snapshot(folder), outside_before,
                                 sorted(os.listdir(folder.parent)))
        totals[case.cls][0 if not problems else 1] += 1
        if problems:
            failed_cases.append((case.id, problems))
    if not args.quiet:
        for cid, problems in failed_cases:
            print(f"FAIL {cid}: {'; '.join(problems)}")
    print(f"\n{'class':<14}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for cls, (p, f, s) in totals.items():
        print(f"{cls:<14}{p:>8}{f:>8}{s:>9}")
    tp, tf, ts = (sum(v[i] for v in totals.values()) for i in range(3))
    print(f"{'total':<14}{tp:>8}{tf:>8}{ts:>9}   ({time.time() - t0:.0f} s)")
    if not args.keep:
        _chmod_back(base)
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed_cases else 0


def _chmod_back(folder: Path) -> None:
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, d), 0o755)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
