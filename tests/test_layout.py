"""The package's layout (docs/design.md §2): imports flow one way between stages, with no cycle, and only
the Metaflow adapter imports Metaflow. Read from the source with `ast`, so nothing is executed; but the
flows' modules are imported in a fresh process, to see what loading them loads."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gallery"

# The stage of each top-level unit of gallery/: a module may import its own unit and lower stages only.
STAGES = {
    "errors": 0, "storage": 0, "progress": 0, "faults": 0,  # faults: where a process may be killed (tests, benches)
    "data": 1,
    "model": 2,
    "config": 3,  # settings name the model registries' backbones, poolings and weightings
    "training": 4,
    "retrieval": 5,
    "artifact": 6,  # a model folder: weights, ONNX graphs, the retrieval code
    "evaluation": 7,
    "steps": 8, "runs": 8, "preflight": 8,  # preflight: what the flow's start checks before any work
    "compare": 9,   # reads finished runs' evaluations
    "serve": 10,
    "bench": 11,
    "cli": 12,
    "__main__": 13,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """gallery modules imported by a file (`from gallery.x import y` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gallery"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gallery"))
    return found


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported_modules(p, set(files)) & set(files) - {m} for m, p in files.items()}


def stage_violations(graph) -> list[str]:
    out = []
    for source, targets in graph.items():
        if source == "gallery":  # the top-level facade names public functions lazily, by string
            continue
        for target in targets:
            s, t = unit(source), unit(target)
            if target == "gallery" or (s != t and STAGES[t] >= STAGES[s]):
                out.append(f"{source} imports {target}")
    return out


def cycles(graph) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        state[m] = 2
        stack.pop()

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_every_unit_has_a_stage(graph):
    assert {unit(m) for m in graph if m != "gallery"} <= set(STAGES)


def test_imports_flow_one_way(graph):
    assert stage_violations(graph) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(graph):
    broken = {m: set(t) for m, t in graph.items()}
    broken["gallery.data.ingest"].add("gallery.evaluation.report")  # data reaching up to evaluation
    assert "gallery.data.ingest imports gallery.evaluation.report" in stage_violations(broken)
    broken["gallery.data.tasks"].add("gallery.data.ingest")          # ingest -> contracts -> tasks -> ingest
    assert any("gallery.data.tasks" in c and "gallery.data.ingest" in c for c in cycles(broken))


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapter_imports_metaflow():
    assert {module_name(p) for p in PACKAGE.rglob("*.py") if "metaflow" in top_level_imports(p)} == {"gallery.runs"}


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init} needs a docstring saying what it owns and may import"


def test_public_names_resolve():
    import gallery

    for name in gallery.__all__:
        assert callable(getattr(gallery, name)), name


@pytest.mark.parametrize("flow", ["train_flow.py", "embed_flow.py"])
def test_a_flow_module_loads_no_heavy_library(flow):
    """Every task of a flow imports its module first: it must not load torch, numpy, pandas, pyarrow or
    matplotlib, which the steps that compute import themselves (a light step then starts in about a second)."""
    path = PACKAGE.parent / "flows" / flow
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('flow', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'pyarrow', 'matplotlib', 'sklearn', 'scipy') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={**os.environ, "USERNAME": "tests"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
