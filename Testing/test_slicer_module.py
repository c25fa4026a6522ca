"""InferenceSpecificSeg/InferenceSpecificSeg.py itself, run as Slicer runs it: the module file imported by
its name, Module/Widget/Logic constructed as Slicer constructs them, setup(), the panel driven through its
widgets, a real worker (the protocol stand-in CLI) polled by the panel's own timer. Qt, CTK and the
scripted-module base classes come from Testing/slicer_standin (behaving as Slicer 5.8.1's source, and
without the vtkSegment methods that 5.8 lacks); MRML is real (slicer-core)."""

import importlib.util
import os
import sys
import time
import types

import numpy as np
import pytest

from slicer_test_support import MODULE_DIRECTORY, addVolume, newScene, processGroupMembers, writeFakeEngine

import slicer
import vtk

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")


@pytest.fixture
def slicerApp(tmp_path, monkeypatch):
    import slicer_standin

    monkeypatch.setattr(sys, "path", list(sys.path))
    savedModules = dict(sys.modules)
    saved = {name: getattr(slicer, name, None) for name in ("app", "mrmlScene", "modules", "util")}
    scene = newScene()
    settings, temporary = tmp_path / "settings", tmp_path / "temporary"
    settings.mkdir(), temporary.mkdir()
    application, dialogs = slicer_standin.install(settings, temporary, scene)
    application.modulePaths["InferenceSpecificSeg"] = str(MODULE_DIRECTORY / "InferenceSpecificSeg.py")
    # VTK reports an exception in an observer through sys.excepthook and goes on: collect them, none may occur.
    observerErrors = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: observerErrors.append(error))
    yield types.SimpleNamespace(app=application, dialogs=dialogs, scene=scene, tmp=tmp_path, observerErrors=observerErrors)
    import qt

    # Slicer's exit: the module manager announces the unloading of each module (the widget's cleanup), then the
    # scene goes, whose destructor closes it (StartCloseEvent, EndCloseEvent) once more.
    application.moduleManager().moduleAboutToBeUnloaded.emit("InferenceSpecificSeg")
    scene.Clear(1)
    assert observerErrors == []
    for timer in list(qt.QTimer.active):
        timer.stop()
    slicer.vtkSegment.override(None)
    for name, value in saved.items():
        setattr(slicer, name, value)
    for name in set(sys.modules) - set(savedModules):
        del sys.modules[name]
    sys.modules.update(savedModules)


def loadModule(slicerApp, workerModuleDirectory=None):
    """Import the module file as Slicer's scripted-module factory does and build Module, Widget (setup)."""
    import qt

    spec = importlib.util.spec_from_file_location("InferenceSpecificSeg", MODULE_DIRECTORY / "InferenceSpecificSeg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["InferenceSpecificSeg"] = module
    spec.loader.exec_module(module)
    parent = types.SimpleNamespace(path=str(MODULE_DIRECTORY / "InferenceSpecificSeg.py"), isEntered=True)
    module.InferenceSpecificSeg(parent)
    widgetParent = slicer.qMRMLWidget()
    widgetParent.isEntered = True  # qSlicerScriptedLoadableModuleWidget's property: the module is shown
    widgetParent.setLayout(qt.QVBoxLayout())
    widgetParent.setMRMLScene(slicer.mrmlScene)
    widget = module.InferenceSpecificSegWidget(widgetParent)
    widget.setup()
    if workerModuleDirectory is not None:  # the protocol stand-in CLI instead of the engine, run by this Python
        widget.logic.run.moduleDirectory = workerModuleDirectory
        widget.logic.run.pythonExecutable = sys.executable
    return module, widget


def runEventLoop(slicerApp, condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        slicerApp.app.processEvents()
        time.sleep(0.02)


def pickVolumeAndModel(widget, volumeNode, model):
    """Pick the volume in its selector and `model` in the model list (listed there as an installed package is;
    the protocol stand-in CLI reads the behaviour from --model)."""
    widget.ui.inputVolumeSelector.setCurrentNode(volumeNode)
    widget.ui.modelComboBox.addItem(model, model)
    widget.ui.modelComboBox.currentIndex = widget.ui.modelComboBox.findData(model)
    assert widget._parameterNode.model == model


@pytest.fixture
def volumeNode(slicerApp):
    return addVolume(slicerApp.scene, np.full((10, 12, 14), -500, np.int16), spacing=(1.5, 1.5, 3.0), name="CT")


def test_module_widget_and_logic_construct_as_in_slicer(slicerApp, volumeNode):
    module, widget = loadModule(slicerApp)
    assert isinstance(widget.logic, module.InferenceSpecificSegLogic)
    assert widget.logic.moduleName == "InferenceSpecificSeg"
    parameters = widget._parameterNode
    assert parameters.inputVolume is volumeNode  # the first volume of the scene is preselected
    assert widget.ui.startButton.enabled and widget.ui.startButton.text == "Start"
    assert slicerApp.scene.GetSingletonNode("InferenceSpecificSeg", "vtkMRMLScriptedModuleNode") is parameters.parameterNode


def test_start_runs_to_done_with_terminology_on_slicer_58(slicerApp, volumeNode):
    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    pickVolumeAndModel(widget, volumeNode, "fake-slow")
    widget._parameterNode.steps = 6
    widget.ui.startButton.click()
    assert widget.ui.startButton.text == "Cancel"
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    status = widget.logic.run.status
    assert status.state.value == "done", status.message
    node = widget._parameterNode.outputSegmentation
    assert node is status.segmentationNode and slicerApp.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    segment = node.GetSegmentation().GetSegment("label_1")
    entry = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), entry)
    assert "^10200004^Liver~" in str(entry)  # SCT code of the liver, in Slicer's terminology entry string
    assert slicerApp.dialogs.shown == []
    assert widget.ui.editButton.enabled


