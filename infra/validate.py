"""Offline validation of infra/: every Bicep file parses, and checkov finds nothing we have not accepted.

`make lint` runs it as ``.venv-infra/bin/python infra/validate.py``. No Bicep compiler can be installed
here, so two offline tools stand in for ``az bicep build``, each in its own virtual environment:

1. Syntax — pycep-parser 0.7.1 parses every ``.bicep`` file. checkov 3.3.30 pins pycep-parser 0.5.1, which
   rejects current Bicep syntax, and one venv cannot hold two versions of a package; tests/test_infra.py
   needs 0.7.1 in the main venv anyway (requirements-dev.txt). So this script runs itself again under
   ``.venv/bin/python`` with ``--parse-only`` for this step, rather than vendoring a parser.
2. Policy — checkov scans infra/ with its Bicep checks (``--skip-download``: no network). checkov reports a
   file it cannot parse only in ``summary.parsing_errors`` and still exits 0, so that count is checked
   here; and every failed check must be accepted, per check and resource and with a reason, in
   infra/checkov-accepted.yaml. An accepted entry that no longer fails is an error too, so the list stays
   true.

Exit status 0 when all is well, 1 otherwise. Prints one line per step and a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

INFRA = Path(__file__).resolve().parent
ROOT = INFRA.parent
ACCEPTED = INFRA / "checkov-accepted.yaml"
PARSER_PYTHON = ROOT / ".venv" / "bin" / "python"


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def parse_only() -> int:
    """Step 1 body, run under the main venv: parse every file with pycep-parser, print one JSON report."""
    from pycep import BicepParser  # only importable in the main venv

    parser = BicepParser()
    report: dict[str, str | None] = {}
    for path in bicep_files():
        try:
            parser.parse(file_path=path)
        except Exception as exc:  # any parse failure is a finding, whatever pycep/lark raise
            report[str(path.relative_to(INFRA))] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            report[str(path.relative_to(INFRA))] = None
    print(json.dumps(report))
    return 0


def check_syntax() -> list[str]:
    if not PARSER_PYTHON.exists():
        return [f"{PARSER_PYTHON.relative_to(ROOT)} missing: run `make deps` (pycep-parser lives there)"]
    proc = subprocess.run(  # noqa: S603 — fixed interpreter and arguments
        [str(PARSER_PYTHON), str(Path(__file__).resolve()), "--parse-only"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return [f"parse step failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"]
    report: dict[str, str | None] = json.loads(proc.stdout)
    if not report:
        return ["no .bicep files found under infra/"]
    problems = [f"{name}: {error}" for name, error in report.items() if error]
    print(f"syntax: {len(report) - len(problems)}/{len(report)} Bicep files parse (pycep-parser 0.7.1)")
    return problems


def load_accepted() -> dict[tuple[str, str, str], str]:
    import yaml  # a dependency of checkov, present in this venv

    data = yaml.safe_load(ACCEPTED.read_text(encoding="utf-8")) or {}
    accepted: dict[tuple[str, str, str], str] = {}
    for entry in data.get("accepted", []):
        key = (entry["check"], entry["resource"], entry["file"])
        reason = str(entry.get("reason") or "").strip()
        if not reason:
            raise SystemExit(f"{ACCEPTED.name}: {key} has no reason")
        if key in accepted:
            raise SystemExit(f"{ACCEPTED.name}: {key} is listed twice")
        accepted[key] = reason
    return accepted


def run_checkov() -> dict[str, Any]:
    checkov = Path(sys.executable).with_name("checkov")
    proc = subprocess.run(  # noqa: S603 — fixed executable and arguments
        [str(checkov), "-d", str(INFRA), "--framework", "bicep", "--skip-download", "-o", "json", "--compact"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    # Exit 1 just means "some check failed"; anything else, or output that is not JSON, is a crash.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"checkov exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    try:
        result = json.loads(proc.stdout)
    except ValueError as exc:
        raise SystemExit(f"checkov printed no JSON ({exc}): {proc.stdout[:500]}{proc.stderr[-500:]}") from exc
    if isinstance(result, list):  # one report per framework; only bicep was asked for
        result = next((r for r in result if r.get("check_type") == "bicep"), {})
    if not result.get("results"):  # checkov prints a bare summary when it found no resources at all
        raise SystemExit(f"checkov found no Bicep resources under infra/: {json.dumps(result)[:500]}")
    return dict(result)


def check_policy() -> list[str]:
    accepted = load_accepted()
    result = run_checkov()
    summary = result["summary"]
    problems: list[str] = []
    if summary.get("parsing_errors", 0):
        files = ", ".join(result["results"].get("parsing_errors", []))
        problems.append(f"checkov could not parse {summary['parsing_errors']} file(s): {files}")
    seen: set[tuple[str, str, str]] = set()
    for check in result["results"]["failed_checks"]:
        key = (check["check_id"], check["resource"], check["file_path"].lstrip("/"))
        seen.add(key)
        if key not in accepted:
            problems.append(
                f"{key[0]} failed on {key[1]} ({key[2]}): {check['check_name']} — fix it, or accept it "
                f"with a reason in {ACCEPTED.name}"
            )
    problems += [
        f"{ACCEPTED.name}: {check_id} on {resource} ({file}) no longer fails; remove the entry"
        for check_id, resource, file in sorted(accepted.keys() - seen)
    ]
    print(
        f"checkov {summary.get('checkov_version')}: {summary['resource_count']} resources, "
        f"{summary['passed']} passed, {summary['failed']} failed ({len(seen & accepted.keys())} accepted), "
        f"{summary['parsing_errors']} parsing errors"
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)
    if args.parse_args(argv).parse_only:
        return parse_only()
    started = time.perf_counter()
    problems = check_syntax()
    parsed = time.perf_counter()
    problems += check_policy()
    done = time.perf_counter()
    for problem in problems:
        print(f"  FAIL {problem}")
    outcome = "FAILED" if problems else "ok"
    print(f"infra: {outcome} (syntax {parsed - started:.1f} s, checkov {done - parsed:.1f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
