"""The Widget's glue code (widgets -> Logic -> widgets).

MOCK NOTICE: Qt, CTK and Slicer's application classes (``qt``, ``ctk``,
``slicer.ScriptedLoadableModule``) do not exist outside the Slicer application, so ONLY those are
replaced by small fakes here, and the widgets are fakes named after the .ui file. Everything behind
the Widget is real: the Logic runs on a real MRML scene from slicer-core, on real files. The real
Qt widgets are exercised by SlicerFMABSTest inside Slicer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from slicer_helpers import AFFINES, write_nifti

REPO = Path(__file__).resolve().parents[2]


class FakeWidget:
    """Stands in for any Qt widget of the .ui: the few properties and methods the Widget touches."""

    def __init__(self, name: str):
        self.name, self.text, self.value, self.enabled, self.checked = name, "", 0, True, True
        self.currentPath, self.items, self.lines, self.node = "", [], [], None

    # combo boxes / lists
    def clear(self):
        self.items, self.lines = [], []

    def addItem(self, text):
        self.items.append(text)

    @property
    def currentText(self):
        return self.text or (self.items[0] if self.items else "")

    def setCurrentText(self, text):
        self.text = text

    # plain text edit
    def appendPlainText(self, line):
        self.lines.append(line)

    # MRML node combo boxes
    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node

    def connect(self, *args):
        pass


@pytest.fixture
def widget_module(monkeypatch, slicer_mod):
    """SlicerFMABS.py imported with fake qt/ctk/ScriptedLoadableModule (see MOCK NOTICE)."""
    qt = types.ModuleType("qt")
    qt.QIcon = lambda path: path
    qt.QTimer = type("QTimer", (), {"setInterval": lambda s, i: None, "connect": lambda s, *a: None,
                                    "start": lambda s: setattr(s, "active", True),
                                    "stop": lambda s: setattr(s, "active", False)})
    qt.QSettings = type("QSettings", (), {"value": lambda s, k, d="": d, "setValue": lambda s, k, v: None})
    sl = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(sl, name, type(name, (), {"__init__": lambda self, parent=None, *a, **k: setattr(self, "parent", parent)}))
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", sl)

    @contextlib.contextmanager
    def raise_errors(message=None, show=True, waitCursor=False):
        yield  # the application would show a dialog; here the error fails the test

    monkeypatch.setattr(slicer_mod.util, "tryWithErrorDisplay", raise_errors, raising=False)
    warnings = []
    monkeypatch.setattr(slicer_mod.util, "warningDisplay", lambda text, **k: warnings.append(text), raising=False)
    dialogs = []  # a modal dialog in the application; here recorded so that a test can assert there was none
    monkeypatch.setattr(slicer_mod.util, "errorDisplay", lambda text, **k: dialogs.append(text), raising=False)
    status = []
    monkeypatch.setattr(slicer_mod.util, "showStatusMessage", lambda text, *a, **k: status.append(text), raising=False)
    spec = importlib.util.spec_from_file_location("SlicerFMABS_under_test", REPO / "SlicerFMABS" / "SlicerFMABS.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._warnings, module._dialogs, module._status = warnings, dialogs, status
    return module


@pytest.fixture
def widget(widget_module, scene):
    from SlicerFMABSLib.logic import FMABSLogic

    w = widget_module.SlicerFMABSWidget.__new__(widget_module.SlicerFMABSWidget)
    widget_module.SlicerFMABSWidget.__init__(w)
    names = [e.get("name") for e in ET.parse(REPO / "Resources" / "UI" / "SlicerFMABS.ui").getroot().iter("widget")]
    w.ui = types.SimpleNamespace(**{n: FakeWidget(n) for n in names})
    w.logic = widget_module.SlicerFMABSLogic()
    w.logic._core = FMABSLogic(scene)
    w.logic._jobDependenciesChecked = True
    w.timer = sys.modules["qt"].QTimer()
    return w


def test_project_panel_creates_and_lists(widget, tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("a", "b"):
        write_nifti(src / f"{name}.nii.gz", np.zeros((6, 6, 6), np.float32), AFFINES["LAS"])
    widget.ui.projectPathLineEdit.currentPath = str(tmp_path / "proj")
    widget.ui.classesLineEdit.text = "1:atrium, 2:scar"
    widget.onCreateProject()
    widget.ui.importFolderPathLineEdit.currentPath = str(src)
    widget.onImportFolder()
    assert widget.ui.caseComboBox.items == ["a", "b"] and widget.ui.reviewCaseComboBox.items == ["a", "b"]
    assert "2 scans, 0 cross-labelled" in widget.ui.projectInfoLabel.text and "2:scar" in widget.ui.projectInfoLabel.text


def test_train_panel_reads_run_files(widget, tmp_path):
    core = widget.logic.core
    core.create_project(tmp_path / "proj", {1: "x"})
    run = core.project.run_dir("r1")
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "iteration": 30, "iterations": 120,
                                                 "eta_s": 95, "val_dice": 0.8766, "pid": _own_pid()}))
    (run / "events.jsonl").write_text(
        json.dumps({"type": "progress", "iteration": 30, "lr": 0.01, "eta_s": 95}) + "\n"
        + json.dumps({"type": "suggestion", "cases": [{"case": "la_9", "score": 0.3, "axial": {"index": 4, "ras": [0, 0, 0]}}]})
        + "\n")
    widget.ui.runNameLineEdit.text = "r1"
    widget.onWatchRun()
    assert widget.timer.active
    widget.onTimer()
    assert widget.ui.trainingProgressBar.value == 25
    assert widget.ui.etaLabel.text == "ETA: 1m 35s" and widget.ui.diceLabel.text == "val Dice: 0.877"
    assert widget.ui.trainingStateLabel.text == "running 30/120"
    assert any("progress" in line for line in widget.ui.trainingLogTextEdit.lines)
    assert widget.ui.suggestionComboBox.items == ["la_9 (score 0.300): axial 4"]
    assert widget.timer.active  # still running: keep polling
    (run / "status.json").write_text(json.dumps({"state": "done", "iteration": 120, "iterations": 120}))
    widget.onTimer()
    assert widget.ui.trainingProgressBar.value == 100 and not widget.timer.active
    assert widget.ui.startTrainingButton.enabled and not widget.ui.cancelTrainingButton.enabled


def test_train_panel_shows_the_latest_pseudo_label_round(widget, widget_module, tmp_path):
    """The Train panel's pseudo-label line: the latest round's score on the drawn slices (contract.planes_line),
    styled as a warning when that round's pseudo-labels are worse than the teacher; every round is in the log."""
    from fmabs_core.contract import planes_line
    from fmabs_core.runs.events import RunLog

    core = widget.logic.core
    core.create_project(tmp_path / "proj", {1: "x"})
    log = RunLog(core.project.run_dir("r2"))
    first = log.event("pseudo_label", iteration=40, round=1, cases=4, planes_scans=4, planes_teacher_dice=0.828,
                      planes_pseudo_dice=0.84, planes_gain=0.012)
    log.update_status(state="running", iteration=40, iterations=120, pid=_own_pid())
    widget.ui.runNameLineEdit.text = "r2"
    widget.onWatchRun()
    widget.onTimer()
    assert widget.ui.planesLabel.text == planes_line(first) and widget.ui.planesLabel.styleSheet == ""
    worse = log.event("pseudo_label", iteration=80, round=2, cases=4, planes_scans=4, planes_teacher_dice=0.8,
                      planes_pseudo_dice=0.75, planes_gain=-0.05, warning="worse than the teacher on your slices")
    widget.onTimer()
    assert widget.ui.planesLabel.text == planes_line(worse) and "WARNING: worse than the teacher" in planes_line(worse)
    assert widget.ui.planesLabel.styleSheet == jobs_of(widget_module).WARNING_STYLE
    logged = [line for line in widget.ui.trainingLogTextEdit.lines if "pseudo-labels refreshed for 4 scans" in line]
    assert [line.split("; ", 1)[1] for line in logged] == [planes_line(first), planes_line(worse)]


