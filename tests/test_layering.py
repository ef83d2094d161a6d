"""Imports run one way: faces -> tasks -> config -> registry -> (engine, models, data, eval, interop). Read from the
source itself -- every import, at the top of a module or inside a function -- so the picture README draws cannot
drift from the code, and an import hidden in a function to dodge a cycle is caught."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vistrain"
FACES = ("vistrain.__main__", "vistrain.cli", "vistrain.lmms", "vistrain.html_report", "vistrain.run_folder")
# package -> what it must never import (faces are never imported from below, see FACES)
FORBIDDEN = {
    "vistrain.registry": ("vistrain.tasks", "vistrain.config"),
    "vistrain.engine": ("vistrain.tasks", "vistrain.registry", "vistrain.config", "vistrain.data", "vistrain.eval",
                        "vistrain.interop", "vistrain.models"),
    "vistrain.models": ("vistrain.engine", "vistrain.tasks", "vistrain.registry", "vistrain.data", "vistrain.eval",
                        "vistrain.interop"),
    "vistrain.data": ("vistrain.engine", "vistrain.tasks", "vistrain.registry", "vistrain.eval", "vistrain.interop",
                      "vistrain.models"),
    "vistrain.eval": ("vistrain.tasks", "vistrain.registry", "vistrain.interop"),
    "vistrain.interop": ("vistrain.engine", "vistrain.tasks", "vistrain.registry", "vistrain.eval"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported vistrain module, line, inside a function?) for every import of a vistrain module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(node) for f in functions for node in ast.walk(f) if node is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "vistrain" or name.startswith("vistrain."):
                yield name, node.lineno, id(node) in nested


SOURCES = sorted(SRC.rglob("*.py"))


def test_no_layer_imports_one_above_it_nor_a_face():
    wrong = []
    for path in SOURCES:
        me = module_name(path)
        below_faces = not me.startswith(FACES)
        for name, line, _ in imports(path):
            for package, banned in FORBIDDEN.items():
                if me.startswith(package) and name.startswith(banned):
                    wrong.append(f"{me}:{line} imports {name}")
            if below_faces and name.startswith(FACES):
                wrong.append(f"{me}:{line} imports the face {name}")
    assert not wrong, "\n".join(wrong)


def test_every_import_inside_a_function_says_why():
    """A comment in the block of imports it belongs to, or on the line right above that block."""
    silent = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for name, line, inside in imports(path):
            if not inside:
                continue
            # the block of import lines around this one (groups of imports parted by blank lines are one block)
            in_block = lambda i: not lines[i].strip() or lines[i].strip().startswith(("import ", "from "))  # noqa
            first = last = line - 1
            while first > 0 and in_block(first - 1):
                first -= 1
            while last + 1 < len(lines) and in_block(last + 1):
                last += 1
            said = any("#" in lines[i] for i in range(first, last + 1)) or (
                first > 0 and lines[first - 1].strip().startswith("#"))
            if not said:
                silent.append(f"{module_name(path)}:{line} imports {name} inside a function without a reason")
    assert not silent, "\n".join(sorted(set(silent)))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_the_first_line_of_every_module_says_what_it_holds(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 4, f"{path} has no docstring saying what it holds"
