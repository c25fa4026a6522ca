"""One refinement run seen from the scene: start the worker on a volume (or on the user's corrections of
the last result), turn its events into progress and segmentation updates (`poll`, called from a timer in
the GUI thread), cancel it; afterwards the uncertainty map and the per-organ change list for review.

Imports the MRML classes of `slicer`, vtk, numpy and the GUI-free library; never Qt or torch.
"""

import enum
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import slicer

from .i18n import tr as _
from .edits import editedRegion, exportModelLabels, writeLabelsForWorker
from .protocol import (EXIT_CANCELLED, OPTION_EDITED_REGION, OPTION_INITIAL_MASK, REPORT_FILE, SEGMENTS_FILE,
                       UNCERTAINTY_FILE, ProtocolError, RunProgress, readSegmentsFile, resultIsComplete)
from .review import loadUncertainty, showOverlay
from .segmentation import LiveSegmentation, writeVolumeForWorker
from .settings import RunSettings
from .worker import WORKER_MODULE, WorkerProcess, WorkerTask, readLogTail, workerCommand, workerEnvironment

MODULE_DIRECTORY = Path(__file__).resolve().parent.parent  # holds the isseg package
# What the user's edits of a segmentation node fire (voxels painted or erased, segments added or removed).
EDIT_EVENTS = (slicer.vtkSegmentation.SourceRepresentationModified, slicer.vtkSegmentation.SegmentAdded,
               slicer.vtkSegmentation.SegmentRemoved, slicer.vtkSegmentation.SegmentModified)


# Set on the CT that the panel's "Load demo phantom" added (saved with the scene): the demo model works on it.
DEMO_PHANTOM_ATTRIBUTE = "InferenceSpecificSeg.DemoPhantom"


def markAsDemoPhantom(volumeNode) -> None:
    volumeNode.SetAttribute(DEMO_PHANTOM_ATTRIBUTE, "1")


def isDemoPhantom(volumeNode) -> bool:
    """True for a volume the module generated as the demo model's phantom; a real CT the demo model cannot segment."""
    return volumeNode.GetAttribute(DEMO_PHANTOM_ATTRIBUTE) == "1"


class RunState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class RunStatus:
    """What the panel shows: the state, a one-line message, the progress of the current stage, the result
    node (None until the first snapshot), how many results have been loaded into the scene and the
    per-organ change rows of the `organ_changes` event (docs/worker-protocol.md)."""

    state: RunState = RunState.IDLE
    message: str = ""
    progress: RunProgress = field(default_factory=RunProgress)
    segmentationNode: object = None
    resultsLoaded: int = 0
    errorMessage: Optional[str] = None
    organChanges: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in (RunState.RUNNING, RunState.CANCELLING)