def _own_pid() -> int:
    import os

    return os.getpid()


@pytest.mark.slow  # runs `fmabs methods --json` in a child process
def test_method_help_says_which_family_fits_which_labels(widget):
    widget.onMethodChanged("cfr-mt")
    text = widget.ui.methodHelpLabel.text
    assert "densely labelled" in text and "Three drawn slices" in text
    assert "cfr-mt" in text and "fmabs" in text


def test_polling_error_gives_one_message_and_stops(widget, widget_module, tmp_path, caplog):
    """A run whose files cannot be read (events.jsonl is a folder: reading it raises) makes the watcher's poll
    raise on every tick. Two ticks: one message (log + the Train panel's state line), no dialog, timer stopped."""
    core = widget.logic.core
    core.create_project(tmp_path / "proj", {1: "x"})
    run = core.project.run_dir("broken")
    (run / "events.jsonl").mkdir(parents=True)
    widget.ui.runNameLineEdit.text = "broken"
    widget.onWatchRun()
    with pytest.raises(IsADirectoryError):  # the real watcher on the real folder does raise, each time
        jobs_of(widget_module).RunWatcher(run).poll()
    with caplog.at_level("ERROR"):
        widget.onTimer()
        widget.onTimer()  # a tick already queued when the first one stopped the timer
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "training" in errors[0].getMessage()
    assert widget.ui.trainingStateLabel.text.startswith("error reading the run")
    assert "Is a directory" in widget.ui.trainingStateLabel.text or "events.jsonl" in widget.ui.trainingStateLabel.text
    assert widget_module._dialogs == [] and len(widget_module._status) == 1
    assert not widget.timer.active and core.watcher.failed and widget.ui.startTrainingButton.enabled
    widget.onWatchRun()  # Watch run again: a new watcher, polled again
    assert widget.timer.active and core.watcher.failed is None


