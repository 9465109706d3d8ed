"""The package boundaries hold: the broker and the stand-ins never import each other; only ``broker/http/``
touches FastAPI or Starlette; no module imports another module's private names; and tests reach behaviour
through constructors and the composition root rather than private attributes."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(*paths: str) -> Iterator[tuple[Path, ast.Module]]:
    """Each Python file under ``paths`` (folders, or files ending .py) and its syntax tree."""
    for top in paths:
        for path in [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _top_packages(*paths: str) -> dict[str, set[str]]:
    """Each Python file under ``paths`` (folders, or files ending .py) → the top-level packages it imports."""
    return {
        str(path.relative_to(ROOT)): {module.split(".")[0] for module, _ in _imports(tree)}
        for path, tree in _modules(*paths)
    }


def test_the_broker_imports_no_stand_in_benchmark_or_orchestrator() -> None:
    """broker/ and function_app.py import nothing from sandbox/, devrun/, bench/ or tests/."""
    found = _top_packages("broker", "function_app.py")
    assert len(found) > 10
    leaks = {path: tops & {"sandbox", "devrun", "bench", "tests"} for path, tops in found.items()}
    assert {path: tops for path, tops in leaks.items() if tops} == {}


def test_the_sandbox_never_imports_the_broker() -> None:
    """The stand-ins play Microsoft's services: they import nothing from broker/, devrun/ or bench/."""
    found = _top_packages("sandbox")
    assert len(found) > 10
    leaks = {path: tops & {"broker", "function_app", "devrun", "bench", "tests"} for path, tops in found.items()}
    assert {path: tops for path, tops in leaks.items() if tops} == {}


def test_only_the_orchestrator_joins_the_broker_to_the_sandbox() -> None:
    """devrun/ (what `make run` starts) imports both; the check above would see it if it lived in sandbox/."""
    joined = set().union(*_top_packages("devrun").values())
    assert {"broker", "sandbox"} <= joined


WEB_FRAMEWORKS = ("fastapi", "starlette")


def test_only_the_http_package_imports_the_web_framework() -> None:
    """The boundary to HTTP shows in the folder names: everything outside broker/http knows nothing of it."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path, tree in _modules("broker")
        if ROOT / "broker" / "http" not in path.parents
        for module, _ in _imports(tree)
        if module.split(".")[0] in WEB_FRAMEWORKS
    ]
    assert offenders == []
    assert (ROOT / "function_app.py").read_text().count("fastapi") == 0


def test_no_module_imports_another_modules_private_names() -> None:
    """``from x import _y`` (or ``import x._y``) couples to what ``x`` keeps free to change."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module} {names}"
        for path, tree in _modules("broker", "function_app.py", "sandbox", "devrun", "bench", "tests")
        for module, names in _imports(tree)
        if any(_private(part) for part in module.split(".")) or any(_private(n) for n in names)
    ]
    assert offenders == []


def test_tests_reach_no_private_attribute() -> None:
    """Tests use constructor seams (``clock=``, ``sleep=``, ``retry=``) and the composition root, not ``obj._x``."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}"
        for path, tree in _modules("tests")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _private(node.attr)
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert offenders == []


def test_the_caller_client_imports_only_azure_requests_and_the_standard_library() -> None:
    """client/ is a distribution of its own: it imports nothing from the broker, the stand-ins or the tests
    (its one Azure dependency is azure-core, which its pyproject declares)."""
    found = _top_packages("client/src")
    assert len(found) >= 5
    allowed = {"azure", "requests", "partner_broker_client", *sys.stdlib_module_names}
    assert {path: tops - allowed for path, tops in found.items() if tops - allowed} == {}
