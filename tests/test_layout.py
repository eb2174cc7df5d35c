"""The package's shape: no import cycles, no imports of another module's private names, and one registry of
methods that the README's table of methods lists exactly."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import transferlab
from transferlab.heads import registry

SRC = Path(transferlab.__file__).parent
README = Path(__file__).parents[1] / "README.md"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = ("transferlab", *p.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts).removesuffix(".__init__")] = p
    return out


def _imports(mods: dict[str, Path]):
    """(importer, imported module, names) for every transferlab import, function-level ones included."""
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] != "transferlab":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    yield name, (full if full in mods else base), alias.name if full not in mods else None
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "transferlab":
                        yield name, alias.name, None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                found.append(stack[stack.index(v) :] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(edges):
        if not state.get(u):
            visit(u)
    return found


def test_no_import_cycles_between_modules():
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in _imports(mods):
        if b != a and b in mods and b != "transferlab":
            edges[a].add(b)
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    mods = _modules()
    private = [f"{a} imports {b}.{n}" for a, b, n in _imports(mods) if n and n.startswith("_") and n != "__version__"]
    assert private == []


def test_cycle_finder_finds_a_cycle():  # the check above cannot pass vacuously
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def _readme_methods() -> dict[str, list[str]]:
    text = README.read_text()
    section = text[text.index("### Heads") :]
    section = section[: section.index("\n### ", 5)]
    rows = [line for line in section.splitlines() if re.match(r"\| `\w+` \|", line)]
    return {re.match(r"\| `(\w+)` \|", r).group(1): [c.strip() for c in r.strip("|").split("|")] for r in rows}


def test_readme_lists_exactly_the_registered_methods_with_kind_and_export():
    table = _readme_methods()
    assert list(table) == registry.names()
    for name, cells in table.items():
        info = registry.get(name)
        assert cells[1] == info.kind, name
        assert cells[2] == ("yes" if info.exportable else "no"), name
        assert cells[3] == ("no" if not info.default else "yes" if info.cv is not None else "baseline"), name


def test_all_is_every_feature_method_and_unknown_names_are_refused():
    all_ = registry.resolve_methods(["all"])
    assert all_ == [n for n in registry.names() if registry.get(n).in_all]
    assert "finetune" not in all_ and set(registry.names("seed")) == {"softmax", "svm"}
    assert registry.resolve_methods(["svm", "all", "finetune"])[0] == "svm"
    with pytest.raises(ValueError, match="unknown method 'nope'.*softmax"):
        registry.resolve_methods(["nope"])
    with pytest.raises(ValueError, match="end-to-end"):
        registry.make_head("finetune")


def test_stage_packages_depend_on_earlier_stages_only():
    """Package level: the stages form a DAG (data <- features <- heads <- evaluation <- report <- model, finetune),
    `transferlab/__init__` (version, lazy `load`), `warning_filters` and `progress` aside: the latter two import
    nothing of transferlab, and every stage may use them."""
    mods = _modules()
    base = ("transferlab", "warning_filters", "progress")

    def stage(name: str) -> str:
        return name.split(".")[1] if name.count(".") else "transferlab"

    edges: dict[str, set[str]] = {}
    for a, b, _ in _imports(mods):
        if a in ("transferlab.warning_filters", "transferlab.progress"):
            assert b not in mods, f"{a} imports {b}"
        if b in mods and stage(a) != stage(b) and not {stage(a), stage(b)} & set(base):
            edges.setdefault(stage(a), set()).add(stage(b))
    assert _cycles(edges) == []
    assert edges.get("data", set()) == set() and edges["features"] == {"data"}


def test_readme_python_imports_resolve():
    """Every `from transferlab... import name` in the README's Python blocks names something that exists."""
    import importlib

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    lines = [m for b in blocks for m in re.findall(r"^from (transferlab[\w.]*) import ([\w, ]+)", b, re.M)]
    assert lines
    for module, names in lines:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"


def test_scipy_special_is_loaded_before_torch_so_skops_imports_fast():
    """skops.io's first import looks up scipy.special's ufuncs by scanning sys.modules in order: with scipy.special
    loaded ahead of torch's modules (transferlab/__init__.py) the scan stops early (0.2 s, not 0.8-1.9 s, in the
    final fits of every run)."""
    import subprocess
    import sys

    code = "import sys, transferlab.study; m = list(sys.modules); print(m.index('scipy.special') < m.index('torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
