"""Stand-in for the few VTK classes the VAEUDASegmentation module and its tests use.

Signatures follow VTK's Python wrapping (Common/Core/vtkCommand.h, Common/Core/vtkStringArray.h,
Common/Math/vtkMatrix4x4.h, Wrapping/PythonCore/PyVTKReference.cxx ``reference``).
"""
from __future__ import annotations

import numpy as np


class vtkMatrix4x4:
    """4x4 matrix, identity on creation (Common/Math/vtkMatrix4x4.h)."""

    def __init__(self):
        self._m = np.eye(4)

    def SetElement(self, i, j, value):
        self._m[i, j] = float(value)



class vtkCommand:
    """Event IDs (Common/Core/vtkCommand.h, enum EventIds): the one the module observes."""
    ModifiedEvent = 33


class vtkStringArray:
    """Array of strings (Common/Core/vtkStringArray.h)."""

    def __init__(self):
        self._values = []

    def InsertNextValue(self, value):
        self._values.append(str(value))
        return len(self._values) - 1

    def GetNumberOfValues(self):
        return len(self._values)

    def GetValue(self, index):
        return self._values[index]

    def SetValue(self, index, value):
        """VTK writes into an allocated slot without a range check; the stand-in raises for one out of range."""
        self._values[index] = str(value)


class reference:
    """``vtk.reference``: a mutable holder for C++ output arguments such as vtkSegment::GetTag's value."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value

    def set(self, value):
        self._value = value

    def __str__(self):
        return str(self._value)
