"""Packages import downward only, and no two packages import each other.

The graph is built statically from every `import` in the package, function-level ones included
(an import inside a function still ties the two packages together). README's "What is where"
lists the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bignlp_jax"

# Lowest first; a package may import its own layer (if that makes no cycle) and any lower one.
# errors.py is below everything (every layer raises UserError), then the path layer every
# layer reads and writes through (storage.py); hf/ (the Hugging Face format)
# sits with data/ because `init_from=hf:DIR` is read at run start-up in train/; perf/ (bench,
# plan) drives the train step, so it sits with the other commands above train/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("compat",),  # the checked shims over private JAX / Orbax APIs (nothing of ours below)
    # the path layer (local, gs://, s3://), the one path check, the rule that keeps files
    # named inside an input folder inside it, and the ledger of what we wrote (owned)
    ("storage", "access", "containment", "owned", "client_logs", "outage"),
    ("config",),
    ("rundir",),  # a run directory's files and its recorded config (rundir.py)
    ("parallel", "model", "data", "hf"),
    ("train", "checkpoint"),
    ("evaluate", "infer", "export", "perf"),
    ("pipeline",),
    ("cli",),
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _unit(path: Path, package: Path) -> str:
    """The top-level package (or module) of bignlp_jax that a file belongs to."""
    return path.relative_to(package).parts[0].removesuffix(".py")


def _imported(node: ast.AST, path: Path, package: Path) -> list[str]:
    """Absolute module names an import statement names ('' for none of ours)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            return [node.module or ""]
        here = list(path.relative_to(package.parent).with_suffix("").parts)
        base = here[:len(here) - node.level]  # a module's package is one level up
        if path.name == "__init__.py":
            base = here[:len(here) - node.level + 1]
        return [".".join(base + ([node.module] if node.module else []))]
    return []


def import_edges(package: Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
    """(importer, imported) top-level units -> the 'file:line' places that import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported(node, path, package):
                parts = name.split(".")
                if parts[0] != package.name or len(parts) < 2:
                    continue
                src, dst = _unit(path, package), parts[1]
                if src != dst:
                    where = f"{path.relative_to(package.parent)}:{node.lineno}"
                    edges.setdefault((src, dst), []).append(where)
    return edges


def problems(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """Unplaced packages, upward imports and cycles, one line each."""
    out = []
    units = {u for edge in edges for u in edge}
    out += [f"{u}: not in LAYERS (place it in tests/test_layers.py and README)"
            for u in sorted(units - LEVEL.keys())]
    for (src, dst), where in sorted(edges.items()):
        if src in LEVEL and dst in LEVEL and LEVEL[dst] > LEVEL[src]:
            out.append(f"{src} -> {dst} points up the layers ({', '.join(where)})")
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in reach(a)
                     if a != b and a in reach(b)})
    out += [f"cycle: {a} <-> {b}" for a, b in cycles]
    return out


def test_packages_import_downward_without_cycles():
    edges = import_edges()
    assert ("train", "checkpoint") in edges  # the walk sees imports at all
    assert problems(edges) == []


@pytest.mark.parametrize("edges, expected", [
    ({("checkpoint", "train"): ["x.py:1"], ("train", "checkpoint"): ["y.py:2"]},
     ["cycle: checkpoint <-> train"]),
    ({("data", "evaluate"): ["bignlp_jax/data/x.py:3"]},
     ["data -> evaluate points up the layers (bignlp_jax/data/x.py:3)"]),
    ({("cli", "newpkg"): ["bignlp_jax/cli.py:9"]},
     ["newpkg: not in LAYERS (place it in tests/test_layers.py and README)"]),
    ({("model", "parallel"): ["m.py:1"], ("train", "errors"): ["t.py:1"]}, []),
])
def test_the_check_finds_each_kind_of_problem(edges, expected):
    assert problems(edges) == expected


def test_relative_and_function_level_imports_count(tmp_path):
    package = tmp_path / "bignlp_jax"
    (package / "data").mkdir(parents=True)
    (package / "data" / "__init__.py").write_text("from .tasks import x\n")
    (package / "data" / "tasks.py").write_text(
        "def f():\n    from ..train import loop\n    import bignlp_jax.model.layers\n")
    assert import_edges(package) == {("data", "train"): ["bignlp_jax/data/tasks.py:2"],
                                     ("data", "model"): ["bignlp_jax/data/tasks.py:3"]}


def unexplained_function_imports(package: Path = PACKAGE) -> list[str]:
    """Imports inside functions with no reason: none on the line, none on the comment line just
    above the block of imports, and no module-wide `# Function-level imports: ...` line."""
    out = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if any(line.startswith("# Function-level imports: ") for line in lines):
            continue
        tree = ast.parse(text)
        top = {id(node) for node in tree.body}
        # `if TYPE_CHECKING:` imports never run: annotations only
        top |= {id(node) for block in tree.body if isinstance(block, ast.If)
                and ast.unparse(block.test).endswith("TYPE_CHECKING") for node in block.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            row = node.lineno - 1
            if "#" in lines[row]:
                continue
            above = row - 1
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            if above >= 0 and lines[above].strip().startswith("#"):
                continue
            out.append(f"{path.relative_to(package.parent)}:{node.lineno}: {lines[row].strip()}")
    return out


def test_function_level_imports_say_why():
    """Imports inside functions are for start-up time only (never to dodge a cycle: see the
    layer test above), and each says why."""
    assert unexplained_function_imports() == []


def test_the_reason_check_finds_a_silent_import(tmp_path):
    package = tmp_path / "bignlp_jax"
    package.mkdir()
    (package / "a.py").write_text(
        "def f():\n    import json  # why\n\n\ndef g():\n    # why, for both\n"
        "    import os\n    import re\n\n\ndef h():\n    import sys\n")
    assert unexplained_function_imports(package) == ["bignlp_jax/a.py:12: import sys"]


def names_from_own_package(package: Path = PACKAGE) -> list[str]:
    """'file:line package: names' where a module takes names from the `__init__` of a package
    it sits in (`from bignlp_jax.data import make_source` inside data/): such an import points
    up, from a part to the whole. Importing a sibling module through the package is fine."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        enclosing = {".".join(parts[:i]) for i in range(2, len(parts))}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0
                    and node.module in enclosing):
                continue
            folder = package.parent.joinpath(*node.module.split("."))
            names = [a.name for a in node.names if not (folder / f"{a.name}.py").is_file()
                     and not (folder / a.name / "__init__.py").is_file()]
            if names:
                out.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.module}: "
                           f"{', '.join(names)}")
    return out


def test_no_module_imports_the_package_it_sits_in():
    assert names_from_own_package() == []


def test_the_package_import_check_finds_one(tmp_path):
    package = tmp_path / "bignlp_jax"
    (package / "data" / "store").mkdir(parents=True)
    for init in (package / "__init__.py", package / "data" / "__init__.py",
                 package / "data" / "store" / "__init__.py"):
        init.write_text("")
    (package / "data" / "tokenizer.py").write_text("")
    (package / "data" / "store" / "commands.py").write_text(
        "from bignlp_jax.data import tokenizer\nfrom bignlp_jax.data import make_source\n"
        "from bignlp_jax.data.store import commands\nfrom bignlp_jax.model import Model\n")
    (package / "data" / "other.py").write_text("def f():\n    from bignlp_jax.data import x\n")
    assert names_from_own_package(package) == [
        "bignlp_jax/data/other.py:2 bignlp_jax.data: x",
        "bignlp_jax/data/store/commands.py:2 bignlp_jax.data: make_source"]
