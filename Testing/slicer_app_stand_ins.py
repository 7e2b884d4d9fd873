"""Slicer's own module machinery over slicer-core's real MRML scene, with the application's Qt/CTK part stood in for.

The module file imports ``slicer.parameterNodeWrapper`` and ``slicer.ScriptedLoadableModule``. No package carries
them, so they are Slicer 5.8.1's own files, copied unchanged into ``../shared/vendor/slicer-5.8.1-python`` (see its
README.md). They import ``qt`` and ``ctk`` and name a few ``slicer.qMRML*`` widget classes, which exist only in the
Slicer application; the classes below stand in for exactly those names, and for the few ``slicer.app`` calls the
module's tests reach. Everything else is real: ``vtkMRMLScene``, ``vtkMRMLScriptedModuleNode``, the wrapper's
serializers and validators, ``ScriptedLoadableModuleLogic.getParameterNode``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Slicer 5.8.1's Base/Python/slicer files, beside the repository (CI clones the repository next to ``shared/``).
SLICER_PYTHON = REPO.parent / "shared" / "vendor" / "slicer-5.8.1-python"
MODULE_FILE = REPO / "MultimodalPrealign" / "MultimodalPrealign.py"
#: The vendored modules (``slicer/`` of SLICER_PYTHON) that the module file imports, and what they import.
VENDORED_MODULES = ("slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule")


# ----------------------------------------------------------------------------- qt


def _stand_in_class(module_name: str, name: str, doc: str, base: type = object) -> type:
    return type(name, (base,), {"__doc__": f"Stands in for {module_name}.{name} of the Slicer application (its Qt/CTK "
                                           f"part cannot run here): {doc}",
                                "__module__": __name__})


class QSettingsStandIn:
    """Stands in for ``qt.QSettings`` of the Slicer application (Qt cannot run here): an empty settings store,
    so ``slicer.util.settingsValue`` (ScriptedLoadableModuleWidget's developer-mode check) returns its default."""

    def contains(self, key):
        return False

    def value(self, key, default=None):
        return default


class QIconStandIn:
    """Stands in for ``qt.QIcon`` of the Slicer application (Qt cannot run here): ScriptedLoadableModule makes the
    module's icon from Resources/Icons/<module>.png; the path is kept."""

    def __init__(self, path):
        self.path = path


def make_qt() -> types.ModuleType:
    """A module standing in for PythonQt's ``qt``: only the names Slicer's module machinery touches."""
    qt = types.ModuleType("qt", "Stands in for the Slicer application's PythonQt 'qt' module, which cannot run here.")
    qt.QWidget = _stand_in_class("qt", "QWidget", "a type name in guiConnectors/guiCreation/wrapper annotations.")
    for name in ("QLabel", "QLineEdit", "QPushButton", "QTextEdit"):  # guiConnectors' widget annotations
        setattr(qt, name, _stand_in_class("qt", name, "a type name in guiConnectors annotations.", qt.QWidget))
    qt.QSettings = QSettingsStandIn
    qt.QIcon = QIconStandIn
    return qt


def make_ctk() -> types.ModuleType:
    """A module standing in for the Slicer application's ``ctk``: the two classes guiConnectors annotates with."""
    ctk = types.ModuleType("ctk", "Stands in for the Slicer application's 'ctk' (CTK widgets), which cannot run here.")
    for name in ("ctkPathLineEdit", "ctkDirectoryButton"):
        setattr(ctk, name, _stand_in_class("ctk", name, "a type name in guiConnectors annotations."))
    return ctk


#: The ``slicer.qMRML*`` widget classes guiConnectors names (qMRMLNodeComboBox also in an annotation).
QMRML_WIDGET_NAMES = ("qMRMLNodeComboBox", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget")


def make_qmrml_widgets() -> dict:
    return {name: _stand_in_class("slicer", name, "a widget class guiConnectors compares widget types with.")
            for name in QMRML_WIDGET_NAMES}


# ----------------------------------------------------------------------------- slicer.app


class ModuleManagerStandIn:
    """Stands in for ``slicer.app.moduleManager()`` (qSlicerModuleManager) of the Slicer application (Qt cannot run
    here): ScriptedLoadableModuleWidget connects to its ``moduleAboutToBeUnloaded(QString)`` signal."""

    def __init__(self):
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def disconnect(self, signal, slot):
        self.connections.remove((signal, slot))


class SlicerAppStandIn:
    """Stands in for ``slicer.app`` (qSlicerApplication) of the Slicer application (Qt cannot run here).

    temporaryPath: Slicer's temporary folder (a pytest folder); connect: the module's ``startupCompleted()``
    connection is recorded; translate: ``slicer.i18n.tr`` with no translation loaded (the text itself);
    processEvents: no event loop to run.
    """

    def __init__(self, temporary_path: str):
        self.temporaryPath = temporary_path
        self.connections = []
        self._module_manager = ModuleManagerStandIn()

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def translate(self, context, text):
        return text

    def processEvents(self):
        pass

    def moduleManager(self):
        return self._module_manager


class ModulePanelStandIn:
    """Stands in for the ``qSlicerScriptedLoadableModuleWidget`` the Slicer application hands a scripted module's
    widget as ``parent`` (Qt cannot run here): ``layout()`` and ``isEntered`` are what ScriptedLoadableModuleWidget
    and the module's widget read."""

    class Layout:
        """Stands in for the panel's QVBoxLayout (Qt cannot run here): keeps the widgets added to it."""

        def __init__(self):
            self.widgets = []

        def addWidget(self, widget):
            self.widgets.append(widget)

    def __init__(self):
        self.isEntered = False
        self._layout = self.Layout()

    def layout(self):
        return self._layout


class ModuleParentStandIn:
    """Stands in for the ``qSlicerScriptedLoadableModule`` the Slicer application hands a scripted module class as
    ``parent`` (Qt cannot run here): the attributes ScriptedLoadableModule and the module set, and ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.icon = None


# ----------------------------------------------------------------------------- loading


_QT, _CTK, _QMRML = make_qt(), make_ctk(), make_qmrml_widgets()


def load_slicer_machinery(monkeypatch):
    """Slicer's own ``parameterNodeWrapper`` and ``ScriptedLoadableModule`` over slicer-core, for one test.

    Skips when the vendored folder is absent (it holds files no package carries); never when it is present (an
    incomplete folder fails).
    The stand-ins go into ``sys.modules`` / ``slicer`` through ``monkeypatch`` (undone after the test); the
    vendored modules stay imported for the session (they hold the same stand-in ``qt``/``ctk`` modules).
    Returns the ``slicer`` package.
    """
    import slicer

    folder = SLICER_PYTHON / "slicer"
    if not SLICER_PYTHON.exists():  # present but incomplete is an error below, not a skip
        pytest.skip(f"Slicer's module machinery is absent: {SLICER_PYTHON} (Slicer 5.8.1 Base/Python/slicer files, "
                    "see shared/vendor/slicer-5.8.1-python/README.md) is not beside the repository")
    monkeypatch.setitem(sys.modules, "qt", _QT)
    monkeypatch.setitem(sys.modules, "ctk", _CTK)
    for name, cls in _QMRML.items():
        monkeypatch.setattr(slicer, name, cls, raising=False)
    monkeypatch.setattr(slicer, "selfTests", {}, raising=False)  # ScriptedLoadableModule registers its test here
    if str(folder) not in [str(p) for p in slicer.__path__]:
        slicer.__path__.append(str(folder))
    for name in VENDORED_MODULES:
        module = importlib.import_module(name)
        source = Path(module.__file__).resolve()
        assert folder.resolve() in source.parents, f"{name} imported from {source}, not from {folder}"
    return slicer


def load_module(monkeypatch, tmp_path):
    """The module file ``MultimodalPrealign.py`` imported over Slicer's machinery and a fresh real scene.

    ``slicer.mrmlScene``: a new ``vtkMRMLScene``; ``slicer.app``: :class:`SlicerAppStandIn` whose temporaryPath is
    ``tmp_path / "slicer-temp"``. The module is imported afresh (its parameter-node class is wrapped again) and
    removed from ``sys.modules`` after the test, as are the stand-ins.
    """
    slicer = load_slicer_machinery(monkeypatch)
    monkeypatch.setattr(slicer, "app", SlicerAppStandIn(str(tmp_path / "slicer-temp")), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.syspath_prepend(str(REPO / "MultimodalPrealign"))
    spec = importlib.util.spec_from_file_location("MultimodalPrealign", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "MultimodalPrealign", module)  # as Slicer imports it; undone after the test
    spec.loader.exec_module(module)
    return module
