"""Shared set-up for the tests of the Slicer side (Testing/test_slicer_*.py): import path, MRML scenes
from the slicer-core wheel, volumes with chosen geometry, and labelmap files as the worker writes them."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MODULE_DIRECTORY = Path(__file__).resolve().parent.parent / "InferenceSpecificSeg"
if str(MODULE_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(MODULE_DIRECTORY))

import slicer  # noqa: E402  (slicer-core: real MRML classes, no Qt)
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

SEGMENTS = [
    {"value": 1, "name": "liver", "color": [0.86, 0.55, 0.42],
     "terminology": {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                     "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}}},
    {"value": 2, "name": "spleen", "color": [0.62, 0.35, 0.71],
     "terminology": {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                     "type": {"scheme": "SCT", "code": "78961009", "meaning": "Spleen"}}},
    {"value": 4, "name": "kidney_left", "color": [0.73, 0.44, 0.25],
     "terminology": {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                     "type": {"scheme": "SCT", "code": "64033007", "meaning": "Kidney"},
                     "modifier": {"scheme": "SCT", "code": "7771000", "meaning": "Left"}}},
]


def newScene():
    """An empty MRML scene, with the segmentation conversion rules that Slicer's Segmentations module
    registers at application start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return slicer.vtkMRMLScene()


def addVolume(scene, voxels: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=None, name="CT"):
    """Add a scalar volume with voxels[k, j, i] and the given geometry (directions: 3x3 IJK-to-RAS
    axis directions as rows of the matrix, default identity)."""
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True))
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volumeNode.SetAndObserveImageData(image)
    volumeNode.SetSpacing(*spacing)
    volumeNode.SetOrigin(*origin)
    if directions is not None:
        volumeNode.SetIJKToRASDirections([list(row) for row in directions])
    return volumeNode


def obliqueDirections(angle=0.35):
    """IJK-to-RAS directions rotated about two axes: not axis-aligned."""
    c, s = np.cos(angle), np.sin(angle)
    rotationZ = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rotationX = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return rotationZ @ rotationX


def writeVolumeFile(volumeNode, path: Path) -> None:
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    assert storageNode.WriteData(volumeNode)


def writeSnapshot(referencePath: Path, labels: np.ndarray, path: Path) -> None:
    """Write labels[k, j, i] as a uint8 labelmap on the grid of the image file `referencePath`, as the
    worker does (SimpleITK, same size, origin, spacing, direction)."""
    reference = sitk.ReadImage(str(referencePath))
    labelmap = sitk.GetImageFromArray(labels.astype(np.uint8))
    labelmap.CopyInformation(reference)
    sitk.WriteImage(labelmap, str(path), True)


def writeSegmentsFile(directory: Path, segments=SEGMENTS) -> Path:
    path = Path(directory) / "segments.json"
    path.write_text(json.dumps({"segments": segments}), encoding="utf-8")
    return path


def exportSegmentVoxels(scene, segmentationNode, segmentIds, referenceVolumeNode) -> np.ndarray:
    """voxels[k, j, i] of the given segments exported on the grid of `referenceVolumeNode` (labels 1..N
    in the order of `segmentIds`), through Slicer's own export."""
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentationNode, ids, labelmapNode, referenceVolumeNode)
    image = labelmapNode.GetImageData()
    dimensions = image.GetDimensions()
    voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dimensions[::-1]).copy()
    matrix, referenceMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmapNode.GetIJKToRASMatrix(matrix)
    referenceVolumeNode.GetIJKToRASMatrix(referenceMatrix)
    assert np.allclose([matrix.GetElement(r, c) for r in range(4) for c in range(4)],
                       [referenceMatrix.GetElement(r, c) for r in range(4) for c in range(4)], atol=1e-6)
    scene.RemoveNode(labelmapNode)
    return voxels


