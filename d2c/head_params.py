"""The parameters of the detection heads, one definition for convert, detect and the loss.

Why one place: a [yolo]/[region] section's keys, their Darknet defaults (some depend on the
lineage: `max` 90 in pjreddie and 200 in AlexeyAB, `iou_normalizer` none vs 0.75) and their
checks were written in the converter, the loss and the decoder, and drifted. The converter reads
the cfg with `yolo_default`/`region_default`, records the values on the node (and in the JSON
sidecar); the loss and `d2c detect` turn those records into YoloParams/RegionParams with
`head_params`, so every consumer sees the same values and the same errors.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any

from d2c.errors import ParamError
from d2c.loss.params import Key, check_keys, check_value

FLAVORS = ("pjreddie", "alexeyab")
IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")
#: Truth records per image: pjreddie's [yolo] l.truths is hard-coded to 90 boxes whatever `max`
#: says; [region]'s loops hard-code 30.
PJREDDIE_YOLO_TRUTHS = 90
REGION_MAX_TRUTHS = 30
#: [yolo] defaults that depend on the Darknet lineage (parse_yolo of each).
_YOLO_FLAVOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "max_boxes": {"pjreddie": PJREDDIE_YOLO_TRUTHS, "alexeyab": 200},
    "iou_normalizer": {"pjreddie": 1.0, "alexeyab": 0.75},
}


# --------------------------------------------------------------------------------------------
# Strict JSON parameter handling
# --------------------------------------------------------------------------------------------

def _json_list(owner: str, key: str, value: Any, kind: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ParamError(f"{owner}: key '{key}' expects a list, got {value!r} ({type(value).__name__})")
    return tuple(check_value(owner, f"{key}[{k}]", Key(kind), v) for k, v in enumerate(value))


#: JSON kinds of the dataclass field annotations below (d2c.loss.params.Key kinds, "kind*" a
#: list of them, "kind?" also null).
_JSON_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "int | None": "int?",
               "float | None": "float?", "tuple[int, ...]": "int*", "tuple[float, ...]": "float*"}


def _from_json_fields(cls: type, owner: str, obj: Any) -> dict[str, Any]:
    """Check a decoded JSON object against the fields of `cls`: no unknown key, every field without
    a default present, each value of its field's kind. Returns the checked values."""
    spec = {f.name: _JSON_KINDS[f.type] for f in fields(cls)}
    check_keys(obj, spec, [f.name for f in fields(cls) if f.default is MISSING], owner)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        kind = spec[key]
        if kind.endswith("*"):
            out[key] = _json_list(owner, key, value, kind[:-1])
        elif kind.endswith("?") and value is None:
            out[key] = None
        else:
            out[key] = check_value(owner, key, Key(kind.rstrip("?")), value)
    return out


