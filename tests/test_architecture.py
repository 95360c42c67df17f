"""The package's dependency rules, checked with import-linter (contracts in pyproject.toml):
core <- engine <- recipes <- pipeline and CLI, the built-in world a leaf that only the recipes
import, and no import cycles. A change that breaks a rule fails here, naming the import."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package under `root` (the repo, or a copy of it)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_contracts_hold():
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("model.py", "import llama2.world.grading", "never import the built-in world"),
    ("tokenizer.py", "import llama2.recipes.sft", "core <- engine <- recipes"),
    ("world/tasks.py", "import llama2.sampling", "a leaf"),
])
def test_a_deliberate_violation_fails(tmp_path, module, line, contract):
    """Each kind of rule is live: the same check on a copy of the package with one bad import fails."""
    shutil.copytree(REPO / "llama2", tmp_path / "llama2", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / "llama2" / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and contract in r.stdout, r.stdout


def test_no_import_cycles():
    """No module imports one that (directly or not) imports it back."""
    graph = grimp.build_graph("llama2", cache_dir=None)
    cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                     if graph.chain_exists(importer=b, imported=a)})
    assert cycles == []
