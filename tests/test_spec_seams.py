"""The public seams (issue 18): the `BackboneSpec` contract is complete, the compat layer is one public module,
and the package's modules import without cycles, each on its own."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qzoom_adapters as qz
from qzoom_adapters import compat
from qzoom_adapters import spec as spec_module
from qzoom_adapters.spec import BUILTIN_BACKBONES, OPTIONAL_MEMBERS, BackboneSpec, protocol_members

ROOT = "qzoom_adapters"
SUBPACKAGES = ("backbones", "recipes", "benchmarks")  # repository folders installed under qzoom_adapters

# Members a caller reads from one concrete family it built itself, not from any spec: (file, member).
FAMILY_SPECIFIC = {
    ("benchmarks/speed.py", "factor"),  # the speed benchmark builds Qwen-VL models only (its _spec_class)
    ("benchmarks/speed.py", "TINY_IDS"),
    ("benchmarks/tool_loop_latency.py", "factor"),  # builds Qwen-VL models only, through the speed benchmark's
}


def _package_dirs() -> dict[str, Path]:
    """Import name -> folder of the package and of each subpackage it maps from a repository folder."""
    dirs = {ROOT: Path(qz.__file__).parent}
    for sub in SUBPACKAGES:
        found = importlib.util.find_spec(f"{ROOT}.{sub}")
        dirs[f"{ROOT}.{sub}"] = Path(next(iter(found.submodule_search_locations)))
    return dirs


def _modules() -> dict[str, Path]:
    """Every module of the installed namespace: dotted name -> source file (packages: their __init__.py)."""
    dirs = _package_dirs()
    mapped = {d.resolve() for name, d in dirs.items() if name != ROOT}
    out = {}
    for pkg, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if any(part in ("__pycache__",) for part in rel.parts):
                continue
            if pkg == ROOT and any((folder / p).resolve() in mapped for p in rel.parts[:1]):
                continue  # a mapped folder inside the root (none today) is listed under its own name
            if not all((folder / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
                continue  # a stray script folder, not a package
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = path
    return out


def _repo_path(path: Path) -> str:
    return str(path.resolve().relative_to(Path(qz.__file__).resolve().parents[1]))


# --- 1. the protocol lists every member used on a spec -----------------------------------------------------
SPEC_NAMES = {"spec", "spec_cls"}


def _is_spec(node: ast.AST) -> bool:
    """`spec`, `spec_cls`, `<x>.spec`, `<x>.spec_cls`, `type(<one of those>)`."""
    if isinstance(node, ast.Name):
        return node.id in SPEC_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in SPEC_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" and node.args:
        return _is_spec(node.args[0])
    return False


def spec_members_used(source: str) -> list[tuple[int, str]]:
    """(line, member) for each `spec.<member>` / `getattr(spec, "<member>", ...)` / `hasattr(...)` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_spec(node.value):
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and _is_spec(node.args[0])
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            found.append((node.lineno, node.args[1].value))
    return [(line, name) for line, name in found if not name.startswith("__")]


def _callers() -> dict[str, Path]:
    """Modules that use specs from outside: the core, the kit, recipes, benchmarks (not the specs themselves)."""
    return {name: path for name, path in _modules().items()
            if not name.startswith(f"{ROOT}.backbones") and name != f"{ROOT}.spec"}


def test_the_scan_sees_every_way_of_reaching_a_spec():
    src = ("spec.a; self.spec.b(); spec_cls.c(); type(spec).d; bb.spec.e; getattr(self.spec, 'f', None)\n"
           "hasattr(spec_cls, 'g'); spec_module.h; other.i; getattr(x, 'j')\n")
    assert sorted(name for _, name in spec_members_used(src)) == list("abcdefg")


