"""Scene side of a run: the input volume goes to a file for the worker, and each labelmap the worker
publishes becomes the content of one segmentation node (names, colors and terminology from
segments.json), updated in place, unless the user has edited it.

Uses the MRML classes of `slicer` and vtk only (no Qt, no slicer.app, no global scene), so it runs in
Slicer and with the slicer-core wheel alike.
"""

import logging
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from .i18n import tr as _

# Slicer's default terminology context; the codes come from the model.
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def segmentIdForValue(value: int) -> str:
    """The segment ID of a label value: the same in every snapshot, so segments keep their identity."""
    return f"label_{value}"


def writeVolumeForWorker(volumeNode, path: Path) -> None:
    """Write `volumeNode`'s voxels with their geometry (origin, spacing, axis directions) to the NRRD file
    `path`, uncompressed for speed. The volume's parent transform is not applied: the result node gets the
    same parent transform. The node's own storage node (file name, format) is left untouched."""
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetUseCompression(False)
    if not storageNode.WriteData(volumeNode):
        raise RuntimeError(_("Could not write the volume '{name}' to '{path}'. Check free disk space in the "
                             "temporary folder.").format(name=volumeNode.GetName(), path=path))


def readVolumeFile(path: Path, volumeNode):
    """Read the image file `path` into `volumeNode` (voxels and geometry) and return it; RuntimeError
    when it cannot be read."""
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(volumeNode) or volumeNode.GetImageData() is None:
        raise RuntimeError(_("Could not read the image file '{path}'.").format(path=path))
    return volumeNode


def readLabelmap(path: Path):
    """Read the labelmap file `path` into a new vtkMRMLLabelMapVolumeNode that is not in any scene."""
    return readVolumeFile(path, slicer.vtkMRMLLabelMapVolumeNode())


def voxelArray(volumeNode) -> np.ndarray:
    """A view of the volume's voxels as an array [k, j, i] (no copy)."""
    image = volumeNode.GetImageData()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])


def terminologyEntry(terminology: dict) -> str:
    """Slicer's serialized terminology string for a segments.json terminology
    ({"category": code, "type": code, "modifier": code}, code = {"scheme", "code", "meaning"})."""

    def codeTriple(role):
        code = terminology.get(role) or {}
        return str(code.get("code", "")), str(code.get("scheme", "")), str(code.get("meaning", ""))

    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, *codeTriple("category"), *codeTriple("type"), *codeTriple("modifier"),
        ANATOMIC_CONTEXT, "", "", "", "", "", "")


def editStamp(segmentationNode) -> tuple:
    """What a user can edit in a segmentation, cheaply: the segment IDs, names and label values, and the newest
    modification time of its binary labelmaps (VTK's MTime, which every change of their voxels advances: the
    Segment Editor's effects, SetBinaryLabelmapToSegment, an array's Modified()). No voxel is read, so the
    check costs the same for any volume size. Display changes (visibility, opacity, color, 3D surfaces) leave
    it alone."""
    segmentation = segmentationNode.GetSegmentation()
    representationName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segments, newestLabelmapTime = [], 0
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segments.append((segmentation.GetNthSegmentID(index), segment.GetName(), segment.GetLabelValue()))
        image = segment.GetRepresentation(representationName)
        if image is not None:
            newestLabelmapTime = max(newestLabelmapTime, image.GetMTime())
    return tuple(segments), newestLabelmapTime


def placeNextTo(node, volumeNode) -> None:
    """Put `node` in the subject hierarchy study of `volumeNode`, when the volume is in one."""
    shNode = node.GetScene().GetSubjectHierarchyNode()
    volumeItem = shNode.GetItemByDataNode(volumeNode)
    if not volumeItem:
        return
    studyItem = shNode.GetItemAncestorAtLevel(volumeItem, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy())
    if not studyItem:
        return
    nodeItem = shNode.GetItemByDataNode(node)
    if nodeItem:
        shNode.SetItemParent(nodeItem, studyItem)
    else:
        shNode.CreateItem(studyItem, node)


