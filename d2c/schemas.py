"""The JSON that d2c prints or writes, as JSON Schema (draft 2020-12 subset), in one place.

Why in code: the documentation (docs/json-schemas.md, written by tools/write_schemas.py) is
generated from these dicts, and the tests check real `d2c detect` and `d2c parity` output
against them, so the documented schema cannot drift from what the commands emit. Other
commands that write JSON add their schema to SCHEMAS.
"""
from __future__ import annotations

import json
from typing import Any

NUMBER = {"type": "number"}
INT = {"type": "integer"}
STR = {"type": "string"}
NULLABLE_INT = {"type": ["integer", "null"]}

DETECTION = {
    "type": "object",
    "description": "One (box, class) pair with score > --thresh, in Darknet's print order.",
    "required": ["class", "name", "score", "box", "box_px"],
    "additionalProperties": False,
    "properties": {
        "class": {**INT, "description": "class index"},
        "name": {**STR, "description": "class name (--names, the names given at convert, COCO/VOC, or the index)"},
        "score": {**NUMBER, "description": "objectness x class probability (Darknet's prob), in (thresh, 1]"},
        "box": {"type": "array", "items": NUMBER, "minItems": 4, "maxItems": 4,
                "description": "centre x, centre y, width, height, relative to the image (0..1), as Darknet's box"},
        "box_px": {"type": "array", "items": INT, "minItems": 4, "maxItems": 4,
                   "description": "left, top, right, bottom in pixels, clamped to the image (draw_detections)"},
    },
}

DETECT_RECORD = {
    "title": "d2c detect record",
    "description": "One per image or video frame: a line of `--jsonl`, an element of the `--json` list, "
                   "the return value of `d2c.Detector(...)(image)`. A record with `error` has no detections.",
    "type": "object",
    "required": ["image", "frame"],
    "properties": {
        "image": {"type": ["string", "null"], "description": "the input path (null for an array given to the API)"},
        "frame": {**NULLABLE_INT, "description": "video frame index, null for a still image"},
        "width": {**INT, "description": "image width in pixels"},
        "height": {**INT, "description": "image height in pixels"},
        "engine": {"enum": ["caffe", "opencv"], "description": "which engine ran the Caffe files"},
        "detections": {"type": "array", "items": DETECTION, "description": "after NMS, in Darknet's print order"},
        "error": {**STR, "description": "why this input could not be read (then no other keys)"},
    },
    "oneOf": [{"required": ["width", "height", "engine", "detections"]}, {"required": ["error"]}],
}

PARITY_REPORT = {
    "title": "d2c parity --json report",
    "description": "Real Darknet vs Caffe on the same cfg, weights, images and truth. Relative errors are "
                   "max|a-b| / max|reference|. Also `d2c.parity(...).to_json()`.",
    "type": "object",
    "required": ["ok", "cfg", "weights", "batch", "subdivisions", "bn", "darknet_compat", "checks", "forward",
                 "loss", "grad", "update", "emulated_defects", "tolerances", "seconds"],
    "properties": {
        "ok": {"type": "boolean", "description": "every check within its bound (also the exit status)"},
        "checks": {"type": "array", "description": "one row per check, as printed: the value and the bound derived "
                                                   "for this run (d2c.tolerances)",
                   "items": {"type": "object", "required": ["name", "value", "bound", "ok"],
                             "properties": {"name": STR, "value": NUMBER, "bound": NUMBER, "ok": {"type": "boolean"},
                                            "at_least": {"type": "boolean", "description": "the value must reach "
                                                         "the bound (the learned change in ulps)"},
                                            "where": {**STR, "description": "the worst element of a group"}}}},
        "net_defaults": {"type": "object", "additionalProperties": STR,
                         "description": "[net] keys parity set itself (burn_in=0 unless --set)"},
        "cfg": STR, "weights": STR, "batch": INT, "subdivisions": INT,
        "bn": {"enum": ["exact", "stock", "frozen"], "description": "Caffe-side BatchNorm mode"},
        "darknet_compat": {"type": "boolean", "description": "Debian Darknet's CPU defects emulated on the Caffe side"},
        "forward": {"type": "object", "description": "per-layer forward comparison; max_rel is the worst layer"},
        "loss": {"type": "object", "description": "loss per mini-batch (each with its bound); rel is the worst "
                                                  "relative difference, bound the bound of the worst mini-batch"},
        "grad": {"type": "object", "description": "head gradients: max_abs, max_rel, and per check its value and bound"},
        "update": {"type": "object",
                   "description": "every learned array, accumulator and BN statistic after each step (each row with "
                                  "its bound); largest_change is the largest learned step (absent with --steps 0)"},
        "emulated_defects": {"type": "array", "items": STR},
        "sign_ties": {"type": "object", "additionalProperties": {"type": "integer"},
                      "description": "per layer, leaky/ReLU pre-activations of the other sign within the forward "
                                     "ceiling of zero, over the mini-batches: Caffe's backward took Darknet's slope "
                                     "there (Debian's engine)"},
        "tolerances": {"type": "object", "additionalProperties": NUMBER,
                       "description": "the fixed ceilings every derived bound is capped by"},
        "seconds": NUMBER,
    },
}

