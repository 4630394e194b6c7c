"""SlicerFMABS: three drawn slices per scan -> a custom 3D segmentation model, inside 3D Slicer.

Module / Widget / Logic / Test, as in Slicer's scripted-module template. The Widget is thin: it
reads its widgets and calls the Logic. The Logic delegates to ``SlicerFMABSLib`` (importable
without Qt, tested headless with slicer-core). Training, suggestions and segmentation run as
separate ``python -m fmabs_core`` processes that a QTimer watches: the GUI never blocks and never
imports torch. Third-party packages are installed on first use, after asking, never at import.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SlicerFMABSLib import deps, jobs

log = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parent
SLICE_VIEW_OF = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


def resourcePath(filename: str) -> str:
    """A resource file: beside the module when installed, in the repository's Resources/ in a checkout."""
    for base in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (base / filename).exists():
            return str(base / filename)
    return str(MODULE_DIR / "Resources" / filename)


#
# SlicerFMABS
#


class SlicerFMABS(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FM-ABS"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []  # PyTorch Utils is used when present, not required to load
        self.parent.contributors = ["SlicerFMABS contributors"]
        self.parent.helpText = """
Train a 3D segmentation model for your structure from three drawn slices (axial, coronal, sagittal)
per scan. A frozen SAM-family model turns the model's guesses into extra pseudo-labels while a
small 3D specialist trains in the background; the module suggests which scan and slices to label
next, then segments new scans and exports NIfTI. Panels: Project, Label, Train, Review, Segment and export.
"""
        self.parent.acknowledgementText = """
Methods: FM-ABS (foundation-model-assisted active barely-supervised learning, MICCAI 2024) and CFR.
Built on 3D Slicer, MONAI, PyTorch and the PyTorch extension (PyTorch Utils).
"""
        icon = resourcePath("Icons/SlicerFMABS.png")
        if os.path.exists(icon):
            self.parent.icon = qt.QIcon(icon)


#
# SlicerFMABSWidget
#


class SlicerFMABSWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panels. Every handler reads widgets, calls the Logic and shows the outcome."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SlicerFMABSLogic | None = None
        self.labelVolume = None  # volume node being cross-labelled
        self.labelSegmentation = None
        self.suggestions: list[jobs.Suggestion] = []
        self.reviewNodes: dict = {}
        self.timer = None

    def resourcePath(self, filename: str) -> str:
        return resourcePath(filename)

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerFMABS.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerFMABSLogic()

        # the methods the job's Python offers (`fmabs methods --json`); fallback names until it is set up
        methods = jobs.method_names() if not deps.missing() else jobs.METHODS
        for combo, values in ((self.ui.methodComboBox, methods), (self.ui.generalistComboBox, jobs.GENERALISTS),
                              (self.ui.strategyComboBox, jobs.STRATEGIES), (self.ui.deviceComboBox, jobs.DEVICES),
                              (self.ui.expertComboBox, jobs.EXPERTS)):
            combo.clear()
            for value in values:
                combo.addItem(value)

        self.ui.methodComboBox.connect("currentTextChanged(QString)", self.onMethodChanged)
        self.onMethodChanged(self.ui.methodComboBox.currentText)

        self.timer = qt.QTimer()
        self.timer.setInterval(1000)
        self.timer.connect("timeout()", self.onTimer)

        # Project
        self.ui.createProjectButton.connect("clicked(bool)", self.onCreateProject)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProject)
        self.ui.addLoadedVolumesButton.connect("clicked(bool)", self.onAddLoadedVolumes)
        self.ui.importFolderButton.connect("clicked(bool)", self.onImportFolder)
        # Label
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggest)
        self.ui.suggestionComboBox.connect("currentIndexChanged(int)", self.onSuggestionChosen)
        self.ui.showSlicesButton.connect("clicked(bool)", self.onShowSlices)
        self.ui.drawButton.connect("clicked(bool)", self.onDraw)
        self.ui.saveCrossLabelButton.connect("clicked(bool)", self.onSaveCrossLabel)
        # Train
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.watchRunButton.connect("clicked(bool)", self.onWatchRun)
        # Review
        self.ui.loadReviewButton.connect("clicked(bool)", self.onLoadReview)
        for checkbox in self.layerCheckBoxes().values():
            checkbox.connect("toggled(bool)", self.updateReviewVisibility)
        self.ui.reviewOpacitySliderWidget.connect("valueChanged(double)", self.updateReviewVisibility)
        # Segment and export
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelSegmentButton.connect("clicked(bool)", self.onCancelSegment)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.restoreSettings()

    def cleanup(self) -> None:
        """Module widget destroyed (application exit): stop polling; running jobs keep running."""
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def onSceneEndClose(self, caller, event) -> None:
        self.labelVolume = self.labelSegmentation = None
        self.reviewNodes = {}

    def layerCheckBoxes(self) -> dict:
        return {"axial": self.ui.showAxialCheckBox, "coronal": self.ui.showCoronalCheckBox,
                "sagittal": self.ui.showSagittalCheckBox, "fused": self.ui.showFusedCheckBox,
                "prediction": self.ui.showPredictionCheckBox}

    def restoreSettings(self) -> None:
        settings = qt.QSettings()
        self.ui.projectPathLineEdit.currentPath = settings.value("SlicerFMABS/ProjectPath", "")
        self.ui.runNameLineEdit.text = settings.value("SlicerFMABS/RunName", "run1")

    def sliceNodes(self) -> dict:
        layoutManager = slicer.app.layoutManager()
        return {view: layoutManager.sliceWidget(name).mrmlSliceNode() for view, name in SLICE_VIEW_OF.items()}

    # ---- Project --------------------------------------------------------------------------------
    def onCreateProject(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not create the project.", waitCursor=True):
            from fmabs_core.contract import parse_classes

            core = self.logic.core
            folder = self.ui.projectPathLineEdit.currentPath
            if not folder:
                raise ValueError("Choose a project folder first.")
            core.create_project(folder, parse_classes(self.ui.classesLineEdit.text))
            qt.QSettings().setValue("SlicerFMABS/ProjectPath", folder)
            self.refreshProject()

    def onOpenProject(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not open the project.", waitCursor=True):
            folder = self.ui.projectPathLineEdit.currentPath
            self.logic.core.open_project(folder)
            qt.QSettings().setValue("SlicerFMABS/ProjectPath", folder)
            self.refreshProject()

    def onAddLoadedVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not add the loaded volumes.", waitCursor=True):
            nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                     if n.GetClassName() == "vtkMRMLScalarVolumeNode"]
            if not nodes:
                raise ValueError("No volume is loaded: load scans first (File > Add Data).")
            added = self.logic.core.add_volume_nodes(nodes)
            slicer.util.showStatusMessage(f"Added {len(added)} scans to the project.", 5000)
            self.refreshProject()

    def onImportFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not import the folder.", waitCursor=True):
            added, problems = self.logic.core.add_folder(self.ui.importFolderPathLineEdit.currentPath)
            if problems:
                slicer.util.warningDisplay("Nothing was imported; fix these files first:\n\n" + "\n".join(problems[:30]))
            else:
                slicer.util.showStatusMessage(f"Imported {len(added)} scans.", 5000)
            self.refreshProject()

    def refreshProject(self) -> None:
        core = self.logic.core
        if core.project is None:
            self.ui.projectInfoLabel.text = "No project open."
            return
        rows = core.case_rows()
        self.ui.caseListWidget.clear()
        for case, labelled in rows:
            self.ui.caseListWidget.addItem(("\u2713 " if labelled else "    ") + case)
        for combo in (self.ui.caseComboBox, self.ui.reviewCaseComboBox):
            current = combo.currentText
            combo.clear()
            for case, _ in rows:
                combo.addItem(case)
            if current:
                combo.setCurrentText(current)
        runs = core.runs()
        for combo, values in ((self.ui.reviewRunComboBox, runs), (self.ui.modelComboBox, core.trained_runs())):
            current = combo.currentText
            combo.clear()
            for run in values:
                combo.addItem(run)
            if current:
                combo.setCurrentText(current)
        classes = ", ".join(f"{k}:{v}" for k, v in core.project.classes.items())
        n_labelled = sum(1 for _, labelled in rows if labelled)
        self.ui.projectInfoLabel.text = (f"{core.project.root}: {len(rows)} scans, {n_labelled} cross-labelled; "
                                         f"classes {classes}; {len(runs)} runs.")

    # ---- Label ----------------------------------------------------------------------------------
    def currentSlicesFor(self, case: str) -> dict:
        suggestion = next((s for s in self.suggestions if s.case == case and s.slices), None)
        return suggestion.slices if suggestion else self.logic.core.centre_slices(self.labelVolume)

    def onLoadCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the scan.", waitCursor=True):
            case = self.ui.caseComboBox.currentText
            if not case:
                raise ValueError("The project has no scans yet: add some in the Project panel.")
            self.labelVolume = self.logic.core.load_case(case)
            self.labelSegmentation = None
            slicer.util.setSliceViewerLayers(background=self.labelVolume, foreground=None, label=None, fit=True)
            self.onShowSlices()

    def onSuggest(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not ask for suggestions.", waitCursor=True):
            run = self.ui.runNameLineEdit.text.strip()
            strategy = self.ui.strategyComboBox.currentText
            if strategy == "none":
                strategy = "her"
            from_run = self.logic.core.suggestions_from_run(run) if run in self.logic.core.runs() else []
            if from_run:  # the training run already suggested: no need to start a process
                self.setSuggestions(from_run)
                return
            if not self.logic.ensureDependencies():
                return
            self.logic.core.start_suggestions(run, strategy, k=2)
            self.ui.labelStatusLabel.text = f"Asking run '{run}' for suggestions ({strategy})..."
            self.timer.start()

    def setSuggestions(self, suggestions: list) -> None:
        self.suggestions = list(suggestions)
        self.ui.suggestionComboBox.clear()
        for s in self.suggestions:
            score = f" (score {s.score:.3f})" if s.score is not None else ""
            where = ", ".join(f"{v} {e['index']}" for v, e in s.slices.items() if e.get("index") is not None)
            self.ui.suggestionComboBox.addItem(f"{s.case}{score}: {where}")
        self.ui.labelStatusLabel.text = f"{len(self.suggestions)} suggestions." if self.suggestions else "No suggestions."

    def onSuggestionChosen(self, index: int) -> None:
        if 0 <= index < len(self.suggestions):
            self.ui.caseComboBox.setCurrentText(self.suggestions[index].case)

    def onShowSlices(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not move the slice views.", waitCursor=True):
            if self.labelVolume is None:
                raise ValueError("Load a scan first (Label panel: Load).")
            case = self.labelVolume.GetAttribute("FMABS.case")
            self.logic.core.place_views(self.labelVolume, self.currentSlicesFor(case), self.sliceNodes())

    def onDraw(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start drawing.", waitCursor=True):
            if self.labelVolume is None:
                raise ValueError("Load a scan first (Label panel: Load).")
            if self.labelSegmentation is None or self.labelSegmentation.GetScene() is None:
                self.labelSegmentation = self.logic.core.create_label_segmentation(self.labelVolume)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(self.labelSegmentation)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(self.labelVolume)
            else:  # Slicer < 5.2
                editor.setMasterVolumeNode(self.labelVolume)

    def onSaveCrossLabel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not save the cross-label.", waitCursor=True):
            if self.labelVolume is None or self.labelSegmentation is None:
                raise ValueError("Load a scan and draw on it first (Label panel: Load, then Draw).")
            core = self.logic.core
            case = self.labelVolume.GetAttribute("FMABS.case")
            if core.project.crosslabel_path(case).exists() and not slicer.util.confirmOkCancelDisplay(
                    f"Scan {case} already has a cross-label. Replace it?"):
                return
            slices = core.shown_slices(self.labelVolume, self.sliceNodes())
            report = core.save_crosslabel(case, self.labelSegmentation, self.labelVolume, slices)
            where = ", ".join(f"{v} {i}" for v, i in report.slices.items())
            self.ui.labelStatusLabel.text = f"Saved {report.path.name} ({where})."
            if report.warnings:
                slicer.util.warningDisplay("\n\n".join(report.warnings), windowTitle="Cross-label saved, please check")
            self.refreshProject()

    # ---- Train ----------------------------------------------------------------------------------
    def onStartTraining(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            run = self.ui.runNameLineEdit.text.strip()
            strategy = self.ui.strategyComboBox.currentText
            self.logic.core.start_training(
                run, self.ui.methodComboBox.currentText, self.ui.iterationsSpinBox.value,
                device=self.ui.deviceComboBox.currentText, generalist=self.ui.generalistComboBox.currentText,
                active=None if strategy == "none" else strategy, budget=self.ui.budgetSpinBox.value,
                expert=self.ui.expertComboBox.currentText)
            qt.QSettings().setValue("SlicerFMABS/RunName", run)
            self.ui.trainingLogTextEdit.clear()
            self.ui.cancelTrainingButton.enabled = True
            self.ui.startTrainingButton.enabled = False
            self.timer.start()

    def onWatchRun(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not watch the run.", waitCursor=True):
            self.logic.core.watch_run(self.ui.runNameLineEdit.text.strip())
            self.ui.trainingLogTextEdit.clear()
            self.ui.cancelTrainingButton.enabled = True
            self.timer.start()

    def onCancelTraining(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not cancel training."):
            if not self.logic.core.cancel_training():
                slicer.util.showStatusMessage("No running training job to cancel.", 3000)
            else:
                self.ui.trainingStateLabel.text = "cancelling (saving a checkpoint)..."

    def onMethodChanged(self, name: str) -> None:
        """What the chosen method does, and which label setting each family is for."""
        described = {m["name"]: m["description"] for m in jobs.available_methods()} if not deps.missing() else {}
        self.ui.methodHelpLabel.text = "\n".join(filter(None, [described.get(name), jobs.METHOD_GUIDE]))

    def onTimer(self) -> None:
        """Every second: read the run files and the child processes; never blocks."""
        try:
            self.pollTraining()
            self.pollSuggestions()
            self.pollSegmentation()
        except Exception as exc:  # a timer must not raise into Qt; show it once and go on
            logging.exception("SlicerFMABS timer")
            slicer.util.errorDisplay(f"FM-ABS: {exc}")
        core = self.logic._core
        busy = core is not None and (
            (core.watcher is not None and not core.watcher.status.finished)
            or core.suggest_job is not None or core.prediction is not None)
        if not busy:
            self.timer.stop()

    def pollTraining(self) -> None:
        core = self.logic._core
        if core is None or core.watcher is None:
            return
        status, lines = core.poll_training()
        for line in lines:
            self.ui.trainingLogTextEdit.appendPlainText(line)
        self.ui.trainingProgressBar.value = int(round(100 * status.fraction))
        done = f"{status.iteration}/{status.total}" if status.total else ""
        state = f"{status.state} ({status.stage_title})" if status.stage_title else status.state
        self.ui.trainingStateLabel.text = f"{state} {done}".strip()
        self.ui.etaLabel.text = f"ETA: {status.eta_text or '-'}"
        self.ui.diceLabel.text = f"val Dice: {status.val_dice:.3f}" if status.val_dice is not None else "val Dice: -"
        if core.watcher.last_suggestion is not None:
            self.setSuggestions(jobs.parse_suggestions(core.watcher.last_suggestion))
            core.watcher.last_suggestion = None
        if status.finished:
            self.ui.cancelTrainingButton.enabled = False
            self.ui.startTrainingButton.enabled = True
            if status.state == jobs.WAITING:
                cases = ", ".join(status.waiting_for) or "the suggested scans"
                self.ui.trainingLogTextEdit.appendPlainText(
                    f"Waiting for your labels: {cases}. Cross-label them in the Label panel, then press Start "
                    "(same run name) to resume training.")
            elif status.error:
                self.ui.trainingLogTextEdit.appendPlainText(f"{status.state}: {status.error}")
            self.refreshProject()

    def pollSuggestions(self) -> None:
        core = self.logic._core
        if core is None or core.suggest_job is None:
            return
        suggestions = core.finish_suggestions()
        if suggestions is not None:
            self.setSuggestions(suggestions)

    def pollSegmentation(self) -> None:
        core = self.logic._core
        if core is None or core.prediction is None:
            return
        elapsed = int(time.time() - core.prediction.started)
        self.ui.segmentStatusLabel.text = f"Segmenting... {elapsed} s"
        try:
            node = core.finish_prediction()
        finally:
            if core.prediction is None:
                self.ui.segmentButton.enabled = True
                self.ui.cancelSegmentButton.enabled = False
        if node is not None:
            self.ui.exportSegmentationSelector.setCurrentNode(node)
            self.ui.segmentStatusLabel.text = f"Done: {node.GetName()}."

    # ---- Review ---------------------------------------------------------------------------------
    def onLoadReview(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the review layers.", waitCursor=True):
            core = self.logic.core
            case, run = self.ui.reviewCaseComboBox.currentText, self.ui.reviewRunComboBox.currentText
            if not case or not run:
                raise ValueError("Choose a run and a scan.")
            volume = core.load_case(case)
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            self.reviewNodes = core.load_review_layers(case, run, volume)
            if not self.reviewNodes:
                slicer.util.infoDisplay(f"Run '{run}' has no pseudo-labels or prediction for {case} yet.")
            self.updateReviewVisibility()

    def updateReviewVisibility(self, *args) -> None:
        opacity = self.ui.reviewOpacitySliderWidget.value
        for layer, checkbox in self.layerCheckBoxes().items():
            node = self.reviewNodes.get(layer)
            if node is not None and node.GetScene() is not None:
                self.logic.core.set_layer_visible(node, checkbox.checked, opacity)

    # ---- Segment and export -----------------------------------------------------------------------
    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            core = self.logic.core
            volume = self.ui.segmentVolumeSelector.currentNode()
            run = self.ui.modelComboBox.currentText
            if volume is None or not run:
                raise ValueError("Choose a volume and a trained model.")
            if not self.logic.ensureDependencies():
                return
            core.start_prediction(core.require_project().run_dir(run), volume, self.ui.deviceComboBox.currentText)
            self.ui.segmentButton.enabled = False
            self.ui.cancelSegmentButton.enabled = True
            self.ui.segmentStatusLabel.text = "Segmenting..."
            self.timer.start()

    def onCancelSegment(self) -> None:
        self.logic.core.cancel_prediction()

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not export the segmentation.", waitCursor=True):
            segmentation = self.ui.exportSegmentationSelector.currentNode()
            volume = self.ui.segmentVolumeSelector.currentNode()
            folder = self.ui.exportDirPathLineEdit.currentPath
            if segmentation is None or volume is None or not folder:
                raise ValueError("Choose a segmentation, the volume it belongs to, and an output folder.")
            name = self.ui.exportNameLineEdit.text.strip() or None
            try:
                nii, nrrd = self.logic.core.export_segmentation(segmentation, volume, folder, name)
            except FileExistsError as exc:
                if not slicer.util.confirmOkCancelDisplay(f"{exc}.\n\nOverwrite?"):
                    return
                nii, nrrd = self.logic.core.export_segmentation(segmentation, volume, folder, name, overwrite=True)
            slicer.util.infoDisplay(f"Exported:\n{nii}\n{nrrd}")


#
# SlicerFMABSLogic
#


class SlicerFMABSLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic: dependency installation, then ``core`` (SlicerFMABSLib.logic.FMABSLogic).

    ``core`` is created on first use, after the dependencies are present, so the module loads in a
    fresh Slicer without torch, MONAI or nibabel.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None
        self._dependenciesChecked = False

    def ensureDependencies(self) -> bool:
        """Ask once, then install torch (PyTorch extension) and the pip packages that are missing."""
        if self._dependenciesChecked:
            return True
        deps.ensure_fmabs_core_importable()
        names = deps.missing(torch_needed=True)
        if names:
            confirm, install_torch, pip_install = deps.slicer_installers()
            if not deps.install(names, confirm, install_torch, pip_install):
                return False
        self._dependenciesChecked = True
        return True

    @property
    def core(self):
        if self._core is None:
            if not self.ensureDependencies():
                raise RuntimeError("FM-ABS needs its Python packages; they were not installed.")
            from SlicerFMABSLib.logic import FMABSLogic

            self._core = FMABSLogic(slicer.mrmlScene, slicer.modules.segmentations.logic())
        return self._core


#
# SlicerFMABSTest
#


class SlicerFMABSTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest or the Reload and Test button) on the application's own scene."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_module_widget()
        self.setUp()
        self.test_crosslabel_review_export()
        self.setUp()
        self.test_run_watcher()

    def _tmp(self) -> Path:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="SlicerFMABSTest-"))

    def test_module_widget(self) -> None:
        """The panels load from the .ui and every section is there."""
        self.delayDisplay("Opening the module")
        slicer.util.selectModule("SlicerFMABS")
        widget = slicer.modules.SlicerFMABSWidget
        for name in ("projectCollapsibleButton", "labelCollapsibleButton", "trainCollapsibleButton",
                     "reviewCollapsibleButton", "segmentCollapsibleButton"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.assertEqual(widget.ui.methodComboBox.count, len(jobs.method_names()))

    def test_crosslabel_review_export(self) -> None:
        """Oblique left-handed scan: views on suggested planes, drawing -> cross-label, layers, export."""
        import numpy as np

        logic = SlicerFMABSLogic()
        self.assertTrue(logic.ensureDependencies())
        import nibabel as nib
        from fmabs_core.data import io as fio
        from SlicerFMABSLib import geometry, segmentations

        tmp = self._tmp()
        angle = np.deg2rad(25)
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag([-0.9, 1.1, 2.0])
        affine[:3, 3] = [12, -8, 20]
        data = np.random.default_rng(0).normal(size=(20, 18, 12)).astype(np.float32)
        scan = tmp / "input" / "scan01.nii.gz"
        scan.parent.mkdir()
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(scan))

        core = logic.core
        core.create_project(tmp / "project", {1: "structure"})
        core.project.add_case(scan)
        volume = core.load_case("scan01")
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        layoutManager = slicer.app.layoutManager()
        sliceNodes = {v: layoutManager.sliceWidget(n).mrmlSliceNode() for v, n in SLICE_VIEW_OF.items()}
        want = {"axial": 5, "coronal": 7, "sagittal": 9}
        core.place_views(volume, {v: {"index": i} for v, i in want.items()}, sliceNodes)
        self.assertEqual(core.shown_slices(volume, sliceNodes), want)

        seg = core.create_label_segmentation(volume)
        segmentId = seg.GetSegmentation().GetNthSegmentID(0)
        _, shape = geometry.canonical_grid(volume)
        mask = np.zeros(shape, np.uint8)
        mask[6:12, 4:10, 5] = 1
        mask[9, 3:12, 2:8] = 1
        kji = geometry.from_canonical(mask, geometry.ijk_to_ras(volume)).transpose(2, 1, 0)
        slicer.util.updateSegmentBinaryLabelmapFromArray(kji, seg, segmentId, volume)
        report = core.save_crosslabel("scan01", seg, volume, want)
        self.assertEqual(report.outside_voxels, 0)
        label = fio.load_label(report.path, 1, allow_unlabelled=True)
        self.assertEqual(fio.check_pair(fio.load_image(core.project.image_path("scan01")), label), [])
        self.assertEqual(int((label.array == 1).sum()), int(mask.sum()))
        self.assertEqual(int((label.array == 255).sum()),
                         int(np.prod(shape)) - (shape[0] * shape[1] + shape[0] * shape[2] + shape[1] * shape[2])
                         + shape[0] + shape[1] + shape[2] - 1)

        self.delayDisplay("Review layers")
        image = fio.load_image(core.project.image_path("scan01"))
        fio.save_like(mask, image, core.project.run_dir("r") / "pseudo" / "scan01_fused.nii.gz")
        nodes = core.load_review_layers("scan01", "r", volume)
        classMap = segmentations.class_of_segments(nodes["fused"], core.project.classes)
        arr, _ = segmentations.segmentation_to_canonical(core.seg_logic, slicer.mrmlScene, nodes["fused"], volume, classMap)
        np.testing.assert_array_equal(arr, mask)

        self.delayDisplay("Export")
        nii, nrrd = core.export_segmentation(nodes["fused"], volume, tmp / "export", "scan01_fused")
        out = nib.load(str(nii))
        np.testing.assert_allclose(out.affine, nib.load(str(core.project.image_path("scan01"))).affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.dataobj), image.to_source(mask))
        self.assertTrue(nrrd.exists())
        self.delayDisplay("Test passed")

    def test_run_watcher(self) -> None:
        """The Train panel's reader on real files, including a partial last line."""
        import json

        run = self._tmp() / "run"
        run.mkdir()
        (run / "status.json").write_text(json.dumps({"state": "running", "iteration": 5, "iterations": 10,
                                                     "eta_s": 30, "val_dice": 0.7, "pid": os.getpid()}))
        (run / "events.jsonl").write_text(json.dumps({"type": "progress", "iteration": 5}) + "\n{\"type\": \"vali")
        status, lines = jobs.RunWatcher(run).poll()
        self.assertEqual((status.state, status.iteration, status.total, status.val_dice), ("running", 5, 10, 0.7))
        self.assertEqual(len(lines), 1)
