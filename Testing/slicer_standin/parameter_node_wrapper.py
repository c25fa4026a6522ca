"""Stand-in for slicer.parameterNodeWrapper (Base/Python/slicer/parameterNodeWrapper/ at v5.8.1), for the
types the module uses: str, int, float, enum.Enum and MRML nodes, with WithinRange/Decimals/SingleStep.
As there: values live in the vtkMRMLScriptedModuleNode (numbers and strings as parameters, an enum as its
member *name*, a node as a node reference), a missing parameter gets its default when the wrapper is made,
writing an out-of-range number raises ValueError and a wrong type TypeError, connectGui binds every widget
whose SlicerParameterName property names a parameter (two-way), and the wrapper forwards
AddObserver/RemoveObserver/StartModify/EndModify/Modified to the node."""

import enum
import typing

import vtk

import slicer


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Decimals:
    def __init__(self, value):
        self.value = value


class SingleStep:
    def __init__(self, value):
        self.value = value


class _Parameter:
    def __init__(self, name, type_, annotations, default):
        self.name, self.type, self.annotations, self.default = name, type_, annotations, default

    def isNode(self):
        return isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)

    def isEnum(self):
        return isinstance(self.type, type) and issubclass(self.type, enum.Enum)

    def write(self, node, value):
        if value is not None and not isinstance(value, self.type) and not (self.type is float and isinstance(value, int)):
            raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")
        for annotation in self.annotations:
            if isinstance(annotation, WithinRange):
                annotation.validate(value)
        if self.isNode():
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.isEnum():
            node.SetParameter(self.name, value.name)
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if self.isNode():
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.isEnum():
            try:
                return self.type[text]
            except KeyError as error:
                raise ValueError(f"Found {text!r} in parameter node but it is not a name in {self.type!r}") from error
        return self.type(text)

    def annotation(self, kind):
        return next((a for a in self.annotations if isinstance(a, kind)), None)


def _connector(widget, parameter, wrapper):
    """(write the value into the widget, the widget's change signal, read the widget)."""
    className = type(widget).__name__
    if className == "qMRMLNodeComboBox" and parameter.isNode():
        return widget.setCurrentNode, widget.currentNodeChanged, widget.currentNode
    if className == "QComboBox" and parameter.isEnum():
        members = list(parameter.type)
        label = getattr(parameter.type, "label", lambda member: member.name)
        wasBlocked = widget.blockSignals(True)
        widget.clear()
        for member in members:
            widget.addItem(label(member))
        widget.blockSignals(wasBlocked)
        return (lambda value: setattr(widget, "currentIndex", members.index(value)), widget.currentIndexChanged,
                lambda: members[widget.currentIndex])
    if className in ("QSpinBox", "ctkSliderWidget") and parameter.type in (int, float):
        limits = parameter.annotation(WithinRange)
        if limits:
            widget.minimum, widget.maximum = limits.minimum, limits.maximum
        for kind, attribute in ((Decimals, "decimals"), (SingleStep, "singleStep")):
            if parameter.annotation(kind):
                setattr(widget, attribute, parameter.annotation(kind).value)
        return lambda value: setattr(widget, "value", value), widget.valueChanged, lambda: parameter.type(widget.value)
    raise RuntimeError(f"No GUI connector for {className} and parameter type {parameter.type}")


def parameterNodeWrapper(classtype):
    hints = typing.get_type_hints(classtype, include_extras=True)
    parameters = {}
    for name, hint in hints.items():
        type_, annotations = (hint.__origin__, hint.__metadata__) if typing.get_origin(hint) is typing.Annotated else (hint, ())
        default = getattr(classtype, name, None)
        if default is None and isinstance(type_, type) and issubclass(type_, enum.Enum):
            default = next(iter(type_))
        elif default is None and type_ in (int, float, str):
            default = type_()
        parameters[name] = _Parameter(name, type_, annotations, default)
        setattr(classtype, name, property(lambda self, p=parameters[name]: p.read(self.parameterNode),
                                          lambda self, value, p=parameters[name]: self._write(p, value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guis, self._nextTag, self._updatingGui = {}, 0, False
        for parameter in parameters.values():
            if not parameterNode.HasParameter(parameter.name):
                parameter.write(parameterNode, parameter.default)

    def _write(self, parameter, value):
        wasModifying = self.parameterNode.StartModify()
        try:
            parameter.write(self.parameterNode, value)
        finally:
            self.parameterNode.EndModify(wasModifying)

    def connectGui(self, gui):
        widgets = gui.findChildren() if getattr(gui, "isWidgetType", lambda: False)() else list(vars(gui).values())
        bindings = {}
        for widget in widgets:
            name = widget.property("SlicerParameterName")
            if name:
                if name not in parameters:
                    raise ValueError(f"Cannot find a param with the given name: {name}")
                bindings[name] = _connector(widget, parameters[name], self)
        tag, self._nextTag = self._nextTag, self._nextTag + 1
        slots = {}
        for name, (write, signal, read) in bindings.items():
            write(getattr(self, name))

            def onChanged(*_, name=name, read=read):
                if not self._updatingGui:
                    setattr(self, name, read())

            signal.connect(onChanged)
            slots[name] = (signal, onChanged)
        self._guis[tag] = (bindings, slots)

        def updateGui(caller, event):
            if self._updatingGui or tag not in self._guis:
                return
            self._updatingGui = True
            try:
                for name, (write, _, _) in self._guis[tag][0].items():
                    write(getattr(self, name))
            finally:
                self._updatingGui = False

        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, updateGui)
        return tag

    def disconnectGui(self, tag):
        if tag in self._guis:
            for signal, slot in self._guis.pop(tag)[1].values():
                signal.disconnect(slot)

    members = {
        "__init__": __init__, "_write": _write, "connectGui": connectGui, "disconnectGui": disconnectGui,
        "allParameters": parameters,
        "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
        "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
        "StartModify": lambda self: self.parameterNode.StartModify(),
        "EndModify": lambda self, wasModifying: self.parameterNode.EndModify(wasModifying),
        "Modified": lambda self: self.parameterNode.Modified(),
    }
    for name, member in members.items():
        setattr(classtype, name, member)
    return classtype
