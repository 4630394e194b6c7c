"""What the five panels do in the browser: thin calls into the Slicer module's logic (``FMABSLogic``).

Why a class here at all: the Slicer Widget keeps a few things per window (the suggestions shown,
which review layers are loaded, the last segmentation); this is the same for one browser page. Every
piece of real work (loading scans, placing the views, saving cross-labels, starting, following and
cancelling jobs, review layers, segmentation and export) is ``SlicerFMABSLib`` code, shared with the
Slicer module. Paths from the browser go through :func:`.security.confine`.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmabs_core import contract
from fmabs_core.errors import InputError
from fmabs_core.web.security import confine
from fmabs_core.web.slicerlib import slicer_lib

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
EXPORTS_DIR = "exports"
#: ``fmabs train`` options the Train panel's "more options" field may carry: sizes, rates, cadences and
#: method choices. Those naming files (--generalist-checkpoint, --adapter...) or set by the panel's own
#: fields (--project, --run, --device...) are refused.
ALLOWED_TRAIN_OPTIONS = frozenset(f"--{name}" for name in (
    "patch-size", "batch-size", "labelled-cases", "labelled-batch-size", "seed", "lr", "network", "width", "dropout",
    "norm", "no-augment", "val-every", "val-overlap", "ckpt-every", "keep-last", "max-val-cases", "active-k",
    "active-every", "ema", "consistency", "noise-std", "noise-clip", "labels", "rank", "grid", "finetune-iterations",
    "finetune-lr", "finetune-batch", "pl-weight", "st-rounds", "cps-weight", "rampup", "log-gamma", "generalist-dtype",
    "generalist-runtime", "embedding-cache-gb", "embedding-dtype", "fusion", "teacher-weight", "gate-confidence",
    "sam-weight", "nt-gamma", "pseudo-warmup", "pseudo-every", "pseudo-stop", "pseudo-max-slices", "pseudo-max-cases",
    "box-jitter", "box-jitter-fraction", "n-points", "bezier", "mc-passes"))


def parse_train_options(text: str) -> list[str]:
    """The "more options" field as ``fmabs train`` arguments (no shell: a list); anything path-like is refused."""
    try:
        tokens = shlex.split(text or "")
    except ValueError as exc:
        raise InputError(f"more options: {exc}") from None
    for token in tokens:
        if token.startswith("--"):
            if token.split("=", 1)[0] not in ALLOWED_TRAIN_OPTIONS:
                raise InputError(f"more options: {token} is not allowed here; allowed: "
                                 f"{', '.join(sorted(ALLOWED_TRAIN_OPTIONS))}")
        elif any(c in token for c in "/\\~") or token.startswith("."):
            raise InputError(f"more options: {token!r} looks like a path; paths are not accepted here")
    return tokens


@dataclass
class LossHistory:
    """The total loss per progress event, for the Train panel's small plot."""

    points: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)  # the latest event's loss terms
    limit: int = 400

    def add(self, iteration: Any, loss: Any, terms: Any = None) -> None:
        if isinstance(terms, dict):
            self.last = {str(k): float(v) for k, v in terms.items() if isinstance(v, (int, float))}
        try:
            it, value = int(iteration), float(loss)
        except (TypeError, ValueError):
            return
        if value == value and abs(value) != float("inf"):
            self.points = (self.points + [(it, value)])[-self.limit:]

    def svg_points(self, width: int = 300, height: int = 80) -> str:
        """The polyline's ``points`` attribute, scaled into the plot box."""
        if len(self.points) < 2:
            return ""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = (width - 4) / max(x1 - x0, 1)
        sy = (height - 4) / (y1 - y0) if y1 > y0 else 0.0
        return " ".join(f"{2 + (x - x0) * sx:.1f},{height - 2 - (y - y0) * sy:.1f}" for x, y in self.points)


