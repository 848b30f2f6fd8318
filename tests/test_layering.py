"""Import layering, read statically (nothing is imported): no import cycles between modules, and no
upward import across "pipeline (CLI, core) -> targets, parallel -> passes, runtime -> models"
(docs/architecture.md).

Every `import` / `from ... import` in models/, runtime/, passes/, parallel/, targets/, pipeline/ and
benchmarks/ counts, function-level
ones included: a deferred import hides a cycle from Python, not from the design. The edge goes to the
module whose names are used (`from pipeline import export` -> pipeline.export); the implicit import
of a parent package's __init__ is not an edge.

Rules:
  models    import nothing of the rest;
  runtime   (ships inside packages) imports models at most (only models.errors, guarded, for the CLI);
  passes    import models at most;
  targets, parallel  import passes, runtime, models, each other and the core's public API (CORE_PUBLIC_API);
  core      (pipeline/ minus the entry points) imports targets only through the registry (REGISTRY);
  entry points (CLI, benchmarks/) may import everything; nothing imports them.

KNOWN_VIOLATIONS lists what is still wrong today, each with its reason. It can only shrink: the test
fails on any edge or cycle that is not listed, and on any listed one that no longer exists (remove it).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "runtime", "passes", "parallel", "targets", "pipeline", "benchmarks")
LAYER = {"models": 0, "runtime": 1, "passes": 1, "parallel": 2, "targets": 2, "pipeline": 3}
ENTRY = 4
ENTRY_POINTS = ("pipeline.cli", "pipeline.__main__", "benchmarks")
# what targets may use of the core: export, parity, golden data, packaging, the stage runner, the
# quantize stage's error profile, and for target builders (issue 13): the build context and shared stage
# helpers (pipeline.build), the package IO spec (pipeline.io_spec), the package README writer
# (pipeline.package_readme), the fp16 reference (pipeline.fp16_reference, ort-cuda's fp16 judgement) and the
# fixed-shape export (pipeline.static_export: the family's static form as ONNX, used by ascend and ort-cuda's gears),
# and the package's one weights file (pipeline.weights_file: every graph of a package over one external-data file),
# and the layer-by-layer build (pipeline.streaming: `compile --stream`, given the target's session settings).
# None of them imports a target, so a target builder can call them without a circle.
CORE_PUBLIC_API = frozenset({"pipeline", "pipeline.export", "pipeline.parity", "pipeline.golden",
                             "pipeline.package", "pipeline.stages", "pipeline.error_profile", "pipeline.build",
                             "pipeline.io_spec", "pipeline.package_readme", "pipeline.fp16_reference",
                             "pipeline.static_export", "pipeline.weights_file", "pipeline.streaming"})
# how the core reaches targets: the registry (targets.get / find / option_problems) and the interface types
REGISTRY = frozenset({"targets", "targets.base"})

KNOWN_VIOLATIONS: dict[tuple[str, ...], str] = {}


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules it imports} restricted to `mods`, every import statement in the file."""
    def known(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for m, path in mods.items():
        pkg = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t and t != m)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_path(graph: dict[str, set[str]], comp: tuple[str, ...]) -> str:
    """One closed import path through a component, for the failure message: a -> b -> ... -> a."""
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return " -> ".join(reversed(path)) + f" -> {start}"
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return " <-> ".join(comp)


def layer(m: str) -> int:
    if any(m == e or m.startswith(e + ".") for e in ENTRY_POINTS):
        return ENTRY
    return LAYER[m.split(".")[0]]


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The (importer, imported) edges that break the layering rules."""
    bad = []
    for m in sorted(graph):
        for d in sorted(graph[m]):
            lm, ld = layer(m), layer(d)
            if ld == ENTRY and lm != ENTRY:
                bad.append((m, d))                          # nothing below imports an entry point
            elif lm == ENTRY:
                continue
            elif lm == LAYER["targets"] and ld == LAYER["pipeline"]:  # targets and parallel
                if d not in CORE_PUBLIC_API:
                    bad.append((m, d))
            elif lm == LAYER["pipeline"] and ld == LAYER["targets"]:
                if d not in REGISTRY:
                    bad.append((m, d))
            elif ld > lm:
                bad.append((m, d))
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files())


def test_no_new_import_cycles(graph):
    new = [c for c in cycles(graph) if c not in KNOWN_VIOLATIONS]
    assert not new, "import cycles:\n" + "\n".join(cycle_path(graph, c) for c in new)


def test_no_new_upward_imports(graph):
    new = [e for e in upward(graph) if e not in KNOWN_VIOLATIONS]
    assert not new, "upward imports (layering pipeline -> targets -> passes -> models):\n" + "\n".join(
        f"{a} imports {b}" for a, b in new)


def test_known_violations_only_shrink(graph):
    """An allow-listed violation that has been fixed must leave the list."""
    present = set(cycles(graph)) | set(upward(graph))
    fixed = [k for k in KNOWN_VIOLATIONS if k not in present]
    assert not fixed, "fixed, remove from KNOWN_VIOLATIONS: " + ", ".join(" / ".join(k) for k in fixed)


def test_every_module_is_seen(graph):
    for m in ("models.checkpoint", "passes.quant_weights", "targets.ascend.flow", "targets.ascend.kit",
              "targets.ascend.kit.verify_on_device", "pipeline.compile", "pipeline.build", "targets.ort_cpu.build",
              "benchmarks.cuda"):
        assert m in graph
    # a function-level import counts (the ort-cpu target imports its build inside Target.build)
    assert "targets.ort_cpu.build" in graph["targets.ort_cpu"]
    assert graph["pipeline.compile"] & set(REGISTRY) and not {"targets.ort_cpu", "targets.ascend.flow"} & graph[
        "pipeline.compile"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_detector_reports_an_injected_cycle_and_upward_import(tmp_path):
    _write(tmp_path, {
        "models/__init__.py": "",
        "models/a.py": "from .b import x\n",
        "models/b.py": "def f():\n    from models import c\nx = 1\n",      # function-level import
        "models/c.py": "import models.a\n",
        "models/d.py": "from passes.p import y\n",                           # upward: models -> passes
        "passes/__init__.py": "",
        "passes/p.py": "from models.a import x\ny = 2\n",
        "targets/__init__.py": "", "pipeline/__init__.py": "",
    })
    g = import_graph(module_files(tmp_path))
    assert g["models.b"] == {"models.c"} and g["passes.p"] == {"models.a"}
    assert cycles(g) == [("models.a", "models.b", "models.c")]
    assert cycle_path(g, cycles(g)[0]) == "models.a -> models.b -> models.c -> models.a"
    assert upward(g) == [("models.d", "passes.p")]


def test_layer_rules_on_a_fake_graph():
    g = {"targets.x": {"pipeline.parity", "pipeline.compile", "passes.q"}, "passes.q": {"models.m"},
         "pipeline.compile": {"targets", "targets.x"}, "pipeline.parity": set(), "targets": set(),
         "models.m": set(), "pipeline.cli": {"targets.x"}, "pipeline.export": {"pipeline.cli"}}
    assert upward(g) == [("pipeline.compile", "targets.x"), ("pipeline.export", "pipeline.cli"),
                         ("targets.x", "pipeline.compile")]
    assert cycles(g) == [("pipeline.compile", "targets.x")]
