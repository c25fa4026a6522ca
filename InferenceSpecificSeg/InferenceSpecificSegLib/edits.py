"""The user's corrections of a published result, as the files of `isseg refine --initial-mask MASK
--edited-region REGION` (docs/worker-protocol.md, "Refining from edits").

MASK is the edited segmentation exported by Slicer's own export on the grid of the run's input volume,
its segments mapped back to the model's label values. REGION is 1 where MASK differs from the labelmap
the worker published last, and also where an earlier refine-from-edits of the same result was told the
user had edited (the worker kept those voxels, so they no longer differ, yet they stay the user's).

Uses the MRML classes of `slicer`, vtk and numpy only (no Qt, no global scene).
"""

from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk

from .i18n import tr as _
from .segmentation import segmentIdForValue, voxelArray, writeVolumeForWorker


def exportModelLabels(segmentationNode, volumeNode, segments: list) -> np.ndarray:
    """uint8 voxels [k, j, i] of `segmentationNode` on the grid of `volumeNode`, with the label values of
    `segments` (protocol.SegmentDescription, the model's labels). A segment the user deleted is
    background; a segment the user added is not a label of the model and is left out."""
    segmentation = segmentationNode.GetSegmentation()
    present = [segment for segment in segments if segmentation.GetSegment(segmentIdForValue(segment.value)) is not None]
    dimensions = volumeNode.GetImageData().GetDimensions()
    if not present:  # an empty ID list would make the export take every segment
        return np.zeros(dimensions[::-1], np.uint8)
    segmentIds = vtk.vtkStringArray()
    for segment in present:
        segmentIds.InsertNextValue(segmentIdForValue(segment.value))
    scene = segmentationNode.GetScene()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")  # the export adds a color table to its scene
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, volumeNode):
            raise RuntimeError(_("Could not export the segmentation '{name}' as a labelmap.").format(
                name=segmentationNode.GetName()))
        exported = voxelArray(labelmapNode)
        # The export numbers the segments 1..N in the order given: map them back to the model's values.
        lookup = np.array([0] + [segment.value for segment in present], np.uint8)
        return lookup[exported]
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        for node in (displayNode.GetColorNode() if displayNode else None, displayNode, labelmapNode):
            if node is not None:
                scene.RemoveNode(node)


def editedRegion(edited: np.ndarray, published: np.ndarray, earlierRegion: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 [k, j, i]: 1 where `edited` differs from `published` or `earlierRegion` is set, else 0."""
    region = edited != published
    if earlierRegion is not None:
        region |= earlierRegion.astype(bool)
    return region.astype(np.uint8)


def writeLabelsForWorker(voxels: np.ndarray, volumeNode, path: Path) -> None:
    """Write uint8 voxels [k, j, i] as a labelmap file on the grid of `volumeNode` (as writeVolumeForWorker
    writes the volume itself, so the worker finds both on the same grid)."""
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(voxels, np.uint8).ravel(), deep=True,
                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmapNode = slicer.vtkMRMLLabelMapVolumeNode()
    labelmapNode.SetName(Path(path).stem)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    labelmapNode.SetIJKToRASMatrix(matrix)
    labelmapNode.SetAndObserveImageData(image)
    writeVolumeForWorker(labelmapNode, path)
