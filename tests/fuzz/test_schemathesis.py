"""Schemathesis against the real app served by uvicorn on loopback (issue 14).

The schema is the live server's own /openapi.json (native, admin and V2 routes). Every
operation gets a bounded, derandomized set of generated requests (positive and negative
data, plus the schema's explicit examples), each sent twice: without a token and with the
admin token. The run happens once per module; the tests below then assert on its findings:

* no 5xx, ever (the contract: a bad request is the client's fault, never a server error);
* every status code is documented for its operation;
* every documented response body matches its schema (and its declared content type).

``TMC_FUZZ_EXAMPLES`` (default 50) sets the examples per operation and pass; about 1,200
cases (2,400 requests) and ~30 s on two shared cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bases import load_base
from tests.app.conftest import ADMIN, component_bytes, live_server, settings_for

EXAMPLES = int(os.environ.get("TMC_FUZZ_EXAMPLES", "50"))
# Valid inputs for the tiny-mlp base (64 features): a pass per inference operation keeps
# them and fuzzes everything else (components, composition, normalize, V2 parameters ...),
# so generation reaches composition and the model rather than stopping at input validation.
VECTORS = [[round(0.01 * (i + 7 * j) - 0.3, 3) for i in range(64)] for j in range(2)]
PREDICT = {"inputs": VECTORS}
V2_INFER = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                        "data": [v for row in VECTORS for v in row]}]}


def _body_patch(name: str) -> dict[str, object] | None:
    if name == "POST /v1/predict":
        return PREDICT
    if name.startswith("POST /v2/models/") and name.endswith("/infer"):
        return V2_INFER
    return None



AUTHS: dict[str, dict[str, str]] = {
    "anonymous": {},
    "admin": {"Authorization": f"Bearer {ADMIN}"},
}
CHECKS = {
    "not_a_server_error": not_a_server_error,
    "status_code_conformance": status_code_conformance,
    "content_type_conformance": content_type_conformance,
    "response_schema_conformance": response_schema_conformance,
}
MAX_KEPT = 1  # example requests kept per (check, operation, status)


@dataclass
class Findings:
    cases: int = 0
    requests: int = 0
    seconds: float = 0.0
    server_errors: list[str] = field(default_factory=list)  # the server's ERROR log lines
    operations: list[str] = field(default_factory=list)
    statuses: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(int)))
    # check -> (operation, auth, status) -> a few reproducible requests
    failures: dict[str, dict[tuple[str, str, int], list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def report(self, check: str) -> str:
        lines = []
        for (op, auth, status), examples in sorted(self.failures[check].items()):
            lines.append(f"{op} [{auth}] -> {status}")
            lines.extend(f"    {e}" for e in examples)
        return "\n".join(lines)


def _describe(case: schemathesis.Case, response: requests.Response, auth: str,
              failure: Failure | FailureGroup) -> str:
    found = list(failure.exceptions) if isinstance(failure, FailureGroup) else [failure]
    why = "; ".join(f"{f.title}: {' '.join(f.message.split())[:300]}" for f in found)
    curl = case.as_curl_command(headers=AUTHS[auth] or None)
    return f"{curl[:1500]}\n      => {response.status_code} {response.text[:160]!r}\n      {why}"


def _fuzz_operation(operation: schemathesis.APIOperation, name: str, mode: GenerationMode,
                    known: dict[str, str], patch: dict[str, object] | None,
                    session: requests.Session, findings: Findings) -> None:
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=known or None))
    def run(case: schemathesis.Case) -> None:
        if patch is not None:
            if not isinstance(case.body, dict):
                return
            case.body = {**case.body, **patch}
        findings.cases += 1
        for auth, headers in AUTHS.items():
            response = case.call(session=session, headers=headers or None, timeout=30)
            findings.requests += 1
            findings.statuses[name][response.status_code] += 1
            for check_name, check in CHECKS.items():
                try:
                    case.validate_response(response, checks=[check], headers=headers or None)
                except (Failure, FailureGroup) as exc:
                    kept = findings.failures[check_name][(name, auth, response.status_code)]
                    if len(kept) < MAX_KEPT:
                        kept.append(_describe(case, response, auth, exc))

    try:
        run()
    except Unsatisfiable:
        # negative mode on an operation with nothing to negate (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE, name


def _fuzz(schema: schemathesis.BaseSchema, known_ids: dict[str, str],
          findings: Findings) -> None:
    """Every operation: positive and negative data, then (where it has path parameters that
    name a model, component or composition) positive data aimed at ones that exist, and for
    inference, positive data around valid inputs."""
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            name = f"{operation.method.upper()} {operation.path}"
            findings.operations.append(name)
            params = {p.name for p in operation.path_parameters}
            known = {k: v for k, v in known_ids.items() if k in params}
            passes: list[tuple[GenerationMode, dict[str, str], dict[str, object] | None]] = [
                (GenerationMode.POSITIVE, {}, None), (GenerationMode.NEGATIVE, {}, None)]
            if known:
                passes.append((GenerationMode.POSITIVE, known, None))
            patch = _body_patch(name)
            if patch is not None:
                passes.append((GenerationMode.POSITIVE, known, patch))
            for mode, fixed, body in passes:
                _fuzz_operation(operation, name, mode, fixed, body, session, findings)


def _seed_registry(url: str, base_dir: Path) -> dict[str, str]:
    """One component and one named composition, so that fuzzing also reaches real ones."""
    base = load_base(base_dir)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        data = component_bytes(base, seed=1234)
        client.put("/v1/components/fuzz-a", content=data).raise_for_status()
        client.put("/v1/compositions/fuzz-mix",
                   json={"weights": {"fuzz-a": 0.5}}).raise_for_status()
        model = client.get("/v1/base").json()["name"]
    return {"model": model, "model_name": model, "cid": "fuzz-a", "name": "fuzz-mix"}


class _ErrorLines(logging.Handler):
    """Keeps the server's ERROR records, tracebacks included, for a failing test to show
    (a 500's cause is only in the server log)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def findings(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Findings]:
    registry = tmp_path_factory.mktemp("fuzz") / "registry"
    out = Findings()
    errors = _ErrorLines(out.server_errors)
    logging.getLogger("tmc").addHandler(errors)
    with live_server(settings_for(tiny_base_dir, registry)) as url:
        known_ids = _seed_registry(url, tiny_base_dir)
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
        start = time.monotonic()
        _fuzz(schema, known_ids, out)
        out.seconds = time.monotonic() - start
    logging.getLogger("tmc").removeHandler(errors)
    print(f"\nfuzz: {len(out.operations)} operations, {out.cases} cases, "
          f"{out.requests} requests in {out.seconds:.1f} s")
    for op in out.operations:
        print(f"  {op}: {dict(sorted(out.statuses[op].items()))}")
    yield out


def test_every_operation_was_fuzzed(findings: Findings) -> None:
    assert len(findings.operations) >= 15, findings.operations
    assert any(op.startswith(("GET /v2", "POST /v2")) for op in findings.operations)
    missing = [op for op in findings.operations if not findings.statuses[op]]
    assert not missing, f"operations never called: {missing}"
    # the valid-input passes reached the model through both protocols
    inference = [op for op in findings.operations if _body_patch(op) is not None]
    assert len(inference) == 2, inference
    assert all(findings.statuses[op].get(200) for op in inference), {
        op: dict(findings.statuses[op]) for op in inference}


def test_no_server_errors(findings: Findings) -> None:
    assert not findings.failures["not_a_server_error"], (
        "5xx responses:\n" + findings.report("not_a_server_error")
        + "\nthe server's errors:\n" + "\n".join(findings.server_errors[:3]))


def test_status_codes_are_documented(findings: Findings) -> None:
    assert not findings.failures["status_code_conformance"], (
        "undocumented status codes:\n" + findings.report("status_code_conformance"))


def test_responses_match_their_schema(findings: Findings) -> None:
    bad = {**findings.failures["content_type_conformance"],
           **findings.failures["response_schema_conformance"]}
    assert not bad, ("responses off their documented content type or schema:\n"
                     + findings.report("content_type_conformance") + "\n"
                     + findings.report("response_schema_conformance"))
