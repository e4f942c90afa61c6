"""Shape inference over the whole network, the way Darknet builds it.

Why one pass that collects problems: users want every unsupported section and every bad index
reported at once, with line numbers, rather than fixing them one crash at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2c.darknet.cfg import COMMON_KEYS, Cfg, Section
from d2c.darknet.node import Node, Shape
from d2c.errors import CfgError, D2CError, NeedsAlexeyABError, UnsupportedLayerError
from d2c.layers import REGISTRY  # imports every converter module

# Refuse absurd networks before allocating anything (issue: resource limits).
MAX_BLOB_FLOATS = 1 << 31          # one activation blob per image
# All parameters together: 1 GiB of float32, 4x yolov4. `convert` without weights peaks near 30
# bytes per parameter (float64 draws, float32 copies, encoding), so the former 8 GiB limit let a
# fuzzed cfg get OOM-killed on a 24 GiB machine.
MAX_PARAM_FLOATS = 1 << 28
MAX_ACTIVATION_FLOATS = 1 << 32    # every layer's output for one image together (16 GiB of float32)

ALEXEYAB_SECTIONS = frozenset({"sam", "scale_channels", "reorg3d", "implicit_add", "implicit_mul",
                               "gaussian_yolo", "local_avgpool", "contrastive", "empty", "silence"})
ALEXEYAB_KEYS = frozenset({"scale_x_y", "new_coords", "iou_loss", "iou_normalizer", "cls_normalizer",
                           "obj_normalizer", "iou_thresh", "max_delta", "beta_nms", "nms_kind",
                           "group_id", "stride_x", "stride_y", "weights_type", "weights_normalization",
                           "max_delta", "label_smooth_eps", "resize", "objectness_smooth"})
ALEXEYAB_ACTIVATIONS = frozenset({"mish", "swish", "silu", "hard_mish", "relu6", "gelu",
                                  "normalize_channels", "normalize_channels_softmax",
                                  "normalize_channels_softmax_maxval"})


HEAD_KINDS = ("yolo", "region", "detection")
RECURRENT_SECTIONS = frozenset({"rnn", "gru", "lstm", "crnn", "conv_lstm", "history"})
# Sections whose output has their input's shape in Darknet: when one cannot be converted, the
# layers after it can still be shaped, so one pass reports their problems too.
SHAPE_PRESERVING = frozenset({"shortcut", "cost", "dropout", "activation", "logistic", "l2norm",
                              "normalization", "batchnorm", "softmax", "sam", "scale_channels"})


@dataclass
class NetInfo:
    """The [net] keys conversion and training need."""

    width: int
    height: int
    channels: int
    batch: int
    subdivisions: int
    section: Section


@dataclass
class Graph:
    cfg: Cfg
    net: NetInfo
    nodes: list[Node]
    flavor: str                      # "pjreddie" or "alexeyab"
    flavor_reason: str
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)   # also in warnings; a typo changes the weights' size

    def param_count(self) -> int:
        return sum(n.param_count() for n in self.nodes)

    def heads(self) -> list[Node]:
        return [n for n in self.nodes if n.kind in HEAD_KINDS]


class GraphBuilder:
    """State shared with the converters while nodes are built in cfg order."""

    def __init__(self, cfg: Cfg, flavor: str) -> None:
        self.cfg = cfg
        self.flavor = flavor
        self.nodes: list[Node] = []
        self.net = _parse_net(cfg.net)

    @property
    def input_shape(self) -> Shape:
        return (self.net.channels, self.net.height, self.net.width)

    def shape_of(self, index: int) -> Shape:
        """Output shape of an earlier layer (-1 = the network input)."""
        if index == -1:
            return self.input_shape
        return self.nodes[index].out_shape

    def previous(self, sec: Section) -> tuple[int, Shape]:
        """The layer a plain section reads: the one before it (or the input for layer 0)."""
        prev = sec.index - 1
        return prev, self.shape_of(prev)

    def resolve(self, sec: Section, key: str, value: int) -> int:
        """Turn a relative (negative) or absolute layer reference into an index, checking range."""
        index = sec.index + value if value < 0 else value
        if not 0 <= index < sec.index:
            raise CfgError(f"{sec.where_key(key)}: layer reference {value} resolves to {index}, "
                           f"outside 0..{sec.index - 1}")
        return index


def _parse_net(sec: Section) -> NetInfo:
    width = sec.get_int("width", 0)
    height = sec.get_int("height", 0)
    channels = sec.get_int("channels", 0)
    if width <= 0 or height <= 0 or channels <= 0:
        raise CfgError(f"{sec.where}: width, height and channels must all be > 0 "
                       f"(got {width}x{height}x{channels})")
    batch = sec.get_int("batch", 1)
    subdivisions = sec.get_int("subdivisions", 1)
    if batch <= 0 or subdivisions <= 0:
        raise CfgError(f"{sec.where}: batch and subdivisions must be > 0 (got {batch}, {subdivisions})")
    if width * height * channels > MAX_BLOB_FLOATS:
        raise CfgError(f"{sec.where}: input {width}x{height}x{channels} is "
                       f"{width * height * channels * 4 / 2**30:.1f} GiB per image; refusing")
    return NetInfo(width=width, height=height, channels=channels, batch=batch,
                   subdivisions=subdivisions, section=sec)


def infer_flavor(cfg: Cfg) -> tuple[str, str]:
    """Which Darknet the cfg was written for, and why (printed to the user)."""
    for sec in cfg.layers:
        if sec.type in ALEXEYAB_SECTIONS:
            return "alexeyab", f"section [{sec.raw_type}] at line {sec.line}"
        for key, opt in sec.options.items():
            if key in ALEXEYAB_KEYS:
                return "alexeyab", f"key '{key}' at line {opt.line}"
            if key == "activation" and opt.value in ALEXEYAB_ACTIVATIONS:
                return "alexeyab", f"activation={opt.value} at line {opt.line}"
            if key == "groups" and sec.type == "route":
                return "alexeyab", f"route groups at line {opt.line}"
    return "pjreddie", "no AlexeyAB-only section, key or activation"


def build_graph(cfg: Cfg, flavor: str | None = None, *, continue_on_error: bool = False) -> Graph:
    """Build every node, collecting unsupported sections and bad keys into one error.

    With the flavor inferred as pjreddie, a construct only AlexeyAB defines (unequal-channel
    shortcut, several `from`s) switches to AlexeyAB semantics, and the reason says where.
    """
    if flavor is None:
        guess, reason = infer_flavor(cfg)
        if guess == "pjreddie":
            try:
                return _build_graph(cfg, guess, reason, continue_on_error)
            except NeedsAlexeyABError as exc:
                return _build_graph(cfg, "alexeyab", str(exc), continue_on_error)
        return _build_graph(cfg, guess, reason, continue_on_error)
    return _build_graph(cfg, flavor, "given", continue_on_error)


def _build_graph(cfg: Cfg, flavor: str, reason: str, continue_on_error: bool) -> Graph:
    if flavor not in ("pjreddie", "alexeyab"):
        raise D2CError(f"unknown Darknet flavor {flavor!r}; use pjreddie or alexeyab")
    unsupported = [f"{cfg.path}:{s.line}: [{s.raw_type}] (layer {s.index})"
                   + (": recurrent layers are not supported" if s.type in RECURRENT_SECTIONS else "")
                   for s in cfg.layers if s.type not in REGISTRY]
    recurrent = any(s.type in RECURRENT_SECTIONS for s in cfg.layers)
    if unsupported and (not _has_image_input(cfg) or (recurrent and not continue_on_error)):
        # Recurrent cfgs have no image input ([net] inputs=...): say what is unsupported, not that.
        raise UnsupportedLayerError(f"{cfg.path}: {len(unsupported)} unsupported section(s)"
                                    + ("; recurrent layers ([rnn], [gru], [lstm], [crnn]) have no stock-Caffe "
                                       "form matching Darknet's" if recurrent else ""), unsupported)
    builder = GraphBuilder(cfg, flavor)
    problems: list[str] = []
    warnings = list(cfg.warnings)
    skipped: list[str] = []
    unknown_keys: list[str] = []
    total_params = 0
    total_activations = 0
    for sec in cfg.layers:
        converter = REGISTRY.get(sec.type)
        if converter is None:
            if continue_on_error:
                # Later layers cannot be shaped without this one; stop here, loudly.
                skipped.append(f"{cfg.path}:{sec.line}: [{sec.raw_type}] unsupported; conversion stops "
                               f"before layer {sec.index}")
                break
            if sec.type in SHAPE_PRESERVING:   # already listed as unsupported; shape on past it
                builder.nodes.append(_pass_through(sec, builder))
                continue
            break
        try:
            node = converter.build(sec, builder)
        except NeedsAlexeyABError as exc:
            if reason != "given":
                raise  # inferred pjreddie: build_graph retries with AlexeyAB semantics
            problems.append(exc.render())
            break
        except D2CError as exc:
            problems.append(exc.render())
            if continue_on_error:
                skipped.append(f"{sec.where}: skipped: {exc}")
                break
            if sec.type in SHAPE_PRESERVING:   # report the problems after it in the same pass
                builder.nodes.append(_pass_through(sec, builder))
                continue
            break
        c, h, w = node.out_shape
        if min(node.out_shape) <= 0:
            problems.append(f"{sec.where}: output shape {c}x{h}x{w} is empty "
                            f"(input {node.in_shape}); check size/stride/padding")
            break
        if c * h * w > MAX_BLOB_FLOATS:
            problems.append(f"{sec.where}: output {c}x{h}x{w} needs {c * h * w * 4 / 2**30:.1f} GiB "
                            f"per image; refusing")
            break
        # Python ints: a fuzzed size can overflow numpy's int64 product and wrap past the limit.
        total_params += sum(math.prod(p.shape) for p in node.params)
        total_activations += c * h * w
        if total_activations > MAX_ACTIVATION_FLOATS:
            problems.append(f"{sec.where}: the outputs of layers 0..{sec.index} need an estimated "
                            f"{total_activations * 4 / 2**30:.1f} GiB per image (limit "
                            f"{MAX_ACTIVATION_FLOATS * 4 / 2**30:.0f} GiB); refusing")
            break
        if total_params > MAX_PARAM_FLOATS:
            problems.append(f"{sec.where}: network needs over {total_params * 4 / 2**30:.1f} GiB of parameters "
                            f"({total_params:,} floats; limit {MAX_PARAM_FLOATS * 4 / 2**30:.0f} GiB); refusing")
            break
        builder.nodes.append(node)
        unknown_keys.extend(f"{cfg.path}:{opt.line}: [{sec.raw_type}] unknown key '{key}' (ignored)"
                            for key, opt in sec.options.items()
                            if key not in converter.keys and key not in COMMON_KEYS)
    if unsupported and not continue_on_error:
        raise UnsupportedLayerError(f"{cfg.path}: {len(unsupported)} unsupported section(s)"
                                    + (f" and {len(problems)} other problem(s)" if problems else ""),
                                    unsupported + problems)
    if problems:
        raise CfgError(f"{cfg.path}: cannot build the network", problems)
    if not builder.nodes:
        raise CfgError(f"{cfg.path}: no layer could be converted", skipped)
    return Graph(cfg=cfg, net=builder.net, nodes=builder.nodes, flavor=flavor,
                 flavor_reason=reason, warnings=warnings + unknown_keys, skipped=skipped,
                 unknown_keys=unknown_keys)


def _has_image_input(cfg: Cfg) -> bool:
    """[net] declares width, height and channels (recurrent cfgs declare `inputs` instead)."""
    return all(cfg.net.has(k) for k in ("width", "height", "channels"))


def _pass_through(sec: Section, builder: GraphBuilder) -> Node:
    """A stand-in for a section that failed but keeps its input's shape, so later layers can be
    checked in the same pass. Never converted: the build ends in an error."""
    prev, shape = builder.previous(sec)
    return Node(index=sec.index, kind=sec.type, section=sec, inputs=[prev], in_shapes=[shape], out_shape=shape)
