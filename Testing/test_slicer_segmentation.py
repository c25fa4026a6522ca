"""Snapshots become segmentation nodes: real MRML from the slicer-core wheel, no mocks."""

import numpy as np
import pytest
import vtk

from slicer_test_support import (SEGMENTS, addVolume, exportSegmentVoxels, newScene, obliqueDirections, segmentIds,
                                 writeSegmentsFile, writeSnapshot)

import slicer
from InferenceSpecificSegLib.protocol import readSegmentsFile
from InferenceSpecificSegLib import segmentation
from InferenceSpecificSegLib.segmentation import LiveSegmentation, editStamp, segmentIdForValue, writeVolumeForWorker

SHAPE = (14, 18, 22)  # k, j, i: a different size per axis catches swapped axes


def blobLabels(shift=0, withKidney=True):
    """A labelmap with the values of SEGMENTS (1, 2, 4) in boxes, plus a value (7) the model does not know."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:7, 3 + shift:10 + shift, 4:12] = 1
    labels[8:12, 10:15, 13:19] = 2
    if withKidney:
        labels[3:6, 12:16, 2:5] = 4
    labels[0, 0, 0] = 7
    return labels


@pytest.fixture
def run(tmp_path):
    """A scene with an oblique, anisotropic CT, the CT written for the worker, and segments.json."""
    scene = newScene()
    voxels = np.random.default_rng(0).integers(-1000, 400, SHAPE).astype(np.int16)
    volumeNode = addVolume(scene, voxels, spacing=(0.7, 1.3, 2.9), origin=(-40.0, 12.5, 88.0),
                           directions=obliqueDirections(), name="Abdomen CT")
    inputPath = tmp_path / "input.nrrd"
    writeVolumeForWorker(volumeNode, inputPath)
    segments = readSegmentsFile(writeSegmentsFile(tmp_path))
    return scene, volumeNode, inputPath, segments, tmp_path


def showFirstSnapshot(run):
    """A LiveSegmentation of the run's CT that shows its first snapshot (blobLabels(), snapshot_0000.nrrd)."""
    scene, volumeNode, inputPath, segments, directory = run
    live = LiveSegmentation(scene, volumeNode, "Abdomen CT ISL")
    writeSnapshot(inputPath, blobLabels(), directory / "snapshot_0000.nrrd")
    live.update(directory / "snapshot_0000.nrrd", segments)
    return live


def segmentationNodes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def test_volume_written_for_the_worker_keeps_voxels_and_geometry(run):
    import SimpleITK as sitk

    scene, volumeNode, inputPath, _, _ = run
    image = sitk.ReadImage(str(inputPath))
    assert image.GetSize() == SHAPE[::-1]
    assert np.allclose(image.GetSpacing(), (0.7, 1.3, 2.9))
    lpsFromRas = np.diag([-1, -1, 1])
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), lpsFromRas @ obliqueDirections())
    assert np.allclose(image.GetOrigin(), lpsFromRas @ np.array([-40.0, 12.5, 88.0]))
    assert np.array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volumeNode))
    assert volumeNode.GetStorageNode() is None  # the node's own storage settings are untouched


def test_snapshot_becomes_segments_with_model_names_colors_and_exact_voxels(run):
    scene, volumeNode, inputPath, segments, directory = run
    labels = blobLabels()
    writeSnapshot(inputPath, labels, directory / "snapshot_0000.nrrd")

    live = LiveSegmentation(scene, volumeNode, "Abdomen CT ISL")
    live.update(directory / "snapshot_0000.nrrd", segments)

    node = live.node
    assert segmentationNodes(scene) == [node]
    assert node.GetName() == "Abdomen CT ISL"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        "liver", "spleen", "kidney_left"]
    for description in SEGMENTS:
        segmentId = segmentIdForValue(description["value"])
        segment = segmentation.GetSegment(segmentId)
        assert segment.GetColor() == pytest.approx(description["color"])
        terminology = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), terminology)
        assert terminology.GetTypeObject().GetCodeValue() == description["terminology"]["type"]["code"]
        assert terminology.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure"
        # Exported on the input volume's grid (which the export checks), voxel for voxel.
        exported = exportSegmentVoxels(scene, node, [segmentId], volumeNode)
        assert exported.shape == SHAPE
        assert int((exported > 0).sum()) == int((labels == description["value"]).sum())
        assert np.array_equal(exported > 0, labels == description["value"])
    kidney = slicer.vtkSlicerTerminologyEntry()
    slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        segmentation.GetSegment(segmentIdForValue(4)).GetTerminology(), kidney)
    assert kidney.GetTypeModifierObject().GetCodeMeaning() == "Left"
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volumeNode
    assert node.GetDisplayNode() is not None


def test_repeated_snapshots_update_one_node_with_stable_segment_ids(run):
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    firstNode, firstIds = live.node, segmentIds(live.node)
    firstSegments = [firstNode.GetSegmentation().GetSegment(segmentId) for segmentId in firstIds]

    for index, shift in enumerate((1, 2, 3), start=1):
        labels = blobLabels(shift, withKidney=shift < 3)  # the kidney disappears in the last one
        writeSnapshot(inputPath, labels, directory / f"snapshot_{index:04d}.nrrd")
        live.update(directory / f"snapshot_{index:04d}.nrrd", segments)
        assert live.node is firstNode
        assert segmentationNodes(scene) == [firstNode]
        assert segmentIds(firstNode) == firstIds == ["label_1", "label_2", "label_4"]
        assert [firstNode.GetSegmentation().GetSegment(segmentId) for segmentId in firstIds] == firstSegments
        exported = exportSegmentVoxels(scene, firstNode, firstIds, volumeNode)
        for position, value in enumerate((1, 2, 4), start=1):
            assert np.array_equal(exported == position, labels == value)


