"""The package layout holds: no import cycle, and no private name used from outside its package.

Read from the source with `ast`, nothing imported: every module's imports, resolved to the
modules of this repository. A cycle between modules (imports at module level: one inside a
function is a deliberate late import), or a module reaching into another package's private
(`_name`) names anywhere, by import or by attribute, fails here with the modules named.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "vision_cache", "tests", "scripts")


@dataclass(frozen=True)
class Use:
    """One module-level import (or attribute of an imported module) in `importer`."""

    importer: str
    target: str  # the module imported, or that the name comes from
    name: str | None  # the name taken from it, if any
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def package_of(module: str) -> str:
    """The package a module belongs to (a package's __init__ belongs to itself)."""
    if (ROOT / module.replace(".", "/") / "__init__.py").exists():
        return module
    return module.rpartition(".")[0]


def _nodes(tree: ast.Module, *, in_functions: bool) -> Iterator[ast.AST]:
    """Every node; outside function bodies only unless `in_functions` (classes, if/try blocks
    and TYPE_CHECKING imports count as module level)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if in_functions or not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
        ):
            stack.extend(ast.iter_child_nodes(node))


def _resolve_from(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = package_of(importer).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def uses(module: str, *, in_functions: bool = False) -> Iterator[Use]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    aliases: dict[str, str] = {}
    for node in _nodes(tree, in_functions=in_functions):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Use(module, alias.name, None, node.lineno)
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    yield Use(module, submodule, None, node.lineno)
                    aliases[alias.asname or alias.name] = submodule
                else:
                    yield Use(module, source, alias.name, node.lineno)
    yield from _attribute_uses(module, tree, aliases)


def _attribute_uses(module: str, tree: ast.Module, aliases: dict[str, str]) -> Iterator[Use]:
    """`media._Private`: a private name reached through an imported module, anywhere."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
        ):
            yield Use(module, aliases[node.value.id], node.attr, node.lineno)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for use in uses(module):
            if use.target in MODULES and use.target != module:
                graph[module].add(use.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def private_reaches() -> list[str]:
    """Private names used from outside the package that defines them."""
    found = []
    for module in MODULES:
        for use in uses(module, in_functions=True):
            name = use.name or use.target.rpartition(".")[2]
            if not name.startswith("_") or name.startswith("__"):
                continue
            owner = package_of(use.target) if use.name is None else use.target
            owner_package = package_of(owner) if owner in MODULES else owner
            inside = module == owner_package or module.startswith(owner_package + ".")
            if not inside:
                found.append(f"{module}:{use.line} uses {use.target}.{use.name or ''}")
    return found


def test_no_private_name_is_used_from_outside_its_package() -> None:
    assert private_reaches() == []


def test_vision_cache_never_imports_the_proxy() -> None:
    """The cache and its clients stand alone: the proxy depends on them, never the reverse."""
    reverse = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if m.startswith("vision_cache")
        for t in targets
        if t.split(".")[0] == "proxy"
    ]
    assert reverse == []


@pytest.mark.parametrize(
    "package",
    sorted(
        m
        for m in MODULES
        if MODULES[m].name == "__init__.py" and m.split(".")[0] in ("proxy", "vision_cache")
    ),
)
def test_every_subpackage_says_what_it_holds(package: str) -> None:
    docstring = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert docstring and len(docstring) > 80, f"{package}/__init__.py needs a docstring"


def test_nothing_edits_sys_path() -> None:
    """Imports go through packages (pytest's `pythonpath`, ``python -m scripts.NAME``)."""
    edits = []
    for path in [*MODULES.values(), *sorted((ROOT / "fuzz").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert edits == []