# --------------------------------------------------------------------------------------------
# The head parameters
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class YoloParams:
    """Everything a [yolo] section and its [net] give the loss.

    Flavour-dependent defaults are resolved in __post_init__: `max_boxes` 90 (pjreddie) or 200
    (AlexeyAB); `iou_normalizer` 1 (pjreddie has none) or 0.75 (AlexeyAB's default). AlexeyAB-only
    keys must keep their neutral values with flavor="pjreddie" (ParamError otherwise), because
    pjreddie's Darknet ignores them and a silent mismatch would be worse than an error.
    `cls_normalizer` only matters with AlexeyAB's counters_per_class, which is not supported;
    it is accepted for completeness and has no effect (as in AlexeyAB without that option).
    `max_delta=None` in JSON means no clipping (FLT_MAX in AlexeyAB).
    """

    classes: int
    mask: tuple[int, ...]
    anchors: tuple[float, ...]
    net_w: int
    net_h: int
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    max_boxes: int | None = None
    flavor: str = "pjreddie"
    scale_x_y: float = 1.0
    new_coords: bool = False
    iou_loss: str = "mse"
    iou_normalizer: float | None = None
    obj_normalizer: float = 1.0
    cls_normalizer: float = 1.0
    iou_thresh: float = 1.0
    iou_thresh_kind: str = "iou"
    max_delta: float | None = math.inf     # None (JSON null): no clipping
    label_smooth_eps: float = 0.0
    objectness_smooth: bool = False

    def __post_init__(self) -> None:
        owner = "[yolo] params"
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("mask", tuple(int(m) for m in self.mask))
        set_("anchors", tuple(float(a) for a in self.anchors))
        if self.flavor not in FLAVORS:
            raise ParamError(f"{owner}: key 'flavor' must be one of {FLAVORS}, got {self.flavor!r}")
        for key, by_flavor in _YOLO_FLAVOR_DEFAULTS.items():
            if getattr(self, key) is None:
                set_(key, by_flavor[self.flavor])
        if self.max_delta is None:
            set_("max_delta", math.inf)
        if self.classes < 1:
            raise ParamError(f"{owner}: key 'classes' must be >= 1, got {self.classes}")
        if len(self.anchors) < 2 or len(self.anchors) % 2:
            raise ParamError(f"{owner}: key 'anchors' needs (w, h) pairs, got {len(self.anchors)} values")
        if any(not math.isfinite(a) or a <= 0 for a in self.anchors):
            raise ParamError(f"{owner}: key 'anchors' must be positive finite sizes, got {self.anchors}")
        if not self.mask:
            raise ParamError(f"{owner}: key 'mask' must list at least one anchor")
        bad = [m for m in self.mask if not 0 <= m < self.total]
        if bad:
            raise ParamError(f"{owner}: key 'mask' has anchor indices {bad} outside 0..{self.total - 1}")
        if self.net_w < 1 or self.net_h < 1:
            raise ParamError(f"{owner}: keys 'net_w'/'net_h' must be >= 1, got {self.net_w}x{self.net_h}")
        if self.max_boxes < 0:
            raise ParamError(f"{owner}: key 'max_boxes' must be >= 0, got {self.max_boxes}")
        if self.iou_loss not in IOU_LOSSES:
            raise ParamError(f"{owner}: key 'iou_loss' must be one of {IOU_LOSSES}, got {self.iou_loss!r}")
        if self.iou_thresh_kind not in ("iou", "giou", "diou", "ciou"):
            raise ParamError(f"{owner}: key 'iou_thresh_kind' must be iou, giou, diou or ciou, "
                             f"got {self.iou_thresh_kind!r}")
        if not (self.max_delta > 0):
            raise ParamError(f"{owner}: key 'max_delta' must be > 0, got {self.max_delta}")
        if self.flavor == "pjreddie":
            neutral = {"scale_x_y": 1.0, "new_coords": False, "iou_loss": "mse", "iou_normalizer": 1.0,
                       "obj_normalizer": 1.0, "cls_normalizer": 1.0, "iou_thresh": 1.0,
                       "iou_thresh_kind": "iou", "max_delta": math.inf, "label_smooth_eps": 0.0,
                       "objectness_smooth": False}
            for key, value in neutral.items():
                if getattr(self, key) != value:
                    raise ParamError(f"{owner}: key '{key}' = {getattr(self, key)!r} is AlexeyAB-only; "
                                     f"pjreddie's [yolo] has no such option (use flavor='alexeyab')")

    @property
    def total(self) -> int:
        """Number of anchors in the cfg (Darknet's l.total)."""
        return len(self.anchors) // 2

    @property
    def n(self) -> int:
        """Anchor slots of this layer (Darknet's l.n = len(mask))."""
        return len(self.mask)

    @classmethod
    def from_json(cls, obj: dict) -> "YoloParams":
        """Build from a decoded JSON object (e.g. a Caffe param_str); strict about keys and types."""
        kw = _from_json_fields(cls, "[yolo] params", obj)
        if kw.get("max_delta", 0) is None:
            kw["max_delta"] = math.inf
        return cls(**kw)

    def to_json(self) -> dict:
        """All fields, defaults resolved; max_delta=inf is written as None (JSON has no inf)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mask"] = list(self.mask)
        out["anchors"] = list(self.anchors)
        out["max_delta"] = None if math.isinf(self.max_delta) else self.max_delta
        return out


@dataclass(frozen=True)
class RegionParams:
    """What a [region] section gives the loss (anchors in grid-cell units).

    `log`, `sqrt` and `max_boxes` are parsed by Darknet but unused by its forward pass; they are
    accepted and kept for round-tripping only. Only coords = 4 is supported (no mask coords).
    """

    classes: int
    num: int
    anchors: tuple[float, ...]
    coords: int = 4
    softmax: bool = False
    rescore: bool = False
    bias_match: bool = False
    background: bool = False
    thresh: float = 0.5
    coord_scale: float = 1.0
    object_scale: float = 1.0
    noobject_scale: float = 1.0
    class_scale: float = 1.0
    log: bool = False
    sqrt: bool = False
    max_boxes: int = REGION_MAX_TRUTHS

    def __post_init__(self) -> None:
        owner = "[region] params"
        object.__setattr__(self, "anchors", tuple(float(a) for a in self.anchors))
        if self.classes < 1:
            raise ParamError(f"{owner}: key 'classes' must be >= 1, got {self.classes}")
        if self.num < 1:
            raise ParamError(f"{owner}: key 'num' must be >= 1, got {self.num}")
        if self.coords != 4:
            raise ParamError(f"{owner}: key 'coords' = {self.coords} is not supported (only 4)")
        if len(self.anchors) != 2 * self.num:
            raise ParamError(f"{owner}: key 'anchors' needs num·2 = {2 * self.num} values, got {len(self.anchors)}")
        if any(not math.isfinite(a) or a <= 0 for a in self.anchors):
            raise ParamError(f"{owner}: key 'anchors' must be positive finite sizes, got {self.anchors}")

    @property
    def entries(self) -> int:
        return self.coords + 1 + self.classes

    @classmethod
    def from_json(cls, obj: dict) -> "RegionParams":
        """Build from a decoded JSON object; unknown keys and wrong types raise ParamError."""
        return cls(**_from_json_fields(cls, "[region] params", obj))

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["anchors"] = list(self.anchors)
        return out


def head_params_json(kind: str, attrs: dict[str, Any], net_w: int, net_h: int, flavor: str) -> dict[str, Any]:
    """The YoloParams/RegionParams JSON for a head, from the attributes its converter recorded."""
    cls = YoloParams if kind == "yolo" else RegionParams
    known = {f.name: f.type for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key not in known or value is None and key != "max_delta":
            continue
        if known[key] == "bool":
            value = bool(value)  # Darknet reads these flags as ints: any non-zero is on
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    if kind == "yolo":
        out.update(net_w=int(net_w), net_h=int(net_h), flavor=flavor)
        if out.get("max_delta") is None:
            out.pop("max_delta", None)
    return out


def _field_default(cls: type, key: str) -> Any:
    for f in fields(cls):
        if f.name == key:
            if f.default is MISSING:
                raise KeyError(f"{cls.__name__}.{key} has no default")
            return f.default
    raise KeyError(f"{cls.__name__} has no field {key!r}")


def yolo_default(key: str, flavor: str) -> Any:
    """Darknet's value of a YoloParams field when the [yolo] section leaves its key out."""
    if key in _YOLO_FLAVOR_DEFAULTS:
        return _YOLO_FLAVOR_DEFAULTS[key][flavor]
    return _field_default(YoloParams, key)


