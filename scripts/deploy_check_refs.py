"""References between the rendered objects of one value set -- no offline tool follows them
(the Kubernetes schemas and checkov look at one object at a time), and a dangling one only
shows in a cluster:

- names are DNS names, unique per kind, in the release namespace; the value set renders the
  kinds it expects and none it forbids;
- Services select a pod template and name ports it has;
- the HPA targets a rendered workload that leaves spec.replicas to it and requests what it
  scales on; the PDB selects pods and still allows an eviction;
- the ServiceMonitor scrapes exactly one Service on a port it has, and the PrometheusRule's
  job / namespace are the ones that ServiceMonitor produces;
- NetworkPolicies select rendered pods; the Ingress routes to a rendered Service port and never
  to the app's admin routes (read from the app's admin router).
"""

from __future__ import annotations

import re

import deploy_check_app as app_facts
from deploy_check_rules import Doc, Rendered, Report, pod_labels, pod_spec

NAMESPACE = "tmc-ci"
DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def long_running_pods(rx: Rendered) -> list[tuple[dict[str, str], Doc]]:
    return [(pod_labels(w), pod_spec(w) or {}) for w in rx.workloads
            if w["kind"] not in ("Pod", "Job")]


def check_documents(rx: Rendered, rep: Report) -> None:
    seen: set[tuple[str, str]] = set()
    for d in rx.docs:
        kind, name = d.get("kind", "?"), d.get("metadata", {}).get("name", "?")
        if (kind, name) in seen:
            rep.error(rx.vs.name, f"duplicate {kind}/{name}")
        seen.add((kind, name))
        limit = 63 if kind in ("Service", "Job", "CronJob") else 253
        if not DNS_NAME.fullmatch(name) or len(name) > limit:
            rep.error(rx.vs.name, f"{kind}/{name}: invalid name (DNS label, <= {limit} chars)")
        if d.get("metadata", {}).get("namespace") not in (None, NAMESPACE):
            rep.error(rx.vs.name, f"{kind}/{name}: namespace is not the release namespace")
    kinds = set(rx.by_kind)
    for k in sorted(rx.vs.expect_kinds - kinds):
        rep.error(rx.vs.name, f"expected a {k}, none rendered")
    for k in sorted(rx.vs.forbid_kinds & kinds):
        rep.error(rx.vs.name, f"a {k} was rendered but this value set must not have one")


def check_services(rx: Rendered, rep: Report) -> None:
    """Services select pods and name ports they have."""
    pods = long_running_pods(rx)
    for svc in rx.by_kind.get("Service", []):
        sw = f"{rx.vs.name}: Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector")
        targets = [sp for lbl, sp in pods if matches(sel, lbl)]
        if not targets:
            rep.error(sw, f"selector {sel} matches no pod template")
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            for sp in targets:
                ports = [cp for c in sp.get("containers") or [] for cp in c.get("ports") or []]
                if isinstance(tp, str) and tp not in {cp.get("name") for cp in ports}:
                    rep.error(sw, f"targetPort {tp!r} is not a named container port")
                if isinstance(tp, int) and tp not in {cp.get("containerPort") for cp in ports}:
                    rep.error(sw, f"targetPort {tp} is not a container port")


