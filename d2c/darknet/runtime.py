"""ctypes binding of Debian's real Darknet (`libdarknet.so`, pjreddie 2018, CPU, -Ofast).

Why: every parity claim d2c makes is checked against the engine itself, not against our reading
of its source. This module drives the installed library: parse a cfg, load/save weights, run
forward/backward/train steps, read any layer's buffers, and run Darknet's own detection
pipeline (letterbox, decode, NMS).

Struct layouts are never hard-coded: `d2c.darknet.header` parses the shipped `darknet.h`.

**Side effect of loading the library in-process.** `libdarknet.so` is built with `-Ofast`, so
its ELF constructor turns on FTZ/DAZ (flush denormals to zero) in the MXCSR of the loading
thread; threads created later inherit it. After `DarknetNet(...)` every float computation in
this Python process, numpy and Caffe included, flushes denormals. Use `DarknetProcess` (same
API, runs in a child process) whenever the caller also computes references or runs Caffe.

Darknet also has no error handling worth the name: a missing file makes it call `exit()`, some
bad cfgs crash it, and `load_weights` silently accepts short files. So every path is checked
before it is handed to C, weight files are size-checked against the parsed network, and in
`DarknetProcess` a crash of the engine becomes an `EngineError` in the caller.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from d2c.child import Child
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.header import CHeader, load_header
from d2c.errors import (CfgError, D2CError, DatasetError, EngineError, ParamError,
                        UnsupportedLayerError, WeightsError)
from d2c.layers import REGISTRY

DEFAULT_LIBRARY = Path("/usr/lib/darknet/libdarknet.so")
LIBRARY_ENV = "D2C_DARKNET_LIB"      # override the library path (tests, other installs)
HEADER_ENV = "D2C_DARKNET_HEADER"    # override the header path
INSTALL_HINT = "install it with `sudo apt-get install darknet` (Debian/Ubuntu package 'darknet')"

# Section types pjreddie's parse_network_cfg knows; anything else is AlexeyAB-only and would
# make the Debian library misbehave (it prints "Type not recognized" and continues with junk).
PJREDDIE_SECTIONS = frozenset({
    "net", "convolutional", "deconvolutional", "local", "activation", "logistic", "l2norm",
    "rnn", "gru", "lstm", "crnn", "connected", "crop", "cost", "region", "yolo", "iseg",
    "detection", "softmax", "normalization", "batchnorm", "maxpool", "reorg", "avgpool",
    "dropout", "route", "upsample", "shortcut",
})


# ----------------------------------------------------------------------------------------------
# Locating the library (no dlopen here: `d2c info` must not switch on FTZ)
# ----------------------------------------------------------------------------------------------
def library_path() -> Path:
    """Path of libdarknet.so ($D2C_DARKNET_LIB or Debian's); EngineError if it is missing."""
    path = Path(os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)
    if not path.is_file():
        raise EngineError(f"Darknet library not found at {path}; {INSTALL_HINT}")
    return path


def header_path() -> Path:
    """Path of the darknet.h that matches the library ($D2C_DARKNET_HEADER or next to it)."""
    env = os.environ.get(HEADER_ENV)
    path = Path(env) if env else library_path().parent / "include" / "darknet.h"
    if not path.is_file():
        raise EngineError(f"Darknet header not found at {path}; {INSTALL_HINT}")
    return path


def version_info() -> dict[str, Any]:
    """Library/header paths and the Debian package version, for `d2c info`. Never loads the .so."""
    info: dict[str, Any] = {"engine": "darknet (pjreddie, libdarknet.so)", "available": False}
    try:
        lib = library_path()
        info.update(available=True, library=str(lib), header=str(header_path()))
    except EngineError as exc:
        info["error"] = str(exc)
        return info
    try:
        owner = subprocess.run(["dpkg-query", "-S", str(lib)], capture_output=True, text=True, timeout=20)
        package = owner.stdout.split(":", 1)[0].strip() if owner.returncode == 0 else "darknet"
        query = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                               capture_output=True, text=True, timeout=20)
        if query.returncode == 0 and query.stdout.strip():
            info.update(package=package, version=query.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ----------------------------------------------------------------------------------------------
# The loaded library (one per process)
# ----------------------------------------------------------------------------------------------
class _Library:
    """libdarknet.so with argtypes/restype set from the parsed header's struct classes."""

    def __init__(self) -> None:
        self.path = library_path()
        self.header: CHeader = load_header(header_path())
        h = self.header
        self.Layer = h.struct("layer")
        self.Network = h.struct("network")
        self.Image = h.struct("image")
        self.Detection = h.struct("detection")
        self.Matrix = h.struct("matrix")
        self.Data = h.struct("data")
        try:
            self.dll = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise EngineError(f"cannot load {self.path}: {exc}; {INSTALL_HINT}") from exc
        self.libc = _libc()
        net_p = ctypes.POINTER(self.Network)
        f_p = ctypes.POINTER(ctypes.c_float)
        det_p = ctypes.POINTER(self.Detection)
        c_int, c_float, c_char_p = ctypes.c_int, ctypes.c_float, ctypes.c_char_p
        signatures: dict[str, tuple[list, Any]] = {
            "parse_network_cfg": ([c_char_p], net_p),
            "load_weights": ([net_p, c_char_p], None),
            "save_weights": ([net_p, c_char_p], None),
            "set_batch_network": ([net_p, c_int], None),
            "forward_network": ([net_p], None),
            "backward_network": ([net_p], None),
            "update_network": ([net_p], None),
            "network_predict": ([net_p, f_p], f_p),
            "train_network": ([net_p, self.Data], c_float),
            "train_network_datum": ([net_p], c_float),
            "get_current_rate": ([net_p], c_float),
            "get_current_batch": ([net_p], ctypes.c_size_t),
            "load_image_color": ([c_char_p, c_int, c_int], self.Image),
            "letterbox_image": ([self.Image, c_int, c_int], self.Image),
            "free_image": ([self.Image], None),
            "get_network_boxes": ([net_p, c_int, c_int, c_float, c_float, ctypes.POINTER(c_int), c_int,
                                   ctypes.POINTER(c_int)], det_p),
            "do_nms_sort": ([det_p, c_int, c_int, c_float], None),
            "free_detections": ([det_p, c_int], None),
            "free_network": ([net_p], None),
        }
        for name, (argtypes, restype) in signatures.items():
            try:
                func = getattr(self.dll, name)
            except AttributeError as exc:
                raise EngineError(f"{self.path} does not export {name}(); is it pjreddie's Darknet?") from exc
            func.argtypes = argtypes
            func.restype = restype

    def layer_type(self, value: int) -> str:
        return self.header.enum_name("LAYER_TYPE", value)

    def layer_type_value(self, name: str) -> int:
        return self.header.enum("LAYER_TYPE")[name]


_LIBRARY: _Library | None = None


def _library() -> _Library:
    """Load libdarknet.so once per process (this is the moment FTZ/DAZ switches on)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _Library()
    return _LIBRARY


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library (for fflush) without loading any Darknet: each engine's prints go through it."""
    libc = ctypes.CDLL(None)
    libc.fflush.argtypes = [ctypes.c_void_p]
    return libc


def denormals_flushed() -> bool:
    """True if this process flushes float32 denormals (FTZ/DAZ), e.g. after loading Darknet."""
    tiny = np.array([1e-40], dtype=np.float32)
    return bool((tiny * np.float32(1.0))[0] == 0.0)


@contextlib.contextmanager
def _c_output_to(path: str | None) -> Iterator[None]:
    """Send C-level stdout/stderr (fd 1 and 2) to `path` (or /dev/null) for the duration.

    Why at fd level: Darknet prints with printf/fprintf, which Python's sys.stdout never sees.
    C stdio buffers are flushed before the fds are restored so nothing leaks out later.
    """
    libc = _libc()
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Input checks done before any path reaches C
# ----------------------------------------------------------------------------------------------
def _check_cfg(cfg: str | Path) -> Path:
    path = Path(cfg)
    if not path.is_file():
        raise CfgError(f"{path}: no such cfg file" if not path.exists() else f"{path}: not a regular file")
    parsed = parse_cfg(path)   # lexical problems (which make Darknet abort) become CfgError here
    for section in parsed.layers:
        if section.type not in PJREDDIE_SECTIONS:
            raise UnsupportedLayerError(f"{section.where}: section type not implemented by pjreddie's "
                                        "Darknet (libdarknet.so); it cannot run this cfg")
    return path


def _check_file(path: str | Path, kind: str, error: type[D2CError]) -> Path:
    p = Path(path)
    if not p.exists():
        raise error(f"{p}: no such {kind} file")
    if not p.is_file():
        raise error(f"{p}: not a regular file (expected a {kind} file)")
    if not os.access(p, os.R_OK):
        raise error(f"{p}: {kind} file is not readable")
    return p


def weights_header_size(path: Path) -> tuple[int, int, int, int]:
    """(major, minor, revision, header bytes) using pjreddie's rule for the width of `seen`."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if len(head) < 12:
        raise WeightsError(f"{path}: {len(head)} bytes, too short for a Darknet weights header (needs 16 or 20)")
    major, minor, revision = struct.unpack("<3i", head)
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    return major, minor, revision, 20 if wide else 16


def _cfg_with_batch(cfg: Path, total_batch: int, tmpdir: str) -> Path:
    """Copy of the cfg with `batch=` inserted right after [net] (Darknet uses the first value)."""
    lines = cfg.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        compact = "".join(line.split()).lower()
        if compact in ("[net]", "[network]"):
            lines.insert(number + 1, f"batch={total_batch}")
            break
    out = Path(tmpdir) / cfg.name
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _as_float32(name: str, array: Any) -> np.ndarray:
    arr = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ParamError(f"{name}: contains NaN or inf")
    return arr


# ----------------------------------------------------------------------------------------------
# In-process network
# ----------------------------------------------------------------------------------------------
class DarknetNet:
    """A Darknet network in this process. Loading the library turns on FTZ/DAZ process-wide.

    cfg/weights are checked before Darknet sees them. `batch` lowers the batch with Darknet's
    own set_batch_network (as its detector does); a larger batch re-parses a copy of the cfg
    with that batch, because set_batch_network never reallocates buffers. `clear` sets seen=0
    (Darknet's -clear). With `strict_weights` a weights file shorter than the network needs is
    an error (Darknet would silently keep its random init); pass False for partial backbones
    such as darknet53.conv.74. `quiet` sends Darknet's prints to /dev/null (fd-level).
    """

    FLAVOR = "pjreddie"   # whose layer arrays the converters' engine_arrays describe

    def __init__(self, cfg: str | Path, weights: str | Path | None = None, *, batch: int | None = None,
                 clear: bool = False, strict_weights: bool = True, quiet: bool = False) -> None:
        self._net = None
        self.cfg_path = _check_cfg(cfg)
        self.weights_path = _check_file(weights, "weights", WeightsError) if weights is not None else None
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise ParamError(f"batch must be a positive integer, got {batch!r}")
        self.quiet = quiet
        self.lib = _library()
        with self._output():
            net = self.lib.dll.parse_network_cfg(str(self.cfg_path).encode())
        if not net:
            raise EngineError(f"{self.cfg_path}: Darknet's parse_network_cfg returned NULL")
        self._net = net
        if batch is not None and batch > self.net.batch:
            total = batch * max(1, self.net.subdivisions)
            self.close()
            with tempfile.TemporaryDirectory(prefix="d2c-darknet-") as tmp:
                copy = _cfg_with_batch(self.cfg_path, total, tmp)
                with self._output():
                    self._net = self.lib.dll.parse_network_cfg(str(copy).encode())
            if not self._net or self.net.batch != batch:
                raise EngineError(f"{self.cfg_path}: could not re-parse with batch={batch}")
        elif batch is not None and batch != self.net.batch:
            self.lib.dll.set_batch_network(self._net, batch)
        if self.weights_path is not None:
            self._check_weights_fit(self.weights_path, strict_weights)
            with self._output():
                self.lib.dll.load_weights(self._net, str(self.weights_path).encode())
        if clear:
            self.net.seen[0] = 0

    # --- plumbing ------------------------------------------------------------------------
    @property
    def net(self) -> Any:
        if not self._net:
            raise EngineError("this Darknet network has been closed")
        return self._net.contents

    def _output(self) -> contextlib.AbstractContextManager:
        return _c_output_to(None) if self.quiet else contextlib.nullcontext()

    def close(self) -> None:
        """Free the network (free_network). The object is unusable afterwards."""
        if self._net:
            self.lib.dll.free_network(self._net)
        self._net = None

    def __enter__(self) -> DarknetNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_layers(self) -> int:
        return int(self.net.n)

    def _layer(self, i: int) -> Any:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self.n_layers:
            raise ParamError(f"layer index {i!r} out of range 0..{self.n_layers - 1}")
        return self.net.layers[int(i)]     # a view into Darknet's array, not a copy

    def _type(self, layer: Any) -> str:
        return self.lib.layer_type(layer.type)

    @staticmethod
    def _read(ptr: Any, count: int) -> np.ndarray:
        if not ptr or count <= 0:
            return np.zeros(0, dtype=np.float32)
        return np.ctypeslib.as_array(ptr, shape=(count,)).copy()

    def _write(self, ptr: Any, array: np.ndarray) -> None:
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    # --- description ---------------------------------------------------------------------
    def denormals_flushed(self) -> bool:
        """Whether this process (where the library is loaded) flushes denormals; True on Debian."""
        return denormals_flushed()

    def net_info(self) -> dict[str, Any]:
        """The [net] values as Darknet parsed them (batch is the mini-batch, batch/subdivisions)."""
        n = self.net
        steps = [int(n.steps[k]) for k in range(n.num_steps)] if n.steps else []
        scales = [float(n.scales[k]) for k in range(n.num_steps)] if n.scales else []
        return {
            "n": int(n.n), "batch": int(n.batch), "subdivisions": int(n.subdivisions),
            "h": int(n.h), "w": int(n.w), "c": int(n.c), "inputs": int(n.inputs),
            "outputs": int(n.outputs), "truths": int(n.truths),
            "learning_rate": float(n.learning_rate), "momentum": float(n.momentum),
            "decay": float(n.decay), "burn_in": int(n.burn_in), "power": float(n.power),
            "max_batches": int(n.max_batches),
            "policy": self.lib.header.enum_name("learning_rate_policy", n.policy),
            "steps": steps, "scales": scales, "seen": int(n.seen[0]), "train": int(n.train),
        }

    def layer_info(self, i: int) -> dict[str, Any]:
        """Darknet's own numbers for layer i (type name, shapes, sizes, yolo settings)."""
        l = self._layer(i)
        kind = self._type(l)
        info: dict[str, Any] = {
            "index": int(i), "type": kind,
            "activation": self.lib.header.enum_name("ACTIVATION", l.activation),
            "in_shape": (int(l.c), int(l.h), int(l.w)),
            "out_shape": (int(l.out_c), int(l.out_h), int(l.out_w)),
            "batch": int(l.batch), "inputs": int(l.inputs), "outputs": int(l.outputs),
            "n": int(l.n), "size": int(l.size), "stride": int(l.stride), "pad": int(l.pad),
            "groups": int(l.groups), "batch_normalize": int(l.batch_normalize),
            "nweights": int(l.nweights), "nbiases": int(l.nbiases),
            "classes": int(l.classes), "truths": int(l.truths), "max_boxes": int(l.max_boxes),
            "total": int(l.total), "workspace_size": int(l.workspace_size),
            "has_cost": bool(l.cost), "learning_rate_scale": float(l.learning_rate_scale),
        }
        if kind == "YOLO":
            info["mask"] = [int(l.mask[k]) for k in range(l.n)] if l.mask else []
            info["anchors"] = self._read(l.biases, 2 * l.total).tolist()
            info.update(ignore_thresh=float(l.ignore_thresh), truth_thresh=float(l.truth_thresh))
        elif kind == "REGION":
            info["anchors"] = self._read(l.biases, 2 * l.n).tolist()
            info.update(coords=int(l.coords), softmax=int(l.softmax), thresh=float(l.thresh))
        elif kind == "ROUTE":
            info["input_layers"] = [int(l.input_layers[k]) for k in range(l.n)] if l.input_layers else []
        elif kind == "SHORTCUT":
            info["from"] = int(l.index)
        return info

    # --- data in and out -----------------------------------------------------------------
    def _check_input(self, x: Any, rows: int | None = None) -> np.ndarray:
        n = self.net
        arr = _as_float32("input", x)
        rows = n.batch if rows is None else rows
        ok_shapes = {(rows, n.c, n.h, n.w), (rows, n.inputs)}
        if arr.shape not in ok_shapes:
            raise ParamError(f"input has shape {arr.shape}; this network needs "
                             f"({rows}, {n.c}, {n.h}, {n.w}) float32 (batch={n.batch})")
        return arr

    def _check_truth(self, truth: Any, rows: int) -> np.ndarray:
        n = self.net
        arr = _as_float32("truth", truth)
        if n.truths <= 0:
            raise ParamError("this network has no truth input (no detection/cost layer at the end)")
        if arr.shape != (rows, n.truths):
            raise ParamError(f"truth has shape {arr.shape}; expected ({rows}, {n.truths}) "
                             "(per image: x, y, w, h, class per box, x == 0 ends the list)")
        return arr

    def forward(self, x: Any, train: bool = False, truth: Any | None = None) -> None:
        """Copy x (batch, c, h, w) into net->input, set net.train, run forward_network.

        In training mode the detection layers read net->truth: pass `truth` (batch, truths),
        otherwise it is zeroed (no boxes). Results stay in the layers (layer_output, cost).
        """
        arr = self._check_input(x)
        n = self.net
        self._write(n.input, arr)
        if n.truth:
            if truth is not None:
                self._write(n.truth, self._check_truth(truth, n.batch))
            elif train:
                ctypes.memset(n.truth, 0, n.batch * n.truths * 4)
        n.train = 1 if train else 0
        with self._output():
            self.lib.dll.forward_network(self._net)

    def backward(self) -> None:
        """backward_network after a training forward: fills l.delta and the *_updates buffers."""
        with self._output():
            self.lib.dll.backward_network(self._net)

    def update(self) -> None:
        """update_network: apply the accumulated updates with get_current_rate (advances *t)."""
        with self._output():
            self.lib.dll.update_network(self._net)

    def _shape(self, l: Any) -> tuple[int, ...]:
        if l.out_c * l.out_h * l.out_w == l.outputs and l.outputs > 0:
            return (int(l.batch), int(l.out_c), int(l.out_h), int(l.out_w))
        return (int(l.batch), int(l.outputs))

    def layer_output(self, i: int) -> np.ndarray:
        """Copy of l.output, shape (b, c, h, w) or (b, outputs) for flat layers."""
        l = self._layer(i)
        shape = self._shape(l)
        return self._read(l.output, int(np.prod(shape))).reshape(shape)

    def layer_delta(self, i: int) -> np.ndarray:
        """Copy of l.delta (Darknet's δ = minus the gradient), same shape as the output."""
        l = self._layer(i)
        if not l.delta:
            raise ParamError(f"layer {i} ({self._type(l)}) has no delta buffer")
        shape = self._shape(l)
        return self._read(l.delta, int(np.prod(shape))).reshape(shape)

    # --- parameters ----------------------------------------------------------------------
    def _param_specs(self, l: Any, buffers: str = "params") -> dict[str, tuple[Any, tuple[int, ...]]]:
        """name -> (pointer, shape) for the arrays a layer has, in .weights order: what the section's
        converter lists (LayerConverter.engine_arrays); none for a type d2c does not convert."""
        converter = REGISTRY.get(self._type(l).lower())
        listed = converter.engine_arrays(l, buffers == "updates", self.FLAVOR) if converter else []
        return {name: (getattr(l, field), shape) for name, field, shape in listed
                if getattr(l, field) and math.prod(shape) > 0}

    def layer_params(self, i: int) -> dict[str, np.ndarray]:
        """Copies of the layer's parameter arrays in .weights order, with Darknet's shapes.

        conv: biases (n), [scales, rolling_mean, rolling_variance (n)], weights (n, c/groups, k, k);
        connected: biases, weights (out, in), [BN triple]; batchnorm: the BN triple;
        yolo/region: anchors (l.biases, not stored in .weights). Other layers: {}.
        """
        l = self._layer(i)
        return {name: self._read(ptr, int(np.prod(shape))).reshape(shape)
                for name, (ptr, shape) in self._param_specs(l).items()}

    def layer_updates(self, i: int) -> dict[str, np.ndarray]:
        """Copies of the accumulators (bias_updates, scale_updates, weight_updates): Darknet's
        momentum buffers after an update, summed negative gradients after a backward."""
        l = self._layer(i)
        return {name: self._read(ptr, int(np.prod(shape))).reshape(shape)
                for name, (ptr, shape) in self._param_specs(l, "updates").items()}

    def set_layer_params(self, i: int, **arrays: Any) -> None:
        """Overwrite named parameter arrays of layer i (same element count; shape must match or be flat)."""
        l = self._layer(i)
        specs = self._param_specs(l)
        checked: list[tuple[Any, np.ndarray]] = []
        for name, value in arrays.items():
            if name not in specs:
                raise ParamError(f"layer {i} ({self._type(l)}) has no parameter {name!r}; "
                                 f"it has {sorted(specs)}")
            ptr, shape = specs[name]
            arr = _as_float32(f"layer {i} {name}", value)
            if arr.shape != shape and arr.shape != (int(np.prod(shape)),):
                raise ParamError(f"layer {i} ({self._type(l)}) {name}: shape {arr.shape}, expected {shape}")
            checked.append((ptr, arr))
        for ptr, arr in checked:        # write only after every array was validated
            self._write(ptr, arr)

    def param_count(self) -> int | None:
        """Floats a complete .weights body needs for this network; None if a layer type is unknown."""
        total = 0
        for i in range(self.n_layers):
            l = self._layer(i)
            kind = self._type(l)
            if l.dontload or l.numload or l.dontloadscales:
                return None
            if kind in ("RNN", "GRU", "LSTM", "CRNN") or kind.lower() not in REGISTRY and (l.nweights or l.nbiases):
                return None   # parameters d2c does not know the layout of (recurrent, deconvolutional, ...)
            total += sum(int(np.prod(shape)) for name, (_, shape) in self._param_specs(l).items()
                         if name != "anchors")
        return total

    def _check_weights_fit(self, path: Path, strict: bool) -> None:
        kinds = {self._type(self._layer(i)) for i in range(self.n_layers)}
        if "DECONVOLUTIONAL" in kinds:
            raise UnsupportedLayerError(f"{self.cfg_path}: pjreddie's load_weights crashes (SIGFPE) on "
                                        "[deconvolutional] layers (groups is never set); cannot load "
                                        f"{path}")
        _, _, _, head = weights_header_size(path)
        if not strict:
            return
        needed = self.param_count()
        if needed is None:
            return
        have = (path.stat().st_size - head) // 4
        if have < needed:
            raise WeightsError(f"{path}: holds {have} floats after its {head}-byte header but "
                               f"{self.cfg_path} needs {needed}; Darknet would silently keep random "
                               "values for the rest (pass strict_weights=False for a partial backbone)")

    # --- costs and training ---------------------------------------------------------------
    def cost(self) -> float:
        """*net->cost: the mean of l.cost over the layers that have one (set by forward)."""
        return float(self.net.cost[0])

    def layer_cost(self, i: int) -> float:
        """*l.cost of a yolo/region/cost layer (Σδ² for yolo/region)."""
        l = self._layer(i)
        if not l.cost:
            raise ParamError(f"layer {i} ({self._type(l)}) has no cost")
        return float(l.cost[0])

    def train_step(self, x: Any, truth: Any) -> float:
        """One train_network call on a `data` struct built from x and truth; returns its value.

        x: (rows, c, h, w) images, rows a multiple of the mini-batch; truth: (rows, net->truths).
        train_network runs rows/batch mini-batches through train_network_datum (seen += batch,
        forward, backward, update when (seen/batch) % subdivisions == 0) and returns
        Σ err / rows, err being *net->cost of each mini-batch.
        """
        n = self.net
        arr = np.asarray(x)
        rows = int(arr.shape[0]) if arr.ndim >= 1 else 0
        if rows == 0 or rows % n.batch:
            raise ParamError(f"train_step: {rows} images is not a positive multiple of the mini-batch "
                             f"{n.batch} (train_network asserts d.X.rows % net->batch == 0)")
        images = self._check_input(arr, rows).reshape(rows, n.inputs)
        labels = self._check_truth(truth, rows)
        f_p = ctypes.POINTER(ctypes.c_float)

        def matrix(values: np.ndarray) -> tuple[Any, Any]:
            row_ptrs = (f_p * values.shape[0])(*[values[r].ctypes.data_as(f_p) for r in range(values.shape[0])])
            return self.lib.Matrix(rows=values.shape[0], cols=values.shape[1], vals=row_ptrs), row_ptrs

        mx, keep_x = matrix(images)
        my, keep_y = matrix(labels)
        d = self.lib.Data(w=n.w, h=n.h, X=mx, y=my, shallow=0, num_boxes=None, boxes=None)
        with self._output():
            loss = self.lib.dll.train_network(self._net, d)
        del keep_x, keep_y
        return float(loss)

    def train_datum(self, x: Any, truth: Any) -> float:
        """One mini-batch via train_network_datum (input/truth copied in); returns *net->cost."""
        n = self.net
        self._write(n.input, self._check_input(x))
        self._write(n.truth, self._check_truth(truth, n.batch))
        with self._output():
            return float(self.lib.dll.train_network_datum(self._net))

    def seen(self) -> int:
        return int(self.net.seen[0])

    def set_seen(self, value: int) -> None:
        if value < 0:
            raise ParamError(f"seen must be >= 0, got {value}")
        self.net.seen[0] = int(value)

    def current_rate(self) -> float:
        """get_current_rate: the rate the next update would use at the current seen."""
        return float(self.lib.dll.get_current_rate(self._net))

    def current_batch(self) -> int:
        """get_current_batch: seen / (batch * subdivisions)."""
        return int(self.lib.dll.get_current_batch(self._net))

    def save_weights(self, path: str | Path) -> None:
        """Darknet's save_weights (header 0.2.0 + 64-bit seen), written via a temp file + rename."""
        target = Path(path)
        if not target.parent.is_dir():
            raise WeightsError(f"{target}: directory {target.parent} does not exist")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with self._output():
                self.lib.dll.save_weights(self._net, tmp.encode())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- Darknet's detection pipeline ------------------------------------------------------
    def _load_image(self, image_path: str | Path) -> Any:
        path = _check_file(image_path, "image", DatasetError)
        try:
            import cv2  # noqa: PLC0415 - only to refuse undecodable files before Darknet sees them
        except ImportError:
            cv2 = None
        if cv2 is not None and cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
            raise DatasetError(f"{path}: not a decodable image")
        with self._output():
            return self.lib.dll.load_image_color(str(path).encode(), 0, 0)

    def letterbox(self, image_path: str | Path) -> np.ndarray:
        """Darknet's load_image_color + letterbox_image to the net size, as (3, h, w) float32."""
        im = self._load_image(image_path)
        try:
            sized = self.lib.dll.letterbox_image(im, self.net.w, self.net.h)
            try:
                return self._read(sized.data, sized.c * sized.h * sized.w).reshape(sized.c, sized.h, sized.w)
            finally:
                self.lib.dll.free_image(sized)
        finally:
            self.lib.dll.free_image(im)

    def detect(self, image_path: str | Path, thresh: float = 0.25, hier: float = 0.5,
               nms: float = 0.45) -> list[dict[str, Any]]:
        """Darknet's test_detector pipeline; one entry per (box, class) with prob > thresh.

        Boxes are [x, y, w, h] relative to the original image, (x, y) the centre, in Darknet's
        detection order (after do_nms_sort). nms=0 skips NMS, as in Darknet.
        """
        n = self.net
        im = self._load_image(image_path)
        dets = None
        count = ctypes.c_int(0)
        try:
            sized = self.lib.dll.letterbox_image(im, n.w, n.h)
            try:
                # A full-batch buffer: forward reads batch*inputs floats from net->input.
                buffer = np.zeros((n.batch, n.inputs), dtype=np.float32)
                buffer[0] = self._read(sized.data, n.inputs)
            finally:
                self.lib.dll.free_image(sized)
            f_p = ctypes.POINTER(ctypes.c_float)
            with self._output():
                self.lib.dll.network_predict(self._net, buffer.ctypes.data_as(f_p))
                dets = self.lib.dll.get_network_boxes(self._net, im.w, im.h, thresh, hier, None, 1,
                                                      ctypes.byref(count))
            classes = int(n.layers[n.n - 1].classes)
            if nms:
                self.lib.dll.do_nms_sort(dets, count.value, classes, nms)
            found: list[dict[str, Any]] = []
            # Darknet's printer loops over the last layer's classes (region dets leave det.classes
            # at 0) and compares with a float threshold.
            thresh32 = float(np.float32(thresh))
            for k in range(count.value):
                det = dets[k]
                for c in range(classes):
                    prob = float(det.prob[c])
                    if prob > thresh32:
                        box = det.bbox
                        found.append({"class": c, "score": prob, "objectness": float(det.objectness),
                                      "box": [float(box.x), float(box.y), float(box.w), float(box.h)]})
            return found
        finally:
            if dets:
                self.lib.dll.free_detections(dets, count.value)
            self.lib.dll.free_image(im)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------
# The same API in a child process, for either engine
# ----------------------------------------------------------------------------------------------
ENGINES = ("debian", "alexeyab")
_WORKER_METHODS = frozenset({
    "layer_info", "net_info", "forward", "backward", "update", "layer_output", "layer_delta",
    "layer_params", "layer_updates", "set_layer_params", "param_count", "cost", "layer_cost",
    "train_step", "train_datum", "seen", "set_seen", "current_rate", "current_batch",
    "save_weights", "detect", "letterbox", "denormals_flushed",
})


def open_engine(engine: str, cfg: str | Path, weights: str | Path | None = None, **kwargs: Any) -> DarknetNet:
    """A network of the named engine in this process: Debian's libdarknet.so or AlexeyAB's build."""
    if engine == "alexeyab":
        from d2c.darknet.alexeyab import AlexeyABNet  # noqa: PLC0415 - its library loads on demand
        return AlexeyABNet(cfg, weights, **kwargs)
    if engine != "debian":
        raise ParamError(f"unknown Darknet engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if kwargs.pop("fuse_bn", False):
        raise ParamError("fuse_bn is an option of the AlexeyAB engine (Debian's detector does not fuse)")
    return DarknetNet(cfg, weights, **kwargs)


class DarknetProcess(Child):
    """`DarknetNet` (or `AlexeyABNet` with engine="alexeyab") in a child process, so this process
    keeps IEEE denormals and survives the engine's crashes.

    Same methods and arguments (see `_WORKER_METHODS`); arrays come back as numpy copies. Darknet's
    prints go to a log file when `quiet` (the default); a crash (exit(), SIGSEGV, SIGFPE...) raises
    EngineError with the exit status and the end of that log, and the object is dead.
    """

    def __init__(self, cfg: str | Path, weights: str | Path | None = None, *, engine: str = "debian",
                 batch: int | None = None, clear: bool = False, strict_weights: bool = True,
                 quiet: bool = True, **engine_options: Any) -> None:
        if engine not in ENGINES:
            raise ParamError(f"unknown Darknet engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "debian":
            cfg_path = _check_cfg(cfg)        # fail early, in this process, with the file named
            library_path()
            header_path()
        else:
            from d2c.darknet.alexeyab import _check_cfg as check_alexeyab_cfg, build_dir  # noqa: PLC0415
            cfg_path = check_alexeyab_cfg(cfg)
            build_dir()
        weights_path = _check_file(weights, "weights", WeightsError) if weights is not None else None
        self.engine = engine
        self.cfg_path, self.weights_path = cfg_path, weights_path
        super().__init__("d2c.darknet.runtime:open_engine", engine, str(cfg_path),
                         None if weights_path is None else str(weights_path),
                         name="Darknet" if engine == "debian" else "AlexeyAB Darknet", quiet=quiet,
                         batch=batch, clear=clear, strict_weights=strict_weights, **engine_options)
        self.n_layers: int = self.call("n_layers")

    def __getattr__(self, name: str) -> Any:
        if name in _WORKER_METHODS:
            return functools.partial(self.call, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __enter__(self) -> DarknetProcess:
        return self
