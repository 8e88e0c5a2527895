"""The alert rules (deploy/prometheus/alerts.yml) pass promtool's check and their unit tests
(alerts_test.yml), cover what the issue asks for, and each links to its runbook entry in the docs."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO
from tests.prometheus import RULE_TESTS, RULES, binary
from tests.test_docs import anchors


def test_promtool_checks_the_rules():
    out = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = subprocess.run([binary("promtool"), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                         timeout=120, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def _rules() -> list[dict]:
    """Each rule's name, expression and annotations, read from the file's regular layout (no YAML library
    needed; promtool has checked the file as YAML)."""
    rules = []
    for block in RULES.read_text().split("- alert: ")[1:]:
        expr = re.search(r"expr: >?\s*(.*?)\n\s+(?:for|labels):", block, re.S).group(1)
        annotations = dict(re.findall(r"^ {10}(\w+): \"(.*)\"$", block, re.M))
        rules.append({"alert": block.split()[0], "expr": " ".join(expr.split()), "annotations": annotations})
    return rules


def test_every_alert_has_a_runbook_entry_and_a_unit_test():
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    headings = anchors(REPO / "docs" / "operations.md")
    for rule in _rules():
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, f"docs/operations.md has no runbook heading #{anchor}"
        assert rule["alert"] in tested, f"{rule['alert']} has no unit test in {RULE_TESTS.name}"
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_issues_alerts_are_all_there():
    expressions = {rule["alert"]: rule["expr"] for rule in _rules()}
    assert "fp_outbox_oldest_pending_age_seconds" in expressions["FpOutboxOldestPendingTooOld"]
    assert "fp_outbox_dead_total" in expressions["FpOutboxDeadLettersRising"]
    assert "fp_outbox_endpoint_up" in expressions["FpOutboxEndpointDown"]
    assert "up{" in expressions["FpOutboxNoWorkerUp"]
    assert "deriv(fp_outbox_queue_depth" in expressions["FpOutboxDeliveryBelowDemand"]
    assert "fp_outbox_oldest_transaction_age_seconds" in expressions["FpOutboxVacuumHorizonOld"]
    assert "> 3600" in expressions["FpOutboxVacuumHorizonOld"]  # older than an hour