class LiveSegmentation:
    """The segmentation node that shows a run's results on the grid of its input volume.

    `scene` is the MRML scene, `volumeNode` the input volume, `baseName` the name of the node to create.
    The node is created by the first `update`. After each update its edit stamp is recorded; when the stamp
    differs at the next update, the user has edited the node, and that node is left alone: results go to a
    new node instead. A node the user deleted is likewise replaced by a new one.
    `publishedLabels` holds the voxels [k, j, i] of the last labelmap shown (the model's label values, 0
    for any other value), for telling the user's edits from the worker's result.
    """

    def __init__(self, scene, volumeNode, baseName: str):
        self.scene = scene
        self.volumeNode = volumeNode
        self.baseName = baseName
        self.node = None
        self.editedNodes = []  # nodes left alone because the user edited them during the run
        self._stamp = None  # editStamp of the node after the last update
        # The last labelmap shown, renumbered 1..N (flat), its label values and its shape [k, j, i]: publishedLabels
        # is derived from them only when asked for (refine from edits), not at every snapshot of a run.
        self._published = None

    @property
    def publishedLabels(self):
        """uint8 voxels [k, j, i] of the last labelmap shown, in the model's label values; None before the first."""
        if self._published is None:
            return None
        renumbered, values, shape = self._published
        return np.array([0, *values], dtype=np.uint8)[renumbered].reshape(shape)

    @property
    def edited(self) -> bool:
        """True when the node is in the scene and its content differs from the last result shown in it."""
        return (self.node is not None and self.node.GetScene() is self.scene
                and editStamp(self.node) != self._stamp)

    def update(self, labelmapPath: Path, segments: list) -> None:
        """Show the labelmap file `labelmapPath` (on the input grid) as the segments `segments` (list of
        protocol.SegmentDescription). Voxels with a value not in `segments` are ignored."""
        labelmapNode = readLabelmap(labelmapPath)
        values = [segment.value for segment in segments]
        renumbered = _renumberLabels(labelmapNode, values)
        if self.node is None or self.node.GetScene() is not self.scene:
            self.node = self._newNode()
        elif self.edited:
            logging.info("Segmentation %s was edited during the run; writing results to a new node", self.node.GetName())
            self.editedNodes.append(self.node)
            self.node = self._newNode()
        segmentIds = vtk.vtkStringArray()
        transformNodeId = self.volumeNode.GetTransformNodeID()
        if transformNodeId:
            # The import maps the labelmap through the transform between the labelmap and the segmentation
            # node: give the labelmap the volume's transform (which needs it in the scene, briefly).
            self.scene.AddNode(labelmapNode)
            labelmapNode.SetAndObserveTransformNodeID(transformNodeId)
        wasModifying = self.node.StartModify()
        try:
            for segment in segments:
                segmentIds.InsertNextValue(self._ensureSegment(segment))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, self.node, segmentIds):
                raise RuntimeError(_("Could not import the labelmap '{path}' into the segmentation.").format(path=labelmapPath))
        finally:
            self.node.EndModify(wasModifying)
            if labelmapNode.GetScene() is not None:
                self.scene.RemoveNode(labelmapNode)
        self._stamp = editStamp(self.node)
        self._published = (renumbered, values, labelmapNode.GetImageData().GetDimensions()[::-1])

    def rename(self, name: str) -> None:
        """Give the current node (if any) the name `name`, made unique in the scene (e.g. to mark a partial result)."""
        if self.node is not None and self.node.GetName() != name:
            self.node.SetName(self.scene.GenerateUniqueName(name))

    def _newNode(self):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(self.baseName))
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        node.SetAndObserveTransformNodeID(self.volumeNode.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        placeNextTo(node, self.volumeNode)
        return node

    def _ensureSegment(self, description) -> str:
        """ID of the segment for `description`, created with the model's name, color and terminology
        if it does not exist yet (an existing one keeps the color the user may have chosen)."""
        segmentId = segmentIdForValue(description.value)
        segmentation = self.node.GetSegmentation()
        if segmentation.GetSegment(segmentId) is None:
            segment = slicer.vtkSegment()
            segment.SetName(description.name)
            segment.SetColor(*description.color)
            if description.terminology:
                # The terminology tag: what SetTerminology (only from Slicer 5.10) sets; present since 5.8 and older.
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminologyEntry(description.terminology))
            segmentation.AddSegment(segment, segmentId)
        return segmentId


def addLabelmapAsSegmentation(scene, volumeNode, labelmapPath: Path, segments: list, name: str):
    """A new segmentation node `name` on the grid of `volumeNode` holding the labelmap file `labelmapPath` as
    `segments` (protocol.SegmentDescription: names, colors, terminology), e.g. a phantom's truth. Returns it."""
    segmentation = LiveSegmentation(scene, volumeNode, name)
    segmentation.update(labelmapPath, segments)
    return segmentation.node


def _renumberLabels(labelmapNode, values: list) -> np.ndarray:
    """Map label `values[i]` to i + 1 (the import maps value i + 1 to the i-th segment ID) and any other
    value to 0, in place. Returns the renumbered voxels (flat, uint8)."""
    image = labelmapNode.GetImageData()
    voxels = np.clip(vtk_to_numpy(image.GetPointData().GetScalars()), 0, None)
    lookup = np.zeros(max(256, int(voxels.max()) + 1), dtype=np.uint8)
    for index, value in enumerate(values):
        lookup[value] = index + 1
    renumbered = lookup[voxels]
    scalars = numpy_to_vtk(renumbered, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return renumbered
