"""The alert rules, their unit tests, the PrometheusRule made from them, the dashboard and the runbook.

promtool (Debian's ``prometheus`` package) checks and unit-tests the rules: input series -> the alerts
they must raise (k8s/alerts/tests). Without promtool these tests skip and say why; with
``JUKI_REQUIRE_PROMTOOL=1`` (set by .ci/run, which installs it) they fail instead, so CI cannot pass
without running them. Each check is also shown failing on a deliberately broken input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .exported_metrics import exported, referenced
from .k8s_policy import K8S

ALERTS = K8S / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.rules.yaml"))
RULE_TESTS = sorted((ALERTS / "tests").glob("*.yaml"))
DASHBOARDS = sorted((K8S / "components" / "monitoring" / "dashboards").glob("*.json"))
README = K8S / "README.md"
REPO_ROOT = K8S.parent

# Grafana's variables in panel queries, replaced by a value of the right shape before promtool parses them.
DASHBOARD_VARIABLES = {"__rate_interval": "5m", "service": "lookup"}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    reason = "promtool not found: install Debian's `prometheus` package (apt-get install prometheus)"
    if os.environ.get("JUKI_REQUIRE_PROMTOOL") == "1":
        pytest.fail(reason + "; JUKI_REQUIRE_PROMTOOL=1 forbids skipping")
    pytest.skip(reason)


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def rules(files: list[Path] = RULE_FILES) -> list[dict[str, Any]]:
    return [rule for path in files for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def copy_alerts(tmp_path: Path) -> Path:
    """A copy of k8s/alerts (rule files and their tests, same relative paths) to break."""
    target = tmp_path / "alerts"
    shutil.copytree(ALERTS, target)
    return target


# --- rules ---------------------------------------------------------------------------------------------
def test_rule_files_exist_and_cover_every_concern() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert RULE_FILES and RULE_TESTS
    assert alerts >= {
        "JukiLookupAvailabilityBurnFast", "JukiLookupLatencyBurnFast", "JukiAccessLogBacklog",
        "JukiAccessLogAppendFailures", "JukiRelayLagHigh", "JukiRelayStalled", "JukiMunicipalityDisconnected",
        "JukiCertificateExpiring", "JukiDatabasePoolSaturated",
    }


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_raise_exactly_the_expected_alerts(promtool: str) -> None:
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        check["alertname"]
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - tested == set()


def test_promtool_check_fails_on_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    copy = copy_alerts(tmp_path) / "juki.rules.yaml"
    copy.write_text(copy.read_text().replace("> 300", "> > 300", 1))
    result = run(promtool, "check", "rules", str(copy))
    assert result.returncode != 0 and "parse error" in (result.stdout + result.stderr)


@pytest.mark.parametrize(("before", "after"), [
    ("juki_intake_outbox_oldest_age_seconds) > 300", "juki_intake_outbox_oldest_age_seconds) > 3000"),
    ("14.4 * 0.001", "144 * 0.001"),
    ('state="in_use"', 'state="idle"'),
])
def test_promtool_unit_tests_fail_when_a_rule_is_broken(
    promtool: str, tmp_path: Path, before: str, after: str
) -> None:
    folder = copy_alerts(tmp_path)
    rules_file = folder / "juki.rules.yaml"
    assert before in rules_file.read_text()
    rules_file.write_text(rules_file.read_text().replace(before, after))
    assert run(promtool, "check", "rules", str(rules_file)).returncode == 0  # still valid PromQL
    result = run(promtool, "test", "rules", *(str(folder / "tests" / p.name) for p in RULE_TESTS))
    assert result.returncode != 0 and "FAILED" in (result.stdout + result.stderr)


# --- the PrometheusRule is generated from the rule files -------------------------------------------------
def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    result = run(sys.executable, "tools/gen_alerts.py", "--check", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_prod_overlay_carries_the_same_groups(render_overlay) -> None:  # type: ignore[no-untyped-def]
    (rule,) = [d for d in render_overlay("prod") if d["kind"] == "PrometheusRule"]
    source = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == source
    (dashboards,) = [d for d in render_overlay("prod") if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("juki-grafana-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {Path(p).name for p in dashboards["data"]} == {p.name for p in DASHBOARDS}


def test_a_stale_prometheusrule_is_detected(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import gen_alerts
    finally:
        sys.path.pop(0)
    folder = copy_alerts(tmp_path)
    assert gen_alerts.render(sorted(folder.glob("*.rules.yaml"))) == gen_alerts.OUTPUT.read_text()
    (folder / "juki.rules.yaml").write_text((folder / "juki.rules.yaml").read_text().replace("> 0.9", "> 0.8"))
    assert gen_alerts.render(sorted(folder.glob("*.rules.yaml"))) != gen_alerts.OUTPUT.read_text()


# --- dashboards --------------------------------------------------------------------------------------------
def dashboard_expressions(path: Path) -> list[str]:
    document = json.loads(path.read_text())
    panels = [p for p in document["panels"] if p.get("type") != "row"]
    for panel in document["panels"]:
        panels.extend(panel.get("panels", []))
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def substitute(expression: str) -> str:
    def value(match: re.Match[str]) -> str:
        variable = match.group(1) or match.group(2)
        if variable not in DASHBOARD_VARIABLES:
            raise AssertionError(f"unknown dashboard variable ${variable} in {expression}")
        return DASHBOARD_VARIABLES[variable]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expression)


def parse_with_promtool(promtool: str, expressions: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool parses PromQL only inside rules: one recording rule per expression."""
    document = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{index}", "expr": substitute(expression)}
        for index, expression in enumerate(expressions)
    ]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(document))
    return run(promtool, "check", "rules", str(path))


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_parses(promtool: str, dashboard: Path, tmp_path: Path) -> None:
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 15
    result = parse_with_promtool(promtool, expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_panel_query_is_refused(promtool: str, tmp_path: Path) -> None:
    expressions = dashboard_expressions(DASHBOARDS[0])
    expressions[3] = expressions[3].replace("sum by", "sum by by", 1)
    result = parse_with_promtool(promtool, expressions, tmp_path)
    assert result.returncode != 0 and "parse error" in (result.stdout + result.stderr)


def test_dashboard_covers_rpcs_relay_log_backlog_and_pools() -> None:
    used = referenced(e for path in DASHBOARDS for e in dashboard_expressions(path))
    assert used >= {"juki_rpc_server_requests_total", "juki_rpc_server_duration_milliseconds_bucket",
                    "juki:intake_relay_lag_ms:p99_5m", "juki_accesslog_backlog", "juki:db_pool:saturation"}


# --- only names the services export -------------------------------------------------------------------
def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def unknown_names(expressions: list[str]) -> set[str]:
    names = referenced(expressions)
    return {n for n in names if ":" in n} - recorded() | {n for n in names if ":" not in n} - exported()


def test_rules_and_panels_name_only_exported_metrics_and_recorded_rules() -> None:
    expressions = [rule["expr"] for rule in rules()]
    expressions += [e for path in DASHBOARDS for e in dashboard_expressions(path)]
    assert referenced(expressions)
    assert unknown_names(expressions) == set()


def test_an_unexported_metric_is_caught() -> None:
    assert unknown_names(["rate(juki_rpc_server_request_total[5m])", "juki:nothing:rate5m",
                          'juki_accesslog_backlog{pool="juki_not_a_metric"}']) == {
        "juki_rpc_server_request_total", "juki:nothing:rate5m"}


# --- runbook ------------------------------------------------------------------------------------------------
def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def missing_runbook_entries(markdown: str) -> list[str]:
    known = anchors(markdown)
    missing = []
    for rule in rules():
        if "alert" not in rule:
            continue
        link = rule["annotations"].get("runbook", "")
        if not link.startswith("k8s/README.md#") or link.split("#", 1)[1] not in known:
            missing.append(f"{rule['alert']}: {link or 'no runbook annotation'}")
        elif rule["alert"] not in markdown:
            missing.append(f"{rule['alert']}: not named in the runbook")
    return missing


def test_every_alert_links_to_its_runbook_entry() -> None:
    assert missing_runbook_entries(README.read_text()) == []


def test_a_missing_runbook_entry_is_caught() -> None:
    text = README.read_text()
    broken = re.sub(r"^#+ JukiRelayStalled.*$", "", text, flags=re.MULTILINE)
    assert broken != text
    assert any(entry.startswith("JukiRelayStalled") for entry in missing_runbook_entries(broken))
