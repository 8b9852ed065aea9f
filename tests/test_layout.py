"""The layout the project promises: objret/ is a library (no orchestration inside, not even in a function), its
packages follow the data flow and say what enters and leaves them, its modules stay small, and every module's
tests sit at tests/<package>/test_<module>.py or are named for what they test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "objret"
STAGES = ["ingest", "features", "regions", "index", "graph", "mining", "dataset", "eval", "steps"]
ORCHESTRATION = {"prefect", "prefect_dask", "mlflow", "flows", "tasks", "dask", "distributed"}
MAX_LINES = 420   # "about 400": one concept a module


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", _modules(LIBRARY), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_no_orchestration_anywhere(module):
    assert not _imported_roots(module) & ORCHESTRATION


def test_an_import_inside_a_function_is_seen(tmp_path):
    sneaky = tmp_path / "m.py"
    sneaky.write_text("def f():\n    from prefect import flow\n    import mlflow.tracking\n")
    assert _imported_roots(sneaky) >= {"prefect", "mlflow"}


def test_packages_follow_the_data_flow_and_say_what_enters_and_leaves():
    packages = sorted(p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(STAGES)
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((LIBRARY / stage / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 3 and ("enter" in doc and "leave" in doc), stage


def test_earlier_stages_do_not_import_later_ones():
    """Imports point down the data flow: nothing in ingest/ knows about mining (steps/ ties the stages to a work
    folder; eval/ scores what mining ranks)."""
    order = {stage: i for i, stage in enumerate(STAGES)}
    backwards = []
    for stage in STAGES:
        for module in _modules(LIBRARY / stage):
            for node in ast.walk(ast.parse(module.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("objret."):
                    target = node.module.split(".")[1]
                    if target in order and order[target] > order[stage]:
                        backwards.append(f"{module.relative_to(REPO)} imports {node.module}")
    assert not backwards


@pytest.mark.parametrize("module", _modules(LIBRARY), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_small(module):
    assert len(module.read_text().splitlines()) <= MAX_LINES


# Test files named for what they exercise across modules rather than for one module.
ACROSS_MODULES = {"dataset/test_concurrent_push", "dataset/test_exports", "mining/test_report_properties", "steps/test_crash_safety",
                  "mining/test_methods_registry",
                  "eval/test_quality_gate"}


def test_tests_mirror_the_library():
    """tests/<package>/test_<module>.py for a module objret/<package>/<module>.py (or a named cross-module test)."""
    strays = []
    for test in (REPO / "tests").rglob("test_*.py"):
        package = test.parent.name
        if package in STAGES:
            module = LIBRARY / package / f"{test.stem.removeprefix('test_')}.py"
            if not module.is_file() and f"{package}/{test.stem}" not in ACROSS_MODULES:
                strays.append(str(test.relative_to(REPO)))
    assert not strays
