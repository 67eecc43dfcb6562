"""Stand-in for Base/Python/slicer/parameterNodeWrapper: the decorator, the two validators and the
GUI-connector registry (guiConnectors.py, util.py) the module names.

The widget (the only user of the wrapped parameter node) does not run outside Slicer, so the
decorator only marks the class; Slicer's real one adds typed properties and ``connectGui``. The
registry is real: the module's own connector registers with it and is found by ``createGuiConnector``.
"""
from __future__ import annotations

import abc


def parameterNodeWrapper(classtype=None):
    """wrapper.py ``parameterNodeWrapper``: usable as ``@parameterNodeWrapper`` or ``@parameterNodeWrapper()``."""
    def wrap(cls):
        cls._is_parameter_node_wrapper = True
        return cls
    return wrap if classtype is None else wrap(classtype)


class WithinRange:
    """validators.py ``WithinRange(minimum, maximum)``: ``validate`` raises ValueError outside the
    inclusive range."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Choice:
    """validators.py ``Choice(choices)``: ``validate`` raises ValueError for a value not among them."""

    def __init__(self, choices):
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


def unannotatedType(possiblyAnnotatedType):
    """util.py ``unannotatedType``: ``Annotated[T, ...]`` -> ``T``; any other type as it is."""
    import typing
    if typing.get_origin(possiblyAnnotatedType) is typing.Annotated:
        return typing.get_args(possiblyAnnotatedType)[0]
    return possiblyAnnotatedType


class GuiConnector(abc.ABC):
    """guiConnectors.py ``GuiConnector``: the abstract base a connector between a widget and a parameter
    type derives from; ``onChanged(callback)`` connects (``None`` disconnects), ``changed()`` calls it.
    As in Slicer, a subclass that leaves one of the seven abstract methods out cannot be made."""

    @staticmethod
    @abc.abstractmethod
    def canRepresent(widget, datatype) -> bool:
        raise NotImplementedError("Must implement canRepresent")

    @staticmethod
    @abc.abstractmethod
    def create(widget, datatype):
        raise NotImplementedError("Must implement create")

    @abc.abstractmethod
    def _connect(self):
        raise NotImplementedError("Must implement _connect")

    @abc.abstractmethod
    def _disconnect(self):
        raise NotImplementedError("Must implement _disconnect")

    @abc.abstractmethod
    def widget(self):
        raise NotImplementedError("Must implement widget")

    @abc.abstractmethod
    def read(self):
        raise NotImplementedError("Must implement read")

    @abc.abstractmethod
    def write(self, value) -> None:
        raise NotImplementedError("Must implement write")

    def __init__(self):
        super().__init__()
        self._callback = None

    def onChanged(self, callback):
        self._callback = callback
        if self._callback is None:
            self._disconnect()
        else:
            self._connect()

    def changed(self):
        if self._callback:
            self._callback()


_registeredGuiConnectors = []


def parameterNodeGuiConnector(classtype=None):
    """guiConnectors.py ``parameterNodeGuiConnector``: registers a GuiConnector subclass for
    ``createGuiConnector``, as ``@parameterNodeGuiConnector`` or ``@parameterNodeGuiConnector()``."""
    def wrap(cls):
        if not issubclass(cls, GuiConnector):
            raise TypeError("Must be a GuiConnector subclass")
        _registeredGuiConnectors.append(cls)
        return cls
    return wrap if classtype is None else wrap(classtype)


def createGuiConnector(widget, datatype):
    """guiConnectors.py ``createGuiConnector``: the first registered connector that can represent
    ``datatype`` with ``widget`` (Slicer's own connectors come first there; none are stood in)."""
    for connectorType in _registeredGuiConnectors:
        if connectorType.canRepresent(widget, datatype):
            return connectorType.create(widget, datatype)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{type(widget)}'")
