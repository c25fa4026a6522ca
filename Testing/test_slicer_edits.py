"""Refine from edits, the uncertainty overlay and the change list, on a real MRML scene (slicer-core) with
real worker subprocesses: the protocol stand-in CLI for the plumbing, the engine for the promise that
every voxel the user edited is in the final result."""

import os
import sys

import numpy as np
import pytest

from slicer_test_support import (addPhantomVolume, addVolume, obliqueDirections, paintSegment, pollUntil,
                                 processGroupMembers)
from test_slicer_logic import fakeLogic, scene  # noqa: F401 (fixtures: a scene, the logic with the protocol stand-in CLI)

import vtk
from InferenceSpecificSegLib.edits import exportModelLabels
from InferenceSpecificSegLib.logic import RefinementLogic, RunState
from InferenceSpecificSegLib.protocol import describeOrganChanges
from InferenceSpecificSegLib.segmentation import voxelArray
from InferenceSpecificSegLib.settings import Device, RunSettings

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")


@pytest.fixture
def volumeNode(scene):
    # Oblique axes and anisotropic voxels: the export and the files must keep the grid exactly.
    return addVolume(scene, np.full((10, 12, 14), -500, np.int16), spacing=(1.5, 1.25, 3.0), origin=(5.0, -7.0, 2.0),
                     directions=obliqueDirections(), name="CT")


def finishedRun(logic, volumeNode, model="fake", steps=2):
    logic.start(volumeNode, model, RunSettings(steps=steps, device=Device.CPU))
    status = pollUntil(logic, lambda status: not status.active, seconds=900)
    assert status.state == RunState.DONE, status.message
    return status


def correct(logic, node, volumeNode):
    """Edit the result as a user would: paint a block of spleen next to and into the liver (overwriting it,
    as the Segment Editor does by default) and erase one slice of the liver. Returns (labels after the
    edit, the voxels changed), [k, j, i]."""
    published = logic._live.publishedLabels.copy()
    liver = np.argwhere(published == 1)
    painted = np.zeros(published.shape, bool)
    k, j, i = liver.min(axis=0)
    painted[max(k - 1, 0):k + 2, max(j - 2, 0):j + 2, max(i - 2, 0):i + 2] = True
    erased = np.zeros(published.shape, bool)
    erased[liver[:, 0].max()] = published[liver[:, 0].max()] == 1
    paintSegment(node, "label_2", painted, volumeNode)
    paintSegment(node, "label_1", erased, volumeNode, erase=True)
    edited = published.copy()
    edited[painted] = 2
    edited[erased & (edited == 1)] = 0
    changed = edited != published
    assert (changed & (published == 1)).any() and (changed & (published == 0)).any() and (edited[erased] != 1).all()
    return edited, changed


def test_the_edited_region_is_what_the_user_painted_or_erased(fakeLogic, volumeNode, scene):
    status = finishedRun(fakeLogic, volumeNode)
    node = status.segmentationNode
    assert not fakeLogic.canRefineFromEdits()  # nothing edited yet
    nodesBefore = scene.GetNumberOfNodes()
    assert np.array_equal(exportModelLabels(node, volumeNode, fakeLogic.segments), fakeLogic._live.publishedLabels)
    assert scene.GetNumberOfNodes() == nodesBefore  # the export leaves no labelmap or color table behind
    edited, changed = correct(fakeLogic, node, volumeNode)
    assert fakeLogic.canRefineFromEdits()
    assert np.array_equal(exportModelLabels(node, volumeNode, fakeLogic.segments), edited)

    fakeLogic.refineFromEdits(RunSettings(steps=400))
    # The worker was started with the edited mask and the region as files on the CT's grid.
    arguments = open(f"/proc/{fakeLogic.workerProcessId}/cmdline", "rb").read().decode().split("\0")
    maskPath, regionPath = (arguments[arguments.index(option) + 1] for option in ("--initial-mask", "--edited-region"))
    import SimpleITK as sitk

    inputImage = sitk.ReadImage(str(fakeLogic.runDirectory / "input.nrrd"))
    for path, expected in ((maskPath, edited), (regionPath, changed.astype(np.uint8))):
        image = sitk.ReadImage(path)
        assert np.array_equal(sitk.GetArrayFromImage(image), expected)
        assert np.allclose(image.GetOrigin(), inputImage.GetOrigin()) and np.allclose(image.GetSpacing(), inputImage.GetSpacing())
        assert np.allclose(image.GetDirection(), inputImage.GetDirection())
    assert np.array_equal(fakeLogic.editedRegion, changed)
    fakeLogic.cancel()
    status = pollUntil(fakeLogic, lambda status: not status.active)
    # Edits are never overwritten: the run from edits wrote to a new node, the corrected one is as the user left it.
    assert status.segmentationNode is not node and status.segmentationNode.GetName() == "CT ISL from edits (partial)"
    assert np.array_equal(exportModelLabels(node, volumeNode, fakeLogic.segments), edited)
    assert "'CT ISL', is unchanged" in status.message


def test_refine_from_edits_needs_edited_voxels(fakeLogic, volumeNode):
    with pytest.raises(RuntimeError, match="Edit the last result"):
        fakeLogic.refineFromEdits(RunSettings())
    status = finishedRun(fakeLogic, volumeNode)
    status.segmentationNode.GetSegmentation().GetSegment("label_1").SetName("my liver")  # an edit, but no voxel
    assert fakeLogic.canRefineFromEdits()
    with pytest.raises(RuntimeError, match="No voxel differs"):
        fakeLogic.refineFromEdits(RunSettings())


