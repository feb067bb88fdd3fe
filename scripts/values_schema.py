#!/usr/bin/env python3
"""The ``config`` block of helm/tmc/values.schema.json, generated from ``app.settings.Settings``.

Policy: every setting of the app that the chart does not derive from its own structure is a
``config`` key (camelCase of the field, rendered as ``TMC_<UPPER_SNAKE>`` by
templates/configmap.yaml), with the type, enum and bounds pydantic's ``model_json_schema``
gives and the field's description. So a chart key is a real setting by construction, and a new
setting is in the chart as soon as this script is run. The settings the chart sets itself
(paths, URLs, tokens, host, port) are listed in CHART_SET_SETTINGS with the chart value that
carries each one; ``values.yaml`` must give a default for every generated key.

Usage:
  python scripts/values_schema.py --write   rewrite the block (and keep the rest of the file)
  python scripts/values_schema.py --check   exit 1, naming the fix, if the file differs
Run by scripts/deploy-check.sh (``--check``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from deploy_check_app import settings_module

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "helm" / "tmc" / "values.schema.json"
VALUES_FILE = ROOT / "helm" / "tmc" / "values.yaml"
FIX = ".venv/bin/python scripts/values_schema.py --write"

# Settings the chart sets from its own structure (not through values.config), with the values
# that carry each.
CHART_SET_SETTINGS = {
    "base_dir": "base.* (init container or PVC mount)",
    "registry_dir": "registry.mountPath (embedded registry)",
    "redis_url": "redis.* / externalRedis.* (password spliced from a Secret)",
    "blob_url": "objectStorage.* (s3://bucket/prefix)",
    "blob_cache_dir": "server.blobCacheSizeLimit (emptyDir, Redis or object storage)",
    "admin_token": "auth.adminToken (Secret)",
    "inference_token": "auth.inferenceToken (Secret)",
    "host": "always 0.0.0.0 in a pod",
    "port": "server.port",
}
# Keys the templates read directly (device: the GPU switch; drainTimeoutS: the grace period).
CHART_REQUIRED = ["device", "drainTimeoutS"]
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def value_schema(field: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One setting's JSON schema in the chart's form: enum, or a (nullable) number with bounds."""
    if "enum" in spec:
        return {"enum": list(spec["enum"])}
    options = spec.get("anyOf", [spec])
    kinds = [o for o in options if o.get("type") in ("integer", "number")]
    nullable = any(o.get("type") == "null" for o in options)
    if len(kinds) != 1 or len(options) != len(kinds) + nullable:
        raise SystemExit(f"values_schema: setting {field} has type {spec!r}, which the chart "
                         "cannot carry as config: add it to CHART_SET_SETTINGS with the value "
                         "that sets it")
    out: dict[str, Any] = {"type": [kinds[0]["type"], "null"] if nullable else kinds[0]["type"]}
    out.update({k: kinds[0][k] for k in BOUNDS if k in kinds[0]})
    return out


def config_block(settings_cls: Any) -> dict[str, Any]:
    """The ``properties.config`` schema for every setting not in CHART_SET_SETTINGS."""
    fields = settings_cls.model_json_schema()["properties"]
    missing = sorted(set(CHART_SET_SETTINGS) - set(fields))
    if missing:
        raise SystemExit(f"values_schema: CHART_SET_SETTINGS names {missing}, which "
                         "app/settings.py does not have")
    props: dict[str, Any] = {}
    for field, spec in fields.items():
        if field in CHART_SET_SETTINGS:
            continue
        prop = value_schema(field, spec)
        text = f"TMC_{field.upper()}"
        prop["description"] = f"{text}: {spec['description']}" if "description" in spec else text
        props[camel(field)] = prop
    return {"type": "object", "additionalProperties": False,
            "description": "TMC_* settings (generated from app/settings.py by "
                           "scripts/values_schema.py); each key maps to TMC_<UPPER_SNAKE_CASE>",
            "properties": props, "required": CHART_REQUIRED}


def render(schema: dict[str, Any], block: dict[str, Any]) -> str:
    schema["properties"]["config"] = block
    return json.dumps(schema, indent=2) + "\n"


def problems(text: str, wanted: str, block: dict[str, Any]) -> list[str]:
    """Why the committed schema and values.yaml disagree with the settings (empty: they agree)."""
    out = []
    if text != wanted:
        out.append(f"{SCHEMA_FILE.relative_to(ROOT)}: the config block differs from "
                   "app/settings.py")
    defaults = (yaml.safe_load(VALUES_FILE.read_text()) or {}).get("config") or {}
    for key in sorted(set(block["properties"]) - set(defaults)):
        out.append(f"helm/tmc/values.yaml: config.{key} has no default (add it, or null for "
                   "the app's default)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the config block")
    mode.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = ap.parse_args(argv)
    text = SCHEMA_FILE.read_text()
    block = config_block(settings_module().Settings)
    wanted = render(json.loads(text), block)
    if args.write:
        SCHEMA_FILE.write_text(wanted)
        print(f"values_schema: wrote {len(block['properties'])} config keys")
        return 0
    found = problems(text, wanted, block)
    for line in found:
        print(f"values_schema: {line}", file=sys.stderr)
    if found:
        print(f"values_schema: fix with `{FIX}`", file=sys.stderr)
        return 1
    print(f"values_schema: config block matches app/settings.py ({len(block['properties'])} "
          "keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