class WebSession:
    """The page's actions. ``app`` is trame-slicer's ``SlicerApp`` (scene, views, segment editor)."""

    def __init__(self, app: Any, project: str | Path):
        lib = slicer_lib()
        self.lib = lib
        self.app = app
        self.logic = lib.logic.FMABSLogic(app.scene, app.segmentations_logic)
        self.root = Path(project).resolve()
        self.suggestions: list[Any] = []
        self.review_nodes: dict[str, Any] = {}
        self.segment_volume: Any = None
        self.segmentation: Any = None
        self.exported: dict[str, Path] = {}
        self.losses = LossHistory()
        self.open_project()

    # ---- Project ---------------------------------------------------------------------------------
    def open_project(self) -> str:
        self.logic.open_project(self.root)
        return f"Opened {self.root}"

    def project_summary(self) -> dict[str, Any]:
        project = self.logic.require_project()
        rows = self.logic.case_rows()
        runs = self.logic.runs()
        classes = ", ".join(f"{k}:{v}" for k, v in project.classes.items())
        labelled = sum(1 for _, done in rows if done)
        return {
            "cases": [{"title": f"{c}{' ✓' if done else ''}", "value": c} for c, done in rows],
            "runs": runs,
            "trained_runs": self.logic.trained_runs(),
            "info": f"{project.root}: {len(rows)} scans, {labelled} cross-labelled; classes {classes}; {len(runs)} runs.",
            "uploads": self.uploads(),
        }

    def import_folder(self, user_path: str) -> str:
        folder = confine(self.root, user_path, "import folder")
        if not folder.is_dir():
            raise InputError(f"import folder {user_path!r}: no such folder inside the project")
        added, problems = self.logic.add_folder(folder)
        text = f"Added {len(added)} scans" + (f"; {len(problems)} problems: " + "; ".join(problems[:3]) if problems else ".")
        return text

    # ---- Label -----------------------------------------------------------------------------------
    def load_case(self, case: str) -> str:
        if not case:
            raise InputError("The project has no scans yet, or none is chosen: choose a scan first.")
        volume = self.logic.start_labelling(case)
        self.app.display_manager.show_volume(volume, do_reset_views=True)
        self.show_slices()
        if self.logic.drawing_is_saved_crosslabel():
            return f"Loaded {case} with its saved cross-label."
        return f"Loaded {case}."

    def show_slices(self) -> dict[str, int]:
        """Turn the three slice views to the scan's voxel planes at the suggested (or middle) slices."""
        volume = self.logic.params.labelVolume
        if volume is None:
            raise InputError("Load a scan first (Label panel: Load).")
        case = volume.GetAttribute(self.lib.logic.CASE_ATTRIBUTE)
        self.logic.place_views(volume, self.logic.slices_for(case, volume, self.suggestions), self.logic.slice_nodes())
        return self.logic.shown_slices(volume, self.logic.slice_nodes())

    def set_suggestions(self, suggestions: list[Any]) -> list[dict[str, Any]]:
        self.suggestions = list(suggestions)
        out = []
        for s in self.suggestions:
            where = ", ".join(f"{v} {e['index']}" for v, e in s.slices.items() if e.get("index") is not None)
            score = f" (score {s.score:.3f})" if s.score is not None else ""
            out.append({"title": f"{s.case}{score}: {where}", "value": s.case})
        return out

    def ask_suggestions(self, run: str, strategy: str) -> str | None:
        """The run's latest suggestion when it made one; else start ``fmabs suggest`` (polled by the loop)."""
        run = contract.check_name(run) if run else run
        strategy = "her" if strategy in (None, "", "none") else strategy
        if run in self.logic.runs():
            from_run = self.logic.suggestions_from_run(run)
            if from_run:
                self.set_suggestions(from_run)
                return None
        self.logic.start_suggestions(run, strategy, k=2)
        return f"Asking run '{run}' for suggestions ({strategy})..."

    def draw(self, segment_index: int = 0) -> None:
        """Open the segment editor on the scan's cross-label drawing and pick the Paint effect."""
        from trame_slicer.segmentation import SegmentationEffectPaint

        volume = self.logic.params.labelVolume
        if volume is None:
            raise InputError("Load a scan first (Label panel: Load).")
        drawing = self.logic.label_segmentation()
        editor = self.app.segmentation_editor
        if editor.active_segmentation_node is not drawing:
            editor.set_active_segmentation(drawing, volume)
        editor.set_active_segment_id(editor.get_nth_segment_id(segment_index))
        editor.set_active_effect_type(SegmentationEffectPaint)

    def save_crosslabel(self, replace: bool = False) -> tuple[str, list[str]]:
        """Save what is drawn on the three shown planes; (status line, warnings) as in the Slicer panel.

        An existing cross-label is replaced only when asked (the Slicer panel asks for confirmation).
        """
        params = self.logic.params
        volume, drawing = params.labelVolume, params.labelSegmentation
        if volume is None or drawing is None:
            raise InputError("Load a scan and draw on it first (Label panel: Load, then Draw).")
        case = volume.GetAttribute(self.lib.logic.CASE_ATTRIBUTE)
        if self.logic.require_project().crosslabel_path(case).exists() and not replace:
            raise InputError(f"Scan {case} already has a cross-label: tick 'Replace an existing cross-label' and "
                             "save again to replace it.")
        slices = self.logic.shown_slices(volume, self.logic.slice_nodes())
        report = self.logic.save_crosslabel(case, drawing, volume, slices)
        where = ", ".join(f"{v} {i}" for v, i in report.slices.items())
        return f"Saved {report.path.name} ({where}).", list(report.warnings)

    # ---- Train -----------------------------------------------------------------------------------
    def start_training(self, choices: dict[str, Any], more_options: str = "") -> None:
        contract.check_name(str(choices.get("run", "")).strip() or "?")
        options = parse_train_options(more_options)
        self.losses = LossHistory()
        self.logic.start_training(**choices, options=options)

    def watch_run(self, run: str) -> None:
        contract.check_name(run)
        self.losses = LossHistory()
        self.logic.watch_run(run)

    def poll_training(self) -> dict[str, Any] | None:
        """The Train panel's view of the run, or None when nothing is followed."""
        if self.logic.watcher is None:
            return None
        watcher = self.logic.watcher
        before = watcher.events.offset
        status, lines = self.logic.poll_training()
        if watcher.events.offset != before:  # the loss history: reread only what poll just consumed
            self._read_losses(watcher.run_dir / contract.EVENTS_FILE, before, watcher.events.offset)
        suggestions = None
        if watcher.last_suggestion is not None:
            suggestions = self.set_suggestions(self.lib.jobs.parse_suggestions(watcher.last_suggestion))
            watcher.last_suggestion = None
        if status.finished and status.state == self.lib.jobs.WAITING:
            cases = ", ".join(status.waiting_for) or "the suggested scans"
            lines.append(f"Waiting for your labels: {cases}. Cross-label them in the Label panel, then press Start "
                         "(same run name) to resume training.")
        elif status.finished and status.error:
            lines.append(f"{status.state}: {status.error}")
        line, state, finished = self.lib.jobs.status_line(status), status.state, status.finished
        job = self.logic.train_job
        if finished and job is not None and job.running:  # final state written, the process still exiting
            line, state, finished = f"{line} (the process is exiting...)", "exiting", False
        return {
            "state": state,
            "line": line,
            "progress": int(round(100 * status.fraction)),
            "iteration": status.iteration or 0,
            "eta": status.eta_text or "-",
            "dice": f"{status.val_dice:.3f}" if status.val_dice is not None else "-",
            "losses": ", ".join(f"{k} {v:.4g}" for k, v in self.losses.last.items()) or "-",
            # every pseudo-label round's score on the drawn slices (contract.planes_line), newest last
            "rounds": list(status.planes),
            "rounds_warning": status.planes_warning or "",
            "finished": finished,
            "lines": lines,
            "plot": self.losses.svg_points(),
            "suggestions": suggestions,
        }

    def _read_losses(self, path: Path, start: int, end: int) -> None:
        import json

        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                chunk = fh.read(end - start)
        except OSError:
            return
        for raw in chunk.splitlines():
            try:
                event = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(event, dict) and event.get("type") == "progress":
                self.losses.add(event.get("iteration"), event.get("loss"), event.get("losses"))

    def cancel_training(self) -> str:
        return "cancelling (saving a checkpoint)..." if self.logic.cancel_training() else "No running training to cancel."

    # ---- Review ----------------------------------------------------------------------------------
    def load_review(self, case: str, run: str) -> list[str]:
        if not case or not run:
            raise InputError("Choose a run and a scan.")
        contract.check_name(run)
        volume = self.logic.load_case(case)
        self.app.display_manager.show_volume(volume, do_reset_views=True)
        self.review_nodes = self.logic.load_review_layers(case, run, volume)
        return sorted(self.review_nodes)

    def set_review_visibility(self, visible: dict[str, bool], opacity: float) -> None:
        for layer, node in self.review_nodes.items():
            if node is not None and node.GetScene() is not None:
                self.logic.set_layer_visible(node, bool(visible.get(layer, True)), opacity)

    # ---- Segment and export ------------------------------------------------------------------------
    def uploads(self) -> list[str]:
        folder = self.root / UPLOADS_DIR
        return sorted(p.name for p in folder.glob("*.nii.gz")) if folder.is_dir() else []

    def scan_choices(self) -> list[dict[str, str]]:
        cases = [{"title": f"project: {shown}", "value": f"case:{c}"}
                 for c, shown in self.logic.require_project().display_names().items()]
        return cases + [{"title": f"uploaded: {u}", "value": f"upload:{u}"} for u in self.uploads()]

    def _segment_volume(self, choice: str) -> Any:
        kind, _, name = (choice or "").partition(":")
        if kind == "case" and name in self.logic.require_project().cases:
            return self.logic.load_case(name)
        if kind == "upload":
            path = confine(self.root / UPLOADS_DIR, name, "uploaded scan")
            if path.is_file():
                return self.logic.load_volume_file(path, path.name[: -len(".nii.gz")])
        raise InputError(f"scan {choice!r}: choose a project scan or an uploaded one")

    def start_segmentation(self, run: str, choice: str, device: str = "auto") -> str:
        if not run or run not in self.logic.trained_runs():
            raise InputError(f"model {run!r}: choose a trained run (one with a model or a checkpoint)")
        volume = self._segment_volume(choice)
        self.segment_volume = volume
        self.segmentation = None
        self.app.display_manager.show_volume(volume, do_reset_views=True)
        self.logic.start_prediction(self.logic.require_project().run_dir(run), volume, device)
        return "Segmenting..."

    def poll_segmentation(self) -> str | None:
        """None while nothing runs; a status line while it runs and once it is done."""
        job = self.logic.prediction
        if job is None:
            return None
        node = self.logic.finish_prediction()
        if node is None:
            return f"Segmenting... {int(time.time() - job.started)} s"
        self.segmentation = node
        return f"Done: {node.GetName()}."

    def export(self, name: str = "") -> dict[str, Path]:
        """Export the last segmentation to ``exports/``: NIfTI on the scan's own grid and a .seg.nrrd."""
        if self.segmentation is None or self.segment_volume is None:
            raise InputError("Segment a scan first (Segment and export: Segment).")
        base = name.strip() or f"{self.segment_volume.GetName()}_segmentation"
        try:
            contract.check_name(base, "export name")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        folder = self.root / EXPORTS_DIR
        folder.mkdir(exist_ok=True)
        try:
            nii, nrrd = self.logic.export_segmentation(self.segmentation, self.segment_volume, folder, base)
        except FileExistsError as exc:
            raise InputError(f"{exc} (export name)") from None
        self.exported = {"nifti": nii, "nrrd": nrrd}
        return self.exported
