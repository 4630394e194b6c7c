"""FMABSLogic: everything the panels do, on an explicit MRML scene, without Qt.

The Slicer module's ``SlicerFMABSLogic`` hands it ``slicer.mrmlScene``; tests hand it a fresh
``vtkMRMLScene`` from slicer-core. Long work (training, suggestions, segmentation) runs in child
processes (:mod:`.jobs`); this class only starts them and reads their files. The panels' choices live
in the scene's parameter node (:attr:`FMABSLogic.params`), so a saved scene restores them.

The process itself needs numpy, nibabel and filelock (``deps.GUI_MODULES``), not torch.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import deps, geometry, jobs, parameters, segmentations
from .scene import SLICE_VIEW_OF, nodes_by_class
from .scene import slice_nodes as scene_slice_nodes

log = logging.getLogger(__name__)

deps.ensure_fmabs_core_importable()

from fmabs_core import contract  # noqa: E402
from fmabs_core.contract import (  # noqa: E402,F401  (parse_classes: re-exported for the module)
    CHECKPOINTS_DIR, EVENTS_FILE, PSEUDO_DIR, PSEUDO_LAYERS, RUNS_DIR, STATUS_FILE, VIEWS, parse_classes, train_args)
from fmabs_core.data import io as fio  # noqa: E402  (needs the path set up above)
from fmabs_core.data.project import Project, import_folder  # noqa: E402

CASE_ATTRIBUTE = "FMABS.case"
LAYER_ATTRIBUTE = "FMABS.layer"


def safe_name(name: str) -> str:
    """A case / file name from a node name: the project's one rule (:func:`fmabs_core.contract.safe_case_id`)."""
    return contract.safe_case_id(name)


@dataclass
class PredictionJob:
    process: jobs.BackgroundProcess
    volume_node_id: str
    output: Path
    started: float


