"""The caller client is a distribution of its own: pip builds it from ``client/`` alone, it declares only
azure-core and requests, ships ``py.typed``, and imports nothing from the broker app."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

CLIENT = ROOT / "client"
ALLOWED_TOPS = {"requests", "partner_broker_client", *sys.stdlib_module_names}


@pytest.mark.slow
def test_pip_builds_the_client_wheel_from_its_folder(tmp_path: Path) -> None:
    """``pip wheel ./client`` gives a typed wheel whose only requirements are azure-core and requests."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(CLIENT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("partner_broker_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "partner_broker_client/py.typed" in names
    assert "partner_broker_client/aio/__init__.py" in names
    assert not [n for n in names if n.startswith(("broker/", "sandbox/", "tests/"))]
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    version = next(value for key, value in fields if key == "Version")
    requires = sorted(value for key, value in fields if key == "Requires-Dist" and "extra ==" not in value)
    assert version == "0.1.0"
    assert [r.split(">")[0] for r in requires] == ["azure-core", "requests"]


def test_the_client_imports_only_azure_core_requests_and_the_standard_library() -> None:
    """No module of the client imports the broker app (or anything else): the dependency points one way."""
    found: dict[str, set[str]] = {}
    for path in (CLIENT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = {node.module}
            else:
                continue
            foreign = {m for m in modules if m.split(".")[0] not in ALLOWED_TOPS and not m.startswith("azure.core")}
            found.setdefault(path.name, set()).update(foreign)
    assert {name: extra for name, extra in found.items() if extra} == {}
    assert found  # the walk saw the client's modules
