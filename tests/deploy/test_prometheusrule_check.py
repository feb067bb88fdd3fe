"""The deploy check's PrometheusRule validation bites: schema (severity, runbook annotations,
field typos, durations) and the job / namespace the rules select.

Like tests/deploy/test_deploy_check.py, they run under scripts/deploy-check.sh (which installs
helm) and fail with the install command without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy.test_deploy_check import VS, check, dc, helm, render


def rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (pr,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return [r for g in pr["spec"]["groups"] for r in g["rules"]]


def alert(docs: list[dict[str, Any]], name: str = "TmcHighErrorRatio") -> dict[str, Any]:
    return next(r for r in rules(docs) if r.get("alert") == name)


MUTATIONS: dict[str, tuple[Callable[[list[dict[str, Any]]], Any], str]] = {
    "alert without severity": (
        lambda d: alert(d)["labels"].pop("severity"), "PrometheusRule schema"),
    "unknown severity": (
        lambda d: alert(d)["labels"].update(severity="page"), "PrometheusRule schema"),
    "alert without a description": (
        lambda d: alert(d)["annotations"].pop("description"), "PrometheusRule schema"),
    "field typo": (
        lambda d: alert(d).update(fro="5m"), "PrometheusRule schema"),
    "bad duration": (
        lambda d: alert(d).update({"for": "5 minutes"}), "PrometheusRule schema"),
    "selects a job nobody scrapes": (
        lambda d: alert(d).update(expr=alert(d)["expr"].replace('job="ci-tmc"', 'job="tmc"')),
        "selects job='tmc'"),
    "selects another namespace": (
        lambda d: alert(d).update(
            expr=alert(d)["expr"].replace('namespace="tmc-ci"', 'namespace="default"')),
        "selects namespace='default'"),
}


def test_prometheusrule_value_set_is_clean() -> None:
    assert dc.check_value_set(helm(), VS["prometheusrule"])[0].errors == []


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_prometheusrule_mutation_caught(name: str) -> None:
    mutate, fragment = MUTATIONS[name]
    docs = render("prometheusrule")
    mutate(docs)
    errors = check(docs, "prometheusrule")
    assert any(fragment in e for e in errors), f"{fragment!r} not in {errors}"
