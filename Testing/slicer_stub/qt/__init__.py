"""Stand-in for PythonQt's ``qt`` module: only ``QTimer.singleShot``, the one Qt call the logic makes.

In Slicer, ``qt.QTimer.singleShot(msec, callable)`` (QTimer::singleShot, Qt 5) schedules the
callable on the GUI event loop. Here due callables run when a test calls
``slicer.app.processEvents()`` (qSlicerCoreApplication / QCoreApplication::processEvents).
"""
from __future__ import annotations

import time

_pending = []  # [(due time in time.monotonic() seconds, callable)]


class QTimer:
    @staticmethod
    def singleShot(msec, callback):
        _pending.append((time.monotonic() + msec / 1000.0, callback))


def _runDueTimers():
    """Run every timer callback whose time has come (callbacks may schedule new ones)."""
    now = time.monotonic()
    due = [entry for entry in _pending if entry[0] <= now]
    for entry in due:
        _pending.remove(entry)
    for _, callback in due:
        callback()
    return len(due)
