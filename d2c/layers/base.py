"""The converter contract: one module per Darknet section type, registered by name.

Why a registry: adding a layer type means writing one module that says how Darknet reads the
section (keys, defaults, output shape, which arrays it has in the .weights file), how it maps
onto stock Caffe layers, and, for a section with parameters, the way back (Caffe blobs ->
Darknet arrays for `d2c export`), Darknet's random init (training from scratch) and any
non-default .weights layout. Nothing else in d2c switches on section types: export, training
init and the .weights reader dispatch through REGISTRY, and a section with parameters whose
converter lacks one of those methods is an error, never a silent guess.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from d2c.darknet.cfg import Section
from d2c.darknet.node import Node, ParamArray
from d2c.errors import CfgError, UnsupportedLayerError, WeightsError

if TYPE_CHECKING:  # pragma: no cover
    from d2c.caffe.emitter import Emitter
    from d2c.darknet.graph import GraphBuilder
    from d2c.darknet.weights import WeightsHeader
    from d2c.export import ModelReader


class LayerConverter:
    """Base class. Subclasses set `section` and implement `build` and `emit`; a section with
    parameters also implements `export`, `darknet_init` and `engine_arrays` (and read_array/write_array
    when the .weights file stores an array in another layout)."""

    section: ClassVar[str] = ""
    #: keys the section understands beyond COMMON_KEYS; anything else is reported as unknown
    keys: ClassVar[frozenset[str]] = frozenset()
    #: one line for the generated support table
    summary: ClassVar[str] = ""
    #: the stock Caffe layers it emits, for the support table
    caffe_layers: ClassVar[str] = ""
    #: True when only AlexeyAB's Darknet knows the section
    alexeyab_only: ClassVar[bool] = False
    #: True when AlexeyAB's CPU build clears this layer's delta before each training pass: its
    #: forward_network zeroes l.delta only where the layer's constructor set l.train (conv, batchnorm,
    #: maxpool, shortcut), and the heads clear their own
    alexeyab_clears_delta: ClassVar[bool] = False

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        """Read the section's keys, resolve inputs, infer the output shape, list the arrays."""
        raise NotImplementedError

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        """Add Caffe layers for `node`; set `em.blob_of[node.index]` to the blob holding its output."""
        raise NotImplementedError

    # -- the way back and the other lives of a section with parameters ---------------------------
    def export(self, node: Node, model: ModelReader) -> dict[str, np.ndarray]:
        """Caffe blobs -> this node's Darknet arrays (`d2c export`), keyed like node.params."""
        if node.params:
            raise WeightsError(f"{node.where}: [{self.section}] has parameters but its converter defines no "
                               f"export; d2c cannot write them back to .weights")
        return {}

    def darknet_init(self, node: Node, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Darknet's random initial arrays (make_*_layer), drawn from `rng` in .weights order."""
        if node.params:
            raise UnsupportedLayerError(f"{node.where}: [{self.section}] has parameters but its converter "
                                        f"defines no Darknet random init; load them from a .weights file")
        return {}

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """What a real Darknet's layer struct `l` holds for this section, as (array name, struct field,
        shape) in .weights order: the parameters, or with `updates` their accumulators. Read by the
        engine wrappers (d2c.darknet.runtime) for parity; a null or empty field is skipped there."""
        return []

    def overwrites_input_delta(self, node: Node, engine: str) -> bool:
        """True when this node's CPU backward in `engine` (pjreddie or alexeyab) assigns its input's
        delta instead of adding to it, dropping what later consumers added (emulated in parity)."""
        return False

    def keeps_delta(self, node: Node, engine: str) -> bool:
        """True when `engine`'s CPU training never clears this node's delta, so what its consumers
        add there accumulates over every mini-batch of the run and its backward passes the running
        sum on (AlexeyAB: route, upsample and the other sections without l.train; pjreddie clears
        every delta in forward_network, as AlexeyAB's GPU build does)."""
        return engine == "alexeyab" and not self.alexeyab_clears_delta

    def backward_note(self, node: Node, engine: str) -> str:
        """What this node's CPU backward in `engine` (pjreddie or alexeyab) does that Caffe's would
        not and that d2c's train net already follows (reported by parity); '' when nothing."""
        return ""

    def routing_flips(self, node: Node, theirs: np.ndarray, ours: np.ndarray) -> int | None:
        """For a node whose backward routes the gradient by a discrete choice made in the forward
        (max pooling's argmax): how many choices differ between two engines' inputs `theirs` and
        `ours` (b, c, h, w). A near tie flipped by a float-order difference sends a gradient to
        another input: amplification, not a formula error. None: the node makes no such choice."""
        return None

    def activation_flips(self, node: Node, theirs: np.ndarray, ours: np.ndarray) -> tuple[str, np.ndarray] | None:
        """For a node whose own activation picks its gradient by the output's sign (leaky, relu): the
        Caffe layer applying it and, per element of the two engines' outputs `theirs` and `ours`, the
        gradient factor the engine took minus Caffe's (0 where they agree). A pre-activation within
        float order of zero that takes the other sign scales its gradient by 0.1 instead of 1 on
        one side: amplification, not a formula error. None: no such activation."""
        from d2c.layers.activation import branch_layer, gradient_branches

        layer, act = branch_layer(node), node.attrs.get("activation")
        if layer is None:
            return None
        return layer, gradient_branches(act, theirs) - gradient_branches(act, ours)

    def read_array(self, node: Node, spec: ParamArray, stored: np.ndarray, header: WeightsHeader) -> np.ndarray:
        """One array as the .weights file stores it (flat float32) -> its Darknet shape."""
        return stored.reshape(spec.shape)

    def write_array(self, node: Node, spec: ParamArray, arr: np.ndarray, header: WeightsHeader) -> np.ndarray:
        """The inverse of read_array: a Darknet-shaped array in the file's layout."""
        return arr.reshape(spec.shape)


REGISTRY: dict[str, LayerConverter] = {}


def register(cls: type[LayerConverter]) -> type[LayerConverter]:
    """Class decorator: make a converter available under its section name."""
    if not cls.section:
        raise TypeError(f"{cls.__name__} has no section name")
    if cls.section in REGISTRY:
        raise TypeError(f"section [{cls.section}] registered twice")
    REGISTRY[cls.section] = cls()
    return cls


# Converters emit fixed helper weights (reorg one-hot kernels, upsample) and, for [local], layers
# per output cell; bound both so an absurd cfg is refused before anything is allocated.
MAX_FIXED_FLOATS = 1 << 28      # 1 GiB of fixed float32 helper weights in one layer
MAX_CAFFE_LAYERS_PER_NODE = 20000


def check_emitted_size(sec: Section, key: str, floats: int = 0, layers: int = 0) -> None:
    """Refuse a section whose stock-Caffe form would need absurd fixed weights or layer counts."""
    if floats > MAX_FIXED_FLOATS:
        raise UnsupportedLayerError(f"{sec.where_key(key)}: its stock-Caffe form needs {floats:,} fixed weights "
                                    f"({floats * 4 / 2**30:.1f} GiB); refusing (limit {MAX_FIXED_FLOATS:,})")
    if layers > MAX_CAFFE_LAYERS_PER_NODE:
        raise UnsupportedLayerError(f"{sec.where_key(key)}: its stock-Caffe form needs {layers:,} Caffe layers; "
                                    f"refusing (limit {MAX_CAFFE_LAYERS_PER_NODE:,})")


def darknet_init_arrays(node: Node, weights: Callable[[ParamArray], np.ndarray] | None) -> dict[str, np.ndarray]:
    """make_*_layer's arrays: `weights(spec)` draws the weights; biases and rolling_mean are 0,
    scales 1 and rolling_variance 1 (Darknet's 0 would divide by 1e-6 at inference, see d2c.train)."""
    arrays: dict[str, np.ndarray] = {}
    for spec in node.params:
        if spec.name == "weights" and weights is not None:
            arr = weights(spec)
        elif spec.name in ("scales", "rolling_variance"):
            arr = np.ones(spec.shape)
        elif spec.name in ("biases", "rolling_mean"):
            arr = np.zeros(spec.shape)
        else:
            raise UnsupportedLayerError(f"{node.where}: no Darknet init for array '{spec.name}'")
        arrays[spec.name] = np.asarray(arr, np.float32)
    return arrays


def positive(sec: Section, key: str, value: int) -> int:
    """Reject zero or negative sizes early, naming the key and its line."""
    if value <= 0:
        raise CfgError(f"{sec.where_key(key)}: must be > 0, got {value}")
    return value
