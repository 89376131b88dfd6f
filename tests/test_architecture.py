"""The shape of the house: the import graph of `softalign` has no cycle and no upward import, and only the family
module (and the injection layouts) know the model families by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import softalign
from softalign.families import FAMILIES

PACKAGE = Path(softalign.__file__).parent
FAMILY_HOMES = {"softalign.families", "softalign.injection"}
DEPRECATED_SHIMS = {"softalign.backbones", "softalign.config", "softalign.trainer", "softalign.rl.dpo_trainer"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every softalign module `name` imports (at module level or inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name.startswith("softalign")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("softalign"):
                continue
            for alias in node.names:  # `from . import objectives` imports a module, `from . import x` a name
                candidate = f"{module}.{alias.name}"
                targets.add(candidate if candidate in modules else module)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_upward_import():
    """No module imports the `__init__` of a package it belongs to (the version lives in `softalign.version`)."""
    upward = [
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if name.startswith(target + ".") and target in _modules() and _modules()[target].name == "__init__.py"
    ]
    assert upward == []


def test_import_graph_has_no_cycle():
    graph = _graph()
    # package __init__ files import their submodules by construction; a cycle through them is still a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_families_sit_below_injection():
    graph = _graph()
    assert "softalign.families" in graph["softalign.injection"]
    assert not {t for t in graph["softalign.families"] if t not in ("softalign.sd3_padding", "softalign.version")}


def _string_constants(tree: ast.AST):
    """String literals of a module, without docstrings (prose may name families; code may not)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_only_the_family_module_names_families():
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, FAMILIES)) + r")\b")
    mentions = []
    for name, path in _modules().items():
        if name in FAMILY_HOMES:
            continue
        for node in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            if pattern.search(node.value):
                mentions.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert mentions == []


def test_recipes_and_notebooks_use_the_public_api():
    """Recipes and notebooks are short scripts a user can copy: no `sys.path` edits, nothing from `softalign.cli`,
    no private names."""
    import json

    root = PACKAGE.parent
    sources = {str(p): p.read_text(encoding="utf-8") for p in sorted((root / "recipes").glob("*.py"))}
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources[str(notebook)] = "\n".join(
            line for cell in code for line in cell.splitlines() if not line.startswith("%")
        )
    problems = []
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                problems.append(f"{name}:{node.lineno}: sys.path")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softalign"):
                if node.module.startswith("softalign.cli"):
                    problems.append(f"{name}:{node.lineno}: imports from softalign.cli")
                problems += [f"{name}:{node.lineno}: private {a.name}" for a in node.names if a.name.startswith("_")]
                if any(part.startswith("_") for part in node.module.split(".")):
                    problems.append(f"{name}:{node.lineno}: private module {node.module}")
    assert problems == []
