"""Stand-in for ``slicer.packaging`` (Base/Python/slicer/packaging/installer.py, Slicer 5.11 previews).

Slicer's ``pip_install`` runs ``uv pip install --dry-run``, then, when ``interactive``, asks the user
to confirm the changes (``InstallationAbortedError`` when they cancel), then installs; a failed dry
run or install raises ``subprocess.CalledProcessError``. The stand-in never installs; tests replace
``pip_install`` to record calls or to raise what Slicer raises.
"""
from __future__ import annotations

from typing import Optional, Union


class InstallationAbortedError(Exception):
    """The user cancelled the confirmation ``pip_install`` asked for."""

    def __init__(self, command: list, dependee: str):
        super().__init__(command, dependee)
        self.command = command
        self.dependee = dependee


def pip_install(args: Optional[Union[str, list]] = None, *, requirements=None, interactive=True):
    raise RuntimeError("the Slicer stand-in does not install packages")