BENCH_REPORT = {
    "title": "d2c bench --json report",
    "description": "Conversion, forward and training speed; the top-level keys are what other tools read, "
                   "`models` has every measurement per model.",
    "type": "object",
    "required": ["convert_ratio", "peak_rss_ratio", "forward_ms", "machine", "options", "models", "targets"],
    "properties": {
        "convert_ratio": {**NUMBER, "description": "convert time / numpy read+write of the same bytes (largest model)"},
        "peak_rss_ratio": {**NUMBER, "description": "(peak RSS - interpreter) / weights size (largest model)"},
        "peak_rss_mb": NUMBER,
        "forward_ms": {"type": "object", "description": "median forward ms per engine (first model)"},
        "loss_layer_share": {"type": ["number", "null"]},
        "train_iter_ratio": {"type": ["number", "null"], "description": "Caffe / Darknet training iteration time"},
        "parity_s": {"type": ["number", "null"]},
        "machine": {"type": "object", "description": "CPU, cores, memory, load, engine versions"},
        "summary_models": {"type": "object", "description": "which model each top-level figure is about"},
        "parity": {"type": "object"},
        "options": {"type": "object"},
        "models": {"type": "object", "description": "model name -> all its measurements"},
        "targets": {"type": "array", "items": {
            "type": "object", "required": ["target", "model", "value", "limit", "ok"],
            "properties": {"target": STR, "model": STR, "value": {"type": ["number", "null"]}, "limit": NUMBER,
                           "ok": {"type": ["boolean", "null"]}}}},
        "bench_seconds": NUMBER,
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {"detect": DETECT_RECORD, "parity": PARITY_REPORT, "bench": BENCH_REPORT}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The problems of `value` against the subset of JSON Schema used above (empty when valid)."""
    problems: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, dict):
        problems += [f"{where}: missing '{k}'" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                problems += validate(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}: unexpected key '{key}'")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += validate(item, schema["additionalProperties"], f"{where}.{key}")
        if "oneOf" in schema:
            matches = sum(not validate(value, {k: v for k, v in option.items()}, where) for option in schema["oneOf"])
            if matches != 1:
                problems.append(f"{where}: matches {matches} of the oneOf alternatives, expected exactly 1")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{where}: {len(value)} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems


def _rows(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Table rows for an object's properties, descending into arrays of objects (`key[].sub`)."""
    rows = []
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        kind = prop.get("type", "enum: " + ", ".join(map(str, prop.get("enum", []))))
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        rows.append(f"| `{prefix}{key}` | {kind} | {'yes' if key in required else ''} | {prop.get('description', '')} |")
        items = prop.get("items", {})
        if isinstance(items, dict) and "properties" in items:
            rows += _rows(items, f"{prefix}{key}[].")
    return rows


def render_markdown() -> str:
    """docs/json-schemas.md: a table per schema, then the schema itself."""
    lines = ["# JSON written by d2c", "",
             "Generated from `d2c/schemas.py` by `tools/write_schemas.py`; the tests check real output against "
             "these schemas.", ""]
    for name, schema in SCHEMAS.items():
        lines += [f"## {schema['title']}", "", schema["description"], "",
                  "| key | type | required | meaning |", "|---|---|---|---|"]
        lines += _rows(schema)
        lines += ["", "<details><summary>JSON Schema</summary>", "", "```json",
                  json.dumps(schema, indent=1), "```", "", "</details>", ""]
    return "\n".join(lines)