def startLongRun(slicerApp, volumeNode):
    """The panel with a long run going that has shown its first result; (widget, worker process id)."""
    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    pickVolumeAndModel(widget, volumeNode, "fake-slow")
    widget._parameterNode.steps = 500
    widget.ui.startButton.click()
    runEventLoop(slicerApp, lambda: widget.logic.run.status.resultsLoaded >= 1)
    return widget, widget.logic.run.workerProcessId


def test_cancel_mid_run_keeps_the_partial_result(slicerApp, volumeNode):
    widget, workerPid = startLongRun(slicerApp, volumeNode)
    widget.ui.startButton.click()  # the button reads Cancel while running
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    assert widget.logic.run.status.state.value == "cancelled"
    assert widget._parameterNode.outputSegmentation.GetName() == "CT ISL (partial)"
    assert processGroupMembers(workerPid) == []
    assert widget.ui.startButton.text == "Start"


def test_closing_the_scene_mid_run_ends_the_worker(slicerApp, volumeNode):
    widget, workerPid = startLongRun(slicerApp, volumeNode)
    started = time.monotonic()
    slicerApp.scene.Clear(0)  # fires StartCloseEvent and EndCloseEvent, as File > Close Scene does
    assert time.monotonic() - started < 1.0  # the GUI thread does not wait for the worker to go
    assert not widget.logic.run.status.active
    runEventLoop(slicerApp, lambda: processGroupMembers(workerPid) == [], seconds=5)
    assert widget._parameterNode is not None and widget._parameterNode.inputVolume is None


def test_edit_in_segment_editor_hands_over_the_result(slicerApp, volumeNode):
    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    pickVolumeAndModel(widget, volumeNode, "fake")
    widget._parameterNode.steps = 2
    widget.ui.startButton.click()
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    widget.ui.editButton.click()
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    assert slicerApp.app.selectedModule == "SegmentEditor"
    assert editor.segmentationNode is widget._parameterNode.outputSegmentation and editor.sourceVolumeNode is volumeNode


def test_reload_reloads_the_library_modules(slicerApp, volumeNode, monkeypatch):
    module, widget = loadModule(slicerApp)
    import InferenceSpecificSegLib

    libraryFiles = {path.stem for path in (MODULE_DIRECTORY / "InferenceSpecificSegLib").glob("*.py")} - {"__init__"}
    assert set(module.LIBRARY_MODULES_IN_IMPORT_ORDER) == libraryFiles
    reloaded = []
    monkeypatch.setattr(slicer.util, "reloadScriptedModule", lambda name: reloaded.append(name))
    import importlib

    # Recorded, not executed: re-executing the library would give other tests' imports stale classes.
    monkeypatch.setattr(importlib, "reload", lambda m: reloaded.append(m.__name__) or m)
    widget.onReload()
    assert reloaded == [f"InferenceSpecificSegLib.{name}" for name in module.LIBRARY_MODULES_IN_IMPORT_ORDER
                        if f"InferenceSpecificSegLib.{name}" in sys.modules] + ["InferenceSpecificSeg"]
    assert InferenceSpecificSegLib


def test_after_a_failure_the_log_and_a_link_to_the_run_folder_are_shown(slicerApp, volumeNode):
    import qt

    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    assert not widget.ui.runFolderLabel.visible and widget.ui.logCollapsibleButton.collapsed
    pickVolumeAndModel(widget, volumeNode, "fake-bad-model")
    widget.ui.startButton.click()
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    assert slicerApp.dialogs.shown == [("error", "The model package is damaged. Copy it again.")], widget.logic.run.status
    assert widget.ui.runFolderLabel.visible
    widget.ui.runFolderLabel.linkActivated.emit(str(widget.ui.runFolderLabel.text).split('"')[1])
    assert qt.QDesktopServices.opened[-1] == "file://" + str(widget.logic.run.runDirectory)
    widget.ui.logCollapsibleButton.collapsed = False
    widget.showStatus()
    assert "fake worker starting" in widget.ui.logTextEdit.plainText


