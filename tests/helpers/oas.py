"""Validate JSON bodies against Etsy's OpenAPI (3.0) document with jsonschema.

OAS 3.0 is not JSON Schema: `nullable: true` must become a "null" alternative, and `$ref`s point into
`components`. `strict=True` also forbids properties the schema does not declare, so a misspelt field fails.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema

SPEC_PATH = Path(__file__).resolve().parents[2] / "imageselector" / "etsy" / "etsy_openapi_v3_subset.json"
API_PREFIX = "/v3/application"


@cache
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


def _convert(node, components: dict, strict: bool, depth: int = 0):
    """OAS 3.0 schema -> JSON Schema: inline $refs, turn `nullable` into null alternatives."""
    if depth > 40:
        raise RecursionError("schema nesting too deep (cyclic $ref?)")
    if isinstance(node, list):
        return [_convert(x, components, strict, depth + 1) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _convert(components[name], components, strict, depth + 1)
    out = {}
    for k, v in node.items():
        if k in ("description", "example", "nullable", "format", "default"):
            continue
        if k == "properties":
            out[k] = {p: _convert(s, components, strict, depth + 1) for p, s in v.items()}
        elif k in ("items", "allOf", "anyOf", "oneOf", "not", "additionalProperties"):
            out[k] = _convert(v, components, strict, depth + 1)
        else:
            out[k] = copy.deepcopy(v)
    if strict and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def schema_for(name: str, strict: bool = True, relax: tuple[str, ...] = ()) -> dict:
    """A JSON Schema for component `name`; `relax` drops the enum of the named properties."""
    comps = copy.deepcopy(spec()["components"]["schemas"])
    for comp in comps.values():
        for prop in relax:
            if prop in comp.get("properties", {}):
                comp["properties"][prop].pop("enum", None)
    return _convert(comps[name], comps, strict)


def response_component(path_template: str, status: str = "200", method: str = "get") -> str:
    """The component schema name the OAS declares for an operation's response."""
    resp = spec()["paths"][API_PREFIX + path_template][method]["responses"][status]
    return resp["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]


def validate(body, component: str, strict: bool = True, relax: tuple[str, ...] = ()) -> None:
    """Raise jsonschema.ValidationError when `body` does not match the component schema."""
    jsonschema.Draft7Validator(schema_for(component, strict, relax)).validate(body)
