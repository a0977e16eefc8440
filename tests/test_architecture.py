"""The walls between the stages of histokt/, read from the source with ast (no module is imported).

    histokt.train            never imports histokt.batch or histokt.study
    histokt.results          never imports histokt.train
    histokt.ingest.cards     never imports zarr (nor loads it through a histokt module at module level)
    histokt.study,           never import torch: neither directly (anywhere in a module) nor through any module
    histokt.batch.slurm        they load at import time (the transitive closure of module-level imports)
    histokt.cli              imported by histokt/__main__.py only
    subpackage __init__.py   empty, except histokt/ingest/cards/__init__.py (the card registry)

Module-level imports include those in class bodies, ``if`` and ``try`` blocks (they run at import); function-level
ones run later and count for the direct rules only. Relative imports are resolved against the importing module.
The checker runs on any tree, so test_the_checker_catches_planted_violations proves that it bites.
"""

import ast
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

TORCH = ("torch", "torchvision")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    module_level: set = field(default_factory=set)  # imported modules (and their parents) at import time
    anywhere: set = field(default_factory=set)  # every import, function bodies included


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _with_parents(name: str) -> set:
    parts = name.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


class _Imports(ast.NodeVisitor):
    def __init__(self, module: Module, known: set):
        self.module, self.known, self.depth = module, known, 0

    def _add(self, names: set) -> None:
        for name in names:
            self.module.anywhere.add(name)
            if self.depth == 0:
                self.module.module_level.add(name)

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node):
        self._add(set().union(*(_with_parents(alias.name) for alias in node.names)))

    def visit_ImportFrom(self, node):
        if node.level:
            package = self.module.name if self.module.is_package else self.module.name.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = _with_parents(source)
        for alias in node.names:  # `from histokt.batch import slurm` loads the module histokt.batch.slurm
            if f"{source}.{alias.name}" in self.known:
                names.add(f"{source}.{alias.name}")
        self._add(names)


def scan(package_dir: Path) -> dict[str, Module]:
    """Every module under ``package_dir`` (a top-level package), by dotted name, with its imports."""
    top = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        is_package = rel.name == "__init__"
        name = ".".join(rel.parts[:-1] if is_package else rel.parts)
        modules[name] = Module(name, path, is_package)
    known = set(modules)
    for m in modules.values():
        _Imports(m, known).visit(ast.parse(m.path.read_text(), str(m.path)))
    assert top in modules, f"{package_dir}: not a package"
    return modules


def loaded_at_import(modules: dict[str, Module], name: str) -> set:
    """Every module importing ``name`` loads: the closure over module-level imports (parents included)."""
    seen, todo = set(), list(_with_parents(name))
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in modules:
            todo.extend(modules[current].module_level - seen)
    return seen


def violations(package_dir: Path) -> list[str]:
    """Every forbidden edge of the tree, one line each, naming the module, what it imports, and the rule."""
    modules = scan(package_dir)
    top = package_dir.name
    out = []

    def imports(m: Module, prefixes, rule: str, through: bool = False):
        reach = m.anywhere | (loaded_at_import(modules, m.name) if through else set())
        hits = sorted(t for t in reach if any(_within(t, p) for p in prefixes))
        for target in hits:
            if any(_within(other, target) and other != target for other in hits):
                continue  # `import a.b` loads a too: name the module, not each of its parents
            via = "" if target in m.anywhere else " (through its module-level imports)"
            out.append(f"{m.name} imports {target}{via}: {rule}")

    for m in modules.values():
        if _within(m.name, f"{top}.train"):
            imports(m, (f"{top}.batch", f"{top}.study"), "training never imports the batch or study side")
        if _within(m.name, f"{top}.results"):
            imports(m, (f"{top}.train",), "results read result.json files, never the trainer")
        if _within(m.name, f"{top}.ingest.cards"):
            imports(m, ("zarr",), "a card reads raw data; the store writes zarr", through=True)
        if _within(m.name, f"{top}.study") or m.name == f"{top}.batch.slurm":
            imports(m, TORCH, "planning and queue queries stay torch-free", through=True)
        if m.name != f"{top}.__main__":
            imports(m, (f"{top}.cli",), "the command line is a leaf: only __main__ imports it")
        if m.is_package and m.name not in (top, f"{top}.ingest.cards") and m.path.read_text().strip():
            out.append(f"{m.path.relative_to(package_dir.parent)}: a subpackage __init__.py must stay empty")
    return out