def test_closing_the_scene_after_cleanup_calls_nothing_of_the_widget(slicerApp, volumeNode):
    """Slicer unloads a module (moduleAboutToBeUnloaded: the widget's cleanup) before it deletes the scene, whose
    destructor closes it once more: cleanup must leave no observer that could run on a widget being torn down."""
    widget, workerPid = startLongRun(slicerApp, volumeNode)
    slicerApp.app.moduleManager().moduleAboutToBeUnloaded.emit("InferenceSpecificSeg")
    assert widget.Observations == [] and not widget.pollTimer.isActive()
    assert not widget.logic.run.status.active
    runEventLoop(slicerApp, lambda: processGroupMembers(workerPid) == [], seconds=5)
    widget.__dict__.clear()  # what the garbage collector does to a widget in a reference cycle before freeing it
    slicerApp.scene.Clear(0)
    assert slicerApp.observerErrors == []


def test_start_does_not_wait_for_the_device_answer_which_is_shown_when_it_comes(slicerApp, volumeNode, monkeypatch):
    monkeypatch.setenv("FAKE_DEVICES_SECONDS", "1.5")
    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    assert widget.ui.deviceInfoLabel.text.startswith("Device unknown")  # PythonSlicer is not there at setup()
    pickVolumeAndModel(widget, volumeNode, "fake-slow")
    widget._parameterNode.steps = 14  # about 4 s: longer than the device answer takes
    started = time.monotonic()
    widget.ui.startButton.click()
    assert time.monotonic() - started < 1.0 and widget.logic.run.status.active
    assert widget.ui.deviceInfoLabel.text == "Checking which device the worker can use..."
    runEventLoop(slicerApp, lambda: not widget.devicePoller.busy)
    assert widget.ui.deviceInfoLabel.text == "Runs on the CPU (no CUDA GPU found); expect several minutes per run."
    assert widget.logic.run.status.active  # the run went on meanwhile
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    assert widget.logic.run.status.state.value == "done"
    assert not list(slicerApp.tmp.glob("temporary/InferenceSpecificSeg-devices-*"))  # answered: its folder is gone


def test_demo_on_a_real_ct_is_flagged_and_load_demo_phantom_adds_the_phantom_and_its_truth(slicerApp, volumeNode):
    module, widget = loadModule(slicerApp)
    widget.logic.run.pythonExecutable = sys.executable  # the real engine's `isseg phantom`
    assert widget._parameterNode.model == "demo" and widget._parameterNode.inputVolume is volumeNode
    assert widget.ui.demoWarningLabel.visible
    assert "trained on generated phantoms and will not find organs on a real CT" in widget.ui.demoWarningLabel.text
    pickVolumeAndModel(widget, volumeNode, "fake")  # another model: no warning
    assert not widget.ui.demoWarningLabel.visible

    widget.ui.loadPhantomButton.click()
    assert not widget.ui.loadPhantomButton.enabled  # generating, in a worker process
    runEventLoop(slicerApp, lambda: not widget.phantomPoller.busy, seconds=300)
    assert slicerApp.dialogs.shown == []
    assert widget.ui.loadPhantomButton.enabled and widget.ui.loadPhantomButton.text == "Load demo phantom"
    phantomNode = widget._parameterNode.inputVolume
    assert phantomNode is not volumeNode and phantomNode.GetName() == "Demo phantom CT"
    assert widget._parameterNode.model == "demo" and not widget.ui.demoWarningLabel.visible
    assert module.isDemoPhantom(phantomNode) and not module.isDemoPhantom(volumeNode)
    assert phantomNode.GetImageData().GetDimensions() == (96, 96, 64) and phantomNode.GetStorageNode() is not None

    truth = slicerApp.scene.GetFirstNodeByName("Demo phantom truth")
    names = [truth.GetSegmentation().GetNthSegment(i).GetName() for i in range(truth.GetSegmentation().GetNumberOfSegments())]
    assert names == ["liver", "spleen", "kidney_left", "kidney_right", "aorta", "gallbladder"]
    import SimpleITK as sitk

    from slicer_test_support import exportSegmentVoxels, segmentIds

    truthFile = sitk.GetArrayFromImage(sitk.ReadImage(str(next(slicerApp.tmp.glob("temporary/*phantom*/truth.nrrd")))))
    exported = exportSegmentVoxels(slicerApp.scene, truth, segmentIds(truth), phantomNode)
    assert np.array_equal(exported, truthFile)

    widget.ui.inputVolumeSelector.setCurrentNode(volumeNode)  # back to the real CT: the warning again
    assert widget.ui.demoWarningLabel.visible


