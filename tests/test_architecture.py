"""The architecture is checked, not just written (docs/architecture.md): the import floors of
sparse_engine (.importlinter), the kernels' independence, and no reaching into another
module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Private names a file may still read across modules: none (benchmarks reach the kernels
# through their public jit_kernels() / autotune_configs() and sparse_engine/kernels/runtime.py); this list
# may only shrink.
KNOWN_PRIVATE_READS: dict[str, set[str]] = {}


def _python_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_import_floors_hold():
    """A module imports only from its floor's package and the floors below (.importlinter)."""
    lint = pytest.importorskip("importlinter.cli")
    assert lint.lint_imports(config_filename=str(ROOT / ".importlinter")) == 0, "run lint-imports for the details"


def test_the_kernels_import_nothing_of_the_engine():
    """sparse_engine/kernels/ is the bottom floor: torch, triton and each other."""
    offenders = []
    for path in _python_files("sparse_engine/kernels"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n.startswith("sparse_engine") and not n.startswith("sparse_engine.kernels")]
    assert not offenders, offenders


def _private_reads(path: Path) -> set[str]:
    """``from sparse_engine.x import _name`` and ``module._name`` on an imported project module."""
    tree = ast.parse(path.read_text())
    modules, found = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and ((node.module or "").startswith("sparse_engine") or node.level):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add(f"import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("sparse_engine"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.add(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    new = {}
    for path in _python_files("sparse_engine", "benchmarks", "tests", "examples"):
        rel = str(path.relative_to(ROOT))
        extra = _private_reads(path) - KNOWN_PRIVATE_READS.get(rel, set())
        if extra:
            new[rel] = sorted(extra)
    assert not new, f"private names read across modules (make them public, or keep them inside): {new}"


def test_no_folder_at_the_root_shadows_an_installed_package():
    """From the repository root (pytest, ``python -m``) a package folder there is imported before
    site-packages: a top-level ``kernels/`` once shadowed Hugging Face's ``kernels``, which
    transformers 5.25 requires and imports when it loads a model."""
    import importlib.metadata

    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"sparse_engine", "tests"}
    installed = set(importlib.metadata.packages_distributions())
    assert not folders & installed, sorted(folders & installed)
    assert folders == set(), f"package folders at the root besides sparse_engine/ and tests/: {sorted(folders)}"
