"""What pip builds from the repository: the caller client from ``client/`` (azure-core and requests only,
typed) and the broker itself from the root (its ``broker`` package, the ``broker`` command, the pins of
requirements.txt). tests/test_layout.py checks that the client imports nothing else; Azure Functions keeps
building from requirements.txt alone (tests/test_function_app.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT


def build_wheel(source: Path, into: Path, name: str) -> tuple[list[str], list[tuple[str, str]], str]:
    """``pip wheel --no-deps source``: the wheel's file names, its METADATA fields and entry points."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = into.glob(f"{name}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next((archive.read(n).decode() for n in names if n.endswith("entry_points.txt")), "")
    fields = [(k, v) for k, _, v in (line.partition(": ") for line in metadata.splitlines()) if v]
    return names, fields, entry_points


def requires(fields: list[tuple[str, str]]) -> list[str]:
    return sorted(v for k, v in fields if k == "Requires-Dist" and "extra ==" not in v)


@pytest.mark.slow
def test_pip_builds_the_client_wheel_from_its_folder(tmp_path: Path) -> None:
    """``pip wheel ./client`` gives a typed wheel whose only requirements are azure-core and requests."""
    names, fields, _ = build_wheel(ROOT / "client", tmp_path, "partner_broker_client")
    assert "partner_broker_client/py.typed" in names
    assert "partner_broker_client/aio/__init__.py" in names
    assert not [n for n in names if n.startswith(("broker/", "sandbox/", "tests/"))]
    assert dict(fields)["Version"] == "0.1.0"
    assert [r.split(">")[0] for r in requires(fields)] == ["azure-core", "requests"]


@pytest.mark.slow
def test_pip_builds_the_broker_with_its_command(tmp_path: Path) -> None:
    """``pip install .`` builds the broker package with requirements.txt's pins and a working ``broker``
    command; nothing of the stand-ins, tests, benchmarks or the client goes in."""
    names, fields, entry_points = build_wheel(ROOT, tmp_path / "wheel", "partner_token_broker")
    assert "broker/cli.py" in names
    assert not [n for n in names if n.split("/")[0] in ("sandbox", "tests", "bench", "devrun", "client", "infra")]
    pins = sorted(
        line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()[:1].isalnum()
    )
    assert requires(fields) == pins
    assert "broker = broker.cli:main" in entry_points

    # Install that wheel (its dependencies are this venv's) and run the command from an unrelated folder.
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    prefix = tmp_path / "prefix"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--prefix", str(prefix), str(wheel)],
        check=True,
        capture_output=True,
    )
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run(
        [str(prefix / "bin" / "broker"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("usage: broker")
    assert "tenants" in ran.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import broker; print(broker.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(site))


def test_the_functions_package_is_unaffected() -> None:
    """Azure builds the Functions app from requirements.txt alone: it names only registry packages, and the
    deployed package (.funcignore) leaves out the build metadata and the caller client."""
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins
    assert all("==" in pin and not pin.startswith(("-", ".", "/")) for pin in pins)
    ignored = set((ROOT / ".funcignore").read_text().split())
    assert {"pyproject.toml", "client/", "tests/", "sandbox/"} <= ignored
