"""Layering of the whole package: no import circle among gpd_fx's modules, none loads a script by
file path, and no module uses a private name of another package.

``tests/test_trace.py`` checks the passes' own layering (no cycle, never the public wrapper);
this file looks at every module of ``gpd_fx`` (passes, training, testing included), as installed.
Only imports that run when a module is imported count (module level, ``try``/``if`` blocks
included): an import inside a function runs after every module is loaded, so it cannot close a
circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import gpd_fx
import gpd_fx.passes


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (``gpd_fx.passes`` lives at the
    repository's ``passes/`` but installs under ``gpd_fx``)."""
    roots = {"gpd_fx": Path(gpd_fx.__file__).parent, "gpd_fx.passes": Path(gpd_fx.passes.__file__).parent}
    out: dict[str, Path] = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "gpd_fx" and parts[:1] == ["passes"]:
                continue
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _load_time_imports(tree: ast.Module):
    """Import statements executed when the module is imported: not those inside functions or
    under ``if TYPE_CHECKING:``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)   # the body runs for type checkers only
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        parts = name.split(".")
        # a module's own parent packages are already being initialised when it runs: reaching
        # them on the way to a sibling is no dependency; taking a name from their __init__ is
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        for node in _load_time_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                target = _resolve(node, _package(name, path))
                # `from . import rules` names a module; `from .x import f` names x
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
            for t in targets:
                # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                tparts = t.split(".")
                deps |= {".".join(tparts[:i]) for i in range(1, len(tparts))} - ancestors
                deps.add(t)
        edges[name] = (deps & set(MODULES)) - {name}
    return edges


def test_package_has_no_import_circle():
    """A depth-first walk over load-time imports finds no back edge (a circle)."""
    edges = _edges()
    assert {"gpd_fx.testing", "gpd_fx.testing.zoo", "gpd_fx.training.loop", "gpd_fx.passes.widen"} <= set(edges)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(edges[n]):
            assert state.get(d) != 1, "import circle: " + " -> ".join(path + [n, d])
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [])


def test_no_module_loads_a_file_by_path():
    """Code is imported as modules, never executed from a file path (``spec_from_file_location``,
    ``runpy``, a ``SourceFileLoader``): what runs is what is installed. The package, the tests and
    the benchmark scripts alike."""
    here = Path(__file__).resolve()
    scripts = [p for d in (here.parent, here.parents[1] / "benchmarks") if d.is_dir() for p in d.glob("*.py")]
    pattern = re.compile(r"spec_from_file_location|\brunpy\b|SourceFileLoader")
    for path in [*MODULES.values(), *scripts]:
        if path.resolve() == here:
            continue
        found = pattern.search(path.read_text())
        assert found is None, f"{path} uses {found.group()}"


@pytest.mark.parametrize("package", ["gpd_fx.testing"])
def test_new_packages_use_no_private_name_of_another_package(package):
    """``gpd_fx.testing`` imports only public names from other packages (``from x import _y``
    with ``x`` outside its own package would tie it to another package's internals)."""
    for name, path in MODULES.items():
        if not (name == package or name.startswith(package + ".")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                module = node.module or ""
                if module == package or module.startswith(package + "."):
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{name} imports private {private} from {module}"
