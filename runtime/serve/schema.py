"""The OpenAPI request schemas of the generation routes, read off the parameter dataclasses.

The routes take the payload as a plain mapping (``GenerationParams.from_webui`` validates it, each
error a 422 naming the field), so FastAPI alone would publish ``{"type": "object"}``. These schemas
list every field the route accepts with its JSON type, so ``/docs`` shows the webui's field names
and schema-driven clients and fuzzers (schemathesis, in tests/test_serve_schema.py) generate real
payloads. They are built from the dataclasses, so a field added there is published here.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from sdrt.runtime.pipeline.params import _ALIASES, _NEUTRAL, _SETTINGS, GenerationParams

_JSON = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object",
         tuple: "array"}


def _json_type(hint) -> dict:
    """A JSON schema for a field's annotation; {} (anything) where it has no JSON counterpart."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_json_type(a) for a in typing.get_args(hint) if a is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        if len(options) == 1 and "type" in options[0]:
            return {"type": [options[0]["type"], "null"] if nullable else options[0]["type"]}
        return {}
    kind = _JSON.get(origin or hint)
    if kind == "number":
        return {"type": "number"}  # an integer is a number too (JSON Schema: 1 is valid for number)
    return {"type": kind} if kind else {}


def request_schema(kind: type[GenerationParams] = GenerationParams, extra: dict | None = None) -> dict:
    """The JSON schema of a ``kind`` payload: its fields, their aliases, the webui's neutral fields
    and ``override_settings``; no other field (the route answers 422 naming it)."""
    hints = typing.get_type_hints(kind)
    properties: dict[str, dict] = {}
    for f in dataclasses.fields(kind):
        schema = _json_type(hints[f.name])
        if f.default is not dataclasses.MISSING and isinstance(f.default, (int, float, str, bool)):
            schema = {**schema, "default": f.default}
        properties[f.name] = schema
    for alias, name in _ALIASES.items():
        if name in properties:
            properties.setdefault(alias, {k: v for k, v in properties[name].items() if k != "default"})
    for name in (*_NEUTRAL, *kind._neutral_extra):
        properties.setdefault(name, {})  # accepted at its neutral value only
    properties["override_settings"] = {"type": ["object", "null"],
                                       "properties": {k: {} for k in (*_SETTINGS, "sd_model_checkpoint", "sd_vae")},
                                       "additionalProperties": False}
    properties.update(extra or {})
    return {"type": "object", "properties": properties, "additionalProperties": False}


def openapi_body(schema: dict) -> dict:
    """``openapi_extra`` for a route whose body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
