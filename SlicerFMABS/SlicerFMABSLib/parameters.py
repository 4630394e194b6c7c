"""The module's selections in the scene's parameter node, so that a saved scene restores them.

The node is the one Slicer's scripted-module logic uses (``ScriptedLoadableModuleLogic.getParameterNode``):
a singleton ``vtkMRMLScriptedModuleNode`` tagged with the module name, with attribute ``ModuleName``.
Values are stored the way ``slicer.parameterNodeWrapper`` stores them: text as text, numbers as their
decimal text, a node as a node reference whose role is the parameter name (plus an empty parameter of
the same name). The Logic reads and writes them without any GUI; the Widget keeps its widgets in step.

Why not ``parameterNodeWrapper``'s ``connectGui``: its combo-box connector needs the choices fixed in the
class declaration and refills the box from them, while the Train panel's methods come from the job's
Python at run time; and it does not exist in slicer-core, where the Logic is tested. The stored form is
the same, so a wrapper class over these names reads the same node.
"""

from __future__ import annotations

from typing import Any

MODULE_NAME = "SlicerFMABS"

#: text parameters and their defaults (the first entry of each list in the Train panel)
TEXT: dict[str, str] = {
    "projectPath": "",  # the project folder
    "runName": "run1",
    "method": "fmabs",
    "generalist": "litemedsam",
    "strategy": "none",  # next-scan strategy; "none": no active cross-labelling
    "expert": "human",
    "device": "auto",
    "case": "",  # the scan chosen in the Label panel
    "labelPlanes": "",  # the planes Show slices put the views on, "axial=12,coronal=40,sagittal=33" (what Save saves)
    "modelRun": "",  # the trained run chosen in the Segment panel
}
#: whole-number parameters and their defaults
NUMBERS: dict[str, int] = {
    "budget": 10,
    "iterations": 20000,  # fmabs (the default method): its paper's; the panel follows the chosen method
}
#: node parameters (node references) and the class each must have
NODES: dict[str, str] = {
    "labelVolume": "vtkMRMLScalarVolumeNode",  # the scan loaded for cross-labelling
    "labelSegmentation": "vtkMRMLSegmentationNode",  # what is drawn on it
    "segmentVolume": "vtkMRMLScalarVolumeNode",  # Segment panel: the volume to segment
    "exportSegmentation": "vtkMRMLSegmentationNode",  # Segment panel: the segmentation to export
}
NAMES = (*TEXT, *NUMBERS, *NODES)


def parameter_node(scene: Any, create: bool = True) -> Any | None:
    """The module's parameter node in ``scene`` (created with the defaults when missing and ``create``)."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is not None:
        if node.GetAttribute("ModuleName") != MODULE_NAME:  # a scene close resets the node's attributes
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node
    if not create:
        return None
    import slicer

    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag(MODULE_NAME)
    node.SetAttribute("ModuleName", MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    for name, value in {**TEXT, **NUMBERS}.items():  # the defaults, written out as parameterNodeWrapper does
        node.SetParameter(name, str(value))
    return scene.AddNode(node)


class Parameters:
    """Typed access to the parameter node: ``params.runName``, ``params.budget``, ``params.labelVolume``.

    The node is looked up on every access: loading or closing a scene may replace it.
    """

    def __init__(self, scene: Any):
        object.__setattr__(self, "scene", scene)

    @property
    def node(self) -> Any:
        return parameter_node(self.scene)

    def get(self, name: str) -> Any:
        node = self.node
        if name in NODES:
            return node.GetNodeReference(name)
        if name in NUMBERS:
            try:
                return int(float(node.GetParameter(name)))
            except ValueError:  # not set, or not a number (an edited scene file)
                return NUMBERS[name]
        if name in TEXT:
            return node.GetParameter(name) if node.HasParameter(name) else TEXT[name]
        raise AttributeError(f"no module parameter '{name}'")

    def set(self, name: str, value: Any) -> None:
        node = self.node
        if name in NODES:
            if value is not None and not value.IsA(NODES[name]):
                raise TypeError(f"parameter '{name}' takes a {NODES[name]}, not a {value.GetClassName()}")
            was = node.StartModify()
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            node.EndModify(was)
        elif name in NUMBERS:
            node.SetParameter(name, str(int(value)))
        elif name in TEXT:
            node.SetParameter(name, "" if value is None else str(value))
        else:
            raise AttributeError(f"no module parameter '{name}'")

    def update(self, **values: Any) -> None:
        """Set several parameters with one Modified event."""
        node = self.node
        was = node.StartModify()
        try:
            for name, value in values.items():
                self.set(name, value)
        finally:
            node.EndModify(was)

    def values(self) -> dict[str, Any]:
        return {name: self.get(name) for name in NAMES}

    def __getattr__(self, name: str) -> Any:
        if name in NAMES:
            return self.get(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in NAMES:
            self.set(name, value)
        else:
            raise AttributeError(f"no module parameter '{name}'")
