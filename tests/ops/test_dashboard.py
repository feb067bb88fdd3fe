"""The Grafana dashboard shipped with the chart (helm/tmc/files/dashboard.json).

Every PromQL expression of every panel (and of the template variables) must parse AND evaluate
against a real Prometheus server scraping a running tmc: the test starts tmc on loopback, starts
Debian's ``prometheus`` binary scraping it every second, drives predictions, errors, uploads and a
forget through the service, then queries each expression through Prometheus's HTTP API. A
missing ``prometheus`` binary FAILS the test (never skips). The chart side: rendering with
``metrics.grafanaDashboard.enabled`` yields a sidecar-labelled ConfigMap whose JSON equals the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from app.metrics import Metrics
from tests.app.conftest import (
    ADMIN,
    component_bytes,
    free_port,
    fresh_seed,
    live_server,
    settings_for,
    tiny_base,  # noqa: F401 (fixture)
    tiny_base_dir,  # noqa: F401 (fixture)
)
from tests.deploy_checker import load_deploy_checker

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "tmc" / "files" / "dashboard.json"
INSTALL = "apt-get update && apt-get install -y prometheus"
WINDOW = "30s"  # stands in for $__rate_interval / $__interval / $__range: covers the whole test
VARIABLES = ("namespace", "job", "pod")
# Expressions that may legitimately be empty (nothing increments the counter in this scenario)
# or be 0 (no 5xx, an idle queue, one replica), instead of having a positive sample.
MAY_BE_EMPTY = ("tmc_rejected_requests_total",)
MAY_BE_ZERO = ('status=~"5.."', "tmc_queue_depth", "min(tmc_registry_generation",
               "tmc_registry_lost")  # 0/1 alarm: 0 while the shared registry is intact


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels") or []  # collapsed rows hold their panels


def targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / legend, expr) of every panel target."""
    return [(f"{p['title']} [{t.get('legendFormat', t['refId'])}]", t["expr"])
            for p in panels(dash) for t in p.get("targets") or []]


