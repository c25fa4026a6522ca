"""Stand-in for PythonQt's `ctk` module: the CTK widgets the module's .ui uses."""

from qt import QPushButton, QWidget, Signal


class ctkCollapsibleButton(QPushButton):
    def __init__(self, parent=None):
        super().__init__("", parent)
        self.collapsed = False


class ctkSliderWidget(QWidget):
    _signals = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.decimals, self.singleStep, self._value = 0.0, 99.0, 2, 1.0, 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = round(min(max(float(value), self.minimum), self.maximum), self.decimals)
        if value != self._value:
            self._value = value
            self._emit("valueChanged", value)


__all__ = ["ctkCollapsibleButton", "ctkSliderWidget", "Signal"]
