"""3D Slicer module: improve a pretrained CT segmentation model on the case at hand by inference-specific
learning, and watch the result improve live.

This file only wires the panel to the logic; the work is done in the GUI-free InferenceSpecificSegLib
package and, in a separate process, by the `isseg` engine (so torch is never loaded into Slicer).
"""

import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from InferenceSpecificSegLib import dependencies, models
from InferenceSpecificSegLib.logic import RefinementLogic, RunState, isDemoPhantom, markAsDemoPhantom
from InferenceSpecificSegLib.protocol import describeOrganChanges, readSegmentsFile
from InferenceSpecificSegLib.segmentation import addLabelmapAsSegmentation
from InferenceSpecificSegLib.settings import AlignmentMode, Device, Loss, RunSettings
from InferenceSpecificSegLib.worker import WorkerError, WorkerTaskPoller, deviceInfoFromTask


# Each library module after the ones it imports (onReload reloads them in this order).
LIBRARY_MODULES_IN_IMPORT_ORDER = ("i18n", "settings", "protocol", "worker", "models", "dependencies", "segmentation",
                                   "edits", "review", "logic")


class InferenceSpecificSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Inference-Specific Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["InferenceSpecificSeg contributors"]
        self.parent.helpText = _("""
Segments organs in a CT volume with a pretrained network and then improves the result for this one case
by <i>inference-specific learning</i>: the model's training cases are deformably aligned to the CT, the
network is fine-tuned on them, and the moving average of its predictions is shown live in the slice views.
<ol>
<li>Select the CT volume and a model (the built-in demo or an installed model package).</li>
<li>Press <b>Start</b>. On the first run, missing Python packages (PyTorch, MONAI, ...) are offered for installation.</li>
<li>Watch the segmentation update; press <b>Cancel</b> at any time to keep the last result (marked partial).</li>
<li>Press <b>Edit in Segment Editor</b> to correct the result, then <b>Refine from edits</b>: the run starts
from your corrections, keeps every voxel you changed and refines the rest with them.</li>
<li>In <b>Review</b>, show where the result is unsure over the CT, and see per organ what the refinement changed.</li>
</ol>
A segmentation you edit is never overwritten: later results, also those refined from your edits, go to a new segmentation.
See the <a href="https://github.com/InferenceSpecificSeg/InferenceSpecificSeg/blob/main/README.md#in-3d-slicer">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
Method: Chen et al. Inference-specific learning for improved medical image segmentation.
Medical Physics, 2025. doi:10.1002/mp.17883.<br>
Optional loss: Chen et al. Adaptive region-specific loss for improved medical image segmentation.
IEEE Transactions on Pattern Analysis and Machine Intelligence, 2023.<br>
Built on 3D Slicer, PyTorch and MONAI.
""")


DEFAULT_SETTINGS = RunSettings()


