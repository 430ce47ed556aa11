"""The layout of docs/architecture.md holds: every module imports on its own, and no two modules import
each other, directly or around a loop (lazy imports inside functions count too: a loop of lazy imports
still means neither module can be understood without the other)."""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "csr_plugin"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the csr_plugin modules it imports anywhere in its body (a package's own parents excluded:
    importing ``a.b`` runs ``a/__init__`` first, which is no dependency of ``a.b``'s design)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csr_plugin"):
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name.startswith("csr_plugin"))
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_two_module_loop():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}, "d": set()}
    assert cycles(graph) == [["a", "b"]]


def test_no_module_imports_itself_around_a_loop():
    assert cycles(import_graph(_modules())) == []


def test_sampling_lives_in_one_package():
    """Issue 14: sampling used to live in four places (sampling.py, sampler/, ray_sampling.py, openrlhf/engines.py)."""
    names = set(_modules())
    assert {"csr_plugin.sampler", "csr_plugin.ray_sampling", "csr_plugin.openrlhf.engines"}.isdisjoint(names)
    assert {"csr_plugin.sampling.search", "csr_plugin.sampling.local", "csr_plugin.sampling.ray_driver",
            "csr_plugin.sampling.openrlhf_actors"} <= names
    graph = import_graph(_modules())
    # the OpenRLHF integration may use sampling, never the other way round, except the one backend
    # that runs on OpenRLHF's own rollout actors
    for name, deps in graph.items():
        if name.startswith("csr_plugin.sampling") and name != "csr_plugin.sampling.openrlhf_actors":
            assert not {d for d in deps if d.startswith("csr_plugin.openrlhf")}, name


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    def try_import(name: str):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        return name, proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.returncode else []

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(name, err) for name, rc, err in pool.map(try_import, _modules()) if rc != 0]
    assert failures == []
