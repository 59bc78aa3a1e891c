"""The library's shape, checked from the source (AST only, nothing imported but the contract layer):

* layers import only downward: contract -> model -> engine -> features (quality, train, ship,
  serve, plan) -> stage scripts; features may use each other but never in a circle;
* the contract layer runs without torch;
* the library never imports a stage script;
* no function is longer than 60 lines unless its first line says why (`# long: <reason>`).
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


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (module level and inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
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
        for imported, line in imports_of(path):
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
