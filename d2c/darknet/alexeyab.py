"""ctypes binding of AlexeyAB's Darknet (commit 59596d7, CPU, -Ofast), the engine of v4/v7-era cfgs.

Why a second engine: Debian's pjreddie library cannot run mish, sam, scale_channels, route groups,
reorg3d, weighted shortcuts, letter_box or new_coords, so d2c's conversions of YOLOv4/v7 are checked
against the engine that defines them. `tools/build_alexeyab.sh` builds it into the d2c cache.

The API is `DarknetNet`'s (same method names and shapes), so parity, forward checks and detect
checks take either engine. What differs from Debian's library, and is handled here:
- its `darknet.h` has other struct layouts (parsed at runtime, as for Debian; `tests/` compares every
  member's offset with what the C compiler gives for the same header);
- most entry points take `network` and `network_state` by value (forward_network, backward_network,
  train_network_datum, update_network);
- parse_network_cfg_custom(cfg, batch, 1) with batch > 0 allocates inference buffers only, so the
  training layout (batch 0: the cfg's mini-batch) is the default here;
- its convenience loader (load_network_custom) and its detector fuse BN into the convolution
  weights; fusing changes results by up to ~4e-4 relative on deep nets, so layers are compared on
  the unfused path and `fuse_bn=True` reproduces the detector;
- one training step (train_network) updates once after all `subdivisions` mini-batches and counts
  `cur_iteration`; `train_datum` follows that per mini-batch;
- its detector resizes or letterboxes per `[net] letter_box` and runs greedy or DIoU NMS per the
  last layer's `nms_kind`.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.header import CHeader, load_header
from d2c.darknet.runtime import DarknetNet, _check_file, denormals_flushed
from d2c.errors import CfgError, EngineError, ParamError, WeightsError

COMMIT = "59596d7880f6504768df41d6daa586f5cb2b932f"
DIR_ENV = "D2C_ALEXEYAB_DIR"     # a build directory (libdarknet.so + include/darknet.h)
BUILD_HINT = "build it with `bash tools/build_alexeyab.sh` (part of `make setup`)"


def _cache_root() -> Path:
    return Path(os.environ.get("D2C_CACHE") or Path.home() / ".cache" / "d2c")


def build_dir() -> Path:
    """The engine's build directory: $D2C_ALEXEYAB_DIR, else the newest finished build of the pinned
    commit in the d2c cache. EngineError with the way to build it when there is none."""
    env = os.environ.get(DIR_ENV)
    if env:
        path = Path(env)
        if not (path / "libdarknet.so").is_file():
            raise EngineError(f"{DIR_ENV}={path}: no libdarknet.so there; {BUILD_HINT}")
        return path
    found: list[tuple[float, Path]] = []
    for done in _cache_root().glob("alexeyab-darknet-*/.built"):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((done.parent / "build-info.json").read_text())
            if info.get("commit") == COMMIT and (done.parent / "libdarknet.so").is_file():
                found.append((done.stat().st_mtime, done.parent))
    if not found:
        raise EngineError(f"AlexeyAB's Darknet is not built in {_cache_root()}; {BUILD_HINT}")
    return max(found)[1]


def version_info() -> dict[str, Any]:
    """Where the engine is and how it was built, for `d2c info`. Never loads the library."""
    try:
        path = build_dir()
    except EngineError as exc:
        return {"available": False, "error": str(exc)}
    info: dict[str, Any] = {"available": True, "library": str(path / "libdarknet.so")}
    with contextlib.suppress(OSError, ValueError):
        info.update(json.loads((path / "build-info.json").read_text()))
    return info


class _AlexeyABLibrary:
    """The loaded libdarknet.so with signatures from its own header (one per process)."""

    def __init__(self) -> None:
        directory = build_dir()
        self.path = directory / "libdarknet.so"
        self.header: CHeader = load_header(directory / "include" / "darknet.h")
        h = self.header
        self.Layer, self.Network, self.NetworkState = h.struct("layer"), h.struct("network"), h.struct("network_state")
        self.Image, self.Detection = h.struct("image"), h.struct("detection")
        self.Matrix, self.Data = h.struct("matrix"), h.struct("data")
        try:
            self.dll = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise EngineError(f"cannot load {self.path}: {exc}; {BUILD_HINT}") from exc
        net_p = ctypes.POINTER(self.Network)
        f_p = ctypes.POINTER(ctypes.c_float)
        det_p = ctypes.POINTER(self.Detection)
        c_int, c_float, c_char_p = ctypes.c_int, ctypes.c_float, ctypes.c_char_p
        Net, State = self.Network, self.NetworkState
        signatures: dict[str, tuple[list, Any]] = {
            "parse_network_cfg_custom": ([c_char_p, c_int, c_int], Net),
            "load_weights": ([net_p, c_char_p], None),
            "save_weights": ([Net, c_char_p], None),
            "fuse_conv_batchnorm": ([Net], None),
            "forward_network": ([Net, State], None),
            "backward_network": ([Net, State], None),
            "update_network": ([Net], None),
            "network_predict_ptr": ([net_p, f_p], f_p),
            "train_network_datum": ([Net, f_p, f_p], c_float),
            "get_current_rate": ([Net], c_float),
            "get_current_batch": ([Net], c_int),
            "load_image_color": ([c_char_p, c_int, c_int], self.Image),
            "letterbox_image": ([self.Image, c_int, c_int], self.Image),
            "resize_image": ([self.Image, c_int, c_int], self.Image),
            "free_image": ([self.Image], None),
            "get_network_boxes": ([net_p, c_int, c_int, c_float, c_float, ctypes.POINTER(c_int), c_int,
                                   ctypes.POINTER(c_int), c_int], det_p),
            "do_nms_sort": ([det_p, c_int, c_int, c_float], None),
            "diounms_sort": ([det_p, c_int, c_int, c_float, c_int, c_float], None),
            "free_detections": ([det_p, c_int], None),
            "free_network": ([Net], None),
        }
        for name, (argtypes, restype) in signatures.items():
            try:
                func = getattr(self.dll, name)
            except AttributeError as exc:
                raise EngineError(f"{self.path} does not export {name}(); is it AlexeyAB's Darknet?") from exc
            func.argtypes = argtypes
            func.restype = restype

    def layer_type(self, value: int) -> str:
        return self.header.enum_name("LAYER_TYPE", value)


_LIBRARY: _AlexeyABLibrary | None = None


def _library() -> _AlexeyABLibrary:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _AlexeyABLibrary()
    return _LIBRARY


def weights_header_size(path: Path) -> int:
    """Bytes before the first float: AlexeyAB reads a 64-bit `seen` when major*10+minor >= 2."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if len(head) < 12:
        raise WeightsError(f"{path}: {len(head)} bytes, too short for a Darknet weights header (needs 16 or 20)")
    major, minor, _ = np.frombuffer(head, "<i4")
    return 20 if int(major) * 10 + int(minor) >= 2 else 16