def jobs_of(module):
    return module.jobs


def test_widgets_follow_the_parameter_node(widget, widget_module, scene, tmp_path, slicer_mod):
    """The widgets show the parameter node and write to it; a loaded scene brings its values into the panels."""
    from SlicerFMABSLib import parameters

    ui = widget.ui
    for combo, values in ((ui.methodComboBox, ["fmabs", "mt", "sup"]), (ui.generalistComboBox, ["litemedsam", "medsam"]),
                          (ui.strategyComboBox, ["none", "her"]), (ui.expertComboBox, ["human", "simulated"]),
                          (ui.deviceComboBox, ["auto", "cpu"])):
        for value in values:
            combo.addItem(value)
    widget.initializeParameterNode()
    assert ui.runNameLineEdit.text == "run1" and ui.iterationsSpinBox.value == 20000  # the defaults, shown
    params = widget.logic.params
    params.update(runName="night", budget=4, method="mt")  # Logic -> widgets (the node's Modified event)
    assert (ui.runNameLineEdit.text, ui.budgetSpinBox.value, ui.methodComboBox.currentText) == ("night", 4, "mt")
    ui.iterationsSpinBox.value = 321  # the user edits a widget; Qt emits valueChanged(int)
    widget.updateParameterNodeFromGUI("iterations")
    ui.deviceComboBox.setCurrentText("cpu")
    ui.runNameLineEdit.text = "not signalled yet"
    widget.updateParameterNodeFromGUI("device")  # only the widget that changed is written
    assert params.runName == "night"
    ui.runNameLineEdit.text = "night"
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    ui.segmentVolumeSelector.setCurrentNode(volume)
    widget.updateParameterNodeFromGUI()  # all of them
    assert (params.iterations, params.device, params.segmentVolume, params.runName) == (321, "cpu", volume, "night")
    assert widget.labelVolume is None
    widget.labelVolume = volume
    assert params.labelVolume is volume

    # a scene saved and loaded again (as File > Add Data does: imported into the open scene)
    path = tmp_path / "s.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()
    params.update(runName="changed", iterations=5)
    assert ui.runNameLineEdit.text == "changed"
    widget.onSceneStartImport(scene, None)
    ui.iterationsSpinBox.value = 77  # a widget reacting to the nodes being loaded: not written while importing
    widget.updateParameterNodeFromGUI("iterations")
    scene.Import()
    widget.onSceneEndImport(scene, None)
    assert (ui.runNameLineEdit.text, ui.iterationsSpinBox.value, ui.deviceComboBox.currentText) == ("night", 321, "cpu")
    assert ui.segmentVolumeSelector.currentNode().GetName() == "scan"
    # closing the scene: defaults again
    widget.onSceneStartClose(scene, None)
    scene.Clear(0)
    widget.onSceneEndClose(scene, None)
    assert ui.runNameLineEdit.text == parameters.TEXT["runName"] and ui.segmentVolumeSelector.currentNode() is None


