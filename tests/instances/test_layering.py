"""The tenant registry never depends on the pipeline: webhooks uses instances,
never the reverse (the Evolution client lives in instances/clients/ for both)."""

import ast
from pathlib import Path

INSTANCES = Path(__file__).resolve().parents[2] / "instances"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_of_instances_imports_webhooks() -> None:
    offenders = {
        str(path.relative_to(INSTANCES.parent)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] == "webhooks"
        )
        for path in INSTANCES.rglob("*.py")
        # Migrations name the other app's migrations as strings, not imports.
        if "migrations" not in path.parts
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_reads_real_imports() -> None:
    # Guards the test above against passing because it reads nothing.
    assert "instances.clients.evolution" in imported_modules(INSTANCES / "provisioning.py")