def test_user_edited_segmentation_is_not_overwritten(run):
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    editedNode = live.node

    # The user paints the whole volume into the liver, the way Segment Editor effects write.
    painted = slicer.vtkOrientedImageData()
    painted.DeepCopy(editedNode.GetBinaryLabelmapInternalRepresentation("label_1"))
    painted.GetPointData().GetScalars().Fill(1)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        painted, editedNode, "label_1", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    editedVoxels = exportSegmentVoxels(scene, editedNode, ["label_1"], volumeNode)
    stampAfterEdit = editStamp(editedNode)

    writeSnapshot(inputPath, blobLabels(2), directory / "snapshot_0001.nrrd")
    live.update(directory / "snapshot_0001.nrrd", segments)

    assert live.node is not editedNode
    assert live.editedNodes == [editedNode]
    assert editStamp(editedNode) == stampAfterEdit
    assert np.array_equal(exportSegmentVoxels(scene, editedNode, ["label_1"], volumeNode), editedVoxels)
    assert np.array_equal(exportSegmentVoxels(scene, live.node, ["label_1"], volumeNode) > 0, blobLabels(2) == 1)
    assert live.node.GetName() != editedNode.GetName()
    assert len(segmentationNodes(scene)) == 2


def test_display_changes_are_not_edits(run):
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    node = live.node
    node.GetDisplayNode().SetSegmentVisibility("label_2", False)
    node.GetDisplayNode().SetOpacity(0.3)
    node.GetSegmentation().GetSegment("label_1").SetColor(0.1, 0.9, 0.1)  # a color the user prefers stays
    writeSnapshot(inputPath, blobLabels(1), directory / "snapshot_0001.nrrd")
    live.update(directory / "snapshot_0001.nrrd", segments)
    assert live.node is node and live.editedNodes == []
    assert node.GetSegmentation().GetSegment("label_1").GetColor() == pytest.approx((0.1, 0.9, 0.1))


def test_voxels_changed_in_place_are_an_edit_and_3d_surfaces_are_not(run):
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    node = live.node
    node.CreateClosedSurfaceRepresentation()  # "Show 3D"
    writeSnapshot(inputPath, blobLabels(1), directory / "snapshot_0001.nrrd")
    live.update(directory / "snapshot_0001.nrrd", segments)
    assert live.node is node and live.editedNodes == []

    # A paint stroke written straight into the shared labelmap, then marked modified (as the effects do).
    scalars = node.GetBinaryLabelmapInternalRepresentation("label_1").GetPointData().GetScalars()
    scalars.SetValue(0, 1)
    scalars.Modified()
    live.update(directory / "snapshot_0000.nrrd", segments)
    assert live.editedNodes == [node] and live.node is not node


def test_the_edit_check_reads_no_voxel_of_the_shown_result(run, monkeypatch):
    """Each update reads the new snapshot's voxels only: the check for user edits costs the same for any volume."""
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    shownScalars = live.node.GetBinaryLabelmapInternalRepresentation("label_1").GetPointData().GetScalars()
    read = []
    realVtkToNumpy = segmentation.vtk_to_numpy
    monkeypatch.setattr(segmentation, "vtk_to_numpy", lambda array: read.append(array) or realVtkToNumpy(array))
    writeSnapshot(inputPath, blobLabels(1), directory / "snapshot_0001.nrrd")
    live.update(directory / "snapshot_0001.nrrd", segments)
    assert len(read) == 1 and read[0] is not shownScalars
    assert live.node.GetBinaryLabelmapInternalRepresentation("label_1").GetPointData().GetScalars() is not read[0]


def test_deleted_node_is_replaced(run):
    scene, volumeNode, inputPath, segments, directory = run
    live = showFirstSnapshot(run)
    scene.RemoveNode(live.node)
    live.update(directory / "snapshot_0000.nrrd", segments)
    assert live.node.GetScene() is scene
    assert segmentationNodes(scene) == [live.node]


def test_result_goes_under_the_study_of_the_input(run):
    scene, volumeNode, inputPath, segments, directory = run
    shNode = scene.GetSubjectHierarchyNode()
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    study = shNode.CreateStudyItem(patient, "CT abdomen")
    shNode.CreateItem(study, volumeNode)
    live = showFirstSnapshot(run)
    assert shNode.GetItemParent(shNode.GetItemByDataNode(live.node)) == study


def test_transformed_volume_gets_a_segmentation_under_the_same_transform(run):
    scene, volumeNode, inputPath, segments, directory = run
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    matrix.SetElement(1, 3, -7.0)
    transformNode.SetMatrixTransformToParent(matrix)
    volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
    live = LiveSegmentation(scene, volumeNode, "Abdomen CT ISL")
    labels = blobLabels()
    writeSnapshot(inputPath, labels, directory / "snapshot_0000.nrrd")
    live.update(directory / "snapshot_0000.nrrd", segments)
    assert live.node.GetTransformNodeID() == transformNode.GetID()
    exported = exportSegmentVoxels(scene, live.node, ["label_1", "label_2", "label_4"], volumeNode)
    for position, value in enumerate((1, 2, 4), start=1):
        assert np.array_equal(exported == position, labels == value)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # the temporary labelmap is gone