def test_engine_refined_from_edits_keeps_every_edited_voxel(scene, tmp_path):
    """Needs the engine: a finished demo-model run on a tiny phantom, edits through the segmentation API,
    then `isseg refine --initial-mask --edited-region` started by the logic; the new node holds the user's
    labels at every edited voxel, the uncertainty map is loaded and the change list filled."""
    volumeNode = addPhantomVolume(scene, tmp_path, (40, 40, 24), (7.0, 7.0, 8.0))
    logic = RefinementLogic(scene, sys.executable, workDirectory=tmp_path, cancelTimeoutSeconds=30.0)
    try:
        first = finishedRun(logic, volumeNode, "demo", steps=2)
        assert first.organChanges and logic.uncertaintyNode is not None
        edited, changed = correct(logic, first.segmentationNode, volumeNode)
        logic.refineFromEdits(RunSettings(steps=2, device=Device.CPU))
        workerPid = logic.workerProcessId
        status = pollUntil(logic, lambda status: not status.active, seconds=900)
    finally:
        logic.stopNow()
    assert status.state == RunState.DONE, status.message
    final = exportModelLabels(status.segmentationNode, volumeNode, logic.segments)
    assert np.array_equal(final[changed], edited[changed])
    assert np.array_equal(exportModelLabels(first.segmentationNode, volumeNode, logic.segments), edited)
    assert [row["name"] for row in status.organChanges] == [segment.name for segment in logic.segments]
    assert "<table>" in describeOrganChanges(status.organChanges)
    assert processGroupMembers(workerPid) == []


def test_uncertainty_map_is_an_overlay_that_can_be_toggled(fakeLogic, volumeNode, scene):
    sliceViews = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(2)]
    finishedRun(fakeLogic, volumeNode)
    node = fakeLogic.uncertaintyNode
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == "CT ISL uncertainty"
    voxels = voxelArray(node)
    assert voxels.shape == voxelArray(volumeNode).shape and voxels.min() == 0.0 and voxels.max() == 1.0
    ctMatrix, mapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ctMatrix)
    node.GetIJKToRASMatrix(mapMatrix)
    assert all(abs(ctMatrix.GetElement(r, c) - mapMatrix.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))
    colorNode = node.GetDisplayNode().GetColorNode()
    assert colorNode.GetName() == "InferenceSpecificSeg uncertainty"
    rgba = [0.0] * 4
    colorNode.GetColor(0, rgba)
    assert rgba[3] == 0.0  # a sure voxel leaves the CT visible
    fakeLogic.showUncertainty(True)
    assert all(view.GetForegroundVolumeID() == node.GetID() and view.GetForegroundOpacity() > 0 for view in sliceViews)
    fakeLogic.showUncertainty(False)
    assert all(view.GetForegroundVolumeID() is None for view in sliceViews)
    other = addVolume(scene, np.zeros((2, 2, 2), np.int16), name="other")
    sliceViews[0].SetForegroundVolumeID(other.GetID())
    fakeLogic.showUncertainty(False)  # hiding leaves a foreground the user chose alone
    assert sliceViews[0].GetForegroundVolumeID() == other.GetID()
    finishedRun(fakeLogic, volumeNode)
    assert fakeLogic.uncertaintyNode is node  # the next run's map replaces the last one
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1


def test_change_list_comes_from_the_worker(fakeLogic, volumeNode):
    status = finishedRun(fakeLogic, volumeNode)
    assert [row["name"] for row in status.organChanges] == ["liver", "spleen"]
    text = describeOrganChanges(status.organChanges)
    for cell in ("<td>liver</td>", "<td>1.2</td>", "<td>2.5</td>", "<td>0.800</td>", "<td>4.5</td>", "<td>30.0 %</td>",
                 "<b>changed, uncertain</b>", "<td>spleen</td>"):
        assert cell in text
    assert describeOrganChanges([]) == ""


def test_an_uncertainty_map_the_user_deleted_is_not_shown(fakeLogic, volumeNode, scene):
    """A map removed from the scene (by the user, or by closing the scene) is gone for the panel too: the
    check box is disabled and no slice view gets the ID of a node that no longer exists."""
    sliceView = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    finishedRun(fakeLogic, volumeNode)
    scene.RemoveNode(fakeLogic.uncertaintyNode)
    assert fakeLogic.uncertaintyNode is None
    fakeLogic.showUncertainty(True)
    assert sliceView.GetForegroundVolumeID() is None


def test_stopping_at_once_loads_no_uncertainty_map(fakeLogic, volumeNode, scene):
    """stopNow runs as the scene closes or Slicer exits: a map the worker wrote but the panel had not yet
    shown stays in the run folder instead of being read into the scene that is going away."""
    fakeLogic.start(volumeNode, "fake", RunSettings(steps=2, device=Device.CPU))
    fakeLogic._worker._process.wait(timeout=120)  # the worker has written everything; nothing polled it yet
    assert (fakeLogic.runDirectory / "output" / "uncertainty.nrrd").exists()
    fakeLogic.stopNow()
    assert fakeLogic.uncertaintyNode is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # the CT only
