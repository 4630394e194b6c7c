"""SlicerFMABS: three drawn slices per scan -> a custom 3D segmentation model, inside 3D Slicer.

Module / Widget / Logic / Test, as in Slicer's scripted-module template. The Widget is thin: it
reads its widgets and calls the Logic. The Logic delegates to ``SlicerFMABSLib`` (importable
without Qt, tested headless with slicer-core). Training, suggestions and segmentation run as
separate ``python -m fmabs_core`` processes (launched with ``slicer.util.launchConsoleProcess``)
that a QTimer watches: the GUI never blocks and never imports torch. Third-party packages are
installed on first use, after asking, never at import. The panels' choices live in the scene's
parameter node, so a saved scene restores them.

Supported: 3D Slicer 5.10 or later (Python 3.12). Slicer 5.6 and 5.8 ship Python 3.9, on which the
training library cannot run; the module loads there and says so instead of installing anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SlicerFMABSLib import deps, jobs, parameters
from SlicerFMABSLib.scene import SLICE_VIEW_OF

log = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parent

#: parameter (SlicerFMABSLib.parameters) -> (widget of the .ui, how to read and write it)
PARAMETER_WIDGETS = {
    "projectPath": ("projectPathLineEdit", "path"),
    "runName": ("runNameLineEdit", "text"),
    "method": ("methodComboBox", "combo"),
    "generalist": ("generalistComboBox", "combo"),
    "strategy": ("strategyComboBox", "combo"),
    "expert": ("expertComboBox", "combo"),
    "device": ("deviceComboBox", "combo"),
    "budget": ("budgetSpinBox", "number"),
    "iterations": ("iterationsSpinBox", "number"),
    "case": ("caseComboBox", "combo"),
    "modelRun": ("modelComboBox", "combo"),
    "segmentVolume": ("segmentVolumeSelector", "node"),
    "exportSegmentation": ("exportSegmentationSelector", "node"),
}
#: the Qt signal each kind of widget emits when the user changes it
CHANGED_SIGNAL = {"path": "currentPathChanged(QString)", "text": "textChanged(QString)",
                  "combo": "currentTextChanged(QString)", "number": "valueChanged(int)",
                  "node": "currentNodeChanged(vtkMRMLNode*)"}


def readWidget(widget, kind: str):
    """The value a widget shows, by the kind of PARAMETER_WIDGETS."""
    if kind == "path":
        return widget.currentPath
    if kind == "text":
        return widget.text
    if kind == "combo":
        return widget.currentText
    if kind == "number":
        return widget.value
    return widget.currentNode()


def writeWidget(widget, kind: str, value) -> None:
    if kind == "path":
        widget.currentPath = value
    elif kind == "text":
        widget.text = value
    elif kind == "combo":
        if value:  # a choice missing from the list (e.g. no project open yet) leaves the list as it is
            widget.setCurrentText(value)
    elif kind == "number":
        widget.value = value
    else:
        widget.setCurrentNode(value)


@contextlib.contextmanager
def withoutWaitCursor():
    """A question asked from inside a handler that set the wait cursor (tryWithErrorDisplay(waitCursor=True)):
    the normal cursor while the dialog shows, the wait cursor back afterwards."""
    popped = 0
    while qt.QApplication.overrideCursor() is not None and popped < 16:
        qt.QApplication.restoreOverrideCursor()
        popped += 1
    try:
        yield
    finally:
        for _ in range(popped):
            qt.QApplication.setOverrideCursor(qt.QCursor(qt.Qt.WaitCursor))


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
        # the Label panel draws with the Segment Editor on segmentations; PyTorch Utils is used when present
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["SlicerFMABS contributors"]
        self.parent.helpText = """
Train a 3D segmentation model for your structure from three drawn slices (axial, coronal, sagittal)
per scan. A frozen SAM-family model turns the model's guesses into extra pseudo-labels while a
small 3D specialist trains in the background; the module suggests which scan and slices to label
next, then segments new scans and exports NIfTI. Panels: Project, Label, Train, Review, Segment and export.
Needs 3D Slicer 5.10 or later.
"""
        problem = deps.python_problem()
        if problem:  # checked at load: the module still loads and its panels say why nothing runs
            logging.warning("SlicerFMABS: %s", problem)
            self.parent.helpText = "<b>" + problem.split("\n")[0] + "</b>\n" + self.parent.helpText
        self.parent.acknowledgementText = """