class FMABSLogic:
    """The module's logic on one MRML scene (no Qt, no torch)."""

    def __init__(self, scene: Any, segmentations_logic: Any = None):
        import slicer

        self.scene = scene
        if segmentations_logic is None:
            segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
            segmentations_logic.SetMRMLScene(scene)
        self.seg_logic = segmentations_logic
        self.project: Project | None = None
        self.train_job: jobs.BackgroundProcess | None = None
        self.watcher: jobs.RunWatcher | None = None
        self.suggest_job: jobs.BackgroundProcess | None = None
        self.suggest_output: Path | None = None
        self.prediction: PredictionJob | None = None
        self.python: str | None = None  # None: PythonSlicer or this interpreter
        self.launcher: Any = None  # short jobs; None: launchConsoleProcess inside Slicer, Popen elsewhere
        self.train_launcher: Any = None  # training; None: jobs.launch_detached (it outlives Slicer)
        self.train_job_run: Path | None = None  # the run folder train_job trains

    @property
    def params(self) -> parameters.Parameters:
        """The module's choices in the scene's parameter node (saved with the scene)."""
        return parameters.Parameters(self.scene)

    # ---- project ------------------------------------------------------------------------------
    def require_project(self) -> Project:
        if self.project is None:
            raise RuntimeError("No project is open: create or open one in the Project panel.")
        return self.project

    def create_project(self, folder: str | os.PathLike, classes: Mapping[int, str]) -> Project:
        self.project = Project.create(folder, dict(classes))
        log.info("created project %s with classes %s", folder, dict(classes))
        self._remember_project()
        return self.project

    def open_project(self, folder: str | os.PathLike) -> Project:
        self.project = Project(folder)
        self._remember_project()
        return self.project

    def _remember_project(self) -> None:
        if self.scene is not None:
            self.params.projectPath = str(self.project.root)

    def restore_project(self) -> Project | None:
        """Open the project the parameter node names (a reloaded scene), if it is not the open one."""
        folder = self.params.projectPath
        if not folder:
            return None
        if self.project is not None and Path(folder).resolve() == self.project.root.resolve():
            return self.project
        return self.open_project(folder)

    def case_rows(self) -> list[tuple[str, bool]]:
        """(case, cross-labelled?) for every scan of the project."""
        project = self.require_project()
        labelled = set(project.crosslabelled())
        return [(case, case in labelled) for case in project.cases]

    def display_names(self) -> dict[str, str]:
        """case id -> the id, with the scan's own file or node name when it was imported under another id."""
        return self.require_project().display_names()

    def add_folder(self, folder: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Import a folder of scans (or imagesTr/labelsTr); returns (new cases, problems)."""
        project = self.require_project()
        before = set(project.cases)
        _, problems = import_folder(folder, project.root, classes=None)
        added = [c for c in project.cases if c not in before]
        return added, [str(p) for p in problems]

    def add_volume_nodes(self, nodes: Sequence[Any]) -> list[str]:
        """Copy loaded volumes into the project (the user's files are only read)."""
        project = self.require_project()
        added = []
        existing = set(project.cases)
        for node in nodes:
            case = node.GetAttribute(CASE_ATTRIBUTE) or safe_name(node.GetName())
            if case in existing:
                log.info("'%s' is already in the project as case %s", node.GetName(), case)
                node.SetAttribute(CASE_ATTRIBUTE, case)
                continue
            source = self.unmodified_nifti_file(node)
            original = node.GetName() if case != node.GetName() else None  # shown beside the id in the panels
            if source is not None:
                project.add_case(source, case=case, name=original)
            else:
                with tempfile.TemporaryDirectory(prefix="fmabs-add-") as tmp:
                    path = self.write_volume_nifti(node, Path(tmp) / f"{case}.nii.gz")
                    project.add_case(path, case=case, name=original)
            node.SetAttribute(CASE_ATTRIBUTE, case)
            existing.add(case)
            added.append(case)
        return added

    # ---- volumes ------------------------------------------------------------------------------
    @staticmethod
    def unmodified_nifti_file(node: Any) -> Path | None:
        """The NIfTI file a node was read from, if it still holds exactly that file's voxels."""
        storage = node.GetStorageNode()
        if storage is None or not storage.GetFileName():
            return None
        path = Path(storage.GetFileName())
        if not fio.is_nifti(path) or not path.exists() or node.GetModifiedSinceRead():
            return None
        return path

    def load_volume_file(self, path: str | os.PathLike, name: str | None = None) -> Any:
        """Read a scan with Slicer's reader and check its geometry against nibabel's reading."""
        import nibabel as nib
        import slicer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or fio.case_id(path))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
        storage.SetCenterImage(False)
        self.scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise OSError(f"{path}: Slicer could not read this file")
        node.CreateDefaultDisplayNodes()
        if fio.is_nifti(path):
            img = nib.load(str(path))
            if len(img.shape) == 3:
                ref_affine, ref_shape = geometry.canonical_header(img.affine, img.shape)
                affine, shape = geometry.canonical_grid(node)
                if not geometry.same_grid(affine, shape, ref_affine, ref_shape):
                    self.scene.RemoveNode(node)
                    self.scene.RemoveNode(storage)
                    raise geometry.GeometryError(
                        f"{path}: Slicer and nibabel read different geometry (max affine difference "
                        f"{np.abs(affine - ref_affine).max():.3g} mm); the qform and sform of the header "
                        "probably disagree. Fix the header (e.g. nibabel: set both to the same affine)."
                    )
        return node

    def load_case(self, case: str) -> Any:
        """The project scan as a volume node (reused when already loaded)."""
        project = self.require_project()
        for node in nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(CASE_ATTRIBUTE) == case and node.GetAttribute("FMABS.project") == str(project.root):
                return node
        node = self.load_volume_file(project.image_path(case), case)
        node.SetAttribute(CASE_ATTRIBUTE, case)
        node.SetAttribute("FMABS.project", str(project.root))
        return node

    def write_volume_nifti(self, node: Any, path: str | os.PathLike) -> Path:
        """Write a volume node as NIfTI in its own voxel order and IJK-to-RAS (atomic)."""
        import nibabel as nib

        array = geometry.node_array_ijk(node)
        affine = geometry.ijk_to_ras(node)
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with fio.atomic_path(path) as tmp:
            nib.save(img, str(tmp))
        return Path(path)

    def loaded_volume_nodes(self) -> list[Any]:
        """The scalar volumes in the scene (not labelmaps), e.g. for 'Add loaded volumes'."""
        return [n for n in nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode")
                if n.GetClassName() == "vtkMRMLScalarVolumeNode"]

    # ---- labelling ----------------------------------------------------------------------------
    def centre_slices(self, volume_node: Any) -> dict[str, dict[str, Any]]:
        """Fallback suggestion: the middle plane of each view."""
        _, shape = geometry.canonical_grid(volume_node)
        return {v: {"index": int(shape[geometry.VIEW_AXIS[v]] // 2), "ras": None} for v in VIEWS}

    def slices_for(self, case: str, volume_node: Any, suggestions: Sequence[jobs.Suggestion] = ()) -> dict[str, Any]:
        """The planes to label on a scan: the first suggestion for it with slices, else the planes of its saved
        cross-label (what the expert drew), else the middle planes."""
        suggestion = next((s for s in suggestions if s.case == case and s.slices), None)
        if suggestion:
            return suggestion.slices
        return self.drawn_slices(case) or self.centre_slices(volume_node)

    def drawn_slices(self, case: str) -> dict[str, dict[str, Any]] | None:
        """The planes of the scan's saved cross-label (the first of each view), or None when it has none or a view
        has no plane."""
        from fmabs_core.data.crosslabel import labelled_planes

        project = self.require_project()
        path = project.crosslabel_path(case)
        if not path.exists():
            return None
        planes = labelled_planes(project.load_crosslabel(case).array)
        if not all(planes.get(v) for v in VIEWS):
            return None
        return {v: {"index": int(planes[v][0]), "ras": None} for v in VIEWS}

    def place_views(self, volume_node: Any, slices: Mapping[str, Any], slice_nodes: Mapping[str, Any]) -> dict[str, float]:
        """Align the red/green/yellow views with the volume and move them to the given planes."""
        offsets = {}
        for view, entry in geometry.slice_points(slices).items():
            node = slice_nodes.get(view)
            if node is None:
                continue
            offsets[view] = geometry.place_slice_view(node, volume_node, view, entry["index"], entry["ras"])
        return offsets

    def shown_slices(self, volume_node: Any, slice_nodes: Mapping[str, Any]) -> dict[str, int]:
        """The canonical plane each view shows now."""
        return {view: geometry.shown_index(node, volume_node, view) for view, node in slice_nodes.items()}

    @staticmethod
    def hidden_views(slice_nodes: Mapping[str, Any]) -> list[str]:
        """The red, green or yellow views the current layout does not show (``IsViewVisibleInLayout``: the
        layout manager maps the views of its layout; the others exist, unmapped), as 'coronal (Green)'."""
        return [f"{view} ({name})" for view, name in SLICE_VIEW_OF.items()
                if view not in slice_nodes or not slice_nodes[view].IsViewVisibleInLayout()]

    def record_planes(self, volume_node: Any, slice_nodes: Mapping[str, Any]) -> dict[str, int]:
        """Remember the planes the views show (after Show slices): Save saves these, whatever the views do later."""
        planes = self.shown_slices(volume_node, slice_nodes)
        self.params.labelPlanes = ",".join(f"{v}={i}" for v, i in planes.items())
        return planes

    def recorded_planes(self) -> dict[str, int]:
        text = self.params.labelPlanes or ""
        out = {}
        for part in filter(None, text.split(",")):
            view, _, index = part.partition("=")
            if view in SLICE_VIEW_OF and index.strip().lstrip("-").isdigit():
                out[view] = int(index)
        return out

    def planes_to_save(self, volume_node: Any, slice_nodes: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """(the recorded planes, the views that moved since: view -> (recorded, shown now)). An error when Show
        slices was not pressed for this scan or a view is not in the layout."""
        hidden = self.hidden_views(slice_nodes)
        if hidden:
            raise ValueError(f"The current layout does not show the {', '.join(hidden)} view: press Show slices (it "
                             "switches to a layout with the red, green and yellow views), then save.")
        recorded = self.recorded_planes()
        if set(recorded) != set(SLICE_VIEW_OF):
            raise ValueError("Press Show slices first: it puts the three views on the slices to draw, and Save "
                             "saves those slices.")
        shown = self.shown_slices(volume_node, slice_nodes)
        moved = {v: (recorded[v], shown[v]) for v in recorded if shown.get(v) != recorded[v]}
        return recorded, moved

    def slice_nodes(self) -> dict[str, Any]:
        """{axial, coronal, sagittal: the red, green, yellow slice node} for those in the scene (fetched by ID)."""
        return scene_slice_nodes(self.scene)

    def start_labelling(self, case: str) -> Any:
        """Load a project scan for cross-labelling; it becomes the Label panel's volume (parameter node)."""
        volume = self.load_case(case)
        params = self.params
        drawing = params.labelSegmentation
        keep = drawing is not None and drawing.GetAttribute(CASE_ATTRIBUTE) == case
        params.update(case=case, labelVolume=volume, labelSegmentation=drawing if keep else self.saved_drawing(case, volume))
        return volume

    def saved_drawing(self, case: str, volume_node: Any) -> Any:
        """The scan's saved cross-label as the Label panel's drawing (None when it has none): the expert sees what
        they drew and edits it, rather than an empty drawing that, saved with Replace, would erase it."""
        project = self.require_project()
        path = project.crosslabel_path(case)
        if not path.exists():
            return None
        node = segmentations.load_label_file_as_segmentation(self.seg_logic, self.scene, path, volume_node,
                                                             f"{case} cross-label", project.classes, "drawing")
        drawn = {c: sid for sid, c in segmentations.class_of_segments(node, project.classes).items()}
        drawn.update(segmentations.add_class_segments(node, {c: n for c, n in project.classes.items() if c not in drawn}))
        for index, value in enumerate(sorted(drawn)):  # in class order, as a new drawing's (Class to draw: nth)
            node.GetSegmentation().SetSegmentIndex(drawn[value], index)
        node.SetAttribute(CASE_ATTRIBUTE, case)
        node.SetAttribute(LAYER_ATTRIBUTE, "drawing")
        return node

    def drawing_is_saved_crosslabel(self) -> bool:
        """Whether the Label panel's drawing was loaded from the scan's saved cross-label (by :meth:`saved_drawing`;
        edits since then included): what the panels tell the expert after Load."""
        drawing, case = self.params.labelSegmentation, self.params.case
        return (drawing is not None and bool(case)
                and drawing.GetAttribute("FMABS.file") == str(self.require_project().crosslabel_path(case)))

    def label_segmentation(self) -> Any:
        """The Label panel's drawing for its volume, created (one empty segment per class) when there is none."""
        params = self.params
        volume = params.labelVolume
        if volume is None:
            raise ValueError("Load a scan first (Label panel: Load).")
        drawing = params.labelSegmentation
        if drawing is None or drawing.GetScene() is None:
            drawing = self.create_label_segmentation(volume)
            params.labelSegmentation = drawing
        return drawing

    def create_label_segmentation(self, volume_node: Any, classes: Mapping[int, str] | None = None) -> Any:
        """A segmentation on the volume's grid with one empty segment per project class."""
        classes = dict(classes or self.require_project().classes)
        case = volume_node.GetAttribute(CASE_ATTRIBUTE) or volume_node.GetName()
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{case} cross-label")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentations.add_class_segments(node, classes)
        node.SetAttribute(CASE_ATTRIBUTE, case)
        node.SetAttribute(LAYER_ATTRIBUTE, "drawing")
        return node

    def save_crosslabel(self, case: str, segmentation_node: Any, volume_node: Any, slices: Mapping[str, int],
                        confirm_empty: Any = None) -> segmentations.CrossLabelReport | None:
        """Write what was drawn on the three planes as ``crosslabels/<case>.nii.gz`` on the image's grid.

        ``confirm_empty(views)``: asked before anything is written when planes have nothing drawn (saved, they
        say "not this class" on every voxel); False: nothing is written and None is returned.
        """
        project = self.require_project()
        reference = fio.load_image(project.image_path(case))
        class_map = segmentations.class_of_segments(segmentation_node, project.classes)
        drawn, affine = segmentations.segmentation_to_canonical(self.seg_logic, self.scene, segmentation_node,
                                                                volume_node, class_map)
        if not geometry.same_grid(affine, drawn.shape, reference.affine, reference.array.shape):
            raise geometry.GeometryError(
                f"volume '{volume_node.GetName()}' is not on the grid of {project.image_path(case)}; "
                "load the scan from the project (Label panel: Load) and draw on it."
            )
        cross, report = segmentations.crosslabel_from_drawing(drawn, slices)
        empty = [f"{view} {report.slices[view]}" for view, count in report.drawn_voxels.items() if count == 0]
        if empty and confirm_empty is not None:
            if not confirm_empty(empty):
                return None
            report.warnings = [w for w in report.warnings if not w.startswith("Nothing is drawn on")]  # asked already
        path = project.crosslabel_path(case)
        fio.save_like(cross, reference, path, np.uint8)
        report.path = path
        log.info("saved cross-label %s (%s)", path, report.drawn_voxels)
        return report

    # ---- training -----------------------------------------------------------------------------
    def runs(self) -> list[str]:
        project = self.require_project()
        root = project.root / RUNS_DIR
        return sorted(p.name for p in root.iterdir() if p.is_dir() and contract.is_safe_name(p.name)) if root.is_dir() else []

    def trained_runs(self) -> list[str]:
        """Runs with a model to segment with (a finished run, or any checkpoint)."""
        project = self.require_project()
        out = []
        for run in self.runs():
            d = project.run_dir(run)
            status = jobs.read_json(d / STATUS_FILE) or {}
            if status.get("model") or any(d.glob("*.pt")) or any((d / CHECKPOINTS_DIR).glob("*.pt")):
                out.append(run)
        return out

    def job_pythonpath(self) -> list[str]:
        root = deps.ensure_fmabs_core_importable()
        return [str(root)] if root else []

    def train_arguments(self, run: str, method: str, iterations: int, device: str = "auto",
                        generalist: str | None = None, active: str | None = None, budget: int | None = None,
                        expert: str | None = None, options: Sequence[str] = ()) -> list[str]:
        """The ``fmabs train`` arguments of the Train panel's choices; ``options``: further CLI options as given
        (e.g. ``["--patch-size", "64", "64", "64"]``). Device "auto" leaves the choice to the job; strategy
        "none" (or None) trains without active cross-labelling (no --active, --budget, --expert)."""
        project = self.require_project()
        if int(iterations) <= 0:
            raise ValueError(f"iterations must be positive, got {iterations}")
        active = None if active in (None, "", "none") else active
        args = train_args(project.root, run, method, {
            "iterations": int(iterations),
            "device": None if device in (None, "", "auto") else device,
            # only for methods that take one: fmabs train refuses --generalist for sup, mt...
            "generalist": generalist if generalist and jobs.method_takes(method, "generalist") else None,
            "active": active,
            "budget": int(budget) if active and budget else None,
            "expert": expert if active else None,
        })
        return args + [str(o) for o in options]

    def start_training(self, run: str, method: str, iterations: int, device: str = "auto",
                       generalist: str | None = None, active: str | None = None, budget: int | None = None,
                       expert: str | None = None, options: Sequence[str] = ()) -> jobs.RunWatcher:
        """Launch ``fmabs train`` in its own process; returns the watcher the timer polls.

        The choices are recorded in the parameter node (a saved scene remembers which run it trained).
        """
        project = self.require_project()
        if self.train_job is not None and self.train_job.running:
            raise RuntimeError(f"a training job is already running (pid {self.train_job.pid}); cancel it first")
        args = self.train_arguments(run, method, iterations, device, generalist, active, budget, expert, options)
        if self.scene is not None:
            choices = {"runName": run, "method": method, "iterations": int(iterations), "device": device or "auto",
                       "strategy": active or "none"}
            choices.update({k: v for k, v in (("generalist", generalist), ("budget", budget), ("expert", expert))
                            if v is not None})
            self.params.update(**choices)
        run_dir = project.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.watcher = jobs.RunWatcher(run_dir)
        events = run_dir / EVENTS_FILE
        self.watcher.events.offset = events.stat().st_size if events.exists() else 0
        self.train_job = self._launch(args, run_dir / "slicer-job.log", run_dir,
                                      launcher=self.train_launcher or jobs.launch_detached)
        self.train_job_run = run_dir
        return self.watcher

    def training_choices(self) -> dict[str, Any]:
        """The Train panel's choices from the parameter node, as :meth:`start_training`'s keyword arguments."""
        p = self.params
        return {"run": p.runName.strip(), "method": p.method, "iterations": p.iterations, "device": p.device,
                "generalist": p.generalist, "active": p.strategy, "budget": p.budget, "expert": p.expert}

    def _launch(self, args: Sequence[str], log_path: Path, cwd: Path, launcher: Any = None) -> jobs.BackgroundProcess:
        """Start ``fmabs ARGS``: one command line (contract.fmabs_argv); ``launcher`` (default: the short jobs'
        :attr:`launcher`) decides how."""
        return jobs.BackgroundProcess(jobs.fmabs_argv(args, self.python), log_path,
                                      jobs.job_environment(self.job_pythonpath()), cwd=cwd,
                                      launcher=launcher or self.launcher)

    def watch_run(self, run: str) -> jobs.RunWatcher:
        """Watch an existing run (e.g. one started from a terminal, or by an earlier Slicer session)."""
        self.watcher = jobs.RunWatcher(self.require_project().run_dir(run))
        return self.watcher

    def watched_job(self) -> jobs.BackgroundProcess | None:
        """The training job this session started for the watched run, if any: another run's job says nothing
        about the watched run (its state comes from the run's own files and lock)."""
        if self.train_job is None or self.watcher is None or self.train_job_run is None:
            return None
        return self.train_job if Path(self.train_job_run) == Path(self.watcher.run_dir) else None

    def poll_training(self) -> tuple[jobs.JobStatus, list[str]]:
        if self.watcher is None:
            return jobs.JobStatus(), []
        if self.watcher.failed is not None:  # reading the run failed before: it is no longer followed
            return self.watcher.status, []
        job = self.watched_job()
        running = job.running if job is not None else None
        status, lines = self.watcher.poll(running)
        if job is not None and not running and job.returncode == jobs.EXIT_NEEDS_LABELS:
            status.state = jobs.WAITING  # the run stopped for the expert (it may have written "cancelled")
            return status, lines
        if job is not None and not running and status.state == jobs.RUNNING:
            status.state = jobs.CANCELLED if job.cancelled else jobs.CRASHED
        if job is not None and not running and job.process.returncode not in (0, None) \
                and status.state in (jobs.CRASHED, jobs.NOT_STARTED):
            tail = job.log_tail(1500).strip().splitlines()
            status.state = jobs.FAILED
            status.error = status.error or (tail[-1] if tail else f"exit code {job.process.returncode}")
        return status, lines

    def cancel_training(self, own_job: bool = False) -> bool:
        """Ask the watched run's training process (``own_job``: the run this session started, whichever
        is watched) to checkpoint and stop; False when nothing runs.

        The request (SIGTERM; on Windows see :mod:`fmabs_core.runs.process`) goes to the process that
        holds the run lock, the real trainer: the job we started may be Slicer's ``PythonSlicer``, a
        launcher that forwards no signal. A run started elsewhere (a terminal) is cancelled the same
        way. A job of ours that holds no lock (still starting: nothing to save) is stopped with its
        whole process tree.
        """
        if own_job:
            job, run_dir = self.train_job, self.train_job_run
        else:
            job = self.watched_job() if self.watcher is not None else self.train_job
            run_dir = self.watcher.run_dir if self.watcher is not None else None
        own = job if job is not None and job.running else None
        if own is None and run_dir is None:
            return False
        # imported here: jobs exist only once the dependencies (filelock, psutil) are installed
        from fmabs_core.runs import lock, process

        holder = lock.lock_holder(run_dir) if run_dir is not None else None
        pid = (holder or {}).get("pid")
        if pid and holder.get("host") in (None, socket.gethostname()) and process.pid_alive(int(pid)):
            if own is not None:
                own.cancelled = True
            log.info("asking pid %s (holder of %s) to checkpoint and stop", pid, run_dir)
            return process.terminate(int(pid))
        if own is not None:
            own.cancel()
            return True
        return False

    # ---- suggestions --------------------------------------------------------------------------
    def start_suggestions(self, run: str, strategy: str = "her", k: int = 2) -> jobs.BackgroundProcess:
        project = self.require_project()
        out_dir = project.run_dir(run)
        self.suggest_output = out_dir / "slicer-suggest.json"
        if self.suggest_output.exists():
            self.suggest_output.unlink()
        args = ["suggest", "--project", str(project.root), "--run", run, "--active", strategy, "--active-k", str(int(k)),
                "--json", str(self.suggest_output)]
        # the answer goes to its own file; the output (progress, warnings) to the log
        self.suggest_job = self._launch(args, out_dir / "slicer-suggest.log", out_dir)
        return self.suggest_job

    def finish_suggestions(self) -> list[jobs.Suggestion] | None:
        """None while running; the suggestions when done (raises with the job's output on failure)."""
        job = self.suggest_job
        if job is None or job.poll() is None:
            return None
        self.suggest_job = None
        if job.process.returncode != 0:
            raise RuntimeError(f"fmabs suggest failed (exit {job.process.returncode}):\n{job.log_tail(1500)}")
        answer = jobs.read_json(self.suggest_output) if self.suggest_output is not None else None
        if answer is None:
            raise RuntimeError(f"fmabs suggest wrote no readable answer to {self.suggest_output}:\n{job.log_tail(1500)}")
        return jobs.parse_suggestions(answer)

    def suggestions_from_run(self, run: str) -> list[jobs.Suggestion]:
        """The latest suggestion a training run wrote to its events (empty if none)."""
        latest = None
        for event in jobs.EventReader(self.require_project().run_dir(run) / EVENTS_FILE).read_new():
            if event.get("type") == "suggestion":
                latest = event
        return jobs.parse_suggestions(latest) if latest else []

    # ---- review -------------------------------------------------------------------------------
    def review_files(self, case: str, run: str) -> dict[str, Path]:
        """Which review layers exist for a case in a run."""
        d = self.require_project().run_dir(run)
        files = {layer: d / PSEUDO_DIR / f"{case}_{layer}.nii.gz" for layer in PSEUDO_LAYERS}
        files["prediction"] = d / "predictions" / f"{case}.nii.gz"
        files["label"] = self.require_project().crosslabel_path(case)
        return {k: v for k, v in files.items() if v.exists()}

    def load_review_layers(self, case: str, run: str, volume_node: Any) -> dict[str, Any]:
        """Load the per-view and fused SAM pseudo-labels and the prediction as coloured segmentations."""
        project = self.require_project()
        files = self.review_files(case, run)
        files.pop("label", None)
        self.remove_review_layers(case)
        nodes = {}
        try:
            for layer, path in files.items():
                title = f"{case} SAM {layer}" if layer in PSEUDO_LAYERS else f"{case} {layer} ({run})"
                node = segmentations.load_label_file_as_segmentation(self.seg_logic, self.scene, path, volume_node,
                                                                     title, project.classes, layer)
                node.SetAttribute(CASE_ATTRIBUTE, case)
                node.SetAttribute("FMABS.run", run)
                nodes[layer] = node
        except BaseException:  # all the layers or none: a half-loaded review would mislead
            for node in nodes.values():
                self._remove_with_display(node)
            raise
        return nodes

    def _remove_with_display(self, node: Any) -> None:
        display = node.GetDisplayNode()
        if display is not None:
            self.scene.RemoveNode(display)
        self.scene.RemoveNode(node)

    def remove_review_layers(self, case: str) -> None:
        for node in nodes_by_class(self.scene, "vtkMRMLSegmentationNode"):
            if node.GetAttribute(CASE_ATTRIBUTE) == case and node.GetAttribute(LAYER_ATTRIBUTE) in (*PSEUDO_LAYERS, "prediction"):
                self._remove_with_display(node)

    @staticmethod
    def set_layer_visible(node: Any, visible: bool, opacity: float | None = None) -> None:
        display = node.GetDisplayNode() if node is not None else None
        if display is None:
            return
        display.SetVisibility(bool(visible))
        if opacity is not None:
            display.SetOpacity2DFill(float(opacity))

    # ---- segment and export -------------------------------------------------------------------
    def work_dir(self, name: str) -> Path:
        base = self.project.root / "segmentations" if self.project else Path(tempfile.gettempdir()) / "fmabs-segment"
        d = base / f"{safe_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start_prediction(self, model: str | os.PathLike, volume_node: Any, device: str = "auto") -> PredictionJob:
        """Segment a volume in a child process (``fmabs predict``); poll with :meth:`finish_prediction`."""
        if self.prediction is not None and self.prediction.process.running:
            raise RuntimeError("a segmentation is already running; wait for it or cancel it")
        model = Path(model)
        if not model.exists():
            raise FileNotFoundError(f"{model}: no such model (a run folder or a model file)")
        work = self.work_dir(volume_node.GetName())
        source = self.unmodified_nifti_file(volume_node)
        if source is None:  # unsaved, edited or non-NIfTI (DICOM, NRRD): hand the job a NIfTI copy
            source = self.write_volume_nifti(volume_node, work / "input" / f"{safe_name(volume_node.GetName())}.nii.gz")
        args = ["predict", "--model", str(model), "--input", str(source), "--output", str(work / "output")]
        if device != "auto":
            args += ["--device", device]
        process = self._launch(args, work / "predict.log", work)
        self.prediction = PredictionJob(process, volume_node.GetID(), work / "output" / f"{fio.case_id(source)}.nii.gz",
                                        time.time())
        return self.prediction

    def cancel_prediction(self) -> None:
        if self.prediction is not None:
            self.prediction.process.cancel()

    def finish_prediction(self) -> Any | None:
        """None while running; the segmentation node when done (raises with the log tail on failure)."""
        job = self.prediction
        if job is None or job.process.poll() is None:
            return None
        self.prediction = None
        if job.process.returncode != 0 or not job.output.exists():
            raise RuntimeError(
                f"segmentation {'was cancelled' if job.process.cancelled else 'failed'} "
                f"(exit {job.process.returncode}); log {job.process.log_path}:\n{job.process.log_tail(1500)}"
            )
        volume = self.scene.GetNodeByID(job.volume_node_id)
        if volume is None:
            raise RuntimeError(f"the volume was removed from the scene; the result is in {job.output}")
        classes = self.project.classes if self.project else {1: "foreground"}
        node = segmentations.load_label_file_as_segmentation(
            self.seg_logic, self.scene, job.output, volume, f"{volume.GetName()} FM-ABS", classes, "prediction")
        node.SetAttribute(LAYER_ATTRIBUTE, "segmentation")
        return node

    def export_segmentation(self, segmentation_node: Any, volume_node: Any, out_dir: str | os.PathLike,
                            basename: str | None = None, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``<basename>.nii.gz`` (on the volume's own grid and voxel order) and ``<basename>.seg.nrrd``.

        The NIfTI keeps the voxel order and affine of the volume's NIfTI file when it came from one,
        so it overlays the input in any viewer; the input file itself is never overwritten.
        """
        out_dir = Path(out_dir)
        basename = safe_name(basename or f"{volume_node.GetName()}_segmentation")
        nii, nrrd = out_dir / f"{basename}.nii.gz", out_dir / f"{basename}.seg.nrrd"
        for path in (nii, nrrd):
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
        classes = self.project.classes if self.project else {}
        try:
            class_map = segmentations.class_of_segments(segmentation_node, classes) if classes else {}
        except ValueError:
            class_map = {}
        if not class_map:  # not a project segmentation: number the segments 1..N in their order
            class_map = {sid: i + 1 for i, sid in enumerate(segmentations.segment_ids(segmentation_node))}
        array, affine = segmentations.segmentation_to_canonical(self.seg_logic, self.scene, segmentation_node,
                                                                volume_node, class_map)
        source = self.unmodified_nifti_file(volume_node)
        out_affine = geometry.ijk_to_ras(volume_node)
        if source is not None:
            import nibabel as nib

            img = nib.load(str(source))
            if len(img.shape) == 3 and geometry.same_grid(*geometry.canonical_header(img.affine, img.shape),
                                                          affine, array.shape):
                out_affine = img.affine
        protect = [source] if source else []
        storage = volume_node.GetStorageNode()
        if storage is not None and storage.GetFileName():
            protect.append(Path(storage.GetFileName()))
        for path in (nii, nrrd):
            if any(path.resolve() == Path(p).resolve() for p in protect):
                raise ValueError(f"{path}: refusing to overwrite the input volume; choose another name.")
        segmentations.write_nifti_canonical(array, affine, nii, out_affine, protect)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentations.write_seg_nrrd(self.scene, segmentation_node, nrrd)
        log.info("exported %s and %s", nii, nrrd)
        return nii, nrrd
