"""The folders show the architecture: reading a case, the reference maths, judging and reporting
sit below running, and none of them imports the runner (the harness, the CLI, the fuzzer, the
watcher or the pytest plugin)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "manualprop"
BELOW = ["casefile", "reference", "oracle", "verdict", "reports"]
RUNNERS = {"harness", "cli", "fuzz", "watch", "pytest_plugin"}


def _imported(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at the top or inside a function, as
    its dotted name below manualprop ("harness", "verdict.compare")."""
    package = path.parent.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("manualprop"):
                target = node.module.split(".")[1:]
            else:
                continue
            found.add(".".join(target))
            found.update(".".join([*target, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("manualprop.") for a in node.names if a.name.startswith("manualprop."))
    return found


@pytest.mark.parametrize("folder", BELOW)
def test_nothing_below_the_runner_imports_it(folder):
    modules = sorted((PACKAGE / folder).rglob("*.py"))
    assert modules
    for path in modules:
        runners = {m for m in _imported(path) if m.split(".")[0] in RUNNERS}
        assert not runners, f"{path.relative_to(PACKAGE.parent)} imports {sorted(runners)}"


def test_the_check_sees_an_import_of_the_runner(tmp_path):
    """The test above can fail: a module with a lazy import of the harness is caught."""
    (PACKAGE / "verdict").exists()
    probe = PACKAGE / "verdict" / "diagnose.py"
    text = probe.read_text(encoding="utf-8") + "\n\ndef _late():\n    from ..harness import run_case\n"
    fake = tmp_path / "diagnose.py"
    fake.write_text(text, encoding="utf-8")
    assert "harness" not in {m.split(".")[0] for m in _imported(probe)}
    # the same parse, placed as if in manualprop/verdict/
    tree_path = PACKAGE / "verdict" / "_probe_for_test.py"
    try:
        tree_path.write_text(text, encoding="utf-8")
        assert "harness" in {m.split(".")[0] for m in _imported(tree_path)}
    finally:
        tree_path.unlink()
