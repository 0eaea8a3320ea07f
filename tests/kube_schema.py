"""KubeRay's CRD schemas, read the way the Kubernetes API server reads them.

The ``openAPIV3Schema`` of the RayCluster, RayJob and RayService CRDs is
vendored under ``tests/data/kuberay/`` (see its README for the version and
source). :func:`kube_errors` lists every way a manifest breaks it: the
structural schema is turned into JSON Schema (:func:`to_jsonschema`) and a null
in a non-nullable field is dropped first (:func:`prune_nulls`), as the API
server does; ``jsonschema`` does the rest.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY_VERSION = "v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters", "RayJob": "ray.io_rayjobs",
             "RayService": "ray.io_rayservices"}

OBJECT_META = {  # the API server checks a CR's own metadata as ObjectMeta
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 63,  # RayCluster names become Service names
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
INT_FORMATS = {"int32": 2 ** 31, "int64": 2 ** 63}


def to_jsonschema(node: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, read as the API server does.

    - ``x-kubernetes-int-or-string``: an integer or a string (quantities: ``4`` or ``"500m"``);
    - ``nullable: true``: null is a value; without it the API server drops the
      null field before validating (:func:`prune_nulls`), so a required one is missing;
    - ``x-kubernetes-preserve-unknown-fields``: any field is kept;
    - every other object accepts only its declared properties: the API server
      prunes unknown fields and ``kubectl apply`` (strict field validation)
      rejects them, so an unknown field here is a failure;
    - ``format: int32/int64`` bound integers; list-type map/set entries are unique
      (checked by :data:`KubeValidator`). CEL rules (``x-kubernetes-validations``)
      are not evaluated.
    """
    out = {k: v for k, v in node.items() if k not in ("properties", "items",
                                                      "additionalProperties", "anyOf",
                                                      "allOf", "oneOf", "not")}
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = to_jsonschema(node["items"])
    for key in ("allOf", "oneOf"):
        if key in node:
            out[key] = [to_jsonschema(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]  # replaces the anyOf [integer, string]
    elif "anyOf" in node:
        out["anyOf"] = [to_jsonschema(s) for s in node["anyOf"]]
    if node.get("format") in INT_FORMATS and node.get("type") == "integer":
        bound = INT_FORMATS[node["format"]]
        out.setdefault("minimum", -bound)
        out.setdefault("maximum", bound - 1)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        if node.get("x-kubernetes-embedded-resource"):
            out.setdefault("properties", {}).update(
                {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                 "metadata": {"type": "object"}})
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _unique_list_entries(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(set(seen)) != len(seen):
            yield jsonschema.ValidationError(f"duplicate entries in a list-type set: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = (schema.get("items") or {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for keys {keys} = {key}")
            seen.add(key)


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-type": _unique_list_entries})


@functools.lru_cache(maxsize=None)
def crd(kind: str) -> dict:
    with gzip.open(SCHEMAS / f"{CRD_FILES[kind]}.v1.schema.json.gz", "rt") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def validator(kind: str):
    schema = to_jsonschema(crd(kind)["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata",
                                 "spec"})
    return KubeValidator(schema)


def prune_nulls(value, schema: dict | None):
    """``value`` as the API server keeps it: a null field whose schema is not
    ``nullable`` is dropped (then defaulted), not refused."""
    if schema is None:
        return value
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if v is None and sub is not None and not sub.get("nullable"):
                continue
            out[k] = prune_nulls(v, sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_nulls(v, schema["items"]) for v in value]
    return value


def kube_errors(doc: dict) -> list[str]:
    """Every way ``doc`` (a RayCluster, RayJob or RayService) breaks its CRD schema."""
    kind = doc.get("kind")
    assert kind in CRD_FILES, f"not a KubeRay kind: {kind!r}"
    doc = prune_nulls(doc, crd(kind)["openAPIV3Schema"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(kind).iter_errors(doc)]
