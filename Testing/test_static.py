"""Static checks of the Slicer extension: panel vs .ui, CMake lists, catalog entry, Python 3.9, layering."""
from __future__ import annotations

import ast
import glob
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "VAEUDASegmentation"
MODULE_FILE = MODULE_DIR / "VAEUDASegmentation.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VAEUDASegmentation.ui"
ENGINE_FILES = sorted((MODULE_DIR / "vaeuda").glob("*.py"))
# The module's own plain-Python helpers (the child-process runner): no Slicer, no torch.
LIB_FILES = sorted((MODULE_DIR / "VAEUDASegmentationLib").glob("*.py"))
SLICER_SIDE = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "SampleData", "PyTorchUtils"}


def ui_widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def parameter_node_fields():
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VAEUDASegmentationParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def cmake_listed_files(cmake: Path, module_name: str):
    text = re.sub(r"#.*", "", cmake.read_text()).replace("${MODULE_NAME}", module_name)
    listed = []
    for block in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        body = re.search(r"set\(\s*" + block + r"(.*?)\)", text, re.S).group(1)
        listed += body.split()
    return listed


def test_every_ui_name_the_widget_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "found no self.ui.<name> at all: the check would be vacuous"
    missing = used - set(ui_widgets())
    assert not missing, f"used in the widget but not in {UI_FILE.name}: {sorted(missing)}"


def test_ui_parameter_bindings_match_the_parameter_node():
    bound = {}
    for name, w in ui_widgets().items():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = name
    fields = parameter_node_fields()
    assert set(bound) <= fields, f"widgets bound to unknown parameters: {sorted(set(bound) - fields)}"
    assert fields - set(bound) == set(), f"parameters without a widget: {sorted(fields - set(bound))}"


def test_spin_box_ranges_are_the_parameter_nodes():
    """A parameter's WithinRange(low, high) and its spin box's minimum / maximum: one range."""
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VAEUDASegmentationParameterNode")
    ranges = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            for call in ast.walk(node.annotation):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "WithinRange":
                    ranges[node.target.id] = tuple(ast.literal_eval(a) for a in call.args)
    assert ranges, "found no WithinRange: the check would be vacuous"
    spin_boxes = {}
    for w in ui_widgets().values():
        props = {p.get("name"): p for p in w.findall("property")}
        if w.get("class") == "QSpinBox" and "SlicerParameterName" in props:
            value = {k: int(props[k].find("number").text) if k in props else None for k in ("minimum", "maximum")}
            spin_boxes[props["SlicerParameterName"].find("string").text] = (value["minimum"] or 0, value["maximum"])
    assert spin_boxes == ranges
    from vaeuda.errors import MAX_ITERATIONS     # the engine's own bound: the panel offers no count it refuses
    assert {name: high for name, (_, high) in ranges.items() if name.endswith("Iterations")} == \
        {"trainIterations": MAX_ITERATIONS, "adaptIterations": MAX_ITERATIONS}
    from vaeuda.errors import MAX_BATCH_SIZE
    assert ranges["trainBatchSize"] == (0, MAX_BATCH_SIZE)


def test_ui_file_is_well_formed_with_unique_names_and_declared_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML"))}
    assert custom <= declared, f"custom widgets not declared: {sorted(custom - declared)}"
    # Node selectors (qMRMLNodeComboBox and its subclass qMRMLCheckableNodeComboBox) list the scene's
    # nodes, so each needs mrmlSceneChanged -> setMRMLScene; a widget without that slot (such as
    # qMRMLSegmentationShow3DButton, which gets its node instead) must not be connected to it.
    scene_receivers = {c.find("receiver").text for c in root.iter("connection")
                       if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    node_selectors = {w.get("name") for w in root.iter("widget") if w.get("class", "").endswith("NodeComboBox")}
    assert scene_receivers == node_selectors, "exactly the node selectors get the scene (mrmlSceneChanged -> setMRMLScene)"


def test_cmake_lists_exist_and_every_engine_file_is_listed():
    listed = cmake_listed_files(MODULE_DIR / "CMakeLists.txt", "VAEUDASegmentation")
    missing_files = [f for f in listed if not (MODULE_DIR / f).is_file()]
    assert not missing_files, f"listed in CMakeLists.txt but absent: {missing_files}"
    assert LIB_FILES, "VAEUDASegmentationLib/ has no Python files"
    python = {str(p.relative_to(MODULE_DIR)) for p in ENGINE_FILES + LIB_FILES}
    unlisted = sorted(python - set(listed))
    assert not unlisted, f"Python files not listed in VAEUDASegmentation/CMakeLists.txt: {unlisted}"
    resources = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert resources <= set(listed), f"resources not listed: {sorted(resources - set(listed))}"
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_top_level_cmake_is_an_extension_depending_on_pytorch_with_existing_icon_and_screenshot():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(VAEUDASegmentation)" in text and "add_subdirectory(VAEUDASegmentation)" in text
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(variable + r'\s+"([^"]+)"', text).group(1)
        local = url.split("/main/", 1)[1]
        assert (ROOT / local).is_file(), f"{variable} points at {local}, which is not in the repository"
    for variable in ("EXTENSION_README_FILE", "EXTENSION_LICENSE_FILE"):     # the package's own, not Slicer's
        local = re.search(variable + r"\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", text).group(1)
        assert (ROOT / local).is_file(), f"{variable} points at {local}, which is not in the repository"
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in text


def test_catalog_entry_follows_the_schema():
    entry = json.loads((ROOT / "VAEUDASegmentation.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    for key in ("category", "scm_url", "scm_revision"):
        assert isinstance(entry[key], str) and entry[key]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}   # additionalProperties: false
    assert set(entry) <= allowed


def test_icons_are_128_pixel_pngs_and_license_is_apache_2():
    for icon in (MODULE_DIR / "Resources" / "Icons" / "VAEUDASegmentation.png", ROOT / "Resources" / "VAEUDASegmentation.png"):
        data = icon.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24]) == (128, 128)
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_requirements_never_name_what_slicer_or_the_pytorch_extension_provides():
    lines = [l.split("#")[0].strip() for l in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~ ]", l)[0].lower() for l in lines if l}
    assert names and not names & {"numpy", "simpleitk", "torch", "torchvision"}


