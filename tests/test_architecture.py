"""The import contract of the layout (an architecture fitness test, read from the code with `ast`):

- `models/` is pure PyTorch: it imports neither `pipeline` nor `ray`;
- the shared modules directly in `pipeline/` import neither job package;
- `pipeline/label/` and `pipeline/train/` do not import each other;
- `pipeline/review/` imports no training code, and nothing in `pipeline/` outside it imports it;
- no library module imports the CLI helpers (`pipeline.cli`): only jobs/ do;
- jobs/ import only public names (no `_private` module or name).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_files(folder: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
        found += [os.path.relpath(os.path.join(dirpath, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(found)


def _module_name(path: str) -> str:
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names taken from it) of every import in a file, functions' bodies included.

    `from . import x` also counts as importing the module `<package>.x` (x may be a submodule)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read(), path)
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, names))
            if node.module is None:
                found += [(node.lineno, f"{module}.{n}", []) for n in names]
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path}:{line} imports {module}" for path in files for line, module, _ in imports_of(path)
            if any(_within(module, f) for f in forbidden)]


def test_the_checker_sees_relative_absolute_and_nested_imports():
    found = {m for _, m, _ in imports_of(os.path.join("pipeline", "label", "dataset.py"))}
    assert {"ray", "pipeline.faults", "pipeline.storage", "pipeline.label.actor"} <= found
    nested = {m for _, m, _ in imports_of(os.path.join("pipeline", "train", "evaluation.py"))}
    assert "pipeline.ray_setup" in nested  # imported inside a function


def test_models_import_neither_pipeline_nor_ray():
    assert violations(_python_files("models"), ("pipeline", "ray")) == []


def test_shared_pipeline_modules_import_no_job_package():
    shared = [p for p in _python_files("pipeline") if os.path.dirname(p) == "pipeline"]
    assert len(shared) > 5
    assert violations(shared, ("pipeline.label", "pipeline.train")) == []


@pytest.mark.parametrize("package,other", [("label", "train"), ("train", "label")])
def test_job_packages_do_not_import_each_other(package, other):
    files = _python_files(os.path.join("pipeline", package))
    assert files
    assert violations(files, (f"pipeline.{other}",)) == []


def test_the_review_loop_reads_labeling_s_output_and_neither_job_imports_it():
    # pipeline/review/ reads what labeling wrote (its tables, codec, run records) and writes datasets training
    # reads through files: it imports no training code, and neither job package imports it.
    assert violations(_python_files(os.path.join("pipeline", "review")), ("pipeline.train",)) == []
    for package in ("label", "train"):
        assert violations(_python_files(os.path.join("pipeline", package)), ("pipeline.review",)) == []
    shared = [p for p in _python_files("pipeline") if os.path.dirname(p) == "pipeline"]
    assert violations(shared, ("pipeline.review",)) == []


def test_no_library_module_imports_the_cli_helpers():
    library = [p for p in _python_files("models") + _python_files("pipeline") if p != os.path.join("pipeline", "cli.py")]
    assert violations(library, ("pipeline.cli",)) == []


def test_jobs_import_only_public_names():
    bad = []
    for path in _python_files("jobs"):
        for line, module, names in imports_of(path):
            if not (_within(module, "models") or _within(module, "pipeline")):
                continue
            private = [p for p in module.split(".") + names if p.startswith("_")]
            if private:
                bad.append(f"{path}:{line} imports {', '.join(private)} from {module}")
    assert bad == []
