"""Shared set-up for the tests of the Slicer side (Testing/test_slicer_*.py): import path, MRML scenes
from the slicer-core wheel, volumes with chosen geometry, and labelmap files as the worker writes them."""

import json
import sys
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
