"""Small MRML scene helpers that keep the user's scene clean (standard library and MRML only).

- :func:`nodes_by_class`: ``vtkMRMLScene.GetNodesByClass`` returns a *new* collection that the
  caller owns; through the Python wrapping it would never be freed unless released.
- :func:`scratch_nodes`: temporary work (a labelmap exported from a segmentation, a label file
  read for import) adds nodes besides the one we create: ``ExportSegmentsToLabelmapNode`` adds a
  ``<segmentation>_ColorTable`` node, reading a file adds display nodes. Every node added inside the
  block is removed at its end, so a save or an export leaves the scene as it found it.
- :func:`slice_nodes`: the red, green and yellow slice nodes by their ID (they exist in the scene
  whether or not the current layout shows their view; ``layoutManager().sliceWidget("Green")`` is
  None in a layout without the green view).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

#: view of the canonical array -> Slicer's slice view (layout name)
SLICE_VIEW_OF = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


def nodes_by_class(scene: Any, class_name: str) -> list[Any]:
    """The nodes of a class (subclasses included), releasing the collection MRML hands over."""
    collection = scene.GetNodesByClass(class_name)
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)  # the caller owns it; the Python wrapper holds its own reference


def node_ids(scene: Any) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@contextlib.contextmanager
def scratch_nodes(scene: Any) -> Iterator[None]:
    """Remove, at the end of the block (also on error), every node added to ``scene`` inside it.

    Create inside the block only what is temporary; nodes meant to stay are created before it.
    """
    before = node_ids(scene)
    try:
        yield
    finally:
        now = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(now):  # the colour table and display node before the data node that uses them
            node_id = node.GetID()
            if node_id not in before and scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(node)


def slice_nodes(scene: Any) -> dict[str, Any]:
    """{view: slice node} for the views whose slice node exists (``vtkMRMLSliceNodeRed``... or by layout name)."""
    out = {}
    for view, name in SLICE_VIEW_OF.items():
        node = scene.GetNodeByID(f"vtkMRMLSliceNode{name}")
        if node is None:
            node = next((n for n in nodes_by_class(scene, "vtkMRMLSliceNode") if n.GetLayoutName() == name), None)
        if node is not None:
            out[view] = node
    return out
