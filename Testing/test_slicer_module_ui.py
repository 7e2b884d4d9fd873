"""The Slicer module's static checks: .ui widgets vs code, parameter node fields, CMake, docs vs code.

``qt`` and the Slicer application are not importable here, so the module source is parsed with ``ast``
and the .ui file as XML.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MultimodalPrealign"
MODULE_PY = MODULE_DIR / "MultimodalPrealign.py"
SLICER_PACKAGE = MODULE_DIR / "MultimodalPrealignLib" / "slicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MultimodalPrealign.ui"


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    # Slicer 5.8 runs Python 3.9: the module must parse with that grammar.
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), feature_version=(3, 9))


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets(ui) -> dict:
    """name -> (class, {property: text}) for every widget in the .ui file."""
    widgets = {}
    for w in ui.iter("widget"):
        props = {}
        for p in w.findall("property"):
            child = list(p)[0] if len(p) else None
            if child is not None and child.tag == "stringlist":
                props[p.get("name")] = [s.text or "" for s in child]
            elif child is not None:
                props[p.get("name")] = child.text or ""
        widgets[w.get("name")] = (w.get("class"), props)
    return widgets


def class_def(tree, name) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} missing")


def parameter_fields(tree) -> dict:
    """field name -> annotation source of the @parameterNodeWrapper class."""
    wrapped = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrapped) == 1, "exactly one @parameterNodeWrapper class expected"
    return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in wrapped[0].body
            if isinstance(stmt, ast.AnnAssign)}


def module_constant(tree, name):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return node.value
    raise AssertionError(f"{name} missing")


def test_no_future_annotations_and_no_pep604_in_parameter_node(tree):
    future = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "__future__" for alias in node.names]
    assert "annotations" not in future
    for annotation in parameter_fields(tree).values():
        assert "|" not in annotation


def test_every_ui_reference_in_the_code_exists_in_the_ui_file(tree, ui):
    """``self.ui.<name>`` in the widget, and ``ui.<name>`` in the slicer/ helpers the widget hands its ``ui`` to."""
    widgets = ui_widgets(ui)
    referenced = {node.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                  and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                  and node.value.value.id == "self"}
    referenced = {name for name in referenced if not name[0].isupper()}  # ui methods are not widgets
    assert referenced, "the widget references no ui element?"
    helpers = {}
    for path in sorted(SLICER_PACKAGE.glob("*.py")):
        names = {node.attr for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui"}
        helpers.update({name: path.name for name in names})
    assert {"verdictLabel", "picturesWidget", "segmentFixedButton"} <= set(helpers)
    missing = (referenced | set(helpers)) - set(widgets)
    assert not missing, f"widgets used in the code but absent from the .ui: {sorted(missing)}"


def test_every_slicer_parameter_name_is_a_parameter_node_field_and_vice_versa(tree, ui):
    fields = parameter_fields(tree)
    bound = {}
    for name, (cls, props) in ui_widgets(ui).items():
        if "SlicerParameterName" in props:
            bound.setdefault(props["SlicerParameterName"], []).append((name, cls, props))
    unknown = set(bound) - set(fields)
    assert not unknown, f"SlicerParameterName without a parameter-node field: {sorted(unknown)}"
    unbound = set(fields) - set(bound)
    assert not unbound, f"parameter-node fields with no widget: {sorted(unbound)}"
    assert all(len(v) == 1 for v in bound.values()), "a parameter is bound to two widgets"


def test_widget_classes_fit_the_field_types(tree, ui):
    fields = parameter_fields(tree)
    for _name, (cls, props) in ui_widgets(ui).items():
        field = props.get("SlicerParameterName")
        if field is None:
            continue
        annotation = fields[field]
        node_class = re.search(r"vtkMRML\w+", annotation)
        if node_class:
            assert cls == "qMRMLNodeComboBox", (field, cls)
            assert props.get("nodeTypes") == [node_class.group(0)], (field, props.get("nodeTypes"))
            optional = annotation.startswith("Optional[")
            assert (props.get("noneEnabled") == "true") == optional, f"{field}: noneEnabled must match Optional"
        elif "Choice(" in annotation:
            assert cls == "QComboBox", (field, cls)
        elif annotation == "bool":
            assert cls == "QCheckBox", (field, cls)
        elif annotation == "str":
            assert cls == "QLineEdit", (field, cls)
        elif "float" in annotation:
            assert cls in ("QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"), (field, cls)
        elif "int" in annotation:
            assert cls in ("QSpinBox", "ctkSliderWidget"), (field, cls)
        else:
            raise AssertionError(f"unexpected field type {annotation} for {field}")


def test_node_selectors_get_the_scene(ui):
    widgets = ui_widgets(ui)
    selectors = {n for n, (cls, _) in widgets.items() if cls in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert "qualityTableView" in selectors
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors <= receivers, f"selectors without setMRMLScene: {sorted(selectors - receivers)}"


def test_every_non_qt_widget_class_is_declared_as_custom_widget(ui):
    """Designer and slicer.util.loadUI need a <customwidget> entry (base class, header) for Slicer/CTK widgets."""
    declared = {c.findtext("class"): c.findtext("extends") for c in ui.iter("customwidget")}
    used = {cls for cls, _ in ui_widgets(ui).values()}
    missing = {cls for cls in used if not cls.startswith("Q")} - set(declared)
    assert not missing, f"custom widget classes not declared: {sorted(missing)}"
    assert declared["qMRMLTableView"] == "QTableView"


def test_quality_check_section_holds_its_widgets(ui):
    """Verdict, table view, thumbnails and report buttons live in the collapsible 'Quality check' section."""
    section = next(w for w in ui.iter("widget") if w.get("name") == "qualityCollapsibleButton")
    assert section.get("class") == "ctkCollapsibleButton"
    assert section.find("property[@name='text']/string").text == "Quality check"
    inside = {w.get("name"): w.get("class") for w in section.iter("widget")}
    assert {"verdictLabel": "QLabel", "qualityTableView": "qMRMLTableView", "picturesWidget": "QWidget",
            "openReportButton": "QPushButton", "openReportFolderButton": "QPushButton"}.items() <= inside.items()
    pictures = next(w for w in section.iter("widget") if w.get("name") == "picturesWidget")
    assert pictures.find("layout").get("class") == "QGridLayout"  # thumbnails go in row = kind, column = stage
    diagnostics = next(w for w in ui.iter("widget") if w.get("name") == "diagnosticsTextEdit")
    assert diagnostics.get("class") == "QPlainTextEdit"
    assert diagnostics.find("property[@name='readOnly']/bool").text == "true"


def test_the_slicer_helpers_import_before_the_python_requirements_are_installed():
    """Slicer imports the module file, and with it these helpers, before python_requirements can install scipy,
    pydicom and itk-elastix: the helpers import the core parts that need them inside functions only."""
    names = [f"MultimodalPrealignLib.slicer.{path.stem}" for path in sorted(SLICER_PACKAGE.glob("*.py"))]
    code = textwrap.dedent("""
        import importlib, importlib.abc, sys

        class NotInstalledYet(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("scipy", "pydicom", "itk"):
                    raise ImportError(f"{name} is not installed yet")

        sys.meta_path.insert(0, NotInstalledYet())
        for name in sys.argv[1:]:
            importlib.import_module(name)
    """)
    run = subprocess.run([sys.executable, "-c", code, *names], cwd=MODULE_DIR, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_choices_match_the_core(tree):
    from MultimodalPrealignLib import prealign
    from MultimodalPrealignLib.slicer import engine_run

    methods = ast.literal_eval(module_constant(tree, "PREALIGN_METHODS"))
    assert set(methods) <= set(prealign.ALL_METHODS)
    assert methods[0] == "auto"
    engines = module_constant(tree, "ENGINES")
    assert "SLICER_ENGINES" in ast.unparse(engines)
    from MultimodalPrealignLib import engines as core_engines

    # One vocabulary: the panel's engine names are the command line's --engine names.
    assert set(engine_run.SLICER_ENGINES) == set(core_engines.ENGINES) == {"itk", "elastix", "brainsfit"}


def test_module_metadata_and_test_class(tree):
    module = class_def(tree, "MultimodalPrealign")
    source = ast.unparse(module)
    assert "self.parent.title = 'Multimodal Prealign'" in source
    assert "self.parent.categories = ['Registration']" in source
    assert "user guide" in source and "DOCS_URL" in source
    assert "acknowledgementText" in source
    test = class_def(tree, "MultimodalPrealignTest")
    assert {"runTest", "setUp"} <= {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    logic = class_def(tree, "MultimodalPrealignLogic")
    run = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == "run")
    assert [a.arg for a in run.args.args[:3]] == ["self", "fixedVolumeNode", "movingVolumeNode"]


def test_cmake_files(tree):
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in module_cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in module_cmake
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "MultimodalPrealign")).exists()
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CATEGORY "Registration"\)', top)
    assert re.search(r'set\(EXTENSION_DEPENDS "SlicerElastix"\)', top)
    assert re.search(r'set\(EXTENSION_HOMEPAGE "https://', top)
    assert (REPO / "Resources" / "MultimodalPrealign.png").exists()
    assert "add_subdirectory(MultimodalPrealign)" in top
    # A screenshot is named only when one exists.
    has_screenshot = (REPO / "Resources" / "Screenshot1.png").exists()
    assert ('EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/Resources/Screenshot1.png"' in top) or has_screenshot


def test_icon_is_128_pixels():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "MultimodalPrealign.png") as icon:
        assert icon.size == (128, 128)


def test_user_guide_console_snippet_matches_the_logic(tree):
    guide = (REPO / "docs" / "user_guide.md").read_text()
    logic = class_def(tree, "MultimodalPrealignLogic")
    run = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == "run")
    parameters = {a.arg for a in run.args.args}
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    calls = [node for block in blocks for node in ast.walk(ast.parse(block))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run"]
    assert calls, "the guide has no logic.run(...) snippet"
    for call in calls:
        assert {k.arg for k in call.keywords} <= parameters
    mentioned = set(re.findall(r"`(\w+)`", guide.split("Other keywords of `run`")[1].split("\n\n")[0]))
    not_keywords = ("run", "engine", "core", "itk", "elastix")
    assert {m for m in mentioned if m[0].islower() and m not in not_keywords} <= parameters
    # What run returns: defined in slicer/run_steps.py, imported into the module file.
    assert "MultimodalPrealignResult" in {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                                          for alias in node.names}
    result_class = class_def(ast.parse((SLICER_PACKAGE / "run_steps.py").read_text(encoding="utf-8")),
                             "MultimodalPrealignResult")
    init = next(f for f in result_class.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    attributes = {t.attr for node in ast.walk(init) if isinstance(node, ast.Assign) for t in node.targets
                  if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"}
    assert {"tableNode", "pictures", "reportHtmlPath", "reportDirectory", "verdict", "verdictReasons"} <= attributes
    for attribute in re.findall(r"result\.(\w+)", guide):
        assert attribute in attributes, attribute


def test_user_guide_headless_command_matches_the_script():
    import importlib.util

    guide = (REPO / "docs" / "user_guide.md").read_text()
    script = REPO / "docs" / "examples" / "register_pair.py"
    spec = importlib.util.spec_from_file_location("register_pair", script)
    register_pair = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(register_pair)
    command = re.search(r"```bash\n(.*?)```", guide, re.S).group(1).replace("\\\n", " ")
    assert "--python-script docs/examples/register_pair.py" in command
    args = register_pair.parse_args(command.split("register_pair.py", 1)[1].split())
    assert (args.fixed, args.moving, args.out, args.engine) == ("ct.nrrd", "mr.nrrd", "result", "brainsfit")
    for option in re.findall(r"`(--[\w-]+)`", guide):
        if option in ("--additional-module-paths",):
            continue
        assert option.lstrip("-").replace("-", "_") in vars(args), option


def test_sample_data_files_named_by_the_module_exist():
    from MultimodalPrealignLib.slicer.sample_data import DEMO_FILES as demo

    folder = MODULE_DIR / "MultimodalPrealignLib" / "data" / "demo"
    if not any(folder.glob("*.nrrd")):
        pytest.skip("demo data not generated (scripts/make_demo_data.py)")
    for file_name in demo.values():
        assert (folder / file_name).exists(), file_name
    guide = (REPO / "docs" / "user_guide.md").read_text()
    assert all(name in guide for name in list(demo) + list(demo.values()))
