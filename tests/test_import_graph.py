"""The import graph stays one-way: ``lora_ops`` (pure torch) imports neither ``stages`` nor ``flows``, ``stages``
never import ``flows``, a stage script never imports another stage (shared code lives in ``stages/common``),
and no first-party modules import each other in a cycle (function-local imports included: a cycle broken
only at run time is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_ops", "stages", "flows")
#: (importer's package, imported package) pairs that would point the graph upward
UPWARD = {("lora_ops", "stages"), ("lora_ops", "flows"), ("stages", "flows")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (``from a.b import c`` counts as ``a.b.c`` where that is a
    module, else ``a.b``), from every import statement in the file."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in packages and (found := known(target)) and found != name:
                    imported.add(found)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_stage_script(module: str) -> bool:
    return module.startswith("stages.") and not module.startswith("stages.common")


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if (module.split(".")[0], target.split(".")[0]) in UPWARD:
                out.append(f"{module} imports {target} (upward)")
            if is_stage_script(target) and (is_stage_script(module) or module.startswith("stages.common")):
                out.append(f"{module} imports the stage {target}")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_graph_reads_every_kind_of_import(tmp_path: Path):
    pkg = tmp_path / "flows"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from flows.sub import b\n")  # function-local
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..c import x\nimport flows.a\n")  # relative and absolute
    (pkg / "c.py").write_text("import os\nfrom flows.sub.b import thing\n")
    g = import_graph(tmp_path, ("flows",))
    assert g["flows.a"] == {"flows.sub.b"} and g["flows.sub.b"] == {"flows.c", "flows.a"}
    assert g["flows.c"] == {"flows.sub.b"}
    assert cycles(g) == [["flows.a", "flows.c", "flows.sub.b"]]


def test_the_rules_catch_upward_and_stage_to_stage_imports():
    g = {"lora_ops.x": {"stages.common.io"}, "stages.train": {"stages.prepare", "stages.common.io"},
         "stages.common.io": {"flows.study"}, "stages.prepare": set(), "flows.study": set()}
    assert violations(g) == ["lora_ops.x imports stages.common.io (upward)",
                             "stages.common.io imports flows.study (upward)",
                             "stages.train imports the stage stages.prepare"]


def test_the_repository_graph_is_one_way(graph: dict[str, set[str]]):
    assert len(graph) > 100 and graph["flows.study"]  # the walk found the code
    assert violations(graph) == []


def test_no_first_party_import_cycle(graph: dict[str, set[str]]):
    assert cycles(graph) == []
