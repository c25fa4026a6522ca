"""What the reviewer sees besides the segmentation: the worker's uncertainty map (uncertainty.nrrd, 0 sure
to 1 unsure, on the input grid) as a colour overlay over the CT in the slice views.

Uses the MRML classes of `slicer` and vtk only (no Qt, no global scene).
"""

from pathlib import Path

import slicer

from .segmentation import placeNextTo, readVolumeFile

COLOR_TABLE_NAME = "InferenceSpecificSeg uncertainty"
COLOR_COUNT = 64
OVERLAY_OPACITY = 0.6


def uncertaintyColorTable(scene):
    """The overlay's colour table (created once per scene): transparent where the map is 0, then yellow
    to red, opaque from half of the range up, so that sure voxels leave the CT visible."""
    existing = scene.GetFirstNodeByName(COLOR_TABLE_NAME)
    if existing is not None:
        return existing
    colorNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
    colorNode.SetTypeToUser()
    colorNode.SetNumberOfColors(COLOR_COUNT)
    for index in range(COLOR_COUNT):
        level = index / (COLOR_COUNT - 1)
        colorNode.SetColor(index, 1.0, 1.0 - level, 0.0, min(1.0, 2.0 * level))
    return colorNode


def loadUncertainty(scene, path: Path, volumeNode, name: str, node=None):
    """Show the uncertainty map file `path` in `node` (a node of `scene`, or in a new scalar volume node named `name`), with
    the overlay colour table, the window 0..1 and the parent transform of the CT `volumeNode`. Returns
    the node; RuntimeError when the file cannot be read."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        placeNextTo(node, volumeNode)
    readVolumeFile(path, node)
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    displayNode = node.GetDisplayNode()
    displayNode.SetAutoWindowLevel(0)
    displayNode.SetWindowLevelMinMax(0.0, 1.0)
    displayNode.SetAndObserveColorNodeID(uncertaintyColorTable(scene).GetID())
    return node


def showOverlay(scene, node, visible: bool) -> None:
    """Put `node` in (visible) or take it out of (not visible) the foreground of every slice view; a
    foreground volume the user chose otherwise is left alone when hiding."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        compositeNode = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if visible and node is not None:
            compositeNode.SetForegroundVolumeID(node.GetID())
            compositeNode.SetForegroundOpacity(OVERLAY_OPACITY)
        elif node is not None and compositeNode.GetForegroundVolumeID() == node.GetID():
            compositeNode.SetForegroundVolumeID(None)
