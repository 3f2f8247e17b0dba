"""The package layout is the architecture: each layer imports only the layers below it, a stage never imports
another stage, and Ray is imported only by the backends (and the Ray Jobs client)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlcseg_ray"

# layer -> the layers (top-level names under mlcseg_ray) its modules may import
ALLOWED = {
    "core": {"core"},  # the ground floor: the config, the run folder, the executor and the backend protocol
    "ops": {"ops", "core.fanout", "core.errors"},  # plain values in and out: never the run's Config
    "formats": {"formats", "ops", "core"},
    "models": {"models", "core"},
    "library": {"library", "core", "formats", "ops", "models"},  # what stages, the CLI, tools and bench share
    "stages": {"core", "formats", "ops", "models", "library"},
    "backends": {"backends", "core"},
    "tools": {"tools", "core", "formats", "ops", "models", "library", "backends"},
    "cli": {"cli", "core", "formats", "ops", "models", "library", "stages", "backends", "tools", "pipeline", ""},
}
RAY_ALLOWED = {"backends", "tools/jobs.py"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[str, int]]:
    """Absolute module names imported by ``path`` (relative imports resolved against ``root``), with their line.
    Imports under ``if TYPE_CHECKING:`` are annotations only and are left out."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            mod = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found += [(mod if node.module else f"{mod}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module, node.lineno))
    return found


def _layer_of(module: str) -> str:
    """``mlcseg_ray.ops.kmeans`` -> ``ops``; ``mlcseg_ray.core.fanout`` -> ``core.fanout``; the package -> ``""``."""
    parts = module.split(".")[1:]
    if parts[:1] == ["core"] and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] if parts and (PACKAGE / parts[0]).is_dir() or parts[:1] == ["pipeline"] else ""


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_layer_imports_only_the_layers_below_it(path):
    layer = path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else None
    if layer not in ALLOWED:
        return  # top-level modules (pipeline, the package itself) put the layers together
    bad = []
    for module, line in _imports(path):
        if not module.startswith("mlcseg_ray"):
            continue
        target = _layer_of(module)
        allowed = ALLOWED[layer]
        if target not in allowed and target.split(".")[0] not in allowed:
            bad.append(f"line {line}: {module}")
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports outside {sorted(ALLOWED[layer])}: {bad}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "stages").glob("*.py")), ids=lambda p: p.name)
def test_no_stage_imports_another_stage(path):
    others = [m for m, _ in _imports(path) if m.startswith("mlcseg_ray.stages") and m != "mlcseg_ray.stages"]
    assert not others, f"stages/{path.name} imports {others}"


def test_nothing_imports_a_stage_but_the_pipelines_stage_list():
    """What stages compute lives in the library floor (``library/``); a stage module is declarations, shard work and
    wiring, imported by ``pipeline.py`` alone (the CLI, tools, benchmarks and tests reach stages through it)."""
    root = PACKAGE.parent
    users = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "bench").rglob("*.py"), *(root / "tests").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel == "mlcseg_ray/pipeline.py" or rel.startswith("mlcseg_ray/stages/") or rel == "tests/test_layout.py":
            continue
        users += [f"{rel}:{line} {m}" for m, line in _imports(path, root) if m.startswith("mlcseg_ray.stages")]
    assert not users, users


@pytest.mark.parametrize("path", sorted((PACKAGE / "stages").glob("*.py")), ids=lambda p: p.name)
def test_a_stage_module_is_thin(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 250, f"stages/{path.name} has {lines} lines: what it computes belongs in library/"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_a_crowd(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 450, f"{path.relative_to(PACKAGE)} has {lines} lines: split it where its parts differ"


def _module_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (a package's own ``__init__`` aside)."""
    names = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in _modules()
    }
    graph = {}
    for name, path in names.items():
        graph[name] = set()
        for module, _ in _imports(path):
            while module and module not in names:
                module = module.rpartition(".")[0]
            if module and module not in (name, name.rpartition(".")[0]):
                graph[name].add(module)
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its modules in order), or [] where there is none."""
    state, path = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), [])


def test_no_import_cycle():
    assert _a_cycle(_module_graph()) == []
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]  # the finder finds one


def test_ray_is_imported_only_by_the_backends():
    users = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.split("/")[0] in RAY_ALLOWED or rel in RAY_ALLOWED:
            continue
        users += [f"{rel}:{line}" for m, line in _imports(path) if m == "ray" or m.startswith("ray.")]
    assert not users, f"Ray imported outside backends/: {users}"


def test_the_checker_sees_forbidden_imports(tmp_path):
    """The checks above can fail: a stage importing a sibling, and Ray, are found; a TYPE_CHECKING import is not."""
    bad = tmp_path / "mlcseg_ray" / "stages" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "from typing import TYPE_CHECKING\nfrom .cluster import read_pseudo\nfrom ..ops import levels\nimport ray\n"
        "if TYPE_CHECKING:\n    from ..core.backend import Backend\n"
    )
    found = [m for m, _ in _imports(bad, tmp_path)]
    assert found == ["typing", "mlcseg_ray.stages.cluster", "mlcseg_ray.ops", "ray"]
    assert _layer_of("mlcseg_ray.stages.cluster") == "stages" and _layer_of("mlcseg_ray.core.fanout") == "core.fanout"


def _direct_io(path: Path) -> list[str]:
    """Calls in ``path`` that open a file or a Parquet file without the storage layer: ``open(...)``,
    ``pq.*``/``pyarrow.parquet`` reads and writes, ``Image.open``, ``shutil``'s file operations."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            found.append(f"open() at line {node.lineno}")
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id == "pq" or (f.value.id, f.attr) in {("Image", "open"), ("shutil", "rmtree")}:
                found.append(f"{f.value.id}.{f.attr}() at line {node.lineno}")
    return found


@pytest.mark.parametrize(
    "path", sorted([*(PACKAGE / "stages").glob("*.py"), *(PACKAGE / "tools").glob("*.py")]), ids=lambda p: p.name
)
def test_stages_and_tools_read_and_write_only_through_the_storage_layer(path):
    """A run folder may be in a bucket: a stage that opened a path itself would work on a local folder only."""
    assert not _direct_io(path), f"{path.relative_to(PACKAGE)}: {_direct_io(path)} (use core/storage.py)"


def test_the_io_checker_sees_direct_io(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("open('a')\npq.read_table('b')\nImage.open('c')\nrun.masks.open('rb')\n")
    assert _direct_io(bad) == ["open() at line 1", "pq.read_table() at line 2", "Image.open() at line 3"]