def test_refine_from_edits_uncertainty_overlay_and_change_list(slicerApp, volumeNode):
    from slicer_test_support import paintSegment

    _, widget = loadModule(slicerApp, writeFakeEngine(slicerApp.tmp))
    sliceView = slicerApp.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    pickVolumeAndModel(widget, volumeNode, "fake")
    assert not widget.ui.refineFromEditsButton.enabled and not widget.ui.uncertaintyCheckBox.enabled
    widget._parameterNode.steps = 2
    widget.ui.startButton.click()
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    result = widget._parameterNode.outputSegmentation
    assert not widget.ui.refineFromEditsButton.enabled  # nothing edited yet
    assert "<td>liver</td>" in widget.ui.changesLabel.text and "<td>0.800</td>" in widget.ui.changesLabel.text
    widget.ui.uncertaintyCheckBox.click()
    assert sliceView.GetForegroundVolumeID() == widget.logic.run.uncertaintyNode.GetID()
    widget.ui.uncertaintyCheckBox.click()
    assert sliceView.GetForegroundVolumeID() is None

    painted = np.zeros((10, 12, 14), bool)
    painted[0:2, 0:3, 0:3] = True
    paintSegment(result, "label_2", painted, volumeNode)  # fires the segmentation's events as the Segment Editor does
    runEventLoop(slicerApp, lambda: widget.ui.refineFromEditsButton.enabled, seconds=10)
    widget.ui.refineFromEditsButton.click()
    assert widget.logic.run.status.active and not widget.ui.refineFromEditsButton.enabled
    runEventLoop(slicerApp, lambda: not widget.logic.run.status.active)
    assert widget.logic.run.status.state.value == "done", widget.logic.run.status.message
    assert widget._parameterNode.outputSegmentation is not result
    assert widget._parameterNode.outputSegmentation.GetName() == "CT ISL from edits"
    assert not widget.ui.refineFromEditsButton.enabled and slicerApp.dialogs.shown == []


def test_add_model_package_installs_in_a_worker_process_with_progress(slicerApp, volumeNode):
    import qt

    from test_slicer_library import writePackage

    _, widget = loadModule(slicerApp)
    widget.logic.run.pythonExecutable = sys.executable
    source = writePackage(slicerApp.tmp / "package", name="Pelvis CT")
    (source / "atlas" / "case0_image.nrrd").write_bytes(b"\0" * 5_000_000)  # something to copy
    qt.QFileDialog.answers.append(str(source))
    started = time.monotonic()
    widget.ui.addModelButton.menu().actions[0].trigger()  # "Model package folder..."
    assert time.monotonic() - started < 1.0 and not widget.ui.addModelButton.enabled
    assert widget.ui.statusLabel.text.startswith("Installing the model package")
    runEventLoop(slicerApp, lambda: not widget.installPoller.busy, seconds=60)
    assert slicerApp.dialogs.shown == []
    assert widget.ui.addModelButton.enabled
    assert widget._parameterNode.model == str(widget.logic.modelsDirectory / "Pelvis_CT")
    assert widget.ui.statusLabel.text.startswith("Installed the model 'Pelvis CT 1.2'.")

    broken = writePackage(slicerApp.tmp / "broken", name="Broken")
    (broken / "model.safetensors").unlink()
    qt.QFileDialog.answers.append(str(broken))
    widget.ui.addModelButton.menu().actions[0].trigger()
    runEventLoop(slicerApp, lambda: not widget.installPoller.busy, seconds=60)
    assert len(slicerApp.dialogs.shown) == 1 and "weights file" in slicerApp.dialogs.shown[0][1]
    assert not (widget.logic.modelsDirectory / "Broken").exists()


def test_the_modules_own_self_test_passes_with_the_real_engine_through_a_launcher(slicerApp, monkeypatch):
    """Slicer's "Reload and Test" runs slicer.selfTests[name]: the module's Test class, on the phantom that the real
    engine writes, refined by the real engine, started through a PythonSlicer that (like CTK's AppLauncher) runs
    the interpreter as its child."""
    from slicer_test_support import LAUNCHER

    binDirectory = slicerApp.tmp / "bin"
    binDirectory.mkdir()
    launcher = binDirectory / "PythonSlicer"
    launcher.write_text(f"#!{sys.executable}\n{LAUNCHER}", encoding="utf-8")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binDirectory}{os.pathsep}{os.environ['PATH']}")
    loadModule(slicerApp)
    slicer.selfTests["InferenceSpecificSeg"]()  # raises on any failed assertion of the self-test
