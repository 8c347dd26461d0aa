"""Audit the project's installed dependencies for known vulnerabilities (``make audit``; CI).

The project has no lock file: what CI and a developer run is the environment
``pip install -e '.[test]'`` resolved. This script pins that environment's
closure of ``pgkd-stream[test]`` (every requirement, recursively, at its
installed version), hands it to pip-audit without resolving anything again,
and reads the JSON report, so that three outcomes stay apart:

- vulnerabilities found (not in deploy/audit-ignore.txt): exit 1, CI fails;
- the vulnerability service could not be reached, or answered for none of the
  dependencies: a loud warning that the audit did NOT run, exit 0 (exit 3 with
  ``--strict``): CI must not fail because a service is down;
- audited, nothing found: exit 0, with the dependencies it could not audit named.

    python deploy/audit.py [--service pypi,osv] [--strict]

Services are tried in order until one answers for at least one dependency.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "pgkd-stream"
EXTRAS = ("test",)
IGNORE_FILE = Path(__file__).with_name("audit-ignore.txt")
FOUND, NOT_RUN, STRICT_NOT_RUN = 1, 0, 3
# "GHSA-xxxx-xxxx-xxxx  # reason", "PYSEC-2024-1 # reason", "CVE-2024-1234 # reason"
IGNORE_LINE = re.compile(r"^(?P<id>[A-Z][A-Z0-9]*-[A-Za-z0-9-]+)\s+#\s*(?P<reason>\S.*)$")


def closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of every distribution ``project[extras]``
    needs in this environment (markers evaluated here), the project itself excluded."""
    pins: dict[str, str] = {}
    todo = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = metadata.distribution(name)
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            dep = canonicalize_name(req.name)
            try:
                pins[dep] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional requirement this platform does not install
            todo.append((req.name, frozenset(req.extras)))
    pins.pop(canonicalize_name(project), None)
    return dict(sorted(pins.items()))


def read_ignores(path: Path = IGNORE_FILE) -> dict[str, str]:
    """{vulnerability id: reason}. Every accepted vulnerability needs a one-line reason."""
    if not path.exists():
        return {}
    ignores = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = IGNORE_LINE.match(line.strip())
        if not match:
            raise SystemExit(f"audit: {path} line {n}: expected 'VULN-ID  # reason', got {line.strip()!r}")
        ignores[match["id"]] = match["reason"]
    return ignores


@dataclass
class Outcome:
    """What one pip-audit run found."""

    ran: bool  # the service answered for at least one dependency
    vulns: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, version, id, fixed in
    not_audited: dict[str, str] = field(default_factory=dict)  # name -> why
    why_not_run: str = ""


def read_report(returncode: int, report: str, stderr: str) -> Outcome:
    """Tell "vulnerabilities found" from "the service did not answer" in pip-audit's
    exit code (1 for both), JSON report and stderr."""
    try:
        deps = json.loads(report)["dependencies"] if report.strip() else None
    except (ValueError, KeyError, TypeError):
        deps = None
    if deps is None:  # pip-audit stopped before writing a report: no connection, DNS, HTTP error
        last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "no output")
        return Outcome(False, why_not_run=f"pip-audit exited {returncode} without a report: {last.strip()[:300]}")
    outcome = Outcome(True)
    for dep in deps:
        if "skip_reason" in dep:
            outcome.not_audited[dep["name"]] = dep["skip_reason"]
        for vuln in dep.get("vulns", []):
            outcome.vulns.append((dep["name"], dep["version"], vuln["id"], ", ".join(vuln["fix_versions"]) or "-"))
    if deps and len(outcome.not_audited) == len(deps):
        first = next(iter(outcome.not_audited.values()))
        outcome.ran = False
        outcome.why_not_run = f"the service answered for none of the {len(deps)} dependencies (e.g. {first})"
    return outcome


def run_pip_audit(pins: dict[str, str], service: str, ignores: dict[str, str]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="pgkd-audit-") as tmp:
        requirements, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        cmd = [sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--no-deps", "--disable-pip",
               "--vulnerability-service", service, "--format", "json", "--output", str(report),
               "--progress-spinner", "off", "--timeout", "30"]
        for vuln_id in ignores:
            cmd += ["--ignore-vuln", vuln_id]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return Outcome(False, why_not_run="pip-audit did not finish within 900s")
        text = report.read_text() if report.exists() else ""
        return read_report(done.returncode, text, done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", default="pypi,osv", help="vulnerability services to try, in order")
    parser.add_argument("--strict", action="store_true", help="exit 3 when the audit could not run")
    args = parser.parse_args(argv)
    try:
        import pip_audit  # noqa: F401
    except ImportError:
        print("audit: pip-audit is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 2
    ignores = read_ignores()
    pins = closure()
    print(f"audit: {len(pins)} dependencies of {PROJECT}[{','.join(EXTRAS)}] as installed; "
          f"{len(ignores)} accepted vulnerabilities ({IGNORE_FILE.name})")
    for vuln_id, reason in ignores.items():
        print(f"audit:   ignoring {vuln_id}: {reason}")
    for service in args.service.split(","):
        outcome = run_pip_audit(pins, service, ignores)
        if outcome.ran:
            break
        print(f"audit: {service}: did not run ({outcome.why_not_run})")
    else:
        print(f"audit: WARNING: THE VULNERABILITY AUDIT DID NOT RUN: no service answered ({args.service}; "
              "reasons above). Nothing was checked.", file=sys.stderr)
        return STRICT_NOT_RUN if args.strict else NOT_RUN
    for name, why in outcome.not_audited.items():
        print(f"audit: {service}: not audited: {name} ({why})")
    if outcome.vulns:
        print(f"audit: {service}: {len(outcome.vulns)} known vulnerabilities:", file=sys.stderr)
        for name, version, vuln_id, fixed in outcome.vulns:
            print(f"audit:   {name} {version}: {vuln_id} (fixed in {fixed})", file=sys.stderr)
        print("audit: FAILED: raise the pin in pyproject.toml, or accept the vulnerability in "
              f"deploy/{IGNORE_FILE.name} with a one-line reason", file=sys.stderr)
        return FOUND
    audited = len(pins) - len(outcome.not_audited)
    print(f"audit: {service}: no known vulnerabilities in {audited} audited dependencies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