@parameterNodeWrapper
class InferenceSpecificSegParameterNode:
    """inputVolume: the CT to segment. model: "demo" or the folder of an installed model package.
    device, steps (fine-tuning steps), alignment, momentum (m in P = m P + (1 - m) P_t), loss:
    the run's options. outputSegmentation: the result of the latest run."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    model: str = models.DEMO_MODEL
    device: Device = DEFAULT_SETTINGS.device
    steps: Annotated[int, WithinRange(1, 5000)] = DEFAULT_SETTINGS.steps
    alignment: AlignmentMode = DEFAULT_SETTINGS.alignment
    momentum: Annotated[float, WithinRange(0.0, 0.99), Decimals(2), SingleStep(0.05)] = DEFAULT_SETTINGS.momentum
    loss: Loss = DEFAULT_SETTINGS.loss
    outputSegmentation: slicer.vtkMRMLSegmentationNode


class InferenceSpecificSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 300

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._deviceInfo = None  # the worker's answer to `isseg devices` (asked once, in the background)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InferenceSpecificSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = InferenceSpecificSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        addModelMenu = qt.QMenu(self.ui.addModelButton)
        addModelMenu.addAction(_("Model package folder...")).triggered.connect(self.onAddModelFolder)
        addModelMenu.addAction(_("Model package .zip file...")).triggered.connect(self.onAddModelZip)
        self.ui.addModelButton.setMenu(addModelMenu)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.refineFromEditsButton.connect("clicked(bool)", self.onRefineFromEditsButton)
        self.ui.uncertaintyCheckBox.connect("toggled(bool)", self.logic.run.showUncertainty)
        self.logic.run.onResultEdited = self.updateRefineFromEditsButton  # the user painted, erased, added a segment
        self.ui.runFolderLabel.connect("linkActivated(QString)", self.onRunFolderLink)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        self.ui.demoWarningLabel.text = _(
            "The demo model is trained on generated phantoms and will not find organs on a real CT. Press "
            "'Load demo phantom' to see what it does, or add a model package trained on real CTs.")

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)
        self.devicePoller = WorkerTaskPoller(qt.QTimer(), self.onDeviceAnswer, self.POLL_INTERVAL_MS)
        self.phantomPoller = WorkerTaskPoller(qt.QTimer(), self.onPhantomWritten, self.POLL_INTERVAL_MS)
        self.installPoller = WorkerTaskPoller(qt.QTimer(), self.onModelInstalled, self.POLL_INTERVAL_MS,
                                              self.onInstallProgress)

        self.refreshModelList()
        self.initializeParameterNode()
        self.showStatus()
        if not dependencies.missingPackages():  # otherwise the first Start installs them, then asks
            self.startDeviceQuery()

    def onReload(self) -> None:
        """Slicer's Reload re-imports only this file: re-import the library first, leaves before their users."""
        import importlib
        import sys

        for name in LIBRARY_MODULES_IN_IMPORT_ORDER:
            if f"InferenceSpecificSegLib.{name}" in sys.modules:
                importlib.reload(sys.modules[f"InferenceSpecificSegLib.{name}"])
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """Slicer is unloading the module (on exit, before it deletes the scene, whose destructor closes it once
        more): end the run and leave nothing connected to the scene, the parameter node included."""
        self.pollTimer.stop()
        for poller in (self.devicePoller, self.phantomPoller, self.installPoller):
            poller.stop()
        self.logic.run.stopNow()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        # The run's nodes are about to go away: end the worker instead of leaving it running.
        self.pollTimer.stop()
        self.logic.run.stopNow()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """The model list and device line are not bound by the wrapper: follow the parameter node here."""
        index = self.ui.modelComboBox.findData(self._parameterNode.model)
        if index < 0:  # the package was removed from disk since the scene was saved
            self._parameterNode.model = models.DEMO_MODEL
            return
        if index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = index
        # Network kind, labels, atlas size, licence and citation of the selected model (read from model.json).
        self.ui.modelComboBox.toolTip = models.modelDetailsText(self._parameterNode.model)
        volume = self._parameterNode.inputVolume
        self.ui.demoWarningLabel.visible = bool(self._parameterNode.model == models.DEMO_MODEL and volume
                                                and not isDemoPhantom(volume))
        if self._deviceInfo is not None:
            self.ui.deviceInfoLabel.text = self._deviceInfo.describe(self._parameterNode.device.value)
        self.showStatus()

    def refreshModelList(self) -> None:
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for entry in models.availableModels(self.logic.modelsDirectory):
            self.ui.modelComboBox.addItem(entry.title, entry.location)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        if self._parameterNode:
            self.onParameterNodeModified()

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Select a model package folder"))
        if folder:
            self.installModel(folder)

    def onAddModelZip(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Select a model package .zip file"), "",
                                              _("Model package (*.zip)"))
        if path:
            self.installModel(path)

    def installModel(self, source: str) -> None:
        """Check and copy the package in a worker process (an atlas can be gigabytes); onModelInstalled follows."""
        try:
            self.installPoller.start(self.logic.run.startWorkerTask(
                ["install", source, self.logic.modelsDirectory], 3600.0, models.__name__))
        except WorkerError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("Not a usable model package"))
            return
        self.ui.addModelButton.enabled = False
        self.ui.statusLabel.text = _("Installing the model package...")

    def onInstallProgress(self, task) -> None:
        progress = task.lastEvent("progress")
        if progress:
            self.ui.statusLabel.text = _("Installing the model package: {percent} % of {size} MB.").format(
                percent=100 * progress["step"] // max(progress["total"], 1), size=round(progress["total"] / 1e6))

    def onModelInstalled(self, task) -> None:
        self.ui.addModelButton.enabled = True
        installed = task.lastEvent("done")
        if installed is None:
            slicer.util.errorDisplay(task.failureText(), windowTitle=_("Not a usable model package"))
            return
        self.refreshModelList()
        self._parameterNode.model = installed["location"]
        self.ui.statusLabel.text = _("Installed the model '{title}'.").format(title=installed["title"]) + "\n" + \
            models.modelDetailsText(installed["location"])

    def onStartButton(self) -> None:
        if self.logic.run.status.active:
            self.logic.run.cancel()
            self.showStatus()
            return
        if not self.ensureDependencies():
            return
        parameters = self._parameterNode
        # The device answer is not waited for: the run resolves the device itself, the line follows when it comes.
        self.startDeviceQuery()
        with slicer.util.tryWithErrorDisplay(_("Could not start the run."), waitCursor=True):
            self.logic.run.start(parameters.inputVolume, parameters.model, self.runSettings())
            slicer.util.setSliceViewerLayers(background=parameters.inputVolume, fit=True)
            self.pollTimer.start()
        self.showStatus()

    def runSettings(self) -> RunSettings:
        parameters = self._parameterNode
        return RunSettings(parameters.steps, parameters.device, parameters.alignment, parameters.momentum, parameters.loss)

    def onRefineFromEditsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not refine from your edits."), waitCursor=True):
            self.logic.run.refineFromEdits(self.runSettings())
            self.pollTimer.start()
        self.showStatus()

    def updateRefineFromEditsButton(self) -> None:
        """Enabled when the result differs from what the worker published (a cheap check: no voxel is read)."""
        self.ui.refineFromEditsButton.enabled = self.logic.run.canRefineFromEdits()

    def onPollTimer(self) -> None:
        status = self.logic.run.poll()
        # The run goes on while another module is shown: record its result even then.
        parameterNode = self.logic.getParameterNode()
        if status.segmentationNode is not None and parameterNode.outputSegmentation is not status.segmentationNode:
            parameterNode.outputSegmentation = status.segmentationNode
        self.showStatus()
        if not status.active:
            self.pollTimer.stop()
            self.updateRefineFromEditsButton()
            self.logic.run.showUncertainty(self.ui.uncertaintyCheckBox.checked)  # the new map, if shown
            if status.state == RunState.FAILED:
                slicer.util.errorDisplay(status.errorMessage, windowTitle=_("The run failed"))

    def showStatus(self) -> None:
        """Start/Cancel button, progress bar, status line and the enabled state of the inputs."""
        status = self.logic.run.status
        running = status.active
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.startButton.text = _("Cancel") if running else _("Start")
        self.ui.startButton.toolTip = (_("Stop the run; the last result is kept") if running
                                       else _("Segment the selected CT and refine the result for it"))
        self.ui.startButton.enabled = status.state != RunState.CANCELLING and (running or hasInput)
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = status.progress.percent
        self.ui.progressBar.format = status.progress.describe()
        if running and status.segmentationNode is not None:
            self.ui.statusLabel.text = _("Live result: {count} updates shown in '{node}'.").format(
                count=status.resultsLoaded, node=status.segmentationNode.GetName())
        elif status.message:
            self.ui.statusLabel.text = status.message
        self.ui.editButton.enabled = not running and bool(self._parameterNode and self._parameterNode.outputSegmentation)
        if running:
            self.ui.refineFromEditsButton.enabled = False
        self.ui.uncertaintyCheckBox.enabled = self.logic.run.uncertaintyNode is not None
        self.ui.changesLabel.text = describeOrganChanges(status.organChanges) or _(
            "After a run: per organ, what the refinement changed.")
        if not self.ui.logCollapsibleButton.collapsed:
            self.ui.logTextEdit.setPlainText(self.logic.run.logTail())
        failed = status.state == RunState.FAILED and self.logic.run.runDirectory is not None
        self.ui.runFolderLabel.visible = failed
        if failed:
            folderUrl = qt.QUrl.fromLocalFile(str(self.logic.run.runDirectory)).toString()
            self.ui.runFolderLabel.text = f'<a href="{folderUrl}">{_("Open the run folder")}</a>'

    def onRunFolderLink(self, link: str) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl(link))

    def startDeviceQuery(self) -> None:
        """Ask the worker in the background which device it can use (`isseg devices` imports torch: seconds);
        onDeviceAnswer shows the answer. Once answered it is not asked again; after a failure the next Start asks."""
        if self._deviceInfo is not None or self.devicePoller.busy:
            return
        try:
            self.devicePoller.start(self.logic.run.startWorkerTask(["devices"]))
        except WorkerError as error:
            self.ui.deviceInfoLabel.text = _("Device unknown: {error}").format(error=error)
            return
        self.ui.deviceInfoLabel.text = _("Checking which device the worker can use...")

    def onDeviceAnswer(self, query) -> None:
        try:
            self._deviceInfo = deviceInfoFromTask(query)
        except WorkerError as error:
            self.ui.deviceInfoLabel.text = _("Device unknown: {error}").format(error=error)
            return
        shutil.rmtree(query.directory, ignore_errors=True)
        if self._parameterNode:
            self.ui.deviceInfoLabel.text = self._deviceInfo.describe(self._parameterNode.device.value)

    def onLoadPhantomButton(self) -> None:
        """Generate the demo phantom in a worker process (the engine's `isseg phantom`); onPhantomWritten loads it."""
        try:
            self.phantomPoller.start(self.logic.run.startWorkerTask(["phantom", "--output", "."]))  # into the task's folder
        except WorkerError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("Could not generate the demo phantom"))
            return
        self.ui.loadPhantomButton.enabled = False
        self.ui.loadPhantomButton.text = _("Generating the demo phantom...")

    def onPhantomWritten(self, task) -> None:
        self.ui.loadPhantomButton.enabled = True
        self.ui.loadPhantomButton.text = _("Load demo phantom")
        written = task.lastEvent("done")
        if written is None:
            slicer.util.errorDisplay(_("The demo phantom could not be generated: {reason}").format(reason=task.failureText()),
                                     windowTitle=_("Could not generate the demo phantom"))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the demo phantom."), waitCursor=True):
            volumeNode = self.logic.loadDemoPhantom(written)
            self._parameterNode.model = models.DEMO_MODEL
            self._parameterNode.inputVolume = volumeNode
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)

    def ensureDependencies(self) -> bool:
        """Offer to install missing Python packages; True when all are there afterwards."""
        missing = dependencies.missingPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("The run needs these Python packages, which are not installed: {packages}.\n\n"
                  "Install them now? This downloads up to a few gigabytes (PyTorch) and can take several minutes.").format(
                    packages=", ".join(missing)), windowTitle=_("Install Python packages")):
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed. Check the network connection, "
                                               "restart Slicer and try again."), waitCursor=True):
            if dependencies.TORCH in missing:
                self.installTorch()
            requirements = dependencies.pipRequirements(missing)
            if requirements:
                slicer.util.pip_install(requirements)
        shipped = [name for name in missing if name in dependencies.SHIPPED_WITH_SLICER]
        if shipped:
            slicer.util.errorDisplay(_("{packages} came with Slicer in a version this module does not support. Use "
                                       "3D Slicer 5.8 to 5.12.").format(packages=", ".join(shipped)))
            return False
        stillMissing = dependencies.missingPackages()
        if stillMissing:
            slicer.util.errorDisplay(_("These packages are still missing: {packages}. Restart Slicer and press Start "
                                       "again.").format(packages=", ".join(stillMissing)))
        return not stillMissing

    def installTorch(self) -> None:
        """Install PyTorch with the PyTorch extension, which picks the build for the GPU driver (its
        installTorch also imports torch here once; runs themselves never load torch into Slicer)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(_("PyTorch is installed through the PyTorch extension, which is missing: install "
                                 "'PyTorch' in the Extensions Manager, restart Slicer and press Start again.")) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=dependencies.TORCH_VERSION_REQUIREMENT)
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed."))

    def onEditButton(self) -> None:
        segmentationNode, volumeNode = self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(volumeNode)


class InferenceSpecificSegLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node, and `run`: the RefinementLogic on Slicer's scene, with PythonSlicer as
    the worker's interpreter and run folders in Slicer's temporary folder; model packages are installed
    in the user's settings folder. (Composition: ScriptedLoadableModuleLogic.__init__ calls
    super().__init__() without arguments, so the run logic cannot be a second base class.)"""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # PythonSlicer: Slicer's Python as a command-line program (on PATH inside Slicer).
        self.run = RefinementLogic(slicer.mrmlScene, shutil.which("PythonSlicer") or "PythonSlicer",
                                   workDirectory=slicer.app.temporaryPath)
        self.modelsDirectory = models.installedModelsDirectory(os.path.dirname(slicer.app.slicerUserSettingsFilePath))

    def getParameterNode(self):
        return InferenceSpecificSegParameterNode(super().getParameterNode())

    def loadDemoPhantom(self, written: dict):
        """Add the phantom that `isseg phantom` wrote (its done event `written`: ct, truth, segments paths): the CT,
        marked as the module's phantom (markAsDemoPhantom), and its truth as a segmentation. Returns the CT node."""
        volumeNode = slicer.util.loadVolume(written["ct"], {"name": _("Demo phantom CT"), "show": False})
        markAsDemoPhantom(volumeNode)
        addLabelmapAsSegmentation(slicer.mrmlScene, volumeNode, Path(written["truth"]),
                                  readSegmentsFile(Path(written["segments"])), _("Demo phantom truth"))
        return volumeNode


