"""The layout's rules (docs/design.md): no import cycles between sdrt's modules, function-local sdrt
imports only with the reason beside them, small functions in the runtime, a README a newcomer reads."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "sdrt", "export": "sdrt.export", "bench": "sdrt.bench"}
MAX_RUNTIME_FUNCTION_LINES = 60
MAX_PIPELINE_LINES = 200
MAX_README_LINES = 250


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imported(node: ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The sdrt modules an `from X import a, b` statement loads (X itself, or X.a where that is a module)."""
    names = {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
    return {n for n in names if n in modules}


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only: what an import runs
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdrt"):
                deps |= _imported(node, modules)
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path from a module back to itself), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    modules = _modules()
    assert "sdrt.pipeline" in modules and "sdrt.export.checkpoints" in modules and "sdrt.bench.run" in modules
    assert _cycle(_graph(modules)) is None


def test_function_local_sdrt_imports_say_why():
    """Allowed only to keep a heavy optional dependency out of a lean import path, with a comment
    on the statement or on the first statement of its group of imports."""
    bare = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and id(node) not in top and (node.module or "").startswith("sdrt")):
                first = node.lineno - 1
                while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                    first -= 1
                if not any("#" in line for line in lines[first:node.end_lineno]):
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert not bare, "function-local sdrt imports without a reason: " + ", ".join(bare)


def test_runtime_functions_are_small_and_the_pipeline_only_composes():
    long = []
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_RUNTIME_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
            if isinstance(node, ast.ClassDef) and node.name == "Pipeline":
                assert node.end_lineno - node.lineno + 1 <= MAX_PIPELINE_LINES
    assert not long, "runtime functions over the limit: " + ", ".join(long)


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    for target in {part.split(")")[0].split("#")[0] for part in readme.split("](")[1:]}:
        assert (ROOT / target).exists(), f"README links to {target}, which is missing"
