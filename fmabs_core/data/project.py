"""The project folder: scans, labels, cross-labels, runs, and ``fmabs.json``.

All updates to ``fmabs.json`` go through :meth:`Project.update`, which takes a file lock and writes
atomically, because the Slicer GUI and a running training job may touch the project at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from fmabs_core.contract import PROJECT_FILE
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
        if not (self.root / PROJECT_FILE).exists():
            raise ProjectError(
                f"{self.root}: not an FM-ABS project (no {PROJECT_FILE}). Create one with 'fmabs import'."
            )

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, classes: dict[int, str] | None = None, exist_ok: bool = False) -> "Project":
        root = Path(root)
        if (root / PROJECT_FILE).exists():
            if exist_ok:
                return cls(root)
            raise ProjectError(f"{root}: a project already exists here; open it or choose another folder.")
        for sub in ("images", "labels", "crosslabels", "runs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
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
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ProjectError(f"{self.meta_path}: not valid JSON ({exc}); restore it from a backup.") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of ``fmabs.json`` among processes (``filelock``: flock on POSIX, msvcrt on Windows)."""
        with FileLock(str(self.root / PROJECT_LOCK_FILE), thread_local=False):
            yield

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the metadata under the project lock and write it atomically."""
        with self.locked():
            meta = self.read()
            result = change(meta)
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

    def set_split(self, val_fraction: float = 0.2, seed: int = 0, val: list[str] | None = None) -> None:
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
        return self.root / "images" / f"{case}.nii.gz"

    def label_path(self, case: str) -> Path:
        return self.root / "labels" / f"{case}.nii.gz"

    def crosslabel_path(self, case: str) -> Path:
        return self.root / "crosslabels" / f"{case}.nii.gz"

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

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
        self, image: str | Path, label: str | Path | None = None, case: str | None = None, check: bool = True
    ) -> str:
        """Copy a scan (and its dense label) into the project; the user's files are never touched."""
        image = Path(image)
        case = case or io.case_id(image)
        if check:
            img = io.load_image(image)  # validates: readable, 3D, finite
            if label is not None:
                problems = io.check_pair(img, io.load_label(label, self.num_classes))
                if problems:
                    raise InputError("; ".join(problems))
        if case in self.cases:
            raise ProjectError(f"case '{case}' already exists in {self.root}; remove it or rename the file.")
        _copy_as_nifti_gz(image, self.image_path(case))
        if label is not None:
            _copy_as_nifti_gz(Path(label), self.label_path(case))

        def change(meta: dict[str, Any]) -> None:
            meta["cases"].append(case)
            meta["split"]["train"].append(case)

        self.update(change)
        return case

    # ---- integrity --------------------------------------------------------------------------------
    def check(self) -> list[Problem]:
        """Every problem found in the project's image/label/cross-label files, not only the first."""
        problems: list[Problem] = []
        for case in self.cases:
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


def _copy_as_nifti_gz(src: Path, dst: Path) -> None:
    if src.name.endswith(".nii.gz"):
        with io.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    else:  # .nii: re-save compressed, header and data unchanged
        import nibabel as nib

        img = nib.load(str(src))
        with io.atomic_path(dst) as tmp:
            nib.save(img, str(tmp))


def find_pairs(src: str | Path) -> list[tuple[Path, Path | None]]:
    """Image/label pairs from an ``imagesTr``/``labelsTr`` folder (MSD / nnU-Net) or a plain folder of scans."""
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such folder.")
    images_dir = src / "imagesTr" if (src / "imagesTr").is_dir() else src
    labels_dir = src / "labelsTr" if (src / "labelsTr").is_dir() else None
    images = io.list_niftis(images_dir)
    if not images:
        raise InputError(f"{images_dir}: no .nii or .nii.gz scans found.")
    labels = {io.case_id(p): p for p in io.list_niftis(labels_dir)} if labels_dir else {}
    return [(img, labels.get(io.case_id(img))) for img in images]


def import_folder(
    src: str | Path,
    project_root: str | Path,
    classes: dict[int, str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> tuple[Project, list[Problem]]:
    """Import every scan (and dense label when present) into a new or existing project.

    Checks all pairs first and reports every problem; imports nothing if any pair is bad.
    """
    pairs = find_pairs(src)
    if limit is not None:
        pairs = pairs[:limit]
    project = Project.create(project_root, classes, exist_ok=True)
    problems: list[Problem] = []
    n_classes = project.num_classes
    iterator = progress(iter(pairs)) if progress else pairs
    for image, label in iterator:
        cid = io.case_id(image)
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
    if problems:
        return project, problems
    existing = set(project.cases)
    for image, label in pairs:
        if io.case_id(image) in existing:
            log.info("skipping %s: already in the project", image)
            continue
        project.add_case(image, label, check=False)  # checked above
    project.set_split(val_fraction=val_fraction, seed=seed)
    return project, []