def segmentIds(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


FAKE_CLI = r'''
"""A stand-in for the engine's worker CLI that follows docs/worker-protocol.md with synthetic results.
--model selects the behaviour: "fake" (quick), "fake-slow", "fake-bad-model" (error event),
"fake-crash" (dies mid-line), "fake-stubborn" (ignores cancelling, starts a child process),
"fake-unreadable-result" (announces a final labelmap that does not exist), "fake-deaf" (slow, and
stops on SIGTERM only, as the engine busy in one long operation), "fake-orphan" (slow, and leaves a
process outside its process group that holds its stdout open)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SEGMENTS = [{"value": 1, "name": "liver", "color": [0.86, 0.55, 0.42], "terminology": {
                "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}}},
            {"value": 2, "name": "spleen", "color": [0.62, 0.35, 0.71], "terminology": {}}]
cancelled = False
ORGAN_CHANGES = [{"value": 1, "name": "liver", "volume_initial_ml": 1.25, "volume_refined_ml": 2.5, "dice": 0.8,
                  "max_surface_distance_mm": 4.5, "uncertain_share": 0.3, "review": ["changed", "uncertain"]},
                 {"value": 2, "name": "spleen", "volume_initial_ml": 0.0, "volume_refined_ml": 0.0, "dice": None,
                  "max_surface_distance_mm": None, "uncertain_share": None, "review": []}]


def emit(**event):
    print(json.dumps(event), flush=True)


def writeLabels(reference, radius, path):
    size = reference.GetSize()
    k, j, i = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    labels = np.zeros((size[2], size[1], size[0]), np.uint8)
    labels[(k - size[2] / 2) ** 2 + (j - size[1] / 2) ** 2 + (i - size[0] / 3) ** 2 <= radius ** 2] = 1
    labels[:2, :2, -3:] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    temporary = path.with_name("." + path.name)
    sitk.WriteImage(image, str(temporary), True)
    os.replace(temporary, path)
    return str(path)


def onTerminate(*_):
    global cancelled
    cancelled = True


def main(arguments):
    if arguments[0] == "devices":
        time.sleep(float(os.environ.get("FAKE_DEVICES_SECONDS", "0")))  # as torch takes its time to import
        print("a library printing to stdout")
        emit(event="devices", cuda=False, name="CPU", memory_gib=None)
        return 0
    options = dict(zip(arguments[1::2], arguments[2::2]))
    model, output, steps = options["--model"], Path(options["--output"]), int(options["--steps"])
    signal.signal(signal.SIGTERM, onTerminate)
    print("fake worker starting", file=sys.stderr, flush=True)
    if model == "fake-bad-model":
        emit(event="error", kind="bad_model", message="The model package is damaged. Copy it again.")
        return 4
    if model == "fake-crash":
        print("Traceback: boom in the fake worker", file=sys.stderr, flush=True)
        sys.stdout.write('{"event": "progr')
        sys.stdout.flush()
        os._exit(1)
    reference = sitk.ReadImage(options["--input"])
    (output / "segments.json").write_text(json.dumps({"segments": SEGMENTS}), encoding="utf-8")
    if model == "fake-stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (output / "child.pid").write_text(str(child.pid), encoding="utf-8")
    if model == "fake-orphan":
        orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        (output / "orphan.pid").write_text(str(orphan.pid), encoding="utf-8")
    emit(event="stage", stage="initial")
    emit(event="snapshot", index=0, step=0, path=writeLabels(reference, 2, output / "snapshot_0000.nrrd"))
    print("noise: not an event")
    print("{half a json")
    if model == "fake-stubborn":
        while True:
            time.sleep(1)
    delay = 0.3 if model in ("fake-slow", "fake-deaf", "fake-orphan") else 0.02
    emit(event="stage", stage="refine")
    for step in range(1, steps + 1):
        if cancelled or (model != "fake-deaf" and (output / "cancel").exists()):
            labelmap = writeLabels(reference, 2 + step, output / "labelmap.nrrd")
            emit(event="cancelled", labelmap=labelmap, report=str(output / "report.json"), partial=True)
            return 6
        time.sleep(delay)
        emit(event="progress", stage="refine", step=step, total=steps, loss=1.0 / step, eta_s=(steps - step) * delay)
        if step % 2 == 0:
            emit(event="snapshot", index=step // 2, step=step,
                 path=writeLabels(reference, 2 + step, output / f"snapshot_{step // 2:04d}.nrrd"))
    emit(event="stage", stage="finalize")
    if model == "fake-unreadable-result":
        emit(event="done", labelmap=str(output / "missing.nrrd"), probabilities=None, report=None, partial=False)
        return 0
    labelmap = writeLabels(reference, 3 + steps, output / "labelmap.nrrd")
    size = reference.GetSize()
    uncertainty = sitk.GetImageFromArray(np.linspace(0, 1, size[0] * size[1] * size[2], dtype=np.float32).reshape(size[::-1]))
    uncertainty.CopyInformation(reference)
    sitk.WriteImage(uncertainty, str(output / "uncertainty.nrrd"), True)
    emit(event="organ_changes", organs=ORGAN_CHANGES)
    if model != "fake-no-report":  # the real worker writes report.json last: the mark of a complete result
        (output / "report.json").write_text(json.dumps({"partial": False}), encoding="utf-8")
    emit(event="done", labelmap=labelmap, probabilities=None, report=str(output / "report.json"), partial=False)
    return 0


sys.exit(main(sys.argv[1:]))
'''


def writeFakeEngine(directory: Path) -> Path:
    """A folder holding a fake `isseg` package whose `isseg.cli` follows the worker protocol (FAKE_CLI).
    Put it first on the worker's PYTHONPATH (RefinementLogic's moduleDirectory) to use it."""
    package = Path(directory) / "fake_engine" / "isseg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "cli.py").write_text(FAKE_CLI, encoding="utf-8")
    return package.parent


def processAlive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def processGroupMembers(groupId: int) -> list:
    """Living processes in the process group `groupId` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == groupId and fields[0] != "Z":
                members.append(int(entry.name))
    return members


LAUNCHER = r'''
"""Like PythonSlicer (CTK AppLauncher): starts the real interpreter as its child, waits for it, exits with
its exit code, and forwards no signal (SIGTERM ends the launcher alone)."""
import subprocess, sys
sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))
'''


def writeLauncher(directory: Path) -> Path:
    path = Path(directory) / "launcher.py"
    path.write_text(LAUNCHER, encoding="utf-8")
    return path


def paintSegment(segmentationNode, segmentId, mask: np.ndarray, volumeNode, erase=False) -> None:
    """Paint (or erase) the voxels mask[k, j, i] of the grid of `volumeNode` in a segment, through the
    segmentation API that the Segment Editor's Paint and Erase effects use, as its effects call it
    (qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap in Slicer 5.8.1: painting merges the mask
    and overwrites every other segment there, erasing is a minimum with the inverted mask)."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    voxels = (~mask if erase else mask).astype(np.uint8)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True,
                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if erase:
        assert logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_MERGE_MIN)
    else:
        others = [other for other in segmentIds(segmentationNode) if other != segmentId]
        assert logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_MERGE_MASK,
                                                image.GetExtent(), False, others)


def voxelsOfFile(path) -> np.ndarray:
    """voxels[k, j, i] of an image file (as the worker reads it)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def pollUntil(logic, condition, seconds=120.0):
    """Call the RefinementLogic's poll() as the GUI timer does until condition(status); the status."""
    deadline = time.monotonic() + seconds
    while not condition(logic.poll()):
        assert time.monotonic() < deadline, f"timed out; status: {logic.status}"
        time.sleep(0.05)
    return logic.status


def addPhantomVolume(scene, directory: Path, size, spacing, name="Phantom"):
    """A synthetic abdomen (isseg.phantom, seed 5) of `size` voxels (x, y, z) and `spacing` mm, written as
    int16 NRRD into `directory` and read into a new scalar volume node, as a user would load a CT."""
    from isseg.phantom import PhantomSpec, generate

    phantom = generate(PhantomSpec(seed=5, size=size, spacing=spacing))
    path = Path(directory) / "phantom.nrrd"
    sitk.WriteImage(sitk.Cast(phantom.image, sitk.sitkInt16), str(path))
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    assert storageNode.ReadData(volumeNode)
    return volumeNode