def test_the_walls_hold():
    found = violations(ROOT / "histokt")
    assert not found, "forbidden imports in histokt/:\n" + "\n".join(found)


def test_the_checker_catches_planted_violations(tmp_path):
    """A synthetic tree with one violation of each rule, each in its own form of import."""
    files = {
        "__init__.py": '__version__ = "0"\n',
        "__main__.py": "from pkg.cli import main\n",
        "cli.py": "",
        "errors.py": "",
        "heavy.py": "import torch.nn\n",
        "middle.py": "from . import heavy\n",
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    from ..batch import sweep\n",  # function-level, relative
        "study/__init__.py": "",
        "study/plan.py": "from pkg import middle\n",  # torch two hops away
        "study/spec.py": "def g():\n    import torchvision\n",  # direct, function level
        "batch/__init__.py": "X = 1\n",  # not empty
        "batch/sweep.py": "import pkg.cli\n",
        "batch/slurm.py": "try:\n    from pkg.study import plan\nexcept ImportError:\n    pass\n",
        "results/__init__.py": "",
        "results/collect.py": "class C:\n    from pkg.train.loop import f\n",
        "ingest/__init__.py": "",
        "ingest/store.py": "import zarr\n",
        "ingest/cards/__init__.py": "REGISTRY = {}\n",  # allowed: the card registry
        "ingest/cards/one.py": "from ..store import *\n",
    }
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = "\n".join(violations(tmp_path / "pkg"))
    expected = [
        "pkg.train.loop imports pkg.batch.sweep: training never",
        "pkg.results.collect imports pkg.train.loop: results read",
        "pkg.ingest.cards.one imports zarr (through its module-level imports)",
        "pkg.study.plan imports torch.nn (through its module-level imports)",
        "pkg.study.spec imports torchvision: planning",
        "pkg.batch.slurm imports torch.nn (through its module-level imports)",
        "pkg.batch.sweep imports pkg.cli: the command line",
        "pkg/batch/__init__.py: a subpackage __init__.py must stay empty",
    ]
    for line in expected:
        assert line in found, f"not caught: {line}\n{found}"
    assert (
        "pkg.__main__" not in found and "pkg/ingest/cards/__init__.py" not in found and "pkg/__init__.py" not in found
    )
    assert len(found.splitlines()) == len(expected), found


def test_sweep_dry_run_and_status_never_import_torch(tmp_path):
    """What a login node runs: planning the paper's study and reading a run root, without torch."""
    doc = tomllib.loads((ROOT / "jobs" / "paper.toml").read_text())
    for d in doc["datasets"].values():  # the spec checks that every raw folder exists
        (tmp_path / d["raw"]).mkdir(parents=True, exist_ok=True)
    run_root = tmp_path / "root"
    code = f"""
import contextlib, io, sys
from histokt.cli import main
from histokt.study import plan, spec
s = spec.load({str(ROOT / "jobs" / "paper.toml")!r})
plan.write({str(run_root)!r}, s, plan.expand(s))
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["sweep", {str(ROOT / "jobs" / "paper.toml")!r}, "--executor", "slurm", "--dry-run"]) == 0
    assert main(["status", {str(run_root)!r}]) == 0
assert "dry run: nothing submitted" in out.getvalue() and "0/4675 cells done" in out.getvalue(), out.getvalue()
print(sorted(m for m in sys.modules if m.split(".")[0] in {TORCH!r}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"torch was imported: {r.stdout}"


@pytest.mark.parametrize("name", ["histokt.study.plan", "histokt.study.spec", "histokt.batch.slurm"])
def test_torch_free_modules_have_no_torch_in_their_closure(name):
    """The same rule, stated per module (a failure names the module to look at)."""
    modules = scan(ROOT / "histokt")
    assert not any(_within(m, t) for m in loaded_at_import(modules, name) for t in TORCH)