Methods: FM-ABS (foundation-model-assisted active barely-supervised learning, MICCAI 2024) and CFR.
Built on 3D Slicer, MONAI, PyTorch and the PyTorch extension (PyTorch Utils).
"""
        icon = resourcePath("Icons/SlicerFMABS.png")
        if os.path.exists(icon):
            self.parent.icon = qt.QIcon(icon)
        # Sample Data > FM-ABS: phantom scans to try the loop without one's own data (after startup, as the
        # template registers sample data: the Sample Data module may load after this one)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the FM-ABS phantoms to the Sample Data module (SlicerFMABSLib/sampledata.py)."""
    from SlicerFMABSLib import sampledata

    folder = Path(resourcePath("SampleData/" + sampledata.FILES[0])).parent
    if not sampledata.register(folder, thumbnail=resourcePath("Icons/SlicerFMABS.png")):
        logging.info("SlicerFMABS: sample data not registered (no Sample Data module, or files missing in %s)", folder)


#
# SlicerFMABSWidget
#


class SlicerFMABSWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panels. Every handler reads widgets, calls the Logic and shows the outcome.

    The widgets mirror the scene's parameter node (``self.logic.params``): a change in a widget is written
    to the node, and the node (a loaded scene, the Logic) updates the widgets.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SlicerFMABSLogic | None = None
        self.suggestions: list[jobs.Suggestion] = []
        self.reviewNodes: dict = {}
        self.timer = None
        self._parameterNode = None
        self._updatingGUI = False

    def resourcePath(self, filename: str) -> str:
        return resourcePath(filename)

    # the Label panel's scan and drawing live in the parameter node (a saved scene restores them)
    @property
    def labelVolume(self):
        return self.logic.params.labelVolume

    @labelVolume.setter
    def labelVolume(self, node) -> None:
        self.logic.params.labelVolume = node

    @property
    def labelSegmentation(self):
        return self.logic.params.labelSegmentation

    @labelSegmentation.setter
    def labelSegmentation(self, node) -> None:
        self.logic.params.labelSegmentation = node

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerFMABS.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerFMABSLogic()

        # the methods fmabs_core offers, from its catalog (no torch, no process: the panel opens at once)
        methods = jobs.method_names()
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

        # every choice is kept in the parameter node (a widget's change writes its own parameter only)
        for name, (widgetName, kind) in PARAMETER_WIDGETS.items():
            getattr(self.ui, widgetName).connect(CHANGED_SIGNAL[kind],
                                                 lambda *args, name=name: self.updateParameterNodeFromGUI(name))

        # closing Slicer with a training job running: ask whether it keeps running (the default)
        slicer.app.connect("aboutToQuit()", self.onApplicationQuit)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()

        problem = deps.python_problem()
        if problem:
            self.ui.projectInfoLabel.text = problem.split("\n")[0]
            for button in (self.ui.startTrainingButton, self.ui.suggestButton, self.ui.segmentButton):
                button.enabled = False

    def cleanup(self) -> None:
        """Module widget destroyed (application exit, module reload): stop polling and let go of the scene's
        parameter node, so that a reloaded module's hidden widgets write nothing into it.

        A training job keeps running (it was started detached, writing its own log): follow it after a
        restart with Watch run. Short jobs (suggestions, segmentation) end with Slicer.
        """
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()
        self._parameterNode = None

    def enter(self) -> None:
        """The module is shown: observe the scene's parameter node again (a scene closed while it was hidden
        left it unset)."""
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        """The module is hidden: stop following the parameter node (its widgets are not shown)."""
        self.setParameterNode(None)

    def onApplicationQuit(self) -> None:
        """Slicer is closing: a training job started here keeps running unless the user asks to stop it
        (a checkpoint is saved; Start on the same run resumes)."""
        core = self.logic._core if self.logic is not None else None
        job = core.train_job if core is not None else None
        if job is None or not job.running:
            return
        run = Path(core.train_job_run).name if core.train_job_run else "the run"
        keep = slicer.util.confirmYesNoDisplay(
            f"Training run '{run}' is still running.\n\nKeep it running after 3D Slicer closes? It writes its own "
            "log and results; reopen the project and use Watch run to follow it.\n\nNo: it saves a checkpoint "
            "and stops (Start on the same run resumes it).", windowTitle="FM-ABS: training still running")
        if not keep:
            core.cancel_training(own_job=True)

    # ---- parameter node ---------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        """Observe the scene's parameter node (created with the defaults if needed) and show its values."""
        if not self.logic.params.projectPath:  # a new scene: start from the last project used
            last = qt.QSettings().value("SlicerFMABS/ProjectPath", "")
            if last:
                self.logic.params.projectPath = last
        self.setParameterNode(self.logic.params.node)

    def setParameterNode(self, node) -> None:
        if node is self._parameterNode:
            self.updateGUIFromParameterNode()
            return
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Show the parameter node's values in the widgets (without writing them back)."""
        if self._parameterNode is None or self._updatingGUI:
            return
        values = self.logic.params.values()
        self._updatingGUI = True
        try:
            for name, (widgetName, kind) in PARAMETER_WIDGETS.items():
                writeWidget(getattr(self.ui, widgetName), kind, values[name])
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *names: str) -> None:
        """Store what the widgets show in the parameter node: the named parameters (a widget's change), or all."""
        if self._parameterNode is None or self._updatingGUI:
            return
        values = {}
        for name in names or PARAMETER_WIDGETS:
            widgetName, kind = PARAMETER_WIDGETS[name]
            value = readWidget(getattr(self.ui, widgetName), kind)
            if kind != "combo" or value:  # an empty list (no project yet) keeps the stored choice
                values[name] = value
        self._updatingGUI = True  # the node's Modified event must not rewrite the widgets being read
        try:
            self.logic.params.update(**values)
        finally:
            self._updatingGUI = False

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneStartImport(self, caller, event) -> None:
        """Widgets that react to the nodes being loaded (node selectors) must not overwrite the loaded choices."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """A closed scene: nothing of the old one is shown; the parameter node is back to its defaults."""
        self.suggestions = []
        self.reviewNodes = {}
        if getattr(self.parent, "isEntered", True):  # as the template: no parameter node for a hidden module
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene may bring its own parameter node: show it and reopen its project."""
        self.setParameterNode(self.logic.params.node)
        core = self.logic.coreIfReady()
        if core is None:
            return
        try:
            if core.restore_project() is not None:
                self.refreshProject()
        except Exception as exc:  # a moved or deleted project folder: say so, do not fail the scene load
            logging.warning("SlicerFMABS: could not reopen the scene's project: %s", exc)
            self.ui.projectInfoLabel.text = f"The scene's project could not be opened: {exc}"

    def layerCheckBoxes(self) -> dict:
        return {"axial": self.ui.showAxialCheckBox, "coronal": self.ui.showCoronalCheckBox,
                "sagittal": self.ui.showSagittalCheckBox, "fused": self.ui.showFusedCheckBox,
                "prediction": self.ui.showPredictionCheckBox}

    def sliceNodes(self, requireShown: bool = False) -> dict:
        """{view: slice node}, fetched by ID; with ``requireShown``, an error when the layout does not show one of
        the views (a hidden view's node exists: what counts is whether the layout maps it)."""
        nodes = self.logic.core.slice_nodes()
        hidden = self.logic.core.hidden_views(nodes)
        if hidden and requireShown:
            raise ValueError(f"The current layout does not show the {', '.join(hidden)} view: choose a layout with "
                             "the red, green and yellow views (e.g. Four-Up), press Show slices, then save.")
        return nodes

    def showThreeSliceViews(self) -> None:
        """Switch to the Four-Up layout when the current one does not show the red, green and yellow views."""
        layoutManager = slicer.app.layoutManager() if hasattr(slicer, "app") else None
        if layoutManager is None:
            return
        if self.logic.core.hidden_views(self.logic.core.slice_nodes()):
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
            slicer.app.processEvents()  # the layout manager maps the new layout's views

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
            nodes = self.logic.core.loaded_volume_nodes()
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
        runs = core.runs()
        self._updatingGUI = True  # refilling the lists must not overwrite the stored choices
        try:
            self.ui.caseListWidget.clear()
            shown = core.display_names()
            for case, labelled in rows:
                self.ui.caseListWidget.addItem(("\u2713 " if labelled else "    ") + shown.get(case, case))
            for combo, values in ((self.ui.caseComboBox, [case for case, _ in rows]),
                                  (self.ui.reviewCaseComboBox, [case for case, _ in rows]),
                                  (self.ui.reviewRunComboBox, runs), (self.ui.modelComboBox, core.trained_runs())):
                current = combo.currentText
                combo.clear()
                for value in values:
                    combo.addItem(value)
                if current:
                    combo.setCurrentText(current)
        finally:
            self._updatingGUI = False
        self.updateGUIFromParameterNode()  # the stored scan and model, when they are in the lists
        self.updateParameterNodeFromGUI("case", "modelRun")
        classes = ", ".join(f"{k}:{v}" for k, v in core.project.classes.items())
        n_labelled = sum(1 for _, labelled in rows if labelled)
        self.ui.projectInfoLabel.text = (f"{core.project.root}: {len(rows)} scans, {n_labelled} cross-labelled; "
                                         f"classes {classes}; {len(runs)} runs.")

    # ---- Label ----------------------------------------------------------------------------------
    def currentSlicesFor(self, case: str) -> dict:
        return self.logic.core.slices_for(case, self.labelVolume, self.suggestions)

    def onLoadCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the scan.", waitCursor=True):
            case = self.ui.caseComboBox.currentText
            if not case:
                raise ValueError("The project has no scans yet: add some in the Project panel.")
            volume = self.logic.core.start_labelling(case)
            slicer.util.setSliceViewerLayers(background=volume, foreground=None, label=None, fit=True)
            self.onShowSlices()
            if self.logic.core.drawing_is_saved_crosslabel():
                self.ui.labelStatusLabel.text += " Shown: the saved cross-label; edit it and Save (it asks before replacing)."

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
            volume = self.labelVolume
            if volume is None:
                raise ValueError("Load a scan first (Label panel: Load).")
            self.showThreeSliceViews()
            case = volume.GetAttribute("FMABS.case")
            nodes = self.sliceNodes(requireShown=True)
            self.logic.core.place_views(volume, self.currentSlicesFor(case), nodes)
            planes = self.logic.core.record_planes(volume, nodes)
            self.ui.labelStatusLabel.text = ("Draw on these slices: " + ", ".join(f"{v} {i}" for v, i in planes.items())
                                             + ". Save saves these slices.")

    def onDraw(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start drawing.", waitCursor=True):
            drawing = self.logic.core.label_segmentation()
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(drawing)
            editor.setSourceVolumeNode(self.labelVolume)

    def onSaveCrossLabel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not save the cross-label.", waitCursor=True):
            volume, drawing = self.labelVolume, self.labelSegmentation
            if volume is None or drawing is None:
                raise ValueError("Load a scan and draw on it first (Label panel: Load, then Draw).")
            core = self.logic.core
            case = volume.GetAttribute("FMABS.case")
            if core.project.crosslabel_path(case).exists() and not slicer.util.confirmOkCancelDisplay(
                    f"Scan {case} already has a cross-label. Replace it?"):
                return
            nodes = self.sliceNodes(requireShown=True)
            slices, moved = core.planes_to_save(volume, nodes)
            if moved:
                change = ", ".join(f"{v} {a} -> {b}" for v, (a, b) in moved.items())
                if not slicer.util.confirmOkCancelDisplay(
                        f"Since Show slices the views moved ({change}). Save the slices the views show now instead? "
                        "What is drawn on the earlier slices is then not saved.\n\nCancel: nothing is saved; press "
                        "Show slices to go back to the recorded slices.", windowTitle="FM-ABS: the views moved"):
                    return
                slices = core.record_planes(volume, nodes)

            def askEmpty(views: list) -> bool:
                return slicer.util.confirmOkCancelDisplay(
                    f"Nothing is drawn on the {', '.join(views)} slice(s). Saved like this, every voxel there means "
                    "'not the structure' (0). Save anyway?\n\nCancel: nothing is saved; draw the structure there first "
                    "if it is present.", windowTitle="FM-ABS: an empty slice")

            report = core.save_crosslabel(case, drawing, volume, slices, confirm_empty=askEmpty)
            if report is None:
                self.ui.labelStatusLabel.text = "Not saved."
                return
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
        """What the chosen method does, which label setting each family is for, and (when the user picks it)
        the method's own default iterations (its paper's: 20000 for fmabs, 6000 for cfr-*)."""
        described = {m["name"]: m["description"] for m in jobs.available_methods()}
        self.ui.methodHelpLabel.text = "\n".join(filter(None, [described.get(name), jobs.METHOD_GUIDE]))
        iterations = jobs.default_iterations(name) if not self._updatingGUI else None
        if iterations:  # not while a saved scene restores its own choice
            self.ui.iterationsSpinBox.value = iterations
            self.updateParameterNodeFromGUI("iterations")

    def onTimer(self) -> None:
        """Every second: read the run files and the child processes; never blocks, never opens a dialog.

        An error while following a job is shown once (the panel's status line and the log) and that job is
        no longer followed; the timer stops when nothing is left to follow.
        """
        for what, poll in (("training", self.pollTraining), ("suggestions", self.pollSuggestions),
                           ("segmentation", self.pollSegmentation)):
            try:
                poll()
            except Exception as exc:  # a timer must not raise into Qt, nor open a dialog per tick
                self.reportPollError(what, exc)
        core = self.logic._core
        busy = core is not None and (
            (core.watcher is not None and core.watcher.active)
            or core.suggest_job is not None or core.prediction is not None)
        if not busy:
            self.timer.stop()

    def reportPollError(self, what: str, exc: Exception) -> None:
        """One message for a failed job or an unreadable run: the log, the panel's status line, the status bar."""
        logging.error("FM-ABS: following the %s job failed: %s", what, exc, exc_info=exc)
        core = self.logic._core
        text = str(exc).strip() or type(exc).__name__
        short = "\n".join(text.splitlines()[:6])
        if what == "training":
            if core is not None and core.watcher is not None:
                core.watcher.failed = text  # no longer followed: no second message
            running = core is not None and core.train_job is not None and core.train_job.running
            self.ui.trainingStateLabel.text = f"error reading the run (press Watch run to retry): {short}"
            self.ui.cancelTrainingButton.enabled = running
            self.ui.startTrainingButton.enabled = not running
        elif what == "suggestions":
            if core is not None:
                core.suggest_job = None
            self.ui.labelStatusLabel.text = f"Suggestions failed: {short}"
        else:
            if core is not None:
                core.prediction = None
            self.ui.segmentButton.enabled = True
            self.ui.cancelSegmentButton.enabled = False
            self.ui.segmentStatusLabel.text = f"Segmentation failed: {short}"
        slicer.util.showStatusMessage(f"FM-ABS: {what} failed (details in the Python console / error log).", 10000)

    def pollTraining(self) -> None:
        core = self.logic._core
        if core is None or core.watcher is None or core.watcher.failed is not None:
            return
        status, lines = core.poll_training()
        for line in lines:
            self.ui.trainingLogTextEdit.appendPlainText(line)
        self.ui.trainingProgressBar.value = int(round(100 * status.fraction))
        self.ui.trainingStateLabel.text = jobs.status_line(status)
        self.ui.etaLabel.text = f"ETA: {status.eta_text or '-'}"
        self.ui.diceLabel.text = f"val Dice: {status.val_dice:.3f}" if status.val_dice is not None else "val Dice: -"
        self.ui.planesLabel.text = jobs.planes_text(status)  # pseudo-labels vs teacher on the drawn slices
        self.ui.planesLabel.styleSheet = jobs.planes_style(status)
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
    """Slicer-facing logic: dependency installation, the parameter node, then ``core`` (SlicerFMABSLib.logic.FMABSLogic).

    ``core`` is created on first use, once the packages the Slicer process itself needs (numpy, nibabel,
    filelock, psutil) are there, so the module loads in a fresh Slicer; torch, MONAI and the generalists
    are installed only before the first job.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None
        self._jobDependenciesChecked = False
        self._unavailable: set[str] = set()  # generalist packages that could not be installed: not asked again
        self._installing = False  # pip is running (a second click must not start another)

    @property
    def params(self) -> parameters.Parameters:
        """The module's choices in the scene's parameter node (``getParameterNode()``'s node)."""
        return parameters.Parameters(slicer.mrmlScene)

    def ensureDependencies(self, forJobs: bool = True) -> bool:
        """Install what is missing or too old, after one confirmation, one package at a time.

        ``forJobs``: torch (through PyTorch Utils) and every requirement of the jobs; otherwise only what the
        Slicer process imports. False when the user declines or something FM-ABS cannot do without failed
        (one message says which package and pip's reason); a generalist's package that failed only makes
        that generalist unavailable.
        """
        problem = deps.python_problem()
        if problem:
            slicer.util.errorDisplay(problem, windowTitle=f"FM-ABS needs 3D Slicer {deps.MIN_SLICER} or later")
            return False
        deps.ensure_fmabs_core_importable()
        if forJobs and self._jobDependenciesChecked:
            return True
        if self._installing:  # the progress messages let Qt handle clicks meanwhile
            slicer.util.showStatusMessage("FM-ABS is installing its Python packages; wait until it is done.", 5000)
            return False
        requirements = deps.REQUIREMENTS if forJobs else [r for r in deps.REQUIREMENTS if r.gui]
        plan = deps.plan(torch_needed=forJobs, requirements=requirements, skip=self._unavailable)
        if plan.steps:
            confirm, install_torch, run_pip = deps.slicer_installers()

            def askWithNormalCursor(text: str) -> bool:
                with withoutWaitCursor():
                    return confirm(text)

            self._installing = True
            try:
                outcome = deps.install(plan, askWithNormalCursor, install_torch, run_pip, progress=self._showProgress)
            finally:
                self._installing = False
            if outcome.declined:
                return False
            self._unavailable |= outcome.not_again
            if not outcome.ok:
                show = slicer.util.warningDisplay if outcome.usable else slicer.util.errorDisplay
                with withoutWaitCursor():
                    show(outcome.message, windowTitle="FM-ABS: Python packages")
            else:
                slicer.util.showStatusMessage(outcome.message, 5000)
            if not outcome.usable:
                return False
        if forJobs:
            self._jobDependenciesChecked = True
        return True

    @staticmethod
    def _showProgress(text: str) -> None:
        slicer.util.showStatusMessage(text)
        slicer.app.processEvents()

    @property
    def core(self):
        if self._core is None:
            if not self.ensureDependencies(forJobs=False):
                raise RuntimeError("FM-ABS needs its Python packages; they were not installed.")
            from SlicerFMABSLib.logic import FMABSLogic

            self._core = FMABSLogic(slicer.mrmlScene, slicer.modules.segmentations.logic())
        return self._core

    def coreIfReady(self):
        """``core`` when it can be made without asking anything (its packages are installed), else None."""
        if self._core is None and not deps.ready(for_jobs=False):
            return None
        return self.core


#
# SlicerFMABSTest
#


class SlicerFMABSTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest or the Reload and Test button) on the application's own scene.

    It downloads nothing big: the Label, Review and Export part needs only what the Slicer process imports
    (numpy, nibabel, filelock, psutil; installed if missing, a few MB, never PyTorch). The part that runs a
    real ``fmabs`` job needs PyTorch and the jobs' packages already installed. A part that cannot run is
    skipped with a message, and the test then *fails* at the end, naming what was skipped (ctest must not
    pass a test that did not run), unless the environment variable ``FMABS_TEST_ALLOW_SKIPS`` is ``1``
    (for a Slicer without PyTorch, on purpose).
    """

    ALLOW_SKIPS_VARIABLE = "FMABS_TEST_ALLOW_SKIPS"

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.skipped: list[str] = []
        for test in (self.test_module_widget, self.test_sample_data, self.test_crosslabel_review_export,
                     self.test_run_watcher, self.test_cancel_stops_the_process_tree, self.test_fmabs_job):
            self.setUp()
            test()
        if self.skipped and os.environ.get(self.ALLOW_SKIPS_VARIABLE) != "1":
            raise AssertionError(f"SlicerFMABSTest: {len(self.skipped)} part(s) did not run: {'; '.join(self.skipped)}. "
                                 f"Install what they need, or set {self.ALLOW_SKIPS_VARIABLE}=1 to accept this.")

    def _skip(self, what: str, why: str) -> None:
        logging.warning("SlicerFMABSTest: %s skipped: %s", what, why)
        if not hasattr(self, "skipped"):
            self.skipped = []
        self.skipped.append(f"{what} ({why})")
        self.delayDisplay(f"{what} skipped: {why}")

    def _guiPackages(self, what: str) -> bool:
        """numpy, nibabel, filelock, psutil: present, or installed (small); never torch."""
        problem = deps.python_problem()
        if problem:
            self._skip(what, problem.split("\n")[0])
            return False
        if deps.ready(for_jobs=False):
            return True
        try:
            if SlicerFMABSLogic().ensureDependencies(forJobs=False):
                return True
        except Exception as exc:  # offline
            logging.warning("SlicerFMABSTest: %s", exc)
        self._skip(what, f"could not install {', '.join(deps.missing(gui_only=True))}")
        return False

    def _tmp(self) -> Path:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="SlicerFMABSTest-"))

    def _waitFor(self, predicate, timeout_s: float = 120.0, what: str = "the job"):
        """Poll like the module's timer (the GUI keeps running); returns the predicate's first true value."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            value = predicate()
            if value:
                return value
            slicer.app.processEvents()
            time.sleep(0.1)
        self.fail(f"timed out waiting for {what}")

    def test_sample_data(self) -> None:
        """Sample Data > FM-ABS loads four scans and a segmentation of the first scan's drawn planes (checksums
        checked by Sample Data itself)."""
        import SampleData

        from SlicerFMABSLib import sampledata

        registerSampleData()
        nodes = SampleData.SampleDataLogic().downloadSamples(sampledata.SAMPLE_NAME)
        self.assertEqual(len(nodes), len(sampledata.FILES))
        self.assertTrue(all(n.IsA("vtkMRMLScalarVolumeNode") for n in nodes[:-1]))
        self.assertTrue(nodes[-1].IsA("vtkMRMLSegmentationNode"))
        self.assertEqual(nodes[-1].GetSegmentation().GetNumberOfSegments(), 1)

    def test_module_widget(self) -> None:
        """The panels load from the .ui, every section is there, and the widgets follow the parameter node."""
        self.delayDisplay("Opening the module")
        slicer.util.selectModule("SlicerFMABS")
        widget = slicer.modules.SlicerFMABSWidget
        for name in ("projectCollapsibleButton", "labelCollapsibleButton", "trainCollapsibleButton",
                     "reviewCollapsibleButton", "segmentCollapsibleButton"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.assertEqual(widget.ui.methodComboBox.count, len(jobs.method_names()))
        widget.ui.runNameLineEdit.text = "ctest-run"  # widget -> parameter node
        self.assertEqual(widget.logic.params.runName, "ctest-run")
        widget.logic.params.budget = 7  # parameter node -> widget
        self.assertEqual(widget.ui.budgetSpinBox.value, 7)
        slicer.mrmlScene.Clear()  # a closed scene: back to the defaults
        self.assertEqual(widget.logic.params.runName, parameters.TEXT["runName"])

    def test_crosslabel_review_export(self) -> None:
        """Oblique left-handed scan: views on suggested planes, drawing -> cross-label, layers, export; the scene
        keeps no temporary node (colour tables included)."""
        if not self._guiPackages("Label, review and export"):
            return
        import numpy as np

        logic = SlicerFMABSLogic()
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
        volume = core.start_labelling("scan01")
        self.assertEqual(logic.params.labelVolume, volume)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
        slicer.app.processEvents()
        sliceNodes = core.slice_nodes()
        self.assertEqual(set(sliceNodes), set(SLICE_VIEW_OF))  # the hidden views' nodes exist...
        self.assertEqual(core.hidden_views(sliceNodes), ["coronal (Green)", "sagittal (Yellow)"])  # ...unmapped
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        slicer.app.processEvents()
        self.assertEqual(core.hidden_views(sliceNodes), [])
        want = {"axial": 5, "coronal": 7, "sagittal": 9}
        core.place_views(volume, {v: {"index": i} for v, i in want.items()}, sliceNodes)
        self.assertEqual(core.shown_slices(volume, sliceNodes), want)
        self.assertEqual(core.record_planes(volume, sliceNodes), want)
        self.assertEqual(core.planes_to_save(volume, sliceNodes), (want, {}))

        seg = core.label_segmentation()
        segmentId = seg.GetSegmentation().GetNthSegmentID(0)
        _, shape = geometry.canonical_grid(volume)
        mask = np.zeros(shape, np.uint8)
        mask[6:12, 4:10, 5] = 1
        mask[9, 3:12, 2:8] = 1
        kji = geometry.from_canonical(mask, geometry.ijk_to_ras(volume)).transpose(2, 1, 0)
        slicer.util.updateSegmentBinaryLabelmapFromArray(kji, seg, segmentId, volume)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        colourTables = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
        report = core.save_crosslabel("scan01", seg, volume, want)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)  # no *_ColorTable left behind
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"), colourTables)
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
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        nii, nrrd = core.export_segmentation(nodes["fused"], volume, tmp / "export", "scan01_fused")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
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

    def test_cancel_stops_the_process_tree(self) -> None:
        """A job launched as the module launches jobs (launchConsoleProcess, PythonSlicer: a launcher whose child
        is the real interpreter) and cancelled leaves no process behind. Needs psutil, not torch."""
        if not self._guiPackages("Cancelling a job"):
            return
        code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
                "time.sleep(120)']); print('grandchild', g.pid, flush=True); time.sleep(120)")
        job = jobs.BackgroundProcess([jobs.python_executable(), "-c", code], self._tmp() / "job.log")
        self.assertEqual(job.launched_by, "launch_slicer")
        self._waitFor(lambda: "grandchild" in job.log_tail(), what="the job's child")
        grandchild = int(job.log_tail().split()[-1])
        self.assertTrue(jobs.pid_alive(grandchild))
        job.cancel()
        self._waitFor(lambda: job.poll() is not None and not jobs.pid_alive(grandchild), 30, "the job to stop")

    def test_fmabs_job(self) -> None:
        """A real ``fmabs`` job through the module's launcher (only when PyTorch and the jobs' packages are installed)."""
        import json

        if deps.python_problem() or not deps.ready(for_jobs=True):
            self._skip("Running an fmabs job", "PyTorch or the jobs' packages are not installed (the module installs "
                       "them on first use; this test does not download them)")
            return
        root = deps.ensure_fmabs_core_importable()
        job = jobs.BackgroundProcess(jobs.fmabs_argv(["methods", "--json"]), self._tmp() / "methods.json",
                                     jobs.job_environment([root] if root else []))
        self._waitFor(lambda: job.poll() is not None, 300, "fmabs methods")
        self.assertEqual(job.returncode, 0, job.log_tail())
        text = job.log_tail(200000)
        methods = json.loads(text[text.find("["):])
        self.assertIn("fmabs", [m["name"] for m in methods])
