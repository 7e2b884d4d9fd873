"""The core's Python packages beyond Slicer's bundled numpy/SimpleITK, installed into Slicer's Python on demand."""

from __future__ import annotations

import importlib

from ..errors import InputError

#: Python packages the core needs beyond Slicer's bundled numpy/SimpleITK (import name -> pip name).
PYTHON_REQUIREMENTS = {"scipy": "scipy", "pydicom": "pydicom"}


def ensure_python_requirements(need_elastix: bool = False) -> None:
    """Install the core's missing Python packages into Slicer's Python (once, with the user's consent in the GUI).

    ``need_elastix``: also itk-elastix (the core's elastix engine). Raises InputError when the user declines.
    """
    import slicer

    wanted = dict(PYTHON_REQUIREMENTS)
    if need_elastix:
        wanted["itk"] = "itk-elastix"
    missing = []
    for module, package in wanted.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if not missing:
        return
    if slicer.app.commandOptions().noMainWindow or slicer.util.confirmOkCancelDisplay(
            "Multimodal Prealign needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
        slicer.util.pip_install(missing)
    else:
        raise InputError("Python packages " + ", ".join(missing) + " are missing",
                         "accept the installation, or run slicer.util.pip_install(" + repr(missing) + ")")