class AlexeyABNet(DarknetNet):
    """A network in AlexeyAB's Darknet, in this process (the -Ofast library turns on FTZ/DAZ here too).

    `batch=None` parses the cfg for training (its mini-batch, training buffers, delta buffers);
    `batch=B` parses it for inference with mini-batch B, as the engine's own detector does (B=1).
    `fuse_bn` folds BN into the convolutions after loading, as load_network_custom and the
    detector do. `clear` sets seen and cur_iteration to 0.
    """

    engine = "alexeyab"
    FLAVOR = "alexeyab"

    def __init__(self, cfg: str | Path, weights: str | Path | None = None, *, batch: int | None = None,
                 clear: bool = False, strict_weights: bool = True, quiet: bool = False,
                 fuse_bn: bool = False) -> None:
        self._net = None
        self.cfg_path = _check_cfg(cfg)
        self.weights_path = _check_file(weights, "weights", WeightsError) if weights is not None else None
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise ParamError(f"batch must be a positive integer, got {batch!r}")
        self.quiet = quiet
        self.lib = _library()
        with self._output():
            self._struct = self.lib.dll.parse_network_cfg_custom(str(self.cfg_path).encode(), batch or 0, 1)
        if self._struct.n <= 0 or not self._struct.layers:
            raise EngineError(f"{self.cfg_path}: AlexeyAB's parse_network_cfg_custom gave no layers")
        self._net = ctypes.pointer(self._struct)
        self._state_buffers: tuple[np.ndarray, ...] = ()
        if self.weights_path is not None:
            self._check_weights_fit(self.weights_path, strict_weights)
            with self._output():
                self.lib.dll.load_weights(self._net, str(self.weights_path).encode())
        if fuse_bn:
            with self._output():
                self.lib.dll.fuse_conv_batchnorm(self.net)
        if clear:
            self.net.seen[0] = 0
            self.net.cur_iteration[0] = 0

    def close(self) -> None:
        if self._net:
            self.lib.dll.free_network(self.net)
        self._net = None

    def __enter__(self) -> AlexeyABNet:
        return self

    def denormals_flushed(self) -> bool:
        return denormals_flushed()

    def net_info(self) -> dict[str, Any]:
        info = super().net_info()
        n = self.net
        info.update(cur_iteration=int(n.cur_iteration[0]), letter_box=int(n.letter_box), adam=int(n.adam),
                    loss_scale=float(n.loss_scale), learning_rate_min=float(n.learning_rate_min),
                    batches_per_cycle=int(n.batches_per_cycle), batches_cycle_mult=int(n.batches_cycle_mult))
        return info

    def layer_info(self, i: int) -> dict[str, Any]:
        info = super().layer_info(i)
        l = self._layer(i)
        if info["type"] == "YOLO":
            info.update(scale_x_y=float(l.scale_x_y), new_coords=int(l.new_coords),
                        nms_kind=self.lib.header.enum_name("NMS_KIND", l.nms_kind), beta_nms=float(l.beta_nms))
        if info["type"] in ("SHORTCUT", "ROUTE", "SAM", "SCALE_CHANNELS"):
            info["input_layers"] = [int(l.input_layers[k]) for k in range(l.n)] if l.input_layers else []
        return info

    def _check_weights_fit(self, path: Path, strict: bool) -> None:
        head = weights_header_size(path)
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

    def _truth_layout(self) -> tuple[int, int]:
        """(max boxes, floats per box) of the heads: AlexeyAB leaves net->truths at 0; each head
        reads l.truths = max_boxes * truth_size floats per image, truth_size 6 for [yolo]
        (x, y, w, h, class, track id) and 5 for [region]."""
        layers = [self.net.layers[i] for i in range(self.n_layers) if self.net.layers[i].truths > 0]
        if not layers:
            raise ParamError("this network has no truth input (no [yolo]/[region] head)")
        size = max(int(l.truth_size) or 5 for l in layers)
        return max(int(l.truths) // size for l in layers), size

    def _check_truth(self, truth: Any, rows: int) -> np.ndarray:
        """d2c's truth layout (rows, K*5: x, y, w, h, class per box, x == 0 ends the list, as for
        Debian's engine) repacked into the engine's (rows, max_boxes*truth_size), track id 0."""
        arr = np.asarray(truth, dtype=np.float32)
        boxes, size = self._truth_layout()
        if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] % 5 or arr.shape[1] // 5 > boxes \
                or not np.all(np.isfinite(arr)):
            raise ParamError(f"truth has shape {arr.shape}; expected ({rows}, K*5) finite floats with "
                             f"K <= {boxes} (per image: x, y, w, h, class per box, x == 0 ends the list)")
        packed = np.zeros((rows, boxes, size), np.float32)
        packed[:, :arr.shape[1] // 5, :5] = arr.reshape(rows, -1, 5)
        return np.ascontiguousarray(packed.reshape(rows, boxes * size))

    # --- running -----------------------------------------------------------------------------
    def _state(self, x: np.ndarray, truth: np.ndarray | None, train: bool) -> Any:
        """A network_state over arrays kept alive on self (backward reuses the forward's state)."""
        f_p = ctypes.POINTER(ctypes.c_float)
        self._state_buffers = (x,) if truth is None else (x, truth)
        return self.lib.NetworkState(
            truth=None if truth is None else truth.ctypes.data_as(f_p), input=x.ctypes.data_as(f_p),
            delta=None, workspace=self.net.workspace, train=int(train), index=0, net=self.net)

    def forward(self, x: Any, train: bool = False, truth: Any | None = None) -> None:
        """forward_network on x (batch, c, h, w); in training mode with truth (zeros if none)."""
        n = self.net
        arr = np.ascontiguousarray(self._check_input(x).reshape(n.batch, n.inputs))
        t = None
        if train:
            t = self._check_truth(truth if truth is not None else np.zeros((n.batch, 5), np.float32), n.batch)
        n.train = int(train)
        self._last_state = self._state(arr, t, train)
        with self._output():
            self.lib.dll.forward_network(n, self._last_state)

    def backward(self) -> None:
        """backward_network with the state of the last (training) forward."""
        if not getattr(self, "_last_state", None) or not self._last_state.train:
            raise ParamError("backward needs a training forward first (forward(x, train=True, truth=...))")
        with self._output():
            self.lib.dll.backward_network(self.net, self._last_state)

    def update(self) -> None:
        """One optimizer step as train_network does it: cur_iteration += 1, then update_network."""
        self.net.cur_iteration[0] += 1
        with self._output():
            self.lib.dll.update_network(self.net)

    def train_datum(self, x: Any, truth: Any) -> float:
        """One mini-batch the way train_network runs it: train_network_datum (seen += batch, forward,
        backward), and after the last of `subdivisions` mini-batches the update. Returns the cost."""
        n = self.net
        arr = np.ascontiguousarray(self._check_input(x).reshape(n.batch, n.inputs))
        labels = np.ascontiguousarray(self._check_truth(truth, n.batch))
        f_p = ctypes.POINTER(ctypes.c_float)
        subdivisions = max(1, int(n.subdivisions))
        n.current_subdivision = int((int(n.seen[0]) // max(1, int(n.batch))) % subdivisions)
        with self._output():
            err = float(self.lib.dll.train_network_datum(n, arr.ctypes.data_as(f_p), labels.ctypes.data_as(f_p)))
        if (int(n.seen[0]) // int(n.batch)) % subdivisions == 0:
            self.update()
        return err

    def train_step(self, x: Any, truth: Any) -> float:
        """train_network: rows/batch mini-batches, one update; returns the summed cost / rows."""
        n = self.net
        arr, labels = np.asarray(x), np.asarray(truth)
        rows = int(arr.shape[0]) if arr.ndim >= 1 else 0
        if rows == 0 or rows % (n.batch * max(1, n.subdivisions)):
            raise ParamError(f"train_step: {rows} images is not batch*subdivisions "
                             f"({n.batch}*{n.subdivisions})")
        total = sum(self.train_datum(arr[k:k + n.batch], labels[k:k + n.batch]) for k in range(0, rows, n.batch))
        return total / rows

    def current_rate(self) -> float:
        return float(self.lib.dll.get_current_rate(self.net))

    def current_batch(self) -> int:
        return int(self.lib.dll.get_current_batch(self.net))

    def save_weights(self, path: str | Path) -> None:
        """AlexeyAB's save_weights, written via a temp file + rename."""
        import tempfile
        target = Path(path)
        if not target.parent.is_dir():
            raise WeightsError(f"{target}: directory {target.parent} does not exist")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with self._output():
                self.lib.dll.save_weights(self.net, tmp.encode())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- its detector ------------------------------------------------------------------------
    def _sized(self, im: Any) -> Any:
        n = self.net
        return (self.lib.dll.letterbox_image(im, n.w, n.h) if n.letter_box
                else self.lib.dll.resize_image(im, n.w, n.h))

    def letterbox(self, image_path: str | Path) -> np.ndarray:
        """The network input test_detector builds: letterbox_image if [net] letter_box, else resize_image."""
        im = self._load_image(image_path)
        try:
            sized = self._sized(im)
            try:
                return self._read(sized.data, sized.c * sized.h * sized.w).reshape(sized.c, sized.h, sized.w)
            finally:
                self.lib.dll.free_image(sized)
        finally:
            self.lib.dll.free_image(im)

    def detect(self, image_path: str | Path, thresh: float = 0.25, hier: float = 0.5,
               nms: float = 0.45) -> list[dict[str, Any]]:
        """test_detector's pipeline: size the image, predict, get_network_boxes (letter flag from
        the cfg), NMS by the last layer's nms_kind (do_nms_sort or diounms_sort), every class
        with prob > thresh. Boxes are [x, y, w, h] relative to the image, centre first."""
        n = self.net
        im = self._load_image(image_path)
        dets = None
        count = ctypes.c_int(0)
        try:
            sized = self._sized(im)
            try:
                buffer = np.zeros((n.batch, n.inputs), dtype=np.float32)
                buffer[0] = self._read(sized.data, n.inputs)
            finally:
                self.lib.dll.free_image(sized)
            f_p = ctypes.POINTER(ctypes.c_float)
            last = n.layers[n.n - 1]
            with self._output():
                self.lib.dll.network_predict_ptr(self._net, buffer.ctypes.data_as(f_p))
                dets = self.lib.dll.get_network_boxes(self._net, im.w, im.h, thresh, hier, None, 1,
                                                      ctypes.byref(count), int(n.letter_box))
            classes = int(last.classes)
            if nms:
                if self.lib.header.enum_name("NMS_KIND", last.nms_kind) == "DEFAULT_NMS":
                    self.lib.dll.do_nms_sort(dets, count.value, classes, nms)
                else:
                    self.lib.dll.diounms_sort(dets, count.value, classes, nms, last.nms_kind, last.beta_nms)
            found: list[dict[str, Any]] = []
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


def _check_cfg(cfg: str | Path) -> Path:
    """The cfg exists and lexes (AlexeyAB's parser exits on what ours rejects)."""
    path = Path(cfg)
    if not path.is_file():
        raise CfgError(f"{path}: no such cfg file" if not path.exists() else f"{path}: not a regular file")
    parse_cfg(path)
    return path