class FakeLayoutManager:
    """Slicer's layout manager (an application class): a layout maps its views' slice nodes (MappedInLayout, as
    qMRMLLayoutManager does); the nodes of the views it hides stay in the scene, unmapped."""

    def __init__(self, scene, shown):
        self.scene, self.layouts = scene, []
        self._map(shown)

    def _map(self, shown):
        for name in ("Red", "Green", "Yellow"):
            self.scene.GetNodeByID(f"vtkMRMLSliceNode{name}").SetMappedInLayout(name in shown)

    def setLayout(self, layout):
        self.layouts.append(layout)
        self._map({"Red", "Green", "Yellow"})


def test_layout_without_the_green_view(widget, widget_module, scene, slicer_mod, monkeypatch, tmp_path):
    """A layout without the green view (its slice node exists, unmapped): saving asks for a layout with the three
    views instead of failing; Show slices switches to Four-Up. The slice nodes are fetched by ID."""
    for name in ("Red", "Green", "Yellow"):
        node = slicer_mod.vtkMRMLSliceNode()
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        scene.AddNode(node)
    layout = FakeLayoutManager(scene, {"Red", "Yellow"})
    monkeypatch.setattr(slicer_mod, "app", type("App", (), {"layoutManager": lambda self: layout,
                                                            "processEvents": lambda self: None})(), raising=False)
    nodes = widget.sliceNodes()
    assert {v: n.GetID() for v, n in nodes.items()} == {
        "axial": "vtkMRMLSliceNodeRed", "coronal": "vtkMRMLSliceNodeGreen", "sagittal": "vtkMRMLSliceNodeYellow"}
    with pytest.raises(ValueError, match=r"does not show the coronal \(Green\) view"):
        widget.sliceNodes(requireShown=True)
    widget.showThreeSliceViews()
    assert layout.layouts == [slicer_mod.vtkMRMLLayoutNode.SlicerLayoutFourUpView]
    assert set(widget.sliceNodes(requireShown=True)) == {"axial", "coronal", "sagittal"}


def test_in_app_test_fails_when_a_part_is_skipped(widget_module, monkeypatch):
    """SlicerFMABSTest (with the mocked base class, see MOCK NOTICE): a part that could not run makes the
    whole in-app test fail, naming the part, so that ctest never passes a job test that did not run."""
    test = widget_module.SlicerFMABSTest()
    test.setUp = lambda: None
    test.delayDisplay = lambda text: None
    ran = []
    for name in ("test_module_widget", "test_sample_data", "test_crosslabel_review_export", "test_run_watcher",
                 "test_cancel_stops_the_process_tree"):
        monkeypatch.setattr(test, name, lambda name=name: ran.append(name), raising=False)
    monkeypatch.setattr(test, "test_fmabs_job", lambda: test._skip("Running an fmabs job", "no PyTorch"))
    monkeypatch.delenv(test.ALLOW_SKIPS_VARIABLE, raising=False)
    with pytest.raises(AssertionError, match=r"1 part\(s\) did not run: Running an fmabs job \(no PyTorch\)"):
        test.runTest()
    assert len(ran) == 5  # the other parts ran first
    monkeypatch.setenv(test.ALLOW_SKIPS_VARIABLE, "1")  # a Slicer without PyTorch, on purpose
    test.runTest()
    monkeypatch.setattr(test, "test_fmabs_job", lambda: ran.append("job"))
    monkeypatch.delenv(test.ALLOW_SKIPS_VARIABLE)
    test.runTest()  # nothing skipped: passes


