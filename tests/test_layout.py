"""The package boundaries hold: the broker and the stand-ins never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(*paths: str) -> dict[str, set[str]]:
    """Each Python file under ``paths`` (relative to the repository) → the top-level packages it imports."""
    found: dict[str, set[str]] = {}
    for top in paths:
        files = [ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py"))
        for path in files:
            tops: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    tops.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops.add(node.module.split(".")[0])
            found[str(path.relative_to(ROOT))] = tops
    return found


def test_the_broker_imports_no_stand_in_benchmark_or_orchestrator() -> None:
    """broker/ and function_app.py import nothing from sandbox/, devrun/, bench/ or tests/."""
    found = imports_of("broker", "function_app.py")
    assert len(found) > 10
    leaks = {path: tops & {"sandbox", "devrun", "bench", "tests"} for path, tops in found.items()}
    assert {path: tops for path, tops in leaks.items() if tops} == {}


def test_the_sandbox_never_imports_the_broker() -> None:
    """The stand-ins play Microsoft's services: they import nothing from broker/, devrun/ or bench/."""
    found = imports_of("sandbox")
    assert len(found) > 10
    leaks = {path: tops & {"broker", "function_app", "devrun", "bench", "tests"} for path, tops in found.items()}
    assert {path: tops for path, tops in leaks.items() if tops} == {}


def test_only_the_orchestrator_joins_the_broker_to_the_sandbox() -> None:
    """devrun/ (what `make run` starts) imports both; the check above would see it if it lived in sandbox/."""
    found = imports_of("devrun")
    joined = set().union(*found.values())
    assert {"broker", "sandbox"} <= joined
