"""Stand-in for Base/Python/slicer/parameterNodeWrapper: the decorator and the two validators the module names.

The widget (the only user of the wrapped parameter node) does not run outside Slicer, so the
decorator only marks the class; Slicer's real one adds typed properties and ``connectGui``.
"""
from __future__ import annotations


def parameterNodeWrapper(classtype=None):
    """wrapper.py ``parameterNodeWrapper``: usable as ``@parameterNodeWrapper`` or ``@parameterNodeWrapper()``."""
    def wrap(cls):
        cls._is_parameter_node_wrapper = True
        return cls
    return wrap if classtype is None else wrap(classtype)


class WithinRange:
    """validators.py ``WithinRange(minimum, maximum)``."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Choice:
    """validators.py ``Choice(choices)``."""

    def __init__(self, choices):
        self.choices = choices
