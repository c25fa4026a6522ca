"""Stand-in for the PythonQt `qt` module: only the widgets, signals and helpers the module uses, behaving
as Qt does for them (properties as attributes, signals with connect/disconnect, old-style
`widget.connect("signal(args)", slot)`, timers that fire from `slicer.app.processEvents()`)."""

import inspect
import time


def _call(slot, arguments):
    """PythonQt calls a slot with as many of the signal's arguments as the slot accepts."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot(*arguments)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*arguments)
    return slot(*arguments[:sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                                for p in parameters)])


class Signal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot=None):
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def emit(self, *arguments):
        for slot in list(self._slots):
            _call(slot, arguments)


class QObject:
    _signals = ()

    def __init__(self, parent=None):
        self.objectName = ""
        self._blocked = False
        self._properties = {}
        for name in self._signals:
            setattr(self, name, Signal())

    def connect(self, signature, slot):
        """PythonQt's old-style connection: the signal is named by its signature, e.g. "clicked(bool)"."""
        getattr(self, signature.split("(")[0]).connect(slot)

    def blockSignals(self, block):
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def _emit(self, name, *arguments):
        if not self._blocked:
            getattr(self, name).emit(*arguments)

    def setProperty(self, name, value):
        self._properties[name] = value

    def property(self, name):
        return self._properties.get(name)


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled, self.visible, self.toolTip, self.text = True, True, "", ""
        self._children = []
        self._layout = None

    def isWidgetType(self):
        return True

    def findChildren(self, cls=None):
        found = []
        for child in self._children:
            found.append(child)
            found.extend(child.findChildren(cls))
        return [w for w in found if cls is None or isinstance(w, cls)]

    def setLayout(self, layout):
        self._layout = layout
        layout._owner = self

    def layout(self):
        return self._layout

    def setMRMLScene(self, scene):
        self.mrmlScene = scene
        for child in self.findChildren():
            if hasattr(child, "setMRMLScene") and not isinstance(child, type(self)):
                child.setMRMLScene(scene)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class QVBoxLayout:
    def __init__(self, parent=None):
        self._owner = None
        if parent is not None:
            parent.setLayout(self)

    def addWidget(self, widget):
        self._owner._children.append(widget)


QFormLayout = QHBoxLayout = QVBoxLayout


class QLabel(QWidget):
    _signals = ("linkActivated",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.openExternalLinks = False
        self.wordWrap = False


class QPushButton(QWidget):
    _signals = ("clicked", "toggled")

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self.checkable, self.checked, self._menu = text, False, False, None

    def click(self):
        if self.enabled and self.visible:
            self._emit("clicked", False)

    def setMenu(self, menu):
        self._menu = menu

    def menu(self):
        return self._menu


QToolButton = QPushButton


class QCheckBox(QWidget):
    """A check box: setting `checked` (from code or by a click) emits toggled(checked) when it changes, as Qt does;
    a click also emits clicked(checked)."""

    _signals = ("clicked", "toggled")

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self._checked = text, False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, checked):
        if bool(checked) != self._checked:
            self._checked = bool(checked)
            self._emit("toggled", self._checked)

    def setChecked(self, checked):
        self.checked = checked

    def isChecked(self):
        return self._checked

    def click(self):
        if self.enabled and self.visible:
            self.checked = not self._checked
            self._emit("clicked", self._checked)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.minimum, self.maximum, self.format = 0, 0, 100, "%p%"


class QPlainTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.plainText, self.readOnly = "", False

    def setPlainText(self, text):
        self.plainText = text

    def toPlainText(self):
        return self.plainText


class QComboBox(QWidget):
    _signals = ("currentIndexChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items, self._currentIndex = [], -1

    @property
    def currentIndex(self):
        return self._currentIndex

    @currentIndex.setter
    def currentIndex(self, index):
        index = index if 0 <= index < len(self._items) else -1
        if index != self._currentIndex:
            self._currentIndex = index
            self._emit("currentIndexChanged", index)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    @property
    def count(self):
        return len(self._items)

    @property
    def currentText(self):
        return self._items[self._currentIndex][0] if self._currentIndex >= 0 else ""

    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self._currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self._items = []
        self.currentIndex = -1

    def itemText(self, index):
        return self._items[index][0]

    def itemData(self, index):
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def findData(self, data):
        return next((index for index, item in enumerate(self._items) if item[1] == data), -1)


class QSpinBox(QWidget):
    _signals = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self._value = 0, 99, 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = min(max(int(value), self.minimum), self.maximum)  # Qt clamps to the range
        if value != self._value:
            self._value = value
            self._emit("valueChanged", value)


class QAction(QObject):
    _signals = ("triggered",)

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text

    def trigger(self):
        self._emit("triggered", False)


class QMenu(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.actions = []

    def addAction(self, text):
        action = QAction(text, self)
        self.actions.append(action)
        return action


class QTimer(QObject):
    """Fires `timeout` from the application's event loop (`slicer.app.processEvents()`), as Qt does."""

    _signals = ("timeout",)
    active = []  # every started timer; the stand-in application's processEvents fires the due ones

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval, self.singleShot_, self._due = 0, False, None

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def setSingleShot(self, singleShot):
        self.singleShot_ = singleShot

    def start(self, milliseconds=None):
        if milliseconds is not None:
            self.interval = milliseconds
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in QTimer.active:
            QTimer.active.append(self)

    def stop(self):
        self._due = None
        if self in QTimer.active:
            QTimer.active.remove(self)

    def isActive(self):
        return self._due is not None

    @staticmethod
    def singleShot(milliseconds, slot):
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(slot)
        timer.start(milliseconds)

    def _fireIfDue(self, now):
        if self._due is not None and now >= self._due:
            if self.singleShot_:
                self.stop()
            else:
                self._due = now + self.interval / 1000.0
            self._emit("timeout")


class QUrl:
    def __init__(self, url=""):
        self.url = url

    @staticmethod
    def fromLocalFile(path):
        return QUrl("file://" + str(path))

    def toLocalFile(self):
        return self.url[len("file://"):] if self.url.startswith("file://") else ""

    def toString(self):
        return self.url


class QDesktopServices:
    opened = []  # URLs the module asked the desktop to open

    @staticmethod
    def openUrl(url):
        QDesktopServices.opened.append(url.toString() if isinstance(url, QUrl) else str(url))
        return True


class QFileDialog:
    answers = []  # what the next dialogs return, first in first out (the test sets them)

    @staticmethod
    def getExistingDirectory(*arguments):
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""

    @staticmethod
    def getOpenFileName(*arguments):
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""


class QIcon:
    def __init__(self, path=""):
        self.path = path


class QSettings:
    _values = {}

    def value(self, key, default=None):
        return QSettings._values.get(key, default)

    def setValue(self, key, value):
        QSettings._values[key] = value


class Qt:
    WaitCursor = 3
    ShiftModifier = 0x02000000


class QApplication:
    @staticmethod
    def setOverrideCursor(cursor):
        pass

    @staticmethod
    def restoreOverrideCursor():
        pass