def region_default(key: str) -> Any:
    """Darknet's value of a RegionParams field when the [region] section leaves its key out."""
    return _field_default(RegionParams, key)


def head_params(kind: str, attrs: dict[str, Any], net_w: int, net_h: int, flavor: str) -> YoloParams | RegionParams:
    """Checked YoloParams/RegionParams from a head's recorded attributes (node attrs or sidecar)."""
    obj = head_params_json(kind, attrs, net_w, net_h, flavor)
    return YoloParams.from_json(obj) if kind == "yolo" else RegionParams.from_json(obj)


#: What decoding reads of a head (get_yolo_detections / get_region_detections); the loss keys
#: are left out so a sidecar is decoded whatever its training options say.
_DECODE_KEYS = {"yolo": ("classes", "mask", "anchors", "scale_x_y", "new_coords"),
                "region": ("classes", "coords", "num", "anchors", "softmax", "background")}
_ALEXEYAB_DECODE_KEYS = ("scale_x_y", "new_coords")


def decode_params(kind: str, attrs: dict[str, Any], net_w: int, net_h: int, flavor: str) -> YoloParams | RegionParams:
    """The params `d2c detect` decodes a head with: only the decoding keys, and for pjreddie
    without AlexeyAB's scale_x_y/new_coords (pjreddie's parse_yolo never reads them)."""
    keep = [k for k in _DECODE_KEYS[kind] if not (flavor == "pjreddie" and k in _ALEXEYAB_DECODE_KEYS)]
    return head_params(kind, {k: attrs[k] for k in keep if k in attrs}, net_w, net_h, flavor)