class InferenceSpecificSegTest(ScriptedLoadableModuleTest):
    """Runs the built-in demo model on the demo phantom (generated by the worker) and follows the live result."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LiveRefinementWithDemoModel()

    def waitFor(self, isActive, minutes: float) -> None:
        deadline = time.monotonic() + 60 * minutes
        while isActive():
            self.assertLess(time.monotonic(), deadline, f"Took more than {minutes} minutes")
            slicer.app.processEvents()
            time.sleep(0.1)

    def test_LiveRefinementWithDemoModel(self):
        if dependencies.missingPackages():
            self.skipTest(f"Python packages not installed: {', '.join(dependencies.missingPackages())}")
        logic = InferenceSpecificSegLogic()
        task = logic.run.startWorkerTask(["phantom", "--output", "."])
        self.waitFor(lambda: not task.poll(), minutes=5)
        self.assertIsNotNone(done := task.lastEvent("done"), task.failureText())
        logic.run.start(logic.loadDemoPhantom(done), models.DEMO_MODEL, RunSettings(steps=20, device=Device.CPU))
        self.waitFor(lambda: logic.run.poll().active, minutes=15)
        status = logic.run.status
        self.assertEqual(status.state, RunState.DONE, status.message)
        self.assertGreaterEqual(status.resultsLoaded, 2, "The segmentation should have been updated at least twice")
        self.assertIs(status.segmentationNode.GetScene(), slicer.mrmlScene)
        segmentation = status.segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [segment.name for segment in logic.run.segments] or ["(segments.json was empty)"])
        self.delayDisplay("Test passed")
