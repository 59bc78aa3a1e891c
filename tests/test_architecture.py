"""The library's shape, checked from the source (AST only, nothing imported but the contract layer):

* layers import only downward: contract -> model -> engine -> features (quality, train, ship,
  serve, plan) -> stage scripts; features may use each other but never in a circle;
* no two modules import each other in a circle, not even inside one package, and not even through
  an import inside a function (a lazy import still ties the two modules together);
* no module imports another module's private (`_name`) name;
* the contract layer runs without torch;
* the library never imports a stage script;
* no function is longer than 60 lines unless its first line says why (`# long: <reason>`), and no
  library file is longer than 450 lines.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "finetuneflow"
LAYERS = {"contract": 0, "model": 1, "engine": 2, "quality": 3, "train": 3, "ship": 3, "serve": 3, "plan": 3}
STAGES = {p.stem for p in REPO.glob("*.py")}
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450

# Known offenders still being fixed; the lists only shrink (test_the_known_offenders_still_offend).
KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()
KNOWN_LONG_FILES: set[str] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve_relative(node: ast.ImportFrom, package: str | None) -> str:
    """The absolute module of `from <module> import ...`; `package` is the package the importing
    module is in (for a package's `__init__.py`, the package itself): `from . import x` there is it."""
    if not node.level:
        return node.module or ""
    if package is None:
        return ""
    parts = package.split(".")
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def package_of(path: Path, importer: str) -> str:
    return importer if path.name == "__init__.py" else importer.rpartition(".")[0]


def imports_of(path: Path, importer: str | None = None) -> list[tuple[str, int]]:
    """Every module `path` imports (module level and inside functions), with its line; relative
    imports are resolved when the importing module's name is given."""
    found, package = [], package_of(path, importer) if importer else None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve_relative(node, package)
            if module:
                found.append((module, node.lineno))
                found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "finetuneflow":
        return None
    if len(parts) == 1:
        return "finetuneflow", 0
    return parts[1], LAYERS.get(parts[1], 0)


def violations(root: Path) -> list[str]:
    """Upward imports, imports of stage scripts, and circles between feature packages."""
    problems, edges = [], {}
    stages = {p.stem for p in root.parent.glob("*.py")}
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root.parent)
        own = layer_of(importer)
        for imported, line in imports_of(path, importer):
            if imported.split(".")[0] in stages:
                problems.append(f"{path.relative_to(root.parent)}:{line} imports the stage script {imported}")
            target = layer_of(imported)
            if target is None or own is None:
                continue
            if target[1] > own[1]:
                problems.append(f"{path.relative_to(root.parent)}:{line} ({own[0]}, layer {own[1]}) imports "
                                f"{imported} ({target[0]}, layer {target[1]})")
            elif target[1] == own[1] == 3 and target[0] != own[0]:
                edges.setdefault(own[0], set()).add(target[0])
    for start in edges:   # a circle between feature packages
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    problems.append("feature packages import each other in a circle: " + " -> ".join(trail + [nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    return sorted(set(problems))


def test_layers_only_import_downward():
    assert violations(PACKAGE) == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a contract module importing the engine, a model module importing a stage
    script, and two features importing each other are all reported."""
    fake = tmp_path / "finetuneflow"
    for sub in ("contract", "engine", "model", "quality", "ship"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (tmp_path / "train_bart_lora.py").write_text("")
    (fake / "contract" / "paths.py").write_text("from finetuneflow.engine.generation import summarize\n")
    (fake / "model" / "loading.py").write_text("def f():\n    import train_bart_lora\n")
    (fake / "quality" / "a.py").write_text("from finetuneflow.ship import b\n")
    (fake / "ship" / "b.py").write_text("from finetuneflow.quality import a\n")
    found = violations(fake)
    assert any("contract/paths.py:1 (contract, layer 0) imports finetuneflow.engine.generation" in p for p in found)
    assert any("model/loading.py:2 imports the stage script train_bart_lora" in p for p in found)
    assert any("in a circle" in p for p in found)


# ----------------------------------------------------------------------------- circles between modules

def module_graph(root: Path) -> dict[str, set[str]]:
    """{module: the library modules it imports}, counting imports inside functions too.
    `from pkg import mod` points at pkg.mod, `from pkg.mod import name` at pkg.mod."""
    modules = {module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}

    def nearest(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for importer, path in modules.items():
        targets = graph.setdefault(importer, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(nearest(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = resolve_relative(node, package_of(path, importer))
                targets.update(nearest(f"{base}.{alias.name}") for alias in node.names)
        targets.discard(importer)
        targets.discard("")
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) for each group of modules that reach each other."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node: str) -> None:   # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_circle(graph, group) for group in groups]


def _one_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    trails, seen = [[start]], {start}
    while trails:
        trail = trails.pop(0)
        for nxt in sorted(graph.get(trail[-1], ())):
            if nxt == start:
                return trail + [start]
            if nxt in group and nxt not in seen:
                seen.add(nxt)
                trails.append(trail + [nxt])
    raise AssertionError(f"no circle through {start}")   # cannot happen in a strongly connected group


def module_circles(root: Path, known=frozenset()) -> list[str]:
    return [" -> ".join(c) for c in circles(module_graph(root)) if frozenset(c) not in known]


def private_imports(root: Path, known=frozenset(), users: tuple[Path, ...] = ()) -> list[str]:
    """Imports of a library module's `_name` (`from m import _x`, or `m._x` on an imported module)
    by another library module or by one of `users` (stage scripts, benchmarks, scripts)."""
    modules = {module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}
    importers = {**modules, **{module_name(p, root.parent): p for p in users}}
    found = []
    for importer, path in importers.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}   # local name -> library module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve_relative(node, package_of(path, importer))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    elif base in modules and alias.name.startswith("_") and not alias.name.startswith("__") \
                            and (importer, full) not in known:
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} imports {full}")
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                full = f"{aliases[node.value.id]}.{node.attr}"
                if (importer, full) not in known:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} uses {full}")
    return sorted(set(found))


def test_no_module_circles_not_even_inside_a_package():
    assert module_circles(PACKAGE, KNOWN_CIRCLES) == []


def test_no_module_imports_a_private_name():
    """Not the library, nor the stage scripts, benchmarks and scripts that use it (tests may)."""
    users = tuple(sorted(REPO.glob("*.py"))) + tuple(sorted(REPO.glob("benchmarks/*.py"))) \
        + tuple(sorted(REPO.glob("scripts/*.py")))
    assert private_imports(PACKAGE, KNOWN_PRIVATE_IMPORTS, users) == []


def test_the_known_offenders_still_offend():
    """The allow-lists only shrink: an entry that no longer offends must be deleted."""
    found = {frozenset(c) for c in circles(module_graph(PACKAGE))}
    assert KNOWN_CIRCLES <= found
    private = " ".join(private_imports(PACKAGE))
    assert all(name in private for _, name in KNOWN_PRIVATE_IMPORTS)
    assert all(len((REPO / f).read_text(encoding="utf-8").splitlines()) > MAX_FILE_LINES for f in KNOWN_LONG_FILES)


def test_the_circle_check_catches_a_circle_inside_a_package(tmp_path):
    """The check itself, on a planted package: two serve modules that import each other (one of
    them only inside a function) are a circle; a chain, a package importing its own modules and a
    module importing its parent package are not; private names are caught in both spellings."""
    fake = tmp_path / "finetuneflow"
    (fake / "serve").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "serve" / "__init__.py").write_text("from finetuneflow.serve.c import helper\n")
    (fake / "serve" / "a.py").write_text("from finetuneflow.serve.b import build\n")
    (fake / "serve" / "b.py").write_text("def build():\n    from finetuneflow.serve import a\n    return a\n")
    (fake / "serve" / "c.py").write_text("def helper():\n    pass\n\n\ndef _secret():\n    pass\n")
    (fake / "serve" / "d.py").write_text("from finetuneflow.serve.c import helper, _secret\n"
                                         "from finetuneflow.serve import c\nx = c._secret\n")
    (fake / "serve" / "e.py").write_text("from . import c\nfrom .a import build\n")
    assert module_circles(fake) == ["finetuneflow.serve.a -> finetuneflow.serve.b -> finetuneflow.serve.a"]
    assert module_circles(fake, {frozenset({"finetuneflow.serve.a", "finetuneflow.serve.b"})}) == []
    assert private_imports(fake) == ["finetuneflow/serve/d.py:1 imports finetuneflow.serve.c._secret",
                                     "finetuneflow/serve/d.py:3 uses finetuneflow.serve.c._secret"]
    assert module_graph(fake)["finetuneflow.serve.e"] == {"finetuneflow.serve.c", "finetuneflow.serve.a"}
    (fake / "serve" / "c.py").write_text("import finetuneflow.serve.e\n")   # c -> e -> c, through a relative import
    assert "finetuneflow.serve.c -> finetuneflow.serve.e -> finetuneflow.serve.c" in module_circles(fake)


def test_the_contract_layer_imports_no_torch():
    modules = [module_name(p, REPO) for p in sorted((PACKAGE / "contract").glob("*.py"))]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def long_functions(paths) -> list[str]:
    found = []
    for path in paths:
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                head = " ".join(lines[node.lineno - 1:node.body[0].lineno])
                if length > MAX_FUNCTION_LINES and "# long:" not in head:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("where", ["library", "stages"])
def test_no_function_over_60_lines_without_a_reason(where):
    paths = sorted(PACKAGE.rglob("*.py")) if where == "library" else sorted(REPO.glob("*.py"))
    assert long_functions(paths) == []


def long_files(root: Path, known=frozenset()) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        name = path.relative_to(root.parent).as_posix()
        if lines > MAX_FILE_LINES and name not in known:
            found.append(f"{name} ({lines} lines)")
    return found


def test_no_library_file_over_450_lines():
    """A module that long does several jobs: split it by job."""
    assert long_files(PACKAGE, KNOWN_LONG_FILES) == []
