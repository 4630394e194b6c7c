"""Static checks of the module files: widget names against the .ui, the template's classes, CMake lists.

No Qt is needed: the .ui is parsed as XML and the Python as an AST.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "SlicerFMABS" / "SlicerFMABS.py"
UI = REPO / "Resources" / "UI" / "SlicerFMABS.ui"


def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_every_ui_name_used_in_python_exists_in_the_ui_file():
    names = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE.read_text()))
    names |= set(re.findall(r"widget\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE.read_text()))
    assert len(names) > 30  # the regex really finds the panels' widgets
    missing = sorted(names - set(ui_widgets()))
    assert not missing, f"widgets used in SlicerFMABS.py but absent from {UI.name}: {missing}"


def test_ui_file_is_well_formed():
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.findtext("class") == top.get("name") == "SlicerFMABS"
    widgets = ui_widgets()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    for cls in set(widgets.values()):
        assert cls.startswith("Q") or cls in custom, f"{cls} is not a Qt class nor declared as a custom widget"
    # MRML combo boxes get the scene through the template's signal/slot connection
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    assert combos and combos <= receivers


def test_module_follows_the_scripted_template():
    tree = ast.parse(MODULE.read_text())
    classes = {c.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in c.bases]
               for c in tree.body if isinstance(c, ast.ClassDef)}
    assert classes["SlicerFMABS"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["SlicerFMABSWidget"]
    assert classes["SlicerFMABSLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["SlicerFMABSTest"] == ["ScriptedLoadableModuleTest"]
    test_methods = [f.name for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "SlicerFMABSTest"
                    for f in c.body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in test_methods and sum(m.startswith("test_") for m in test_methods) >= 3
    # the GUI never blocks on a job: no subprocess.run/wait/communicate in the module file
    assert not re.search(r"subprocess\.(run|call|check_)|\.communicate\(|\.wait\(", MODULE.read_text())


def test_cmake_lists_every_script_and_resource():
    cmake = (REPO / "SlicerFMABS" / "CMakeLists.txt").read_text()
    lib = sorted(p.name for p in (REPO / "SlicerFMABS" / "SlicerFMABSLib").glob("*.py"))
    for name in lib:
        assert f"${{MODULE_NAME}}Lib/{name}" in cmake, f"{name} missing from SlicerFMABS/CMakeLists.txt"
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake
    for resource in ("Icons/${MODULE_NAME}.png", "UI/${MODULE_NAME}.ui"):
        assert resource in cmake
    assert (REPO / "Resources" / "Icons" / "SlicerFMABS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", top), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(SlicerFMABS)" in top


def test_parameter_widgets_exist_and_fit_their_kind():
    """Every widget bound to the parameter node exists in the .ui with a class its read/write code fits,
    and every bound parameter exists in SlicerFMABSLib.parameters."""
    import sys

    sys.path.insert(0, str(REPO / "SlicerFMABS"))
    from SlicerFMABSLib import parameters

    tree = ast.parse(MODULE.read_text())
    found = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in ("PARAMETER_WIDGETS", "CHANGED_SIGNAL")}
    bound, signals = found["PARAMETER_WIDGETS"], found["CHANGED_SIGNAL"]
    widgets = ui_widgets()
    fits = {"path": "ctkPathLineEdit", "text": "QLineEdit", "combo": "QComboBox", "number": "QSpinBox",
            "node": "qMRMLNodeComboBox"}
    for name, (widget, kind) in bound.items():
        assert name in parameters.NAMES, name
        assert widgets.get(widget) == fits[kind], (name, widget, widgets.get(widget))
        assert kind in signals
    assert set(parameters.NAMES) - set(bound) == {"labelVolume", "labelSegmentation", "labelPlanes"}  # no widget: set by Load/Draw/Show slices