@pytest.mark.parametrize("keep", [True, False])
def test_closing_slicer_asks_about_a_running_training_job(widget, widget_module, monkeypatch, slicer_mod, tmp_path,
                                                           keep):
    """(Qt mocked, see MOCK NOTICE; the job is a real process.) Closing Slicer with a training job running asks
    whether it keeps running; Yes (the default) leaves it, No asks it to checkpoint and stop."""
    core = widget.logic.core
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    code = "import time; time.sleep(60)"
    core.train_job = widget_module.jobs.BackgroundProcess([sys.executable, "-c", code], run / "slicer-job.log")
    core.train_job_run = run
    asked = []
    monkeypatch.setattr(slicer_mod.util, "confirmYesNoDisplay", lambda text, **k: asked.append(text) or keep,
                        raising=False)
    cancelled = []
    monkeypatch.setattr(core, "cancel_training", lambda own_job=False: cancelled.append(own_job) or True)
    try:
        widget.onApplicationQuit()
        assert len(asked) == 1 and "'r1' is still running" in asked[0] and "Watch run" in asked[0]
        assert cancelled == ([] if keep else [True])
        assert core.train_job.running  # never stopped by the widget itself
    finally:
        core.train_job.process.kill()
        core.train_job.wait(10)
    asked.clear()
    widget.onApplicationQuit()  # nothing running: no question
    assert asked == []


def test_cleanup_lets_go_of_the_parameter_node_and_enter_takes_it_again(widget, scene):
    """(Qt mocked.) A reloaded module's hidden widgets must not keep writing into the scene's parameter node."""
    widget.initializeParameterNode()
    assert widget._parameterNode is not None
    widget.cleanup()
    assert widget._parameterNode is None
    widget.enter()
    assert widget._parameterNode is widget.logic.params.node
    widget.exit()
    assert widget._parameterNode is None


class _CursorStack:
    """Stands in for QApplication's override-cursor stack (Qt mocked, see MOCK NOTICE)."""

    stack: list = []

    @classmethod
    def overrideCursor(cls):
        return cls.stack[-1] if cls.stack else None

    @classmethod
    def setOverrideCursor(cls, cursor):
        cls.stack.append(cursor)

    @classmethod
    def restoreOverrideCursor(cls):
        cls.stack.pop()


def test_install_question_shows_the_normal_cursor_and_a_second_click_starts_no_second_pip(widget_module, monkeypatch,
                                                                                           slicer_mod):
    """(Qt mocked; the installer is deps.install, real, with a fake pip.) The confirmation is asked with the
    normal cursor although the handler set the wait cursor; while pip runs a second request installs nothing."""
    from SlicerFMABSLib import deps

    qt = sys.modules["qt"]
    monkeypatch.setattr(qt, "QApplication", _CursorStack, raising=False)
    monkeypatch.setattr(qt, "QCursor", lambda shape: shape, raising=False)
    monkeypatch.setattr(qt, "Qt", types.SimpleNamespace(WaitCursor="wait"), raising=False)
    _CursorStack.stack = ["wait"]  # tryWithErrorDisplay(waitCursor=True) in the handler
    logic = widget_module.SlicerFMABSLogic()
    needed = deps.Requirement("somepackage", ">=1.0", gui=True)
    monkeypatch.setattr(deps, "python_problem", lambda: None)
    monkeypatch.setattr(deps, "REQUIREMENTS", (needed,))
    monkeypatch.setattr(deps, "plan", lambda **kw: deps.Plan([deps.Step("pip", needed, None)]))
    seen, pips, again = [], [], []

    def confirm(text):
        seen.append(_CursorStack.overrideCursor())
        return True

    def run_pip(args):
        pips.append(args)
        again.append(logic.ensureDependencies(forJobs=False))  # a click handled while pip runs
        return 0, "ok"

    monkeypatch.setattr(deps, "slicer_installers", lambda: (confirm, lambda spec: None, run_pip))
    status = []
    monkeypatch.setattr(slicer_mod.util, "showStatusMessage", lambda text, *a: status.append(text), raising=False)
    monkeypatch.setattr(slicer_mod, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)
    assert logic.ensureDependencies(forJobs=False)
    assert seen == [None] and _CursorStack.stack == ["wait"]  # asked with the normal cursor; restored after
    assert len(pips) == 1 and again == [False] and any("installing" in s for s in status)
