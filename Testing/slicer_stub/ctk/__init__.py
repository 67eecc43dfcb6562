"""Stand-in for PythonQt's ``ctk`` module: only ``ctkPathLineEdit``, the CTK class the module names.

Libs/Widgets/ctkPathLineEdit.h: the ``currentPath`` property (QString) and the
``currentPathChanged(const QString&)`` signal, which ctkPathLineEdit.cpp emits when the edited text
is acceptable input (here: any text set).
"""
from __future__ import annotations

import inspect


class _Signal:
    """A PythonQt signal as Python sees it: ``connect`` / ``disconnect`` a callable. PythonQt calls
    a callable with as many of the signal's arguments as it takes (Slicer's connectors connect
    ``changed()``, which takes none, to signals with one)."""

    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot):
        self._slots.remove(slot)

    def _emit(self, *args):
        for slot in list(self._slots):
            taken = [p for p in inspect.signature(slot).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            slot(*args[:len(taken)])


class ctkPathLineEdit:
    def __init__(self, parent=None):
        self._currentPath = ""
        self.currentPathChanged = _Signal()

    @property
    def currentPath(self) -> str:
        return self._currentPath

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        self._currentPath = str(path)
        self.currentPathChanged._emit(self._currentPath)