class RefinementLogic:
    """Runs one refinement at a time in `scene`.

    `pythonExecutable` runs the worker (PythonSlicer in Slicer), `moduleDirectory` is the folder that holds
    the `isseg` package (put first on the worker's PYTHONPATH), `workDirectory` the parent of the private
    run folders; a cancel writes the cancel file, `cancelSignalSeconds` later SIGTERM goes to the worker's
    process group, and `cancelTimeoutSeconds` after the cancel the process tree is killed.

    Edits are never overwritten: a run from edits writes to a new node, and the edited node is left as it is.
    `editedRegion` is the region the last run from edits trusted (None after a plain start), `uncertaintyNode`
    the scalar volume showing the last uncertainty map (None before the first and once it left the scene). `onResultEdited`, when set,
    is called (without arguments) each time the current result node fires an edit event.
    """

    def __init__(self, scene, pythonExecutable: str, moduleDirectory=MODULE_DIRECTORY, workDirectory=None,
                 cancelTimeoutSeconds: float = 20.0, cancelSignalSeconds: float = 3.0):
        self.scene = scene
        self.pythonExecutable = pythonExecutable
        self.moduleDirectory = Path(moduleDirectory)
        self.workDirectory = workDirectory
        self.cancelTimeoutSeconds = cancelTimeoutSeconds
        self.cancelSignalSeconds = cancelSignalSeconds
        self.status = RunStatus()
        self.runDirectory: Optional[Path] = None
        self.segments: list = []  # protocol.SegmentDescription of the current run, from segments.json
        self._worker: Optional[WorkerProcess] = None
        self._live: Optional[LiveSegmentation] = None
        self._outcomeEvent: Optional[dict] = None  # the worker's done, cancelled or error event
        self._finalResultLoaded = False
        self._model: Optional[str] = None
        self._editsSource = None  # the edited node the current run started from, if any
        self.editedRegion = None
        self._uncertaintyNode = None
        self.onResultEdited = None
        self._watched = (None, [])  # the result node observed for edits, and its observer tags

    @property
    def workerProcessId(self) -> Optional[int]:
        """Process id of the running worker (the leader of its process group), None when idle."""
        return self._worker.pid if self._worker is not None else None

    def logTail(self, lines: int = 40) -> str:
        """The end of the current (or last) run's worker log, "" before the first run."""
        return readLogTail(self.runDirectory / "worker.log", lines) if self.runDirectory else ""

    @property
    def uncertaintyNode(self):
        """The scalar volume showing the last uncertainty map; None before the first, and once it has left the
        scene (the user deleted it, the scene was closed), so that nothing offers or shows a node that is gone."""
        node = self._uncertaintyNode
        return node if node is not None and node.GetScene() is self.scene else None

    def startWorkerTask(self, arguments: list, timeoutSeconds: float = 120.0, module: str = WORKER_MODULE) -> WorkerTask:
        """A short worker command (devices, phantom, a model install) in the background, in a private folder of
        the work directory, with this logic's interpreter and environment; poll it (worker.WorkerTaskPoller)."""
        return WorkerTask(self.pythonExecutable, arguments, workerEnvironment(self.moduleDirectory), self.workDirectory,
                          timeoutSeconds, module)

    def start(self, volumeNode, model: str, settings: RunSettings) -> RunStatus:
        """Write `volumeNode` to a new private run folder and start the worker on it with `model` ("demo" or
        a package folder) and `settings`. Returns at once; call `poll` to follow the run. Raises
        RuntimeError (with a user-facing message) when a run is going or the worker cannot start."""
        self._ensureIdle()
        status = self._launch(volumeNode, model, settings, _("{volume} ISL"), {})
        self.editedRegion, self._editsSource = None, None
        return status

    def canRefineFromEdits(self) -> bool:
        """True when no run is going and the last result's node has been edited: its content differs from
        the result the worker published last."""
        live = self._live
        return not self.status.active and live is not None and live.publishedLabels is not None and live.edited

    def refineFromEdits(self, settings: RunSettings) -> RunStatus:
        """Start a run from the user's corrections of the last result (same CT and model, `settings` as for
        `start`): the edited node exported on the CT grid is the worker's --initial-mask, the voxels that
        differ from the last published result (and those trusted by an earlier run from edits) its
        --edited-region. The result goes to a new node. Raises RuntimeError (user-facing message) when
        there is nothing to refine from or the worker cannot start."""
        self._ensureIdle()
        if not self.canRefineFromEdits():
            raise RuntimeError(_("Edit the last result in the Segment Editor first: the run starts from your corrections."))
        live = self._live
        edited = exportModelLabels(live.node, live.volumeNode, self.segments)
        region = editedRegion(edited, live.publishedLabels, self.editedRegion)
        if not region.any():
            raise RuntimeError(_("No voxel differs from the last result: paint or erase in the Segment Editor first."))
        labelFiles = {OPTION_INITIAL_MASK: ("initial_mask.nrrd", edited), OPTION_EDITED_REGION: ("edited_region.nrrd", region)}
        status = self._launch(live.volumeNode, self._model, settings, _("{volume} ISL from edits"), labelFiles)
        self.editedRegion, self._editsSource = region, live.node
        return status

    def showUncertainty(self, visible: bool) -> None:
        """Show the last uncertainty map as the foreground of the slice views, or take it away."""
        showOverlay(self.scene, self.uncertaintyNode, visible)

    def _ensureIdle(self) -> None:
        if self.status.active:
            raise RuntimeError(_("A run is already going. Wait for it or cancel it first."))

    def _launch(self, volumeNode, model: str, settings: RunSettings, baseName: str, labelFiles: dict) -> RunStatus:
        """Write the volume and the `labelFiles` ({option: (file name, uint8 voxels [k, j, i])}) to a new run
        folder, start the worker, and show its results in a new node named `baseName` (with {volume})."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise RuntimeError(_("Select a CT volume that has image data."))
        self.runDirectory = Path(tempfile.mkdtemp(prefix="InferenceSpecificSeg-", dir=self.workDirectory))
        inputPath, outputDirectory = self.runDirectory / "input.nrrd", self.runDirectory / "output"
        outputDirectory.mkdir()
        writeVolumeForWorker(volumeNode, inputPath)
        arguments = ["refine", "--input", inputPath, "--model", model, "--output", outputDirectory,
                     *settings.commandLineArguments()]
        for option, (fileName, voxels) in labelFiles.items():
            writeLabelsForWorker(voxels, volumeNode, self.runDirectory / fileName)
            arguments += [option, self.runDirectory / fileName]
        self._worker = WorkerProcess(workerCommand(self.pythonExecutable, arguments), outputDirectory,
                                     self.runDirectory / "worker.log", workerEnvironment(self.moduleDirectory))
        logging.info("InferenceSpecificSeg run started in %s (worker %d)", self.runDirectory, self._worker.pid)
        self._live = LiveSegmentation(self.scene, volumeNode, baseName.format(volume=volumeNode.GetName()))
        self._model = model
        self.segments = []
        self._outcomeEvent = None
        self._finalResultLoaded = False
        self.status = RunStatus(RunState.RUNNING, RunProgress().describe())
        return self.status

    def poll(self) -> RunStatus:
        """Take the worker's new events, load the newest result into the segmentation node, enforce the
        cancel timeout and, once the worker has exited, settle the outcome. Never blocks on the worker."""
        if self._worker is None:
            return self.status
        workerFinished = self._worker.finished  # before taking the events: once finished, all are in the queue
        newestResult, newestIsFinal = None, False
        for event in self._worker.takeEvents():
            kind = event["event"]
            self.status.progress.apply(event)
            if kind == "snapshot" and "path" in event:
                newestResult, newestIsFinal = event["path"], False  # only the newest of a batch is worth loading
            elif kind in ("done", "cancelled") and "labelmap" in event:
                newestResult, newestIsFinal = event["labelmap"], True
                self._outcomeEvent = event
            elif kind == "error":
                self._outcomeEvent = event
            elif kind == "organ_changes" and isinstance(event.get("organs"), list):
                self.status.organChanges = event["organs"]
        if newestResult is not None:
            loaded = self._loadResult(Path(newestResult))
            self._finalResultLoaded = newestIsFinal and loaded
        if self.status.state == RunState.RUNNING:
            self.status.message = self.status.progress.describe()
        self._worker.escalateCancel(self.cancelSignalSeconds)
        if self._worker.cancelOverdue(self.cancelTimeoutSeconds):
            logging.warning("InferenceSpecificSeg worker did not stop within %g s; killing it", self.cancelTimeoutSeconds)
            self._worker.kill()
        if workerFinished:
            self._loadUncertainty(self._worker.outputDirectory)  # here, not in _settle: stopNow loads nothing
            self._settle()
        return self.status

    def cancel(self) -> None:
        """Ask the running worker to stop; it publishes its partial result first. `poll` kills its process
        tree if it has not exited within the cancel timeout."""
        if self.status.active:
            self._worker.requestCancel()
            self.status.state = RunState.CANCELLING
            self.status.message = _("Cancelling: waiting for the worker to save its partial result...")

    def stopNow(self) -> None:
        """End a running worker and its process tree at once, without waiting for it (the scene is closing or
        Slicer is exiting): the run ends cancelled; results it had not yet shown stay in the run folder."""
        if self.status.active:
            self.status.state = RunState.CANCELLING
            self._worker.kill()
            self._settle()
        self._watchForEdits(None)

    def _loadResult(self, labelmapPath: Path) -> bool:
        """Show the labelmap file in the run's segmentation node; False (and a log entry) when it cannot be read."""
        try:
            if not self.segments:
                self.segments = readSegmentsFile(self._worker.outputDirectory / SEGMENTS_FILE)
            self._live.update(labelmapPath, self.segments)
        except (ProtocolError, RuntimeError) as error:
            # A later snapshot may load; a final result that does not load makes the run fail in _settle.
            logging.warning("InferenceSpecificSeg could not load %s: %s", labelmapPath, error)
            return False
        self.status.segmentationNode = self._live.node
        self._watchForEdits(self._live.node)
        self.status.resultsLoaded += 1
        return True

    def _watchForEdits(self, node) -> None:
        """Observe the edit events of `node` (None: of no node) instead of those of the node observed so far."""
        watched, tags = self._watched
        if node is watched:
            return
        for tag in tags:
            watched.RemoveObserver(tag)
        tags = [node.AddObserver(event, self._resultEdited) for event in EDIT_EVENTS] if node is not None else []
        self._watched = (node, tags)

    def _resultEdited(self, caller, event) -> None:
        if self.onResultEdited is not None:
            self.onResultEdited()

    def _settle(self) -> None:
        """Turn the exited worker's last event and exit code into the final state and message."""
        worker, event = self._worker, self._outcomeEvent or {}
        self._worker = None
        kind, returnCode = event.get("event"), worker.returnCode
        node = self.status.segmentationNode
        if kind == "done" and self._finalResultLoaded and resultIsComplete(worker.outputDirectory):
            self.status.state = RunState.DONE
            self.status.message = _("Done: {count} segments in '{node}'.").format(count=len(self.segments), node=node.GetName())
            shutil.rmtree(self.runDirectory, ignore_errors=True)
        elif kind == "cancelled" or (kind is None and (returnCode == EXIT_CANCELLED or self.status.state == RunState.CANCELLING)):
            self.status.state = RunState.CANCELLED
            self.status.message = _("Cancelled.")
        else:
            self.status.state = RunState.FAILED
            self.status.errorMessage = self._failureMessage(event, worker)
            self.status.message = _("Failed: {error}").format(error=self.status.errorMessage)
        if self.status.state != RunState.DONE and node is not None:
            self._live.rename(_("{name} (partial)").format(name=self._live.baseName))
            self.status.message += " " + _("The last result is kept in '{node}'.").format(node=self._live.node.GetName())
        if self._live.editedNodes:
            self.status.message += " " + _("Your edits in {nodes} were kept; newer results went to a new node.").format(
                nodes=", ".join(f"'{edited.GetName()}'" for edited in self._live.editedNodes))
        if self._editsSource is not None and self._editsSource.GetScene() is self.scene:
            self.status.message += " " + _("The segmentation you corrected, '{node}', is unchanged.").format(
                node=self._editsSource.GetName())
        logging.info("InferenceSpecificSeg run ended: %s (worker exit code %s)", self.status.state.value, returnCode)

    def _loadUncertainty(self, outputDirectory: Path) -> None:
        """Load the run's uncertainty map, when it wrote one, into `uncertaintyNode` (before the run folder goes)."""
        path = outputDirectory / UNCERTAINTY_FILE
        if not path.exists() or self._live is None:
            return
        volumeNode = self._live.volumeNode
        try:
            self._uncertaintyNode = loadUncertainty(self.scene, path, volumeNode, _("{volume} ISL uncertainty").format(
                volume=volumeNode.GetName()), self.uncertaintyNode)
        except RuntimeError as error:
            logging.warning("InferenceSpecificSeg could not load the uncertainty map: %s", error)

    def _failureMessage(self, event: dict, worker: WorkerProcess) -> str:
        if event.get("event") == "error":
            return str(event.get("message") or event.get("kind") or _("unknown error"))
        if event.get("event") == "done" and self._finalResultLoaded:  # loaded, but no report.json saying it is final
            return _("the worker said it was done but wrote no complete {report}, so the result may be incomplete. "
                     "See the log: {log}").format(report=REPORT_FILE, log=worker.logPath)
        if event.get("event") == "done":
            return _("the worker finished but its result could not be loaded. See the log: {log}").format(log=worker.logPath)
        return _("the worker stopped unexpectedly (exit code {code}). Last lines of its log ({log}):\n{tail}").format(
            code=worker.returnCode, log=worker.logPath, tail=worker.logTail())
