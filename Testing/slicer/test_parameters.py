"""The module's choices in the scene's parameter node, on real MRML (slicer-core): the Logic writes and reads
them without any GUI, and a scene saved to an .mrml file and loaded again restores them."""

from __future__ import annotations

import numpy as np
import pytest

from slicer_helpers import AFFINES, write_nifti


@pytest.fixture
def logic(scene, tmp_path):
    from SlicerFMABSLib.logic import FMABSLogic

    lg = FMABSLogic(scene)
    lg.create_project(tmp_path / "project", {1: "atrium"})
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "s1.nii.gz", np.zeros((8, 9, 10), np.float32), AFFINES["oblique"])
    lg.project.add_case(tmp_path / "in" / "s1.nii.gz")
    return lg


def _save(scene, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.SetURL(str(path))
    assert scene.Commit(), f"could not write {path}"
    return path


def _new_scene(slicer_mod):
    scene = slicer_mod.vtkMRMLScene()
    slicer_mod.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    return scene


def test_defaults_and_types(scene):
    from SlicerFMABSLib import parameters

    params = parameters.Parameters(scene)
    assert params.values() == {**parameters.TEXT, **parameters.NUMBERS, **{n: None for n in parameters.NODES}}
    node = params.node
    assert node is parameters.parameter_node(scene) and node.GetSingletonTag() == "SlicerFMABS"
    assert node.GetAttribute("ModuleName") == "SlicerFMABS"  # what ScriptedLoadableModuleLogic.getParameterNode finds
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    params.budget = "12"
    assert params.budget == 12 and node.GetParameter("budget") == "12"  # stored as parameterNodeWrapper stores int
    node.SetParameter("iterations", "not a number")  # an edited scene file
    assert params.iterations == parameters.NUMBERS["iterations"]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(TypeError, match="vtkMRMLScalarVolumeNode"):
        params.labelVolume = segmentation
    with pytest.raises(AttributeError):
        params.nonsense = 1


def test_logic_records_its_choices(logic):
    params = logic.params
    assert params.projectPath == str(logic.project.root)  # create_project
    volume = logic.start_labelling("s1")
    drawing = logic.label_segmentation()
    assert (params.case, params.labelVolume, params.labelSegmentation) == ("s1", volume, drawing)
    assert logic.label_segmentation() is drawing  # the same drawing, not a new one
    params.update(runName="r2", method="mt", strategy="her", budget=4, iterations=30, device="cpu", expert="simulated",
                  generalist="mobilesam")
    choices = logic.training_choices()
    assert logic.train_arguments(**choices) == [
        "train", "--project", str(logic.project.root), "--run", "r2", "--method", "mt", "--iterations", "30",
        "--device", "cpu", "--active", "her", "--budget", "4", "--expert", "simulated"]  # mt takes no generalist
    logic.scene.RemoveNode(drawing)  # the user deleted the drawing: the reference follows
    assert params.labelSegmentation is None
    assert logic.start_labelling("s1") is volume and params.labelVolume is volume


def test_saved_scene_restores_the_choices(logic, tmp_path, slicer_mod):
    """Set, save the scene to an .mrml file, load it into a fresh scene, read back (the Logic alone)."""
    from SlicerFMABSLib.logic import FMABSLogic

    volume = logic.start_labelling("s1")
    drawing = logic.label_segmentation()
    logic.params.update(runName="evening", method="fmabs", generalist="sam_vit_b", strategy="lc", expert="human",
                        budget=3, iterations=250, device="cuda", modelRun="morning", segmentVolume=volume,
                        exportSegmentation=drawing)
    saved = logic.params.values()
    path = _save(logic.scene, tmp_path / "scene" / "scene.mrml")

    fresh = _new_scene(slicer_mod)
    fresh.SetURL(str(path))
    assert fresh.Connect()
    back = FMABSLogic(fresh)
    values = back.params.values()
    nodes = ("labelVolume", "labelSegmentation", "segmentVolume", "exportSegmentation")
    assert {k: v for k, v in values.items() if k not in nodes} == {k: v for k, v in saved.items() if k not in nodes}
    for name in nodes:  # the references point to the reloaded nodes
        assert values[name] is not None and values[name].GetName() == saved[name].GetName(), name
        assert values[name].GetScene() is fresh
    assert values["labelVolume"] is values["segmentVolume"]
    # the project reopens from the scene, and the scan is the reloaded node, read from the project's file
    assert back.restore_project().root == logic.project.root
    assert back.load_case("s1") is values["labelVolume"]
    assert values["labelVolume"].GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()


def test_imported_scene_replaces_the_choices_and_closing_resets_them(logic, tmp_path, slicer_mod):
    """Slicer's module creates its parameter node first; a scene loaded afterwards brings its own values.
    Closing the scene resets them to the defaults."""
    from SlicerFMABSLib import parameters

    logic.params.update(runName="from-file", budget=5)
    path = _save(logic.scene, tmp_path / "scene.mrml")
    other = _new_scene(slicer_mod)
    params = parameters.Parameters(other)
    params.update(runName="before", budget=9, labelVolume=other.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "x"))
    other.SetURL(str(path))
    assert other.Import()
    assert (params.runName, params.budget, params.projectPath) == ("from-file", 5, str(logic.project.root))
    assert other.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1  # still one parameter node
    other.Clear(0)
    assert params.values() == {**parameters.TEXT, **parameters.NUMBERS, **{n: None for n in parameters.NODES}}
