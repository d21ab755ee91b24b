"""deploy/prometheus/alerts.yml: valid for promtool, and every alert unit
tested with `promtool test rules` (deploy/prometheus/tests/). promtool comes
with Debian's `prometheus` package, which `make test` installs; without it
these tests fail (never skip)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
ALERTS = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)


def promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, (
        "promtool is needed: `make test` installs Debian's prometheus package "
        "(apt-get install prometheus)"
    )
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_the_alert_rules_pass_promtool_check() -> None:
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_rules_hold_the_alerts_the_issue_asks_for() -> None:
    assert sorted(ALERTS) == [
        "TokenrelayBreakerOpen",
        "TokenrelayNoProviderAvailable",
        "TokenrelayPartialAnswersHigh",
        "TokenrelayProviderErrorRateHigh",
        "TokenrelayStoreUnavailable",
        "TokenrelayTakeovers",
    ]


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_a_unit_test_that_sees_it_fire(alert: str) -> None:
    firing = [
        path
        for path in RULE_TESTS
        if re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", path.read_text())
    ]
    assert firing, f"no test in deploy/prometheus/tests expects {alert} to fire"


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda path: path.stem)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = run("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_rule_that_waits_too_long(tmp_path: Path) -> None:
    """The tests bite: with the breaker's `for:` raised, its test fails."""
    rules = tmp_path / "alerts.yml"
    text = RULES.read_text()
    assert "for: 5m" in text
    rules.write_text(text.replace("for: 5m", "for: 50m"))
    test = tmp_path / "tests" / "breaker_open.yml"
    test.parent.mkdir()
    test.write_text((ROOT / "deploy" / "prometheus" / "tests" / "breaker_open.yml").read_text())
    result = run("test", "rules", str(test))
    assert result.returncode != 0 and "TokenrelayBreakerOpen" in result.stdout + result.stderr