def check_autoscaling(rx: Rendered, rep: Report) -> None:
    for hpa in rx.by_kind.get("HorizontalPodAutoscaler", []):
        hw = f"{rx.vs.name}: HorizontalPodAutoscaler/{hpa['metadata']['name']}"
        ref = hpa["spec"]["scaleTargetRef"]
        target = next((d for d in rx.by_kind.get(ref["kind"], [])
                       if d["metadata"]["name"] == ref["name"]), None)
        if target is None:
            rep.error(hw, f"scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
            continue
        if "replicas" in target["spec"]:
            rep.error(hw, "the target also sets spec.replicas (every helm upgrade would reset "
                          "the HPA's choice)")
        for m in hpa["spec"].get("metrics") or []:
            if m["type"] != "Resource":
                continue
            rname = m["resource"]["name"]
            for c in (pod_spec(target) or {}).get("containers") or []:
                if rname not in ((c.get("resources") or {}).get("requests") or {}):
                    rep.error(hw, f"{rname} utilization target but container {c['name']} has "
                                  f"no {rname} request")


def check_disruption_budgets(rx: Rendered, rep: Report) -> None:
    pods = long_running_pods(rx)
    hpas = rx.by_kind.get("HorizontalPodAutoscaler", [])
    for pdb in rx.by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"].get("matchLabels")
        if not any(matches(sel, lbl) for lbl, _ in pods):
            rep.error(f"{rx.vs.name}: PodDisruptionBudget", f"selector {sel} matches no pod")
        minr = min([d["spec"]["replicas"] for d in rx.servers if "replicas" in d["spec"]]
                   + [h["spec"]["minReplicas"] for h in hpas] or [0])
        min_available = pdb["spec"].get("minAvailable")
        if isinstance(min_available, int) and min_available >= minr:
            rep.error(f"{rx.vs.name}: PodDisruptionBudget",
                      f"minAvailable {min_available} >= replicas {minr}: no voluntary eviction "
                      "could ever happen (node drains block)")


def scraped_services(rx: Rendered, sm: Doc) -> list[Doc]:
    sel = sm["spec"]["selector"].get("matchLabels")
    return [s for s in rx.by_kind.get("Service", [])
            if matches(sel, s["metadata"].get("labels") or {})]


def check_monitoring(rx: Rendered, rep: Report) -> None:
    """One scraped Service per ServiceMonitor; its targets get job=<Service name> and
    namespace=<release namespace>, which is what the PrometheusRule must select."""
    jobs: set[str] = set()
    for sm in rx.by_kind.get("ServiceMonitor", []):
        hits = scraped_services(rx, sm)
        jobs |= {s["metadata"]["name"] for s in hits}
        if len(hits) != 1:
            rep.error(f"{rx.vs.name}: ServiceMonitor", f"selects {len(hits)} Services "
                      f"({[s['metadata']['name'] for s in hits]}); each pod must be scraped once")
        for ep in sm["spec"]["endpoints"]:
            for s in hits:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    rep.error(f"{rx.vs.name}: ServiceMonitor", f"port {ep.get('port')!r} is "
                              f"not a port name of Service/{s['metadata']['name']}")
    for pr in rx.by_kind.get("PrometheusRule", []):
        pw = f"{rx.vs.name}: PrometheusRule/{pr['metadata']['name']}"
        for rule in (r for g in pr["spec"]["groups"] for r in g["rules"]):
            expr, name = str(rule.get("expr", "")), rule.get("alert") or rule.get("record")
            for job in sorted(set(re.findall(r'\bjob="([^"]*)"', expr))):
                if jobs and job not in jobs:
                    rep.error(pw, f"{name} selects job={job!r} but the ServiceMonitor scrapes "
                                  f"job {sorted(jobs)}")
            for ns in sorted(set(re.findall(r'\bnamespace="([^"]*)"', expr))):
                if ns != NAMESPACE:
                    rep.error(pw, f"{name} selects namespace={ns!r}, not the release's")


def check_network_policies(rx: Rendered, rep: Report) -> None:
    pods = long_running_pods(rx)
    for np in rx.by_kind.get("NetworkPolicy", []):
        where = f"{rx.vs.name}: NetworkPolicy/{np['metadata']['name']}"
        sel = np["spec"]["podSelector"].get("matchLabels")
        if not any(matches(sel, lbl) for lbl, _ in pods):
            rep.error(where, f"podSelector {sel} matches no pod")
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                psel = (peer.get("podSelector") or {}).get("matchLabels")
                if psel and "namespaceSelector" not in peer and not any(
                        matches(psel, pod_labels(w)) for w in rx.workloads):
                    rep.error(where, f"allows pods {psel} but no rendered pod has those labels")


def exposes_admin(path: str, admin_paths: frozenset[str]) -> bool:
    """A Prefix path routes every admin path it is a prefix of (``/`` routes them all)."""
    prefix = path.rstrip("/")
    return any(a == prefix or a.startswith(prefix + "/")
               or (prefix + "/").startswith(a.split("{")[0].rstrip("/") + "/")
               for a in admin_paths)


def check_ingresses(rx: Rendered, rep: Report) -> None:
    services = {s["metadata"]["name"]: s for s in rx.by_kind.get("Service", [])}
    _routes, admin_paths = app_facts.http_routes()
    for ing in rx.by_kind.get("Ingress", []):
        iw = f"{rx.vs.name}: Ingress/{ing['metadata']['name']}"
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                be = p["backend"]["service"]
                backend = services.get(be["name"])
                if backend is None:
                    rep.error(iw, f"backend Service {be['name']!r} is not rendered")
                elif be["port"].get("number") not in {q["port"] for q in backend["spec"]["ports"]}:
                    rep.error(iw, f"backend port {be['port']} not on Service {be['name']}")
                if exposes_admin(p["path"], admin_paths):
                    rep.error(iw, f"path {p['path']} exposes the admin API through the Ingress")


def check_references(rx: Rendered, rep: Report) -> None:
    check_documents(rx, rep)
    check_services(rx, rep)
    check_autoscaling(rx, rep)
    check_disruption_budgets(rx, rep)
    check_monitoring(rx, rep)
    check_network_policies(rx, rep)
    check_ingresses(rx, rep)
