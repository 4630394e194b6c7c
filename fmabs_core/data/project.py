"""The project folder: scans, labels, cross-labels, runs, and ``fmabs.json``.

All updates to ``fmabs.json`` go through :meth:`Project.update`, which takes a file lock and writes
atomically, because the Slicer GUI and a running training job may touch the project at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from fmabs_core.contract import (CROSSLABELS_DIR, IMAGES_DIR, LABELS_DIR, MAX_CLASS, PROJECT_FILE, RUNS_DIR,
                                 check_name, is_safe_name, safe_case_id)
from fmabs_core.data import io
from fmabs_core.errors import InputError, ProjectError

log = logging.getLogger(__name__)

PROJECT_LOCK_FILE = ".fmabs.lock"
SCHEMA_VERSION = 1


@dataclass
class Problem:
    case: str
    path: str
    message: str

    def __str__(self) -> str:
        return self.message


class Project:
    """Handle on a project folder; cheap to create, re-reads ``fmabs.json`` on each access."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ProjectError(f"{self.root}: is a file, not a project folder. Give the folder that holds "
                               f"{PROJECT_FILE} (--project).")
        if not (self.root / PROJECT_FILE).exists():
            raise ProjectError(
                f"{self.root}: not an FM-ABS project (no {PROJECT_FILE}). Create one with 'fmabs import'."
            )
        self.read()  # a damaged fmabs.json is named when the project is opened, whatever the command

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, classes: dict[int, str] | None = None, exist_ok: bool = False) -> "Project":
        root = Path(root)
        if (root / PROJECT_FILE).exists():
            if exist_ok:
                return cls(root)
            raise ProjectError(f"{root}: a project already exists here; open it or choose another folder.")
        check_new_project_folder(root)
        if classes is not None:
            check_classes(classes, "classes")
        try:
            for sub in PROJECT_DIRS:
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(f"{root}: cannot create the project here ({exc.strerror or exc}); choose another "
                               "folder.") from None
        meta = {
            "version": SCHEMA_VERSION,
            "classes": {str(k): v for k, v in (classes or {1: "foreground"}).items()},
            "cases": [],
            "split": {"train": [], "val": []},
            "budget": None,
            "rounds": [],
        }
        io.atomic_write_text(root / PROJECT_FILE, json.dumps(meta, indent=2))
        return cls(root)

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / PROJECT_FILE

    def read(self) -> dict[str, Any]:
        """``fmabs.json``, checked against its schema (:func:`check_meta`): a ProjectError names the key."""
        path = self.meta_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProjectError(f"{self.root}: not an FM-ABS project (no {PROJECT_FILE}).") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ProjectError(f"{path}: cannot be read ({reason}); restore it from a backup.") from None
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ProjectError(f"{path}: not valid JSON ({reason}); restore it from a backup.") from None
        return check_meta(meta, path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of ``fmabs.json`` among processes (``filelock``: flock on POSIX, msvcrt on Windows)."""
        try:
            lock = FileLock(str(self.root / PROJECT_LOCK_FILE), thread_local=False)
            lock.acquire()
        except OSError as exc:
            raise ProjectError(f"{self.root}: cannot lock the project ({exc.strerror or exc}); is the folder "
                               "read-only?") from None
        try:
            yield
        finally:
            lock.release()

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the metadata under the project lock and write it atomically."""
        with self.locked():
            return self._change_locked(change)

    def _change_locked(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """:meth:`update`'s work, for a caller that holds :meth:`locked` already (the lock is not re-entrant)."""
        meta = self.read()
        io.remove_stale_temporaries(self.meta_path)  # a writer killed before its rename (every writer holds the lock)
        result = change(meta)
        check_meta(meta, self.meta_path)  # never write a document the next read would refuse
        io.atomic_write_text(self.meta_path, json.dumps(meta, indent=2))
        return result

    @property
    def classes(self) -> dict[int, str]:
        return {int(k): v for k, v in self.read()["classes"].items()}

    @property
    def num_classes(self) -> int:
        """Foreground classes (C); the network predicts C + 1 channels."""
        return max(self.classes)

    @property
    def cases(self) -> list[str]:
        return list(self.read()["cases"])

    def split(self, name: str) -> list[str]:
        return list(self.read()["split"].get(name, []))

    def original_names(self) -> dict[str, str]:
        """case id -> the scan's own file name, for scans imported under a safe id (``my scan 1.nii.gz``)."""
        names = self.read().get("names") or {}
        return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}

    def display_names(self) -> dict[str, str]:
        """case id -> what the panels show: the id, and the file name it came from when that differs (one read of
        fmabs.json for the whole list)."""
        original = self.original_names()
        return {case: f"{case} ({original[case]})" if case in original else case for case in self.cases}

    def set_split(self, val_fraction: float = 0.2, seed: int = 0, val: list[str] | None = None) -> None:
        if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
            raise InputError(f"--val-fraction must be a number in [0, 1) (got {val_fraction})")
        cases = self.cases
        if val is None:
            rng = random.Random(seed)
            shuffled = sorted(cases)
            rng.shuffle(shuffled)
            n_val = int(round(len(cases) * val_fraction)) if len(cases) > 1 else 0
            val = sorted(shuffled[:n_val])
        unknown = sorted(set(val) - set(cases))
        if unknown:
            raise ProjectError(f"validation cases {unknown} are not in the project")
        train = [c for c in cases if c not in set(val)]

        def change(meta: dict[str, Any]) -> None:
            meta["split"] = {"train": train, "val": sorted(val)}

        self.update(change)

    # ---- paths ----------------------------------------------------------------------------------
    def image_path(self, case: str) -> Path:
        return self.root / IMAGES_DIR / f"{_case_name(case)}.nii.gz"

    def label_path(self, case: str) -> Path:
        return self.root / LABELS_DIR / f"{_case_name(case)}.nii.gz"

    def crosslabel_path(self, case: str) -> Path:
        return self.root / CROSSLABELS_DIR / f"{_case_name(case)}.nii.gz"

    def run_dir(self, run: str) -> Path:
        """``runs/<run>``; the name must be a safe folder name, and the folder must stay inside ``runs/``."""
        try:
            check_name(run, "run name")
        except ValueError as exc:
            raise InputError(f"--run: {exc}") from None
        runs = self.root / RUNS_DIR
        path = runs / run
        if path.is_symlink() or (path.exists() and path.resolve().parent != runs.resolve()):
            raise InputError(f"--run {run}: {path} leads outside the project's {RUNS_DIR}/ folder (a link?); "
                             "choose another run name.")
        return path

    def has_label(self, case: str) -> bool:
        return self.label_path(case).exists()

    def crosslabelled(self) -> list[str]:
        return [c for c in self.cases if self.crosslabel_path(c).exists()]

    # ---- loading --------------------------------------------------------------------------------
    def load_image(self, case: str) -> io.Volume:
        return io.load_image(self.image_path(case))

    def load_label(self, case: str) -> io.Volume:
        return io.load_label(self.label_path(case), self.num_classes)

    def load_crosslabel(self, case: str) -> io.Volume:
        vol = io.load_label(self.crosslabel_path(case), self.num_classes, allow_unlabelled=True)
        if not (vol.array != 255).any():
            raise InputError(
                f"{vol.path}: this cross-label has no labelled voxel (all 255). Draw the three slices "
                "again, or delete the file to leave the scan unlabelled."
            )
        return vol

    # ---- adding scans ---------------------------------------------------------------------------
    def add_case(
        self, image: str | Path, label: str | Path | None = None, case: str | None = None, check: bool = True,
        name: str | None = None,
    ) -> str:
        """Copy a scan (and its dense label) into the project; the user's files are never touched.
        ``name``: the scan's own file name when the case id differs from it (kept in ``fmabs.json`` ``names``)."""
        image = Path(image)
        case = case or io.case_id(image)
        try:
            check_name(case, "case id")
        except ValueError as exc:
            raise InputError(f"{image}: {exc} (the case id is the file name without .nii/.nii.gz); rename the "
                             "file.") from None
        if check:
            img = io.load_image(image)  # validates: readable, 3D, finite
            if label is not None:
                problems = io.check_pair(img, io.load_label(label, self.num_classes))
                if problems:
                    raise InputError("; ".join(problems))
        def change(meta: dict[str, Any]) -> None:
            meta["cases"].append(case)
            meta["split"]["train"].append(case)
            if name is not None:
                meta.setdefault("names", {})[case] = str(name)

        # the check, the copies and the entry under one lock: two people (or the Slicer module and a terminal)
        # adding scans with the same case id at once get one scan and one clear refusal, never one's image
        # under the other's entry
        with self.locked():
            if case in self.cases:
                raise ProjectError(f"case '{case}' already exists in {self.root}; remove it or rename the file.")
            _copy_as_nifti_gz(image, self.image_path(case))
            if label is not None:
                _copy_as_nifti_gz(Path(label), self.label_path(case))
            self._change_locked(change)
        return case

    # ---- integrity --------------------------------------------------------------------------------
    def check(self, progress: Callable[..., Iterator] | None = None) -> list[Problem]:
        """Every problem found in the project's image/label/cross-label files, not only the first.
        ``progress``: wraps the scans (a progress bar in the CLI)."""
        problems: list[Problem] = []
        for case in (progress or (lambda items, **kw: items))(self.cases, desc="checking scans"):
            try:
                img = self.load_image(case)
            except InputError as exc:
                problems.append(Problem(case, str(self.image_path(case)), str(exc)))
                continue
            for path, loader in (
                (self.label_path(case), lambda c=case: self.load_label(c)),
                (self.crosslabel_path(case), lambda c=case: self.load_crosslabel(c)),
            ):
                if not path.exists():
                    continue
                try:
                    lab = loader()
                except InputError as exc:
                    problems.append(Problem(case, str(path), str(exc)))
                    continue
                for msg in io.check_pair(img, lab):
                    problems.append(Problem(case, str(path), msg))
        return problems


PROJECT_DIRS = (IMAGES_DIR, LABELS_DIR, CROSSLABELS_DIR, RUNS_DIR)


def _case_name(case: str) -> str:
    try:
        return check_name(case, "case id")
    except ValueError as exc:
        raise InputError(str(exc)) from None


# ---- the schema of fmabs.json ---------------------------------------------------------------------
def check_classes(classes: Any, where: str) -> dict[int, str]:
    """``{value: name}`` with values 1..254 and string names (keys may be the JSON strings)."""
    if not isinstance(classes, dict) or not classes:
        raise ProjectError(f"{where}: expected an object like {{\"1\": \"foreground\"}} with at least one class, "
                           f"found {_short(classes)}")
    out = {}
    for key, name in classes.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(key, bool) or str(value) != str(key).strip() or not 1 <= value <= MAX_CLASS:
            raise ProjectError(f"{where}: class value {key!r} must be an integer 1..{MAX_CLASS} (0 is background, "
                               "255 'not labelled')")
        if not isinstance(name, str):
            raise ProjectError(f"{where}: the name of class {key} must be a string, found {_short(name)}")
        out[value] = name
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta: Any, path: Path | str = PROJECT_FILE) -> dict[str, Any]:
    """``meta`` if it is a valid ``fmabs.json`` document, else a ProjectError naming the file and key.

    Required: ``classes`` (object, values 1..254), ``cases`` (list of distinct safe names: they become file
    names), ``split`` (object of lists of known cases). Optional: ``version`` (an integer this version
    can read), ``budget`` (null or an integer >= 1), ``rounds`` (a list of objects), ``names`` (case id -> the
    scan's own file name, for scans imported under a safe id). Other keys are kept.
    """
    fix = "; fix the file or restore it from a backup"
    if not isinstance(meta, dict):
        raise ProjectError(f"{path}: expected a JSON object with 'classes', 'cases' and 'split', found "
                           f"{type(meta).__name__ if meta is not None else 'null'}{fix}")
    missing = [k for k in ("classes", "cases", "split") if k not in meta]
    if missing:
        raise ProjectError(f"{path}: missing key(s) {', '.join(map(repr, missing))}{fix}")
    version = meta.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProjectError(f"{path}: key 'version' must be an integer, found {_short(version)}{fix}")
    if version > SCHEMA_VERSION:
        raise ProjectError(f"{path}: key 'version' is {version}: written by a newer FM-ABS (this one reads "
                           f"version {SCHEMA_VERSION}); update fmabs-core")
    check_classes(meta["classes"], f"{path}: key 'classes'")
    cases = meta["cases"]
    if not isinstance(cases, list):
        raise ProjectError(f"{path}: key 'cases' must be a list of case ids, found {_short(cases)}{fix}")
    seen: set[str] = set()
    for i, case in enumerate(cases):
        try:
            check_name(case, "case id")
        except ValueError as exc:
            raise ProjectError(f"{path}: key 'cases'[{i}]: {exc}{fix}") from None
        if case in seen:
            raise ProjectError(f"{path}: key 'cases' lists '{case}' twice{fix}")
        seen.add(case)
    split = meta["split"]
    if not isinstance(split, dict):
        raise ProjectError(f"{path}: key 'split' must be an object like {{\"train\": [...], \"val\": [...]}}, "
                           f"found {_short(split)}{fix}")
    for name, members in split.items():
        if not isinstance(members, list) or not all(isinstance(c, str) for c in members):
            raise ProjectError(f"{path}: key 'split'.{name} must be a list of case ids, found {_short(members)}{fix}")
        unknown = [c for c in members if c not in seen]
        if unknown:
            raise ProjectError(f"{path}: key 'split'.{name} names case(s) {unknown[:5]} that are not in 'cases'{fix}")
    names = meta.get("names", {})
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ProjectError(f"{path}: key 'names' must be an object of case id -> file name, found {_short(names)}{fix}")
    budget = meta.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ProjectError(f"{path}: key 'budget' must be null or a whole number of scans >= 1, found "
                           f"{_short(budget)}{fix}")
    rounds = meta.get("rounds", [])
    if rounds is not None:
        if not isinstance(rounds, list):
            raise ProjectError(f"{path}: key 'rounds' must be a list, found {_short(rounds)}{fix}")
        for i, item in enumerate(rounds):
            if not isinstance(item, dict):
                raise ProjectError(f"{path}: key 'rounds'[{i}] must be an object, found {_short(item)}{fix}")
            if not isinstance(item.get("cases", []), list):
                raise ProjectError(f"{path}: key 'rounds'[{i}].cases must be a list, found "
                                   f"{_short(item.get('cases'))}{fix}")
    return meta


