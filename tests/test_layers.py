"""The package's layers, as README.md lists them, against the imports in the code.

README.md names every module of s6tls in one layer, lowest first.  A module
may import from its own layer and the layers listed before it; a program
imports no other program; the imports have no cycle.  Imports inside
functions (the lazy ones) and under ``TYPE_CHECKING`` count too: a
dependency is a dependency, whenever it is paid for.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "s6tls"
PROGRAMS = "programs"


def layers() -> dict[str, tuple[int, str]]:
    """module -> (layer number, layer name), from the block after ``<!-- layers -->``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layers -->\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no layer block"
    out: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(block.group(1).strip().splitlines()):
        name, *modules = line.split()
        for module in modules:
            assert module not in out, f"{module} is in two layers"
            out[module] = (number, name)
    return out


def modules() -> dict[str, Path]:
    """Every module of the package by its README name (``tls/config``), no ``__init__``."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).with_suffix("").as_posix()
        if not name.endswith("__init__"):
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports, wherever the import is."""
    package = name.split("/")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
        elif node.module and node.module.split(".")[0] == "s6tls":
            base, node.module = [], ".".join(node.module.split(".")[1:]) or None
        else:
            continue
        parts = base + (node.module.split(".") if node.module else [])
        for alias in node.names:
            target = "/".join([*parts, alias.name])
            if target in known:
                out.add(target)
            elif "/".join(parts) in known:
                out.add("/".join(parts))
    return out - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_readme_names_every_module_once_and_no_other():
    assert set(layers()) == set(modules())


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_module_imports_only_its_own_layer_and_lower_ones(name):
    layer = layers()
    higher = {m for m in graph()[name] if layer[m][0] > layer[name][0]}
    assert not higher, f"{name} ({layer[name][1]}) imports from higher layers: {sorted(higher)}"


def test_no_program_imports_another():
    layer = layers()
    programs = {m for m, (_, kind) in layer.items() if kind == PROGRAMS}
    for name in programs:
        assert not graph()[name] & programs, name


def test_the_imports_have_no_cycle():
    deps = graph()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for dep in deps[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in deps:
        visit(name, ())


def test_the_check_sees_a_program_that_imports_another(tmp_path):
    """The parser finds what the rule forbids: a relative import of a sibling program."""
    fake = tmp_path / "s6tls"
    fake.mkdir()
    (fake / "tlsserver.py").write_text("from .tlsd import ENVIRONMENT\nfrom . import tlsc\n")
    assert imports("tlsserver", fake / "tlsserver.py", {"tlsd", "tlsc", "tlsserver"}) == {
        "tlsd",
        "tlsc",
    }
