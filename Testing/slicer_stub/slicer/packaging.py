"""Stand-in for ``slicer.packaging`` (Base/Python/slicer/packaging.py, Slicer 5.11 and later).

Slicer's ``pip_install`` runs pip (a constraints file as ``-c``), with a progress dialog naming the
``requester`` when ``show_progress`` and ``blocking`` on the main thread, plain in testing mode; a
failed install raises ``subprocess.CalledProcessError``. ``slicer.util.pip_install(requirements,
**kwargs)`` delegates to it. Older Slicer has no ``slicer.packaging`` and only
``slicer.util.pip_install(requirements)``. The stand-in never installs; tests replace
``pip_install`` to record calls or to raise what Slicer raises.
"""
from __future__ import annotations


def pip_install(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=True,
                show_progress=True, requester=None, parent=None, logCallback=None, completedCallback=None):
    raise RuntimeError("the Slicer stand-in does not install packages")