def check_new_project_folder(root: Path) -> None:
    """A new project may go in a new or empty folder, or one whose project subfolders are absent or empty:
    never where it would write over (or among) files the user already has there."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ProjectError(f"{root}: is a file, not a folder; choose a folder for the project (--project).")
    clash = [sub for sub in PROJECT_DIRS if (root / sub).exists()
             and (not (root / sub).is_dir() or any((root / sub).iterdir()))]
    if clash:
        raise ProjectError(f"{root}: not an FM-ABS project (no {PROJECT_FILE}), but it already has "
                           f"{', '.join(c + '/' for c in clash)} with files in it, where the project would write. "
                           "Choose a new or empty folder for the project.")
    if root.is_dir():
        io.check_writable(root, f"--project {root}")


def _copy_as_nifti_gz(src: Path, dst: Path) -> None:
    """Under the project lock (add_case): a copy killed before its rename left a temporary file; it goes first."""
    io.remove_stale_temporaries(dst)
    if src.name.endswith(".nii.gz"):
        with io.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    else:  # .nii: re-save compressed, header and data unchanged
        import nibabel as nib

        img = nib.load(str(src))
        with io.atomic_path(dst) as tmp:
            nib.save(img, str(tmp))


@dataclass
class ImportPlan:
    """What ``fmabs import`` found in a folder, before it reads any voxel."""

    pairs: list[tuple[Path, Path | None]]
    problems: list[Problem]
    skipped: list[str]
    #: scan file -> its case id (the file name, or a safe id made from it: :func:`fmabs_core.contract.safe_case_id`)
    ids: dict[Path, str] = field(default_factory=dict)
    #: case id -> the scan's own file name, for the ids that are not the file name
    names: dict[str, str] = field(default_factory=dict)

    def case_id(self, image: Path) -> str:
        return self.ids.get(Path(image), io.case_id(image))


def plan_import(src: str | Path) -> ImportPlan:
    """Pair scans with labels (``imagesTr``/``labelsTr`` or a plain folder of scans) by case id.

    Problems: two files for one case id (``a.nii`` and ``a.nii.gz``, or ``a_0000`` and ``a``), among
    the scans or among the labels; case ids that are not safe names. Skipped (listed, not imported):
    hidden and non-NIfTI entries, and labels without a scan.
    """
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such folder.")
    if not src.is_dir():
        raise InputError(f"{src}: is a file; 'fmabs import' takes a folder of scans (or one with imagesTr/labelsTr).")
    images_dir = src / "imagesTr" if (src / "imagesTr").is_dir() else src
    labels_dir = src / "labelsTr" if (src / "labelsTr").is_dir() else None
    others: list[Path] = []
    images = io.list_niftis(images_dir, others)
    labels = io.list_niftis(labels_dir, others) if labels_dir else []
    skipped = [f"{p}: {_why_skipped(p)}" for p in others if p.name not in ("imagesTr", "labelsTr") or p.parent != src]
    if not images:
        raise InputError(f"{images_dir}: no .nii or .nii.gz scans found.")
    problems: list[Problem] = []
    by_id: dict[str, list[Path]] = {}
    for p in images:
        by_id.setdefault(io.case_id(p), []).append(p)
    labels_by_id: dict[str, list[Path]] = {}
    for p in labels:
        labels_by_id.setdefault(io.case_id(p), []).append(p)
    for kind, groups in (("scan", by_id), ("label", labels_by_id)):
        for cid, paths in groups.items():
            if len(paths) > 1:
                problems.append(Problem(cid, str(paths[0]), f"case '{cid}' has {len(paths)} {kind} files: "
                                        f"{', '.join(map(str, paths))}; keep one (the case id is the file name "
                                        "without .nii/.nii.gz and _0000)."))
    # A clinician's own file name ("my scan 1.nii.gz", accents, other scripts) is imported under a safe id; the
    # project keeps the original name. Names that are safe already keep their id.
    safe = {cid for cid in by_id if is_safe_name(cid)}
    ids: dict[Path, str] = {}
    names: dict[str, str] = {}
    taken = set(safe)
    for cid, paths in sorted(by_id.items()):
        new_id = cid if cid in safe else safe_case_id(cid, taken)
        taken.add(new_id)
        for p in paths:
            ids[p] = new_id
        if new_id != cid:
            names[new_id] = paths[0].name
    for cid, paths in labels_by_id.items():
        if cid not in by_id:
            skipped += [f"{p}: a label without a scan of the same name" for p in paths]
    pairs = [(paths[0], labels_by_id.get(cid, [None])[0]) for cid, paths in by_id.items()]
    return ImportPlan(sorted(pairs, key=lambda pair: pair[0].name), problems, skipped, ids, names)


def _why_skipped(path: Path) -> str:
    if path.name.startswith("."):
        return "hidden"
    return "a folder (not searched)" if path.is_dir() else "not a NIfTI file (.nii or .nii.gz)"


def import_folder(
    src: str | Path,
    project_root: str | Path,
    classes: dict[int, str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
    skipped: list[str] | None = None,
) -> tuple[Project, list[Problem]]:
    """Import every scan (and dense label when present) into a new or existing project.

    Checks everything first (names, duplicate ids, every pair's files) and reports every problem;
    imports nothing if anything is wrong (a new project is then created empty). A project folder that
    is a file, the source folder itself, or a non-project folder with files where the project would
    write is refused before anything. ``skipped`` receives the files that were left out and why.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise InputError(f"--limit must be at least 0 (got {limit})")
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise InputError(f"--val-fraction must be a number in [0, 1) (got {val_fraction})")
    root = Path(project_root)
    src = Path(src)
    existing = Project(root) if (root / PROJECT_FILE).exists() or (root.exists() and not root.is_dir()) else None
    plan = plan_import(src)
    if existing is None:
        check_new_project_folder(root)
        if root.exists() and any(root.resolve() == d.resolve() for d in (src, src / "imagesTr", src / "labelsTr")
                                 if d.is_dir()):
            raise ProjectError(f"--project {root}: is the folder being imported from; choose another folder for "
                               "the project, so that nothing is written among your scans.")
        if classes is not None:
            check_classes(classes, "--classes")
    elif classes is not None and {int(k): v for k, v in classes.items()} != existing.classes:
        raise InputError(f"--classes {classes} differs from the classes of the existing project {root} "
                         f"({existing.classes}); leave --classes out to import into it.")
    pairs = plan.pairs if limit is None else plan.pairs[:limit]
    notes = list(plan.skipped)
    if limit is not None and len(plan.pairs) > limit:
        notes.append(f"{len(plan.pairs) - limit} scan(s) after the first {limit} (--limit)")
    problems: list[Problem] = list(plan.problems)
    bad_ids = {p.case for p in problems}
    n_classes = existing.num_classes if existing is not None else max(classes or {1: "foreground"})
    iterator = progress(iter(pairs)) if progress else pairs
    for image, label in iterator:
        cid = plan.case_id(image)
        if cid in bad_ids:
            continue
        try:
            img = io.load_image(image)
        except InputError as exc:
            problems.append(Problem(cid, str(image), str(exc)))
            continue
        if label is not None:
            try:
                lab = io.load_label(label, n_classes)
            except InputError as exc:
                problems.append(Problem(cid, str(label), str(exc)))
                continue
            problems += [Problem(cid, str(label), m) for m in io.check_pair(img, lab)]
    if skipped is not None:
        skipped.extend(notes)
    project = existing or Project.create(root, classes)  # an empty project even when nothing can be imported
    if problems:
        return project, problems
    present = set(project.cases)
    for image, label in pairs:
        cid = plan.case_id(image)
        if cid in present:
            log.info("skipping %s: already in the project", image)
            if skipped is not None:
                skipped.append(f"{image}: case '{cid}' is already in the project")
            continue
        project.add_case(image, label, case=cid, check=False, name=plan.names.get(cid))  # checked above
    project.set_split(val_fraction=val_fraction, seed=seed)
    return project, []
