"""The chart's alerts (helm/tmc/templates/prometheusrule.yaml) checked with promtool.

The rule is rendered by helm (the binary scripts/deploy-check.sh installs into .tools/helm, run
before pytest by `make test`) from tests/deploy/values/prometheusrule.yaml, then
``promtool check rules`` validates every group and ``promtool test rules`` runs
tests/ops/alerts_test.yaml, where each alert has a firing case and a quiet one.

promtool ships in Debian's ``prometheus`` package (Makefile APT_PACKAGES): without it these tests
FAIL with the install command; they never skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_checker import load_deploy_checker

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "tests" / "deploy" / "values" / "prometheusrule.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
INSTALL = "sudo apt-get install -y prometheus"  # Debian's package ships promtool; or `make apt`


dc = load_deploy_checker()


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool not found on PATH: install it with `{INSTALL}` (Debian's "
                    "prometheus package ships it; `make apt` installs it too)")
    return path


@pytest.fixture(scope="module")
def helm() -> str:
    path = dc.find_tool(os.environ.get("HELM"), [ROOT / ".tools" / "helm" / "helm"], "helm")
    if path is None:
        pytest.fail("helm not found: run `bash scripts/deploy-check.sh` (it installs the pinned "
                    "helm into .tools/helm), or set HELM")
    return str(path)


def render_rule(helm: str, tmp: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = [VALUES]
    if extra is not None:
        files.append(tmp / "extra-values.yaml")
        files[-1].write_text(yaml.safe_dump(extra))
    proc = dc.helm_template(helm, files)
    assert proc.returncode == 0, proc.stderr
    rules = [d for d in dc.load_documents(proc.stdout) if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"
    return rules[0]


@pytest.fixture(scope="module")
def rule(helm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return render_rule(helm, tmp_path_factory.mktemp("render"))


def alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def write_groups(rule: dict[str, Any], path: Path, annotations: bool = True) -> Path:
    groups = yaml.safe_load(yaml.safe_dump(rule["spec"]["groups"]))
    if not annotations:
        for g in groups:
            for r in g["rules"]:
                r.pop("annotations", None)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def unit_test(promtool: str, rule: dict[str, Any], where: Path) -> subprocess.CompletedProcess[str]:
    """promtool test rules on the rendered groups. Annotations are dropped: promtool compares
    them verbatim, and they are checked here in Python (test_alerts_say_what_to_do)."""
    write_groups(rule, where / "rules.yaml", annotations=False)
    shutil.copy(UNIT_TESTS, where / "alerts_test.yaml")
    return subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=where,
                          capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool: str, rule: dict[str, Any], tmp_path: Path) -> None:
    path = write_groups(rule, tmp_path / "rules.yaml")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, out
    assert f"SUCCESS: {len(alerts(rule))} rules found" in out, out


def test_promtool_unit_tests_pass(promtool: str, rule: dict[str, Any], tmp_path: Path) -> None:
    proc = unit_test(promtool, rule, tmp_path)
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, out
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_and_a_quiet_case(rule: dict[str, Any]) -> None:
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for t in case.get("alert_rule_test") or []:
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in alerts(rule)}
    assert names, "the rendered PrometheusRule has no alerts"
    assert not names - fires, f"alerts never shown firing: {sorted(names - fires)}"
    assert not names - quiet, f"alerts never shown quiet: {sorted(names - quiet)}"
    unknown = (fires | quiet) - names
    assert not unknown, f"tests of alerts the chart does not render: {sorted(unknown)}"


def test_alerts_say_what_to_do(rule: dict[str, Any]) -> None:
    for a in alerts(rule):
        labels, ann = a.get("labels") or {}, a.get("annotations") or {}
        assert labels.get("severity") in {"critical", "warning"}, a["alert"]
        assert labels.get("team") == "ml-serving", f"{a['alert']}: alertLabels not applied"
        assert ann.get("summary"), a["alert"]
        assert "Runbook:" in ann.get("description", ""), f"{a['alert']}: no runbook line"


def _exported_names() -> set[str]:
    sys.path.insert(0, str(ROOT))
    try:
        from app.metrics import Metrics  # noqa: PLC0415 (the app of this checkout)
    finally:
        sys.path.pop(0)
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                "info": ["_info"], "summary": ["_sum", "_count", ""]}
    return {fam.name + s for fam in Metrics().registry.collect() for s in suffixes[fam.type]}


def test_alerts_use_metrics_the_app_exports(rule: dict[str, Any]) -> None:
    exported = _exported_names()
    for a in alerts(rule):
        for name in re.findall(r"\b(tmc_[a-z_]+)\s*\{", a["expr"]):
            assert name in exported, f"{a['alert']}: {name} is not a metric of app/metrics.py"


def test_values_reach_the_rule(helm: str, promtool: str, tmp_path: Path) -> None:
    """Thresholds, selector, namespace and labels come from values; a threshold low enough to
    fire on the quiet series makes the unit tests fail (the quiet cases bite)."""
    rule = render_rule(helm, tmp_path, {"metrics": {"prometheusRule": {
        "namespace": "monitoring", "labels": {"tier": "alerts"},
        "thresholds": {"errorRatio": 0.01}}}})
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["tier"] == "alerts"
    by_name = {a["alert"]: a for a in alerts(rule)}
    assert "> 0.01" in by_name["TmcHighErrorRatio"]["expr"]
    proc = unit_test(promtool, rule, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "TmcHighErrorRatio" in out, out

    rule = render_rule(helm, tmp_path, {"metrics": {"prometheusRule": {
        "selector": 'job="tmc-metrics"'}}})
    for a in alerts(rule):
        assert 'job="tmc-metrics"' in a["expr"] and "ci-tmc" not in a["expr"], a["expr"]
