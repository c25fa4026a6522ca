"""The engine's import graph: every module imports on its own, no module imports another that imports it
back (not even through imports inside functions), the commands sit above the engine, and nothing in
isseg imports Slicer, Qt or VTK."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "InferenceSpecificSeg" / "isseg"
GUI_MODULES = {"slicer", "qt", "ctk", "vtk", "mrml", "PythonQt"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """The isseg modules that module `name` imports anywhere in its file, and the top-level names of
    the other modules it imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES:
                inside.add(target)
            elif target and not target.startswith("isseg"):
                outside.add(target.split(".")[0])
    return inside - {name}, outside


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def test_no_import_cycles():
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in MODULES:
        visit(name, [])


def test_commands_sit_above_the_engine():
    commands = {name for name in MODULES if name.startswith("isseg.commands")}
    for name in set(MODULES) - commands - {"isseg.cli"}:
        assert not GRAPH[name] & (commands | {"isseg.cli"}), f"{name} imports the command layer"
    for name in commands:
        assert "isseg.cli" not in GRAPH[name], f"{name} imports isseg.cli back"


def test_engine_never_imports_slicer_qt_or_vtk():
    for name in MODULES:
        assert not imports_of(name)[1] & GUI_MODULES, name


def test_every_module_imports_on_its_own():
    """Each module in a fresh set of isseg modules (torch and the other libraries stay loaded, for speed)."""
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'isseg' or m.startswith('isseg.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
