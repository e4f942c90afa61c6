"""Strict JSON `param_str` handling for d2c's Caffe Python layers.

Why: a prototxt is user-editable text. Its `param_str` is parsed with `json` only (never
eval), checked against a fixed schema, and any unknown key, wrong type or bad value raises a
ParamError that names the Caffe layer and the key, instead of failing later with a traceback
deep inside numpy.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from d2c.errors import ParamError


@dataclass(frozen=True)
class Key:
    """One allowed key: its kind and, when optional, the default used when it is absent.

    kinds: "int", "float", "bool", "str", "object", "choice" (with `choices`).
    """

    kind: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None


def _type_name(value: Any) -> str:
    return type(value).__name__


def parse_param_str(text: Any, owner: str) -> Any:
    """Decode a param_str as JSON; an empty string means `{}`."""
    if text is None:
        return {}
    if not isinstance(text, str):
        raise ParamError(f"{owner}: param_str must be a string, got {_type_name(text)}")
    if not text.strip():
        return {}
    try:
        # parse_constant rejects NaN/Infinity, which json accepts by default but are not JSON.
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ParamError(f"{owner}: param_str is not valid JSON ({exc}); got {text[:200]!r}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN/Infinity)")


def check_value(owner: str, key: str, spec: Key, value: Any) -> Any:
    """Validate one value against its Key; returns the normalised value."""
    kind = spec.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{owner}: key '{key}' expects an integer, got {value!r} ({_type_name(value)})")
        out: Any = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{owner}: key '{key}' expects a number, got {value!r} ({_type_name(value)})")
        if not math.isfinite(value):
            raise ParamError(f"{owner}: key '{key}' expects a finite number, got {value!r}")
        out = float(value)
    elif kind == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, int) and value in (0, 1):  # cfg flags are 0/1
            out = bool(value)
        else:
            raise ParamError(f"{owner}: key '{key}' expects true/false (or 0/1), got {value!r} ({_type_name(value)})")
    elif kind == "str":
        if not isinstance(value, str):
            raise ParamError(f"{owner}: key '{key}' expects a string, got {value!r} ({_type_name(value)})")
        out = value
    elif kind == "choice":
        if value not in spec.choices:
            raise ParamError(f"{owner}: key '{key}' must be one of {', '.join(map(repr, spec.choices))}, "
                             f"got {value!r}")
        out = value
    elif kind == "object":
        if not isinstance(value, dict):
            raise ParamError(f"{owner}: key '{key}' expects a JSON object, got {_type_name(value)}")
        out = value
    else:  # pragma: no cover - schema typo
        raise AssertionError(kind)
    if spec.minimum is not None and kind in ("int", "float") and out < spec.minimum:
        raise ParamError(f"{owner}: key '{key}' must be >= {spec.minimum}, got {out!r}")
    return out


def check_keys(obj: Any, known: Iterable[str], required: Iterable[str], owner: str) -> dict[str, Any]:
    """A decoded JSON object with no unknown and no missing keys (ParamError naming them)."""
    if not isinstance(obj, dict):
        raise ParamError(f"{owner}: parameters must be a JSON object, got {_type_name(obj)}")
    known = set(known)
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        raise ParamError(f"{owner}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                         f"known keys: {', '.join(sorted(known))}")
    missing = sorted(k for k in required if k not in obj)
    if missing:
        raise ParamError(f"{owner}: missing required key(s) {', '.join(repr(k) for k in missing)}")
    return obj


def check_object(obj: Any, schema: dict[str, Key], owner: str) -> dict[str, Any]:
    """Validate a decoded JSON object against `schema`; fill defaults; unknown keys are errors."""
    check_keys(obj, schema, [k for k, spec in schema.items() if spec.required], owner)
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if key in obj:
            out[key] = check_value(owner, key, spec, obj[key])
        else:
            out[key] = spec.default
    return out


def load_params(text: Any, schema: dict[str, Key], owner: str) -> dict[str, Any]:
    """parse_param_str + check_object in one call (what a layer's setup does).

    pycaffe does not tell a Python layer its name, so d2c puts it in the param_str; when it is
    there, error messages name the Caffe layer even if another key is wrong.
    """
    obj = parse_param_str(text, owner)
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        owner = f"Caffe layer '{obj['name']}' ({owner})"
    return check_object(obj, schema, owner)


def dump_params(obj: dict[str, Any]) -> str:
    """Deterministic compact JSON for a prototxt (sorted keys, no NaN/inf)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# Schemas of the layers d2c emits. Kept here so emitters and layers agree on one definition.

LOSS_SCHEMA: dict[str, Key] = {
    "name": Key("str", required=True),             # the Caffe layer name (pycaffe does not give it)
    "kind": Key("choice", required=True, choices=("yolo", "region")),
    "heads": Key("int", required=True, minimum=1),  # L: Darknet's cost is the mean over heads
    "params": Key("object", required=True),       # YoloParams / RegionParams JSON (checked there)
    "darknet_compat": Key("bool", default=False),  # region: Debian CPU backward (zeros)
    "seen": Key("int", default=0, minimum=0),      # region warm-up until set_seen() is called
    "check_finite": Key("bool", default=True),     # NaN/inf in the input -> NumericError
}

BN_SCHEMA: dict[str, Key] = {
    "name": Key("str", required=True),
    "flavor": Key("choice", default="pjreddie", choices=("pjreddie", "alexeyab")),
    "momentum": Key("float", default=0.99, minimum=0.0),   # r <- momentum*r + (1-momentum)*v
    "use_global_stats": Key("bool", default=False),          # inference formula in TRAIN phase too
    "exact_sums": Key("choice", default="auto", choices=("auto", "always", "never")),
    "check_finite": Key("bool", default=True),
}
