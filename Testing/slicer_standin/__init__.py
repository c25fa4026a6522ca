"""A stand-in for the parts of 3D Slicer that the slicer-core wheel lacks (Qt, CTK, the application,
slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper, slicer.i18n and the GUI functions of
slicer.util), so that tests execute InferenceSpecificSeg/InferenceSpecificSeg.py itself on real MRML.
Each part behaves as Slicer's own source at v5.8.1 does (the oldest supported version); APIs that 5.8
lacks raise AttributeError (see `restrictToSlicer58`)."""

import sys
import time
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

STANDIN = Path(__file__).resolve().parent
# Methods of vtkSegment that exist only from Slicer 5.10 on (Libs/vtkSegmentationCore/vtkSegment.h: v5.8.1
# declares GetTerminologyEntryTagName and SetTag/GetTag; v5.10.0 adds these three).
SEGMENT_METHODS_SINCE_5_10 = ("SetTerminology", "GetTerminology", "HasTerminology")


def restrictToSlicer58(slicer):
    """Make every vtkSegment (made in Python or in C++) raise AttributeError for the 5.10+ methods."""
    base = slicer.vtkSegment

    class vtkSegment58(base):
        def __getattribute__(self, name):
            if name in SEGMENT_METHODS_SINCE_5_10:
                raise AttributeError(f"'vtkSegment' object has no attribute '{name}' (not in Slicer 5.8)")
            return super().__getattribute__(name)

    base.override(vtkSegment58)


class _ModuleManager:
    def __init__(self):
        import qt

        self.moduleAboutToBeUnloaded = qt.Signal()


class CoreIOManager:
    """slicer.app.coreIOManager(), which slicer.util.loadVolume calls: reads a "VolumeFile" as Slicer 5.8.1's
    qSlicerVolumesReader::load does (vtkSlicerVolumesLogic.AddArchetypeVolume with the node name, default the
    file's base name, and the option bits of labelmap, center, singleFile, autoWindowLevel, discardOrientation).
    No fileType: loadVolume names the type itself, and a caller that leaves it to Slicer should fail here."""

    OPTION_BITS = (("labelmap", 0x1), ("center", 0x2), ("singleFile", 0x4), ("autoWindowLevel", 0x8),
                   ("discardOrientation", 0x10))

    def loadNodes(self, fileType, properties, loadedNodes, userMessages=None):
        import slicer

        if fileType != "VolumeFile":
            raise RuntimeError(f"the stand-in reads no {fileType}")
        fileName = properties["fileName"]
        logic = slicer.vtkSlicerVolumesLogic()
        logic.SetMRMLScene(slicer.mrmlScene)
        options = sum(bit for key, bit in self.OPTION_BITS if properties.get(key))
        node = logic.AddArchetypeVolume(fileName, properties.get("name", Path(fileName).name.split(".")[0]), options, None)
        if node is not None:
            loadedNodes.AddItem(node)
        return node is not None


class Application:
    """slicer.app: the paths and the event loop the module uses. `processEvents` fires due QTimers."""

    def __init__(self, settingsDirectory: Path, temporaryDirectory: Path):
        self.temporaryPath = str(temporaryDirectory)
        self.slicerUserSettingsFilePath = str(Path(settingsDirectory) / "Slicer.ini")
        self._moduleManager = _ModuleManager()
        self._coreIOManager = CoreIOManager()
        self.selectedModule, self.modulePaths = None, {}

    def selectModule(self, name):
        self.selectedModule = name

    def modulePath(self, moduleName):
        return self.modulePaths[moduleName]

    def moduleManager(self):
        return self._moduleManager

    def coreIOManager(self):
        return self._coreIOManager

    def processEvents(self):
        import qt

        now = time.monotonic()
        for timer in list(qt.QTimer.active):
            timer._fireIfDue(now)

    def testingEnabled(self):
        return False

    def translate(self, context, text):
        return text

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass


def loadUI(path):
    """slicer.util.loadUI: the widget tree of a .ui file, with each widget's objectName, its properties
    (text, toolTip, enabled, ...) and dynamic properties (SlicerParameterName)."""
    import ctk
    import qt

    import slicer

    classes = {**{name: getattr(qt, name) for name in dir(qt)}, **{name: getattr(ctk, name) for name in dir(ctk)},
               "qMRMLWidget": slicer.qMRMLWidget, "qMRMLNodeComboBox": slicer.qMRMLNodeComboBox}

    def build(element):
        className = element.get("class")
        if className not in classes:
            raise RuntimeError(f"the stand-in has no widget class {className} (from {path})")
        widget = classes[className]()
        widget.objectName = element.get("name")
        for prop in element.findall("property"):
            value = prop[0]
            text = value.text or ""
            parsed = {"bool": lambda: text == "true", "number": lambda: int(text), "double": lambda: float(text)}.get(
                value.tag, lambda: text)()
            if prop.get("stdset") == "0":
                widget.setProperty(prop.get("name"), parsed)
            elif prop.get("name") not in ("geometry", "sizePolicy", "alignment", "orientation"):
                setattr(widget, prop.get("name"), parsed)
        for child in element.iter("widget"):
            if child is not element and _parentWidget(element, child):
                widget._children.append(build(child))
        return widget

    def _parentWidget(ancestor, child):
        """True when `child`'s nearest widget ancestor is `ancestor` (layouts and items in between)."""
        def search(node, nearest):
            for sub in node:
                if sub is child:
                    return nearest is ancestor
                found = search(sub, sub if sub.tag == "widget" else nearest)
                if found is not None:
                    return found
            return None
        return bool(search(ancestor, ancestor))

    return build(ElementTree.parse(path).getroot().find("widget"))


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for child in [widget, *widget.findChildren()]:
        if child.objectName:
            setattr(ui, child.objectName, child)
    return ui


class Dialogs:
    """What slicer.util's message boxes showed, and what the confirmations answer (the test sets it)."""

    def __init__(self):
        self.shown, self.confirm = [], True

    def error(self, text, windowTitle=None, **kwargs):
        self.shown.append(("error", text))

    def confirmOkCancel(self, text, windowTitle=None, **kwargs):
        self.shown.append(("confirm", text))
        return self.confirm


def install(settingsDirectory: Path, temporaryDirectory: Path, scene):
    """Put the stand-in in place with `scene` as slicer.mrmlScene; returns (application, dialogs)."""
    sys.path.insert(0, str(STANDIN))
    import ctk  # noqa: F401  (stand-in, from STANDIN)
    import qt

    import slicer
    import slicer.util

    from . import parameter_node_wrapper, scripted_module

    class qMRMLWidget(qt.QWidget):
        pass

    class qMRMLNodeComboBox(qt.QWidget):
        _signals = ("currentNodeChanged",)

        def __init__(self, parent=None):
            super().__init__(parent)
            self._node, self.mrmlScene, self.nodeTypes = None, None, []

        def currentNode(self):
            return self._node

        def setCurrentNode(self, node):
            if node is not self._node:
                self._node = node
                self._emit("currentNodeChanged", node)

    application, dialogs = Application(settingsDirectory, temporaryDirectory), Dialogs()
    slicer.app, slicer.mrmlScene = application, scene
    slicer.qMRMLWidget, slicer.qMRMLNodeComboBox = qMRMLWidget, qMRMLNodeComboBox
    editor = types.SimpleNamespace(segmentationNode=None, sourceVolumeNode=None)
    editor.setSegmentationNode = lambda node: setattr(editor, "segmentationNode", node)
    editor.setSourceVolumeNode = lambda node: setattr(editor, "sourceVolumeNode", node)
    segmentEditorWidget = types.SimpleNamespace(editor=editor)
    representation = types.SimpleNamespace(self=lambda: segmentEditorWidget)
    slicer.modules = types.SimpleNamespace(
        segmenteditor=types.SimpleNamespace(widgetRepresentation=lambda: representation))
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = scripted_module
    sys.modules["slicer.parameterNodeWrapper"] = slicer.parameterNodeWrapper = parameter_node_wrapper
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    i18n.getContext = lambda sourceFile: Path(sourceFile).stem
    sys.modules["slicer.i18n"] = slicer.i18n = i18n
    gui = {"loadUI": loadUI, "childWidgetVariables": childWidgetVariables, "errorDisplay": dialogs.error,
           "confirmOkCancelDisplay": dialogs.confirmOkCancel, "mainWindow": lambda: None,
           "setSliceViewerLayers": lambda **kwargs: None, "selectModule": application.selectModule,
           "modulePath": application.modulePath}
    for name, function in gui.items():
        setattr(slicer.util, name, function)
    restrictToSlicer58(slicer)
    return application, dialogs