def test_protocol_declares_every_member_the_core_recipes_and_benchmarks_use():
    declared = protocol_members() | set(OPTIONAL_MEMBERS)
    undeclared, family_specific_seen = [], set()
    for name, path in _callers().items():
        rel = _repo_path(path)
        for line, member in spec_members_used(path.read_text()):
            if (rel, member) in FAMILY_SPECIFIC:
                family_specific_seen.add((rel, member))
            elif member not in declared:
                undeclared.append(f"{rel}:{line} uses spec.{member}")
    assert not undeclared, ("members used on a spec but not declared by BackboneSpec (qzoom_adapters/spec.py; "
                            "declare them, with a docstring, or list them in OPTIONAL_MEMBERS):\n"
                            + "\n".join(undeclared))
    assert family_specific_seen == FAMILY_SPECIFIC, f"stale FAMILY_SPECIFIC entries: {FAMILY_SPECIFIC - family_specific_seen}"


def test_protocol_names_the_members_of_issue_18():
    assert {"key_value", "rotary_embeddings", "video_token_id", "model_class", "text_config"} <= protocol_members()
    assert not set(OPTIONAL_MEMBERS) & protocol_members()


def test_every_protocol_member_has_a_docstring():
    src = Path(spec_module.__file__).read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "BackboneSpec")
    documented = set()
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            documented.add(node.name)
        elif isinstance(node, ast.AnnAssign) and i + 1 < len(cls.body):
            after = cls.body[i + 1]
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                documented.add(node.target.id)
    assert protocol_members() - documented == set()


@pytest.mark.parametrize("family", sorted(BUILTIN_BACKBONES))
def test_builtin_families_implement_the_whole_protocol(family):
    spec_cls = qz.registered_families()[family]
    assert spec_module.resolve_target(BUILTIN_BACKBONES[family]) is spec_cls and spec_cls.family == family
    model = spec_cls.model_class()._from_config(spec_cls.tiny_config()).eval()
    spec = qz.get_spec(model)
    assert type(spec) is spec_cls and isinstance(spec, BackboneSpec)
    missing = sorted(m for m in protocol_members() if not hasattr(spec, m))
    assert not missing, f"{spec_cls.__name__} lacks {missing}"


# --- 2. the compat layer is one public module --------------------------------------------------------------
def test_core_and_backbones_import_the_public_compat_module():
    old = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    (node.module or "").endswith("_compat") or any(a.name == "_compat" for a in node.names)):
                old.append(f"{_repo_path(path)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.endswith("._compat") for a in node.names):
                old.append(f"{_repo_path(path)}:{node.lineno}")
    assert not old, f"import qzoom_adapters.compat, not backbones._compat: {old}"


def test_only_compat_reads_the_transformers_version():
    offenders = []
    for name, path in _modules().items():
        if name == f"{ROOT}.compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "__version__" and \
                    isinstance(node.value, ast.Name) and node.value.id == "transformers":
                offenders.append(f"{_repo_path(path)}:{node.lineno}")
    # recording the version in a benchmark report is not a version check
    offenders = [o for o in offenders if not o.startswith("benchmarks/")]
    assert not offenders, f"transformers version read outside qzoom_adapters/compat.py: {offenders}"


# --- 3. imports: no cycle, each module on its own ----------------------------------------------------------
def _module_level_imports(tree: ast.Module):
    """Import statements executed when the module is imported (not in functions; not under TYPE_CHECKING)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef, ast.For, ast.While)) or \
                type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> package modules whose code runs (or must have run) because of its module-level imports.

    `import a.b.c` / `from a.b import x` run a.b.c (or a.b.x when it is a module) and the packages above it that
    are not already above the importer (Python imports the importer's own parents first). `from parent import
    name` of a non-module name needs that package's `__init__` to have run, so it is an edge too.
    """
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()

        def add(target: str, explicit: bool) -> None:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                last = i == len(parts)
                if mod in modules and mod != name and (mod not in own_parents or (last and explicit)):
                    edges.add(mod)

        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, explicit=False)
                continue
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            attrs = [a.name for a in node.names if f"{source}.{a.name}" not in modules]
            add(source, explicit=bool(attrs))
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}", explicit=True)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules():
    modules = _modules()
    assert f"{ROOT}.backbones.qwen2_vl" in modules and f"{ROOT}.recipes.cli" in modules
    graph = import_graph(modules)
    assert f"{ROOT}.compat" in graph[f"{ROOT}.trunk"]
    assert import_cycles(graph) == []


