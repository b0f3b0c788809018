"""The package's layers: models only model, so nothing under pyro_vae.models imports the
training layer, the run directories or the command line, and no module imports itself
through others (an import circle), counting imports inside functions too."""

import ast
from pathlib import Path

import pyro_vae

PACKAGE = Path(pyro_vae.__file__).parent
ABOVE_MODELS = ("pyro_vae.train", "pyro_vae.runs", "pyro_vae.cli", "pyro_vae.stacking", "pyro_vae.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The pyro_vae modules that the file at ``path`` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES  # `from .. import plots`
            found.update(submodules or {base})
    return {m for m in found if m in MODULES and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_import_reader_sees_relative_and_nested_imports():
    edges = graph()
    assert "pyro_vae.models.base" in edges["pyro_vae.models.vae"]  # from .base import ...
    assert "pyro_vae.plots" in edges["pyro_vae.models.vae"]  # from .. import plots
    assert "pyro_vae.stacking" in edges["pyro_vae.train"]


def test_no_module_under_models_imports_the_layers_above():
    upward = {(m, i) for m, deps in graph().items() if m.startswith("pyro_vae.models")
              for i in deps if i.startswith(ABOVE_MODELS)}
    assert upward == set()


def test_the_package_has_no_import_circle():
    edges = graph()
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    assert circles == []