def variable_selectors(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """The series selector inside each label_values(selector, label) variable query."""
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {v['name']}: unexpected query {query!r}"
        out.append((f"variable {v['name']}", m.group(1)))
    return out


def substitute(expr: str) -> str:
    """Grafana's interpolation for a single Prometheus: every variable = All (.*)."""
    for name in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace(f"${{{name}}}", WINDOW).replace(f"${name}", WINDOW)
    for name in VARIABLES:
        expr = expr.replace(f"${{{name}}}", ".*").replace(f"${name}", ".*")
    left = re.findall(r"\$(?!\{\d+\})\{?\w+", expr)  # ${1} is label_replace's, not Grafana's
    assert not left, f"unknown template variables {left} in {expr}"
    return expr


def exported_series() -> set[str]:
    """Sample names app.metrics exports (prometheus_client adds _total, _bucket, _info, ...)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "info": ["_info"]}
    return {fam.name + s for fam in Metrics().registry.collect() for s in suffixes[fam.type]}


# ----------------------------------------------------------------------------- static checks
def test_dashboard_structure_and_metric_names():
    dash = dashboard()
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"
    for var in VARIABLES:
        assert names[var]["type"] == "query" and names[var]["allValue"] == ".*"
    exported = exported_series()
    used: set[str] = set()
    for where, expr in targets(dash) + variable_selectors(dash):
        used |= set(re.findall(r"\btmc_\w+", expr))
        if not where.startswith("variable"):
            # every query filters by the variables, with regex matchers (All = .*)
            for sel in re.findall(r"\btmc_\w+\{([^}]*)\}", expr):
                for var in VARIABLES:
                    assert f'{var}=~"${var}"' in sel, f"{where}: {expr} lacks {var}=~\"${var}\""
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    assert used <= exported, f"not exported by app/metrics.py: {sorted(used - exported)}"
    families = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in exported}
    covered = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in used}
    assert families <= covered, f"metrics without a panel: {sorted(families - covered)}"


# ------------------------------------------------------------------- real Prometheus, real tmc
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(f"the prometheus server binary is not installed; install it with: {INSTALL}",
                    pytrace=False)
    return found


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "tmc", "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def wait(self, what: str, ok: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}): "
                            f"{self.log.read_text()[-3000:]}")
            try:
                if ok():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; prometheus log:\n"
                    f"{self.log.read_text()[-3000:]}")

    def query(self, expr: str) -> dict[str, Any]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        return dict(r.json())

    def last_scrape(self) -> float:
        """Timestamp of the newest successful scrape of tmc (0 before the first)."""
        res = self.query('timestamp(up{job="tmc"} == 1)')["data"]["result"]
        return float(res[0]["value"][1]) if res else 0.0

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def drive_traffic(url: str, base: Any, seconds: float) -> None:
    """Predictions (plain, linearized, explain), 4xx, uploads and forgets spread over several
    scrapes, so that every counter and histogram moves between samples."""
    auth = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=30) as c:
        for cid in ("a", "b"):
            r = c.put(f"/v1/components/{cid}", content=component_bytes(base, fresh_seed()),
                      headers=auth)
            assert r.status_code == 201, r.text
        x = torch.randn(2, 64).tolist()
        start, forgets = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            for body in ({"inputs": x}, {"inputs": x, "components": {"a": 0.5, "b": 0.5}},
                         {"inputs": x, "components": {"a": 1.0}, "explain": True}):
                r = c.post("/v1/predict", json=body)
                assert r.status_code == 200, r.text
            r = c.post("/v1/predict", json={"inputs": x, "components": {"nope": 1.0}})
            assert 400 <= r.status_code < 500, r.text
            if (time.monotonic() - start) > forgets * seconds / 2:  # a forget now and midway
                cid = f"f{forgets}"
                r = c.put(f"/v1/components/{cid}", content=component_bytes(base, fresh_seed()),
                          headers=auth)
                assert r.status_code == 201, r.text
                r = c.delete(f"/v1/components/{cid}", headers=auth)
                assert r.status_code == 200, r.text
                forgets += 1
            time.sleep(0.05)


def test_every_dashboard_query_evaluates_against_a_real_prometheus(tiny_base_dir, tiny_base,  # noqa: F811
                                                                  tmp_path):
    binary = prometheus_binary()
    dash = dashboard()
    t0 = time.monotonic()
    with live_server(settings_for(tiny_base_dir, tmp_path / "registry")) as url:
        prom = Prometheus(binary, url.removeprefix("http://"), tmp_path)
        try:
            prom.wait("prometheus /-/ready", lambda: prom.http.get("/-/ready").status_code == 200,
                      30)
            prom.wait("the first scrape of tmc", lambda: prom.last_scrape() > 0, 20)
            drive_traffic(url, tiny_base, seconds=4.0)
            done = time.time()
            prom.wait("3 scrapes after the traffic", lambda: prom.last_scrape() > done + 2.5, 20)
            failures = []
            for where, expr in targets(dash) + variable_selectors(dash):
                got = prom.query(substitute(expr))
                if got.get("status") != "success":
                    failures.append(f"{where}: {got.get('errorType')}: {got.get('error')}\n"
                                    f"    {expr}")
                    continue
                result = got["data"]["result"]
                values = [float(s["value"][1]) for s in result]
                if not result:
                    if not any(m in expr for m in MAY_BE_EMPTY):
                        failures.append(f"{where}: empty result\n    {expr}")
                elif not any(m in expr for m in MAY_BE_EMPTY + MAY_BE_ZERO) and not any(
                        math.isfinite(v) and v > 0 for v in values):
                    failures.append(f"{where}: no positive finite sample {values}\n    {expr}")
            assert not failures, "\n".join(failures)
        finally:
            prom.close()
    print(f"{len(targets(dash))} panel targets + {len(variable_selectors(dash))} variable "
          f"queries checked in {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------------------------- the chart
dc = load_deploy_checker()
HELM = dc.find_tool(os.environ.get("HELM"), [ROOT / ".tools" / "helm" / "helm"], "helm")


def helm() -> str:
    """The helm binary; `make test` installs it (scripts/deploy-check.sh) before pytest runs."""
    assert HELM is not None, "helm is not installed: run `bash scripts/deploy-check.sh` first"
    return str(HELM)


def test_chart_ships_the_dashboard_configmap(tmp_path):
    values = tmp_path / "dashboard.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"grafanaDashboard": {
        "enabled": True, "label": "grafana_dashboard", "labelValue": "1",
        "annotations": {"grafana_folder": "tmc"}, "labels": {"team": "ml"}}}}))
    files = [ROOT / "tests" / "deploy" / "values" / "defaults.yaml", values]
    proc = dc.helm_template(helm(), files)
    assert proc.returncode == 0, proc.stderr
    docs = dc.load_documents(proc.stdout)
    maps = [d for d in docs if d["kind"] == "ConfigMap"
            and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    assert len(maps) == 1, [d["metadata"]["name"] for d in docs]
    cm = maps[0]
    assert cm["metadata"]["labels"]["team"] == "ml"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "tmc"}
    assert list(cm["data"]) == ["tmc.json"]
    assert json.loads(cm["data"]["tmc.json"]) == dashboard()
    assert cm["data"]["tmc.json"] == DASHBOARD.read_text().rstrip("\n")
    # the whole render still passes the deploy checker (k8s 1.30 schemas + cross-checks)
    vs = dc.ValueSet("dashboard", files, expect_kinds=dc.BASE_KINDS)
    rep = dc.Report()
    dc.check_documents(docs, vs, rep)
    assert not rep.errors, rep.errors
    lint = dc.helm_cmd(helm(), "lint", "--strict", str(dc.CHART), *dc.values_args(files))
    assert lint.returncode == 0 and "[WARNING]" not in lint.stdout, lint.stdout + lint.stderr
    # custom sidecar label, and off by default
    custom = dc.helm_cmd(helm(), "template", "ci", str(dc.CHART), "-f", str(values), "--set",
                         "metrics.grafanaDashboard.label=dash,"
                         "metrics.grafanaDashboard.labelValue=yes")
    assert custom.returncode == 0, custom.stderr
    (cm2,) = [d for d in dc.load_documents(custom.stdout)
              if (d["metadata"].get("labels") or {}).get("dash") == "yes"]
    assert "grafana_dashboard" not in cm2["metadata"]["labels"]
    default = dc.helm_template(helm(), files[:1])
    assert default.returncode == 0 and "tmc.json" not in default.stdout
