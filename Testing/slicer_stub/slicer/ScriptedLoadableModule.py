"""Stand-in for Base/Python/slicer/ScriptedLoadableModule.py: the four base classes the module derives from."""
from __future__ import annotations

import unittest

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[: -len("Widget")]
        self.parent = parent

    def resourcePath(self, filename):
        raise NotImplementedError("the widget does not run in the stand-in")

    def setup(self):
        pass

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[: -len("Logic")]
        self.isSingletonParameterNode = True


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        print(message)
