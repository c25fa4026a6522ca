"""Static checks of the Slicer extension: the .ui file against the module code, the CMake lists against
the files on disk, the module's size, the layering rules and the help text."""

import ast
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "InferenceSpecificSeg"
MODULE_FILE = MODULE / "InferenceSpecificSeg.py"
UI_FILE = MODULE / "Resources" / "UI" / "InferenceSpecificSeg.ui"
LIBRARY = MODULE / "InferenceSpecificSegLib"
# Library modules that must run anywhere: no slicer, no Qt.
GUI_FREE = ("i18n", "settings", "protocol", "worker", "models", "dependencies")
# The only engine modules the Slicer side may import: torch-free, standard library only (checked below),
# so that Slicer never loads torch and a zip is unpacked by one implementation on both sides.
ENGINE_MODULES_FOR_SLICER = ("isseg.protocol", "isseg.archive")
ENGINE = ROOT / "InferenceSpecificSeg" / "isseg"


def uiWidgets():
    """{name: class} of every widget in the .ui file."""
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name"): widget.get("class") for widget in root.iter("widget")}


def cmakeList(path: Path, variable: str) -> set:
    """Entries of `set(variable ...)` in a CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{path} has no set({variable} ...)"
    entries = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return {entry.replace("${MODULE_NAME}", "InferenceSpecificSeg") for entry in entries if entry}


def moduleFiles(pattern: str) -> set:
    return {path.relative_to(MODULE).as_posix() for path in MODULE.glob(pattern)
            if path.is_file() and "__pycache__" not in path.parts}


def importedModules(path: Path) -> set:
    """Top-level names of every module `path` imports (anywhere in the file). The engine modules of
    ENGINE_MODULES_FOR_SLICER count by their full name (`isseg.protocol`), every other isseg module as
    `isseg`. Relative imports (inside a package) are left out."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(_topLevel(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "isseg":
            names.update(_topLevel(f"isseg.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(_topLevel(node.module))
    return names


def _topLevel(moduleName: str) -> str:
    return moduleName if moduleName in ENGINE_MODULES_FOR_SLICER else moduleName.split(".")[0]


def test_ui_file_parses_and_has_every_widget_the_module_uses():
    widgets = uiWidgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no widget?"
    assert used <= set(widgets), f"missing in the .ui file: {sorted(used - set(widgets))}"
    assert widgets["InferenceSpecificSeg"] == "qMRMLWidget"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"


def test_ui_parameter_bindings_name_parameters_of_the_parameter_node():
    root = ElementTree.parse(UI_FILE).getroot()
    bound = {widget.get("name"): widget.find("property[@name='SlicerParameterName']/string").text
             for widget in root.iter("widget") if widget.find("property[@name='SlicerParameterName']") is not None}
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    parameterNode = next(node for node in tree.body
                         if isinstance(node, ast.ClassDef) and node.name == "InferenceSpecificSegParameterNode")
    parameters = {statement.target.id for statement in parameterNode.body if isinstance(statement, ast.AnnAssign)}
    assert set(bound.values()) <= parameters
    assert set(bound.values()) == {"inputVolume", "device", "steps", "alignment", "momentum", "loss"}


def test_module_cmake_lists_every_script_and_resource_and_nothing_else():
    cmake = MODULE / "CMakeLists.txt"
    expectedScripts = ({"InferenceSpecificSeg.py"} | moduleFiles("InferenceSpecificSegLib/*.py")
                       | moduleFiles("isseg/**/*.py"))
    expectedResources = (moduleFiles("Resources/**/*")
                         | {path for path in moduleFiles("isseg/demo_model/*") if not path.endswith(".py")})
    listedScripts, listedResources = cmakeList(cmake, "MODULE_PYTHON_SCRIPTS"), cmakeList(cmake, "MODULE_PYTHON_RESOURCES")
    assert listedScripts == expectedScripts, (
        f"add to MODULE_PYTHON_SCRIPTS: {sorted(expectedScripts - listedScripts)}; "
        f"remove: {sorted(listedScripts - expectedScripts)}")
    assert listedResources == expectedResources, (
        f"add to MODULE_PYTHON_RESOURCES: {sorted(expectedResources - listedResources)}; "
        f"remove: {sorted(listedResources - expectedResources)}")
    text = cmake.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "add_subdirectory(Testing)" in text


def test_extension_and_test_cmake_files():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                     "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(InferenceSpecificSeg)" in text
    assert "add_subdirectory(Python)" in (MODULE / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(" in (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")


def test_module_file_is_thin_and_defines_the_slicer_classes():
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 500
    classes = {node.name for node in ast.parse(text).body if isinstance(node, ast.ClassDef)}
    assert {"InferenceSpecificSeg", "InferenceSpecificSegWidget", "InferenceSpecificSegLogic",
            "InferenceSpecificSegTest"} <= classes
    assert 'slicer.util.loadUI(self.resourcePath("UI/InferenceSpecificSeg.ui"))' in text


def test_help_text_cites_the_method_and_the_loss():
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert "10.1002/mp.17883" in text and "Medical Physics, 2025" in text
    assert "region-specific loss" in text and "Pattern Analysis and Machine Intelligence" in text and "2023" in text


def test_layers_import_only_what_they_may():
    for path in [MODULE_FILE, *LIBRARY.glob("*.py")]:
        assert not importedModules(path) & {"torch", "monai", "SimpleITK", "isseg"}, path
        assert {name for name in importedModules(path) if name.startswith("isseg")} <= set(ENGINE_MODULES_FOR_SLICER)
    for name in GUI_FREE:
        assert not importedModules(LIBRARY / f"{name}.py") & {"slicer", "qt", "ctk", "vtk"}, name
    for path in LIBRARY.glob("*.py"):
        assert not importedModules(path) & {"qt", "ctk"}, path
        assert "mrmlScene" not in path.read_text(encoding="utf-8"), f"{path} must take the scene as an argument"


def test_engine_modules_the_slicer_side_may_import_use_the_standard_library_only():
    """What keeps "nothing torch on the Slicer side" true for the allowed engine modules: they import
    neither a third-party library nor another isseg module (which could import torch)."""
    assert not importedModules(ENGINE / "__init__.py"), "importing any isseg module runs isseg/__init__.py"
    for name in ENGINE_MODULES_FOR_SLICER:
        path = ENGINE / f"{name.split('.', 1)[1]}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level], \
            f"{name} imports another isseg module"
        outside = importedModules(path) - set(sys.stdlib_module_names)
        assert outside == set(), f"{name} imports {sorted(outside)}, which are not in the standard library"


def test_user_visible_strings_in_the_module_are_translatable():
    """Text given to Qt properties and dialogs goes through _()."""
    text = MODULE_FILE.read_text(encoding="utf-8")
    untranslated = re.findall(r"\.(?:text|toolTip|format)\s*=\s*[\"']", text)
    untranslated += re.findall(r"(?:errorDisplay|confirmOkCancelDisplay|tryWithErrorDisplay)\(\s*[\"']", text)
    assert untranslated == []


def test_slicer_side_parses_as_python_39():
    """Slicer 5.8 runs Python 3.9: the module file and its library must not use newer syntax."""
    engineModules = [ENGINE / f"{name.split('.', 1)[1]}.py" for name in ENGINE_MODULES_FOR_SLICER]
    for path in [MODULE_FILE, *LIBRARY.glob("*.py"), ENGINE / "__init__.py", *engineModules]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


# Methods of VTK itself or of Python libraries (not Slicer's): not in the 5.8 list.
NOT_SLICER_API = {"ArchiveError", "GetPointData", "GetScalars", "SetScalars", "GetExtent", "GetDimensions", "SetDimensions", "AddObserver", "RemoveObserver", "InsertNextValue", "ModifiedEvent", "GetMTime",
                  "ModelPackageError", "PackageNotFoundError", "Popen", "PyTorchUtilsLogic", "QFileDialog", "QMenu",
                  "QTimer", "SimpleQueue", "Thread", "TimeoutExpired", "WaitCursor", "ZipFile", "Empty", "Enum"}


def test_every_slicer_method_called_exists_in_slicer_58():
    """Each CamelCase method the module and its library call is in Testing/slicer_5_8_api.txt (the 5.8.1 headers)."""
    listed = {}
    for line in (ROOT / "Testing" / "slicer_5_8_api.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            qualified, header = line.split()
            listed.setdefault(qualified.split(".")[1], []).append(header)
    called = set()
    for path in [MODULE_FILE, *LIBRARY.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and re.match(r"^[A-Z][a-z][A-Za-z0-9]*$", node.attr):
                called.add(node.attr)
    assert called - NOT_SLICER_API - set(listed) == set()
    assert not {"SetTerminology", "GetTerminology", "HasTerminology"} & set(listed)