def module_constant(name: str):
    tree = ast.parse(MODULE_FILE.read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets))


def test_slicer_requirements_are_the_engines_minus_what_slicer_and_pytorch_provide():
    """Resources/requirements.txt (installed in Slicer) and pyproject.toml (pip) list the same
    packages and minimum versions, torch's included, but for what Slicer ships and the demo's plotting."""
    try:
        import tomllib
    except ImportError:             # Python before 3.11: the same parser, as the test extra installs it
        import tomli as tomllib
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [l.split("#")[0].strip() for l in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    provided = {"numpy", "simpleitk", "torch", "matplotlib"}
    assert sorted(l for l in lines if l) == sorted(d for d in dependencies
                                                   if re.split(r"[<>=!~ ]", d)[0].lower() not in provided)
    assert "torch" + module_constant("TORCH_REQUIREMENT") in dependencies


def test_the_minimum_versions_run_pins_the_lower_bounds_pyproject_declares():
    """`make test-minimum` installs Testing/minimum-versions.txt: one pin per dependency, of the
    release line (major.minor) of pyproject.toml's lower bound, and requires-python's oldest Python."""
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in project["dependencies"])
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line).groups()
                for line in (ROOT / "Testing" / "minimum-versions.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert {k.lower() for k in pins} == {k.lower() for k in bounds}
    release = {k.lower(): v.split(".")[:2] for k, v in bounds.items()}
    assert {k.lower(): v.split(".")[:2] for k, v in pins.items()} == release
    assert project["requires-python"] == ">=3.9" and "PYTHON_OLDEST ?= python3.9" in (ROOT / "Makefile").read_text()


def test_the_module_knows_the_engines_model_format_name():
    from vaeuda.modelfile import FORMAT
    assert module_constant("MODEL_FORMAT") == FORMAT


def test_engine_and_module_helpers_import_nothing_from_slicer():
    offenders = []
    for path in ENGINE_FILES + LIB_FILES:
        banned = SLICER_SIDE | ({"torch"} if path in LIB_FILES else set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] in banned]
    assert not offenders, offenders


def test_the_label_table_imports_without_torch():
    """The module reads vaeuda.labels, choices and fileio in Slicer's GUI process, which must never import torch."""
    code = "import sys, vaeuda.labels, vaeuda.choices, vaeuda.fileio; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


PYTHON39 = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.9*" / "bin" / "python")))


@pytest.mark.skipif(not PYTHON39, reason="no Python 3.9 under ~/.pyenv/versions")
def test_module_engine_and_stand_in_compile_with_python_3_9(tmp_path):
    files = [MODULE_FILE] + ENGINE_FILES + LIB_FILES + sorted((ROOT / "Testing" / "slicer_stub").rglob("*.py"))
    # py_compile with a private cache prefix: nothing is written into the source tree
    code = ("import py_compile, sys\n"
            "for f in sys.argv[1:]:\n"
            "    py_compile.compile(f, doraise=True)\n")
    done = subprocess.run([PYTHON39[-1], "-X", f"pycache_prefix={tmp_path}", "-c", code, *map(str, files)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _text_io_without_encoding(path: Path):
    """Calls in ``path`` that read or write text in the locale's encoding: ``read_text``/``write_text``
    or a text-mode ``open`` without ``encoding=``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in ("read_text", "write_text"):
            found.append(f"{path.name}:{node.lineno} {name}")
        elif name == "open" and isinstance(node.func, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                found.append(f"{path.name}:{node.lineno} open")
    return found


def test_engine_and_benchmarks_read_and_write_text_as_utf8_whatever_the_locale():
    """Reports hold non-ASCII text (the demo's dagger, ±); in a process whose locale is "C" (GDCM's
    DICOM writer sets LC_CTYPE to "C", and a user's shell may) the default encoding is ASCII."""
    files = ENGINE_FILES + LIB_FILES + [MODULE_FILE] + sorted((ROOT / "benchmarks").glob("*.py"))
    assert [hit for path in files for hit in _text_io_without_encoding(path)] == []