def test_spec_and_compat_are_leaves_and_backbones_import_only_leaves():
    graph = import_graph(_modules())
    leaves = {f"{ROOT}.errors", f"{ROOT}.spec", f"{ROOT}.compat"}
    assert graph[f"{ROOT}.spec"] <= {f"{ROOT}.errors"}
    assert graph[f"{ROOT}.compat"] == set()
    for name, edges in graph.items():
        if name.startswith(f"{ROOT}.backbones"):
            core = {e for e in edges if not e.startswith(f"{ROOT}.backbones")}
            assert core <= leaves, f"{name} imports core modules {sorted(core - leaves)} (only {sorted(leaves)})"
        elif not name.startswith((f"{ROOT}.recipes", f"{ROOT}.benchmarks")):
            assert not any(e.startswith(f"{ROOT}.backbones") for e in edges), f"core module {name} imports a backbone"


def _isolated_modules() -> list[str]:
    return sorted(n for n in _modules() if not n.endswith("__main__") and not n.startswith(
        (f"{ROOT}.recipes", f"{ROOT}.benchmarks")))


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_each_core_and_backbone_module_imports_on_its_own():
    names = _isolated_modules()
    assert f"{ROOT}.spec" in names and f"{ROOT}.backbones.llava" in names and f"{ROOT}.compat" in names
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(names, pool.map(lambda n: _python(f"import {n}"), names)))
    failed = {n: r.stderr.strip().splitlines()[-1:] for n, r in results.items() if r.returncode != 0}
    assert not failed, f"modules that fail to import in a fresh interpreter: {failed}"


def test_importing_the_package_imports_no_backbone_until_a_lookup():
    code = ("import sys, qzoom_adapters as qz, qzoom_adapters.spec, qzoom_adapters.pipeline\n"
            "before = sorted(m for m in sys.modules if m.startswith('qzoom_adapters.backbones'))\n"
            "qz.registered_families()\n"
            "after = sorted(m for m in sys.modules if m.startswith('qzoom_adapters.backbones.'))\n"
            "print(before, after)\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    before, after = r.stdout.strip().split("] [")
    assert before == "[" and all(f"qzoom_adapters.backbones.{m}" in after for m in
                                 ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"))


# --- registry precedence with lazily loaded built-ins ------------------------------------------------------
@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(spec_module, "_REGISTRY", {})
    monkeypatch.setattr(spec_module, "_BUILTIN_CLASSES", {})
    monkeypatch.setattr(spec_module, "_entry_points_loaded", True)


def test_a_registration_wins_over_the_builtin_family_even_before_builtins_load(clean_registry):
    from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec

    mine = type("MyQwen", (Qwen2_5_VLSpec,), {})
    qz.register_backbone(mine)  # the built-ins are not resolved yet
    families = qz.registered_families()
    assert families["qwen2_5_vl"] is mine and spec_module.spec_class_for("qwen2_5_vl") is mine
    assert families["qwen3_vl"].__name__ == "Qwen3VLSpec"


def test_the_latest_registration_claiming_a_model_type_wins(clean_registry):
    from qzoom_adapters.backbones.llava import LlavaSpec

    first = type("First", (LlavaSpec,), {"family": "first"})
    second = type("Second", (LlavaSpec,), {"family": "second"})
    qz.register_backbone(second)
    qz.register_backbone(first)
    assert spec_module.spec_class_for("llava") is first
    assert spec_module.spec_class_for("qwen2_vl").__name__ == "Qwen2VLSpec"


def test_resolve_target_names_a_bad_string():
    with pytest.raises(qz.QZoomError, match="module:Class"):
        spec_module.resolve_target("qzoom_adapters.backbones.llava.LlavaSpec")
