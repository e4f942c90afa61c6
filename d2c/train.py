"""`d2c train`: train a Darknet cfg in Caffe on a Darknet-style dataset, exactly as Darknet would.

Why this shape: the exact pieces already exist and are tested against libdarknet (the train
net with Python loss and BN layers, DarknetSGD's update and learning-rate policy, the
bit-exact data loader); this module wires them into Darknet's `train_detector` loop and adds
what a long run needs: a progress bar, logs, atomic snapshots, exact resume, Ctrl-C and NaN
handling, and an export back to Darknet at every snapshot.

One iteration is one Darknet batch: b*S images are drawn with replacement (get_random_paths)
and augmented (d2c.augment, Darknet's load_data_detection; `--no-augment`: no jitter, HSV or
flip, the same tensor every time for the same picks), then DarknetSGD.step runs the S
mini-batches and updates once. `iteration` in logs and snapshot names is Darknet's batch
number k = seen / (b*S) after the update; training stops when k reaches max_batches
(`--max-batches`, default the cfg's; the learning-rate policy keeps the cfg's value, so `poly`
is not distorted by an early stop).

Weights (Darknet's conventions):
- WEIGHTS given: every layer is read (the file must fit the cfg exactly); `seen` comes from the
  header (so the rate schedule continues) unless `--clear`.
- `--load-upto L`: only layers 0..L-1 are read, like Darknet's `partial` files
  (yolov3-tiny.conv.15 = `darknet partial ... 15`); `seen` starts at 0 as `partial` writes it.
- Every layer not loaded gets Darknet's random init (make_convolutional_layer etc.): conv
  weights sqrt(2/(k*k*c/groups)) * N(0,1), connected and local weights sqrt(2/fan_in) * U(-1,1),
  biases 0, BN scales 1, rolling_mean 0, and rolling_variance **1**, not Darknet's 0: with 0 the
  untrained layer divides by sqrt(0) + 1e-6 at inference (activations x 1e6) until the 0.99
  running average has caught up, so a short fine-tune evaluated with inference BN (mAP,
  export to Darknet) would be garbage. Training forwards use batch statistics either way.

Outputs in --out (default: the .data file's `backup` directory):
  <stem>.cfg           the cfg actually trained (with --batch/--subdivisions/--size applied)
  run.json             the options of the run (what --resume restores)
  train_log.csv/.json  one row per iteration (loss, avg loss, rate, Avg IOU, recall, ...)
  loss.png             loss and Darknet's 0.9/0.1 running average (drawn with OpenCV)
  snapshots/iter_NNNNNN/  <stem>_train.caffemodel (pycaffe's net.save), <stem>.json (sidecar,
                       so `d2c export` works on it), <stem>.cfg, <stem>.weights (d2c.export of
                       that caffemodel), solver_state.npz (DarknetSGD momentum buffers, seen, t,
                       the numpy RNG state of data loading, avg loss, the log rows)
  latest.json          names the newest complete snapshot; replaced atomically
  <stem>_final.weights the exported weights at the end of training
A snapshot directory is written under a temporary name and renamed into place only when
complete, and latest.json is replaced after that, so a crash, kill -9 or full disk at any point
leaves the previous snapshot usable; `--resume` continues from latest.json with bit-identical
losses (same weights, BN statistics, momentum, seen and RNG state).

Multi-scale (`random=1` in the last head, pjreddie): every 10 batches a new square size
(rand()%10+10)*32, 608 in the last 200 batches, as train_detector. Caffe's net.reshape() alone
is not enough (the YOLO loss layers bake net_w/net_h into their parameters, and the emitted
pooling/crop layers depend on the map sizes), so the train net is rebuilt at the new size and
every blob (weights, BN statistics) is copied over; the momentum buffers carry over unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.augment_kernel import SourceImage
from d2c.errors import D2CError, DatasetError, NumericError, UnsupportedLayerError
from d2c.fsutil import atomic_write, atomic_write_text, fsync_dir, fsync_file

F32 = np.float32
STATE_VERSION = 1
RUN_VERSION = 1
SNAPSHOT_DIR = "snapshots"
LATEST = "latest.json"
RUN_FILE = "run.json"
LOG_CSV = "train_log.csv"
LOG_JSON = "train_log.json"
LOSS_PNG = "loss.png"
STATE_FILE = "solver_state.npz"
DEFAULT_KEEP = 3
IMAGE_CACHE_BYTES = 1 << 30
LOG_FIELDS = ("iteration", "seen", "loss", "avg_loss", "rate", "avg_iou", "recall50", "recall75", "obj",
              "no_obj", "class", "count", "width", "height", "seconds")
STAT_KEYS = ("avg_iou", "recall50", "recall75", "obj", "class")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    """Everything `d2c train` accepts; see add_arguments for the meaning of each."""

    data: Path
    cfg: Path
    weights: Path | None = None
    out: Path | None = None
    max_batches: int | None = None
    snapshot_every: int = 100
    resume: bool = False
    load_upto: int | None = None
    bn: str | None = None            # exact (default) | stock
    no_augment: bool = False
    skip_bad: bool = False
    seed: int | None = None
    batch: int | None = None         # mini-batch b (Darknet's net->batch)
    subdivisions: int | None = None
    size: tuple[int, int] | None = None
    clear: bool = False
    keep: int = DEFAULT_KEEP
    progress: bool = True
    verbose: bool = True
    evaluate_map: bool = False
    workers: int = 2                 # loader worker processes (0: load in the training process)

    def check(self) -> None:
        if self.snapshot_every < 1:
            raise D2CError(f"--snapshot-every must be >= 1, got {self.snapshot_every}")
        if self.max_batches is not None and self.max_batches < 0:
            raise D2CError(f"--max-batches must be >= 0, got {self.max_batches}")
        if self.load_upto is not None and self.load_upto < 0:
            raise D2CError(f"--load-upto must be >= 0, got {self.load_upto}")
        if self.load_upto is not None and self.weights is None and not self.resume:
            raise D2CError("--load-upto needs a WEIGHTS file to load from")
        for name, value in (("--batch", self.batch), ("--subdivisions", self.subdivisions)):
            if value is not None and value < 1:
                raise D2CError(f"{name} must be >= 1, got {value}")
        if self.size is not None and (self.size[0] < 1 or self.size[1] < 1):
            raise D2CError(f"--size must be positive, got {self.size[0]} {self.size[1]}")
        if self.bn not in (None, "exact", "stock"):
            raise D2CError(f"--bn must be exact or stock, got {self.bn!r}")
        if self.keep < 1:
            raise D2CError(f"--keep must be >= 1, got {self.keep}")
        if self.workers < 0:
            raise D2CError(f"--workers must be >= 0, got {self.workers}")


# --------------------------------------------------------------------------------------------
# cfg overrides and weights
# --------------------------------------------------------------------------------------------

def override_net_keys(text: str, overrides: dict[str, str]) -> str:
    """The cfg text with [net] keys set (first occurrence replaced, later duplicates dropped,
    missing keys appended to [net]); every other line is kept verbatim."""
    if not overrides:
        return text
    out: list[str] = []
    in_net, seen_net, written = False, False, set()

    def flush() -> None:
        out.extend(f"{k}={v}" for k, v in overrides.items() if k not in written)
        written.update(overrides)

    for line in text.split("\n"):
        stripped = "".join(line.split())
        if stripped.startswith("["):
            if in_net:
                flush()
            in_net = stripped in ("[net]", "[network]") and not seen_net
            seen_net = seen_net or in_net
        elif in_net and stripped and stripped[0] not in "#;" and "=" in stripped:
            key = stripped.split("=", 1)[0]
            if key in overrides:
                if key in written:
                    continue
                ending = "\r" if line.endswith("\r") else ""
                line = f"{key}={overrides[key]}{ending}"
                written.add(key)
        out.append(line)
    if in_net:
        flush()
    return "\n".join(out)


def darknet_init(graph: Any, seed: int, start: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Darknet-like initial arrays for every layer with index >= start (see the module docstring);
    each section's converter draws its own (LayerConverter.darknet_init), in cfg order."""
    from d2c.layers import REGISTRY

    rng = np.random.default_rng([seed, 0x5EED])
    return {node.index: REGISTRY[node.kind].darknet_init(node, rng)
            for node in graph.nodes if node.index >= start and node.params}


def initial_weights(graph: Any, weights: Path | None, *, load_upto: int | None, seed: int,
                    clear: bool) -> tuple[Any, dict[int, dict[str, np.ndarray]], int, list[str]]:
    """(header, arrays for every layer, starting seen, notes) per Darknet's loading rules."""
    from d2c.darknet.weights import WeightsHeader, read_weights

    notes: list[str] = []
    if weights is None:
        notes.append("no WEIGHTS: every layer starts from Darknet's random init")
        return WeightsHeader(), darknet_init(graph, seed), 0, notes
    upto = load_upto
    if upto is not None and upto > len(graph.nodes):
        raise D2CError(f"--load-upto {upto}: the cfg has only {len(graph.nodes)} layers")
    header, loaded = read_weights(weights, graph, upto=upto,
                                  trailing_hint="--load-upto L loads only layers 0..L-1 (a backbone pretrained on another cfg)")
    arrays = darknet_init(graph, seed, start=upto if upto is not None else len(graph.nodes))
    arrays.update({i: {k: np.array(v, F32) for k, v in a.items()} for i, a in loaded.items()})
    if upto is not None:
        fresh = [n.index for n in graph.nodes if n.index >= upto and n.params]
        notes.append(f"--load-upto {upto}: layers 0..{upto - 1} from {weights}, layers {fresh} from Darknet's "
                     f"random init; seen = 0 (as Darknet's `partial` writes it)")
        seen = 0
    else:
        seen = 0 if clear else int(header.seen)
    return header, arrays, seen, notes


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

class BatchSource:
    """Darknet's per-iteration batch: b*S random picks (with replacement), each augmented.

    The numpy Generator is the only randomness (its state is saved in snapshots).
    """

    def __init__(self, samples: list, batch: int, subdivisions: int, width: int, height: int, *,
                 rng: np.random.Generator, record_boxes: int, loader_boxes: int, jitter: float, hue: float,
                 saturation: float, exposure: float, no_augment: bool) -> None:
        self.samples = samples
        self.batch = batch
        self.subdivisions = subdivisions
        self.width, self.height = width, height
        self.rng = rng
        self.record_boxes = record_boxes
        self.loader_boxes = min(loader_boxes, record_boxes)
        self.jitter, self.hue, self.saturation, self.exposure = jitter, hue, saturation, exposure
        self.no_augment = no_augment
        self.cache: dict[str, SourceImage] = {}   # decoded files (d2c.augment_kernel)
        self._cached_bytes = 0
        self.last_indices: np.ndarray | None = None

    def _bounded_cache(self) -> dict[str, SourceImage] | None:
        return self.cache if self._cached_bytes < IMAGE_CACHE_BYTES else None

    def next(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """S (x, truth) mini-batches: x (b, 3, h, w) RGB in [0, 1], truth (b, record_boxes*5)."""
        from d2c.augment import detection_batch

        before = len(self.cache)
        batch = detection_batch(self.samples, self.batch * self.subdivisions, self.width, self.height,
                                rng=self.rng, max_boxes=self.loader_boxes, jitter=self.jitter, hue=self.hue,
                                saturation=self.saturation, exposure=self.exposure, no_augment=self.no_augment,
                                image_cache=self._bounded_cache())
        if len(self.cache) != before:
            self._cached_bytes = sum(a.nbytes for a in self.cache.values())
        self.last_indices = batch.indices
        truth = np.zeros((batch.truth.shape[0], self.record_boxes * 5), F32)
        truth[:, :batch.truth.shape[1]] = batch.truth
        b = self.batch
        return [(np.ascontiguousarray(batch.images[s * b:(s + 1) * b]), truth[s * b:(s + 1) * b])
                for s in range(self.subdivisions)]


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    start_iteration: int
    iteration: int
    rows: list[dict[str, Any]]
    snapshot: Path | None
    final_weights: Path | None
    dropped: int
    notes: list[str] = field(default_factory=list)
    map_result: Any = None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Trainer:
    """Darknet's train_detector over a Caffe train net; `run()` trains, `step()` does one batch."""

    def __init__(self, options: TrainOptions) -> None:
        from d2c.caffe.emitter import TRAIN, ConvertOptions
        from d2c.caffe.runtime import load_caffe
        from d2c.convert import build_conversion
        from d2c.darknet.cfg import parse_cfg, read_cfg_text
        from d2c.darknet.graph import build_graph
        from d2c.darknet.weights import WeightsHeader, read_weights
        from d2c.dataset import DataSpec, load_split
        from d2c.solver import DarknetSGD, TrainConfig

        options.check()
        self.options = options
        self.notes: list[str] = []
        self.spec = DataSpec.load(options.data)
        self.notes.extend(self.spec.warnings)
        self.out = Path(options.out) if options.out is not None else (self.spec.backup or Path("backup"))
        self.stem = Path(options.cfg).stem
        source_text = read_cfg_text(options.cfg)
        state: dict[str, Any] | None = None
        run_info: dict[str, Any] = {}
        if options.resume:
            run_info = self._load_run_info()
            self._merge_resume_options(run_info)
            self.snapshot_dir = self._latest_snapshot()
            state = self._read_state(self.snapshot_dir)
        else:
            self._refuse_existing_run()
            if options.seed is None:
                options.seed = int(np.random.SeedSequence().entropy % (1 << 31))
        self.bn = options.bn or "exact"
        self.seed = int(options.seed)  # type: ignore[arg-type]
        build_graph(parse_cfg(options.cfg, source_text))   # problems are reported against the user's file
        self.overrides = self._net_overrides(source_text)
        if options.resume and self.overrides != run_info.get("overrides", {}):
            raise D2CError(f"--resume: --batch/--subdivisions/--size give [net] {self.overrides}, the run in "
                           f"{self.out} used {run_info.get('overrides', {})}")
        self.cfg_text = override_net_keys(source_text, self.overrides)
        self.cfg_path = self.out / f"{self.stem}.cfg"
        if options.resume:
            recorded = self.cfg_path.read_text(encoding="utf-8") if self.cfg_path.is_file() else None
            if recorded != self.cfg_text:
                raise D2CError(f"--resume: {options.cfg} (with the run's [net] overrides) differs from "
                               f"{self.cfg_path}, the cfg the run in {self.out} was started with")
        self.graph = build_graph(parse_cfg(self.cfg_path, self.cfg_text))
        heads = self.graph.heads()
        if not heads or any(h.kind not in ("yolo", "region") for h in heads):
            raise UnsupportedLayerError(f"{options.cfg}: training needs [yolo] or [region] heads")
        self.train_cfg = TrainConfig.from_section(self.graph.net.section)
        self.b, self.S = self.train_cfg.batch, self.train_cfg.subdivisions
        self.big_b = self.b * self.S
        self.classes = int(heads[-1].attrs["classes"])
        data_classes = self.spec.classes
        if data_classes is not None and data_classes != self.classes:
            raise DatasetError(f"{self.spec.where('classes')}: {data_classes} classes, but the cfg's last head "
                               f"({heads[-1].section.where}) has classes={self.classes}")
        self.samples, problems = load_split(self.spec, "train", classes=self.classes, skip_bad=options.skip_bad)
        self.dropped = len(problems)
        self.dropped_problems = problems
        policy_max = self.train_cfg.policy.max_batches
        self.max_batches = options.max_batches if options.max_batches is not None else policy_max

        # Weights: the snapshot's, or the pretrained file / Darknet init.
        if state is not None:
            wfile = self.snapshot_dir / f"{self.stem}.weights"
            self.header, arrays = read_weights(wfile, self.graph)
            seen = int(state["seen"])
        else:
            self.header, arrays, seen, notes = initial_weights(self.graph, options.weights, load_upto=options.load_upto,
                                                               seed=self.seed, clear=options.clear)
            self.notes.extend(notes)
        self.arrays = arrays
        if seen % self.big_b:
            self.notes.append(f"seen = {seen} is not a multiple of b*S = {self.big_b}: Darknet then updates in the "
                              f"middle of an iteration, and so does d2c (use --clear to start at 0)")
        self.base_header = WeightsHeader(0, 2, 0, seen)
        self._convert = lambda graph: build_conversion(
            graph, self.arrays, WeightsHeader(0, 2, 0, seen), ConvertOptions(flavor=graph.flavor, mode=TRAIN,
                                                                             bn=self.bn, batch=self.b),
            name=self.stem)
        self._load = lambda conv: load_caffe(conv.net, phase="train")
        self.base_graph = self.graph
        self.conversion = self._convert(self.graph)
        self.base_sidecar = dict(self.conversion.sidecar)
        self.net = self._load(self.conversion)
        self.sgd = DarknetSGD(self.net, self.conversion, self.train_cfg, seen=seen)
        self.rng = np.random.default_rng(self.seed)
        self.avg_loss = F32(-1)
        self.rows: list[dict[str, Any]] = []
        self.width, self.height = self.graph.net.width, self.graph.net.height
        if state is not None:
            self.net.copy_from(str(self.snapshot_dir / f"{self.stem}_train.caffemodel"))
            self.sgd.load_state_dict(state["sgd"])
            self.rng.bit_generator.state = state["rng"]
            self.avg_loss = F32(state["avg_loss"])
            self.rows = list(state["rows"])
            width, height = state["size"]
            if (width, height) != (self.width, self.height):
                self.resize(width, height)
        last = self.graph.nodes[-1]
        record_boxes = self.net.blobs["truth"].data.shape[1] // 5
        net_sec = self.graph.net.section
        self.random = float(last.attrs.get("random") or 0.0) != 0.0 and last.kind in ("yolo", "region")
        # Batches are rendered ahead by worker processes (d2c.loader), except with multi-scale, whose
        # size draws interleave with the batch draws on the same Generator.
        from d2c.loader import PrefetchBatchSource
        source_class = BatchSource if self.random or options.workers == 0 else PrefetchBatchSource
        self.source = source_class(
            self.samples, self.b, self.S, self.width, self.height, rng=self.rng, record_boxes=record_boxes,
            loader_boxes=int(last.attrs.get("max_boxes") or record_boxes), jitter=float(last.attrs.get("jitter", 0.2)),
            hue=net_sec.get_float("hue", 0.0), saturation=net_sec.get_float("saturation", 1.0),
            exposure=net_sec.get_float("exposure", 1.0), no_augment=options.no_augment,
            **({} if source_class is BatchSource else {"workers": options.workers}))
        self.start_iteration = self.iteration
        self.stop_requested = False
        self.last_snapshot: Path | None = self.snapshot_dir if state is not None else None
        self.last_batches: list[tuple[np.ndarray, np.ndarray]] = []
        if not options.resume:
            self._write_run_info()

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Darknet's batch number: seen / (b*S)."""
        return self.sgd.seen // self.big_b

    def _net_overrides(self, source_text: str) -> dict[str, str]:
        o = self.options
        recorded = getattr(self, "_recorded_overrides", None)
        if recorded is not None:
            return recorded
        overrides: dict[str, str] = {}
        if o.batch is not None or o.subdivisions is not None:
            from d2c.darknet.cfg import parse_cfg
            sec = parse_cfg(o.cfg, source_text).net
            subdivisions = o.subdivisions or sec.get_int("subdivisions", 1)
            mini = o.batch or max(1, sec.get_int("batch", 1) // max(1, sec.get_int("subdivisions", 1)))
            overrides.update(batch=str(mini * subdivisions), subdivisions=str(subdivisions))
        if o.size is not None:
            overrides.update(width=str(o.size[0]), height=str(o.size[1]))
        return overrides

    def _refuse_existing_run(self) -> None:
        """A run with a snapshot is never overwritten; one that died before its first snapshot may be."""
        if (self.out / LATEST).exists():
            raise D2CError(f"{self.out} already holds a training run with snapshots ({LATEST}); pass --resume to "
                           f"continue it, or choose another --out")

    def _write_run_info(self) -> None:
        o = self.options
        info = {"d2c_train_run": RUN_VERSION, "cfg_source": str(o.cfg), "cfg": self.cfg_path.name,
                "cfg_sha256": hashlib.sha256(self.cfg_text.encode()).hexdigest(), "data": str(o.data),
                "weights": str(o.weights) if o.weights else None, "load_upto": o.load_upto, "bn": self.bn,
                "no_augment": bool(o.no_augment), "seed": self.seed, "batch": self.b, "subdivisions": self.S,
                "size": [self.graph.net.width, self.graph.net.height], "overrides": self.overrides,
                "clear": bool(o.clear),
                "max_batches": self.max_batches}
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cfg_path, self.cfg_text)
            atomic_write_text(self.out / RUN_FILE, json.dumps(info, indent=1) + "\n")
        except OSError as exc:
            raise self._io_error("the run description", exc) from None

    def _load_run_info(self) -> dict[str, Any]:
        path = self.out / RUN_FILE
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise D2CError(f"--resume: {self.out} holds no training run ({RUN_FILE} is missing)") from None
        except (OSError, ValueError) as exc:
            raise D2CError(f"--resume: cannot read {path}: {exc}") from None
        if not isinstance(info, dict) or info.get("d2c_train_run") != RUN_VERSION:
            raise D2CError(f"--resume: {path} is not a d2c train run file (version {RUN_VERSION})")
        return info

    def _merge_resume_options(self, info: dict[str, Any]) -> None:
        """Options the run was started with win; an explicit different value is an error."""
        o = self.options
        conflicts = []
        for name, given, recorded in (("--bn", o.bn, info.get("bn")), ("--seed", o.seed, info.get("seed"))):
            if given is not None and given != recorded:
                conflicts.append(f"{name} {given} (the run used {recorded})")
        if o.no_augment and not info.get("no_augment"):
            conflicts.append("--no-augment (the run used augmentation)")
        if conflicts:
            raise D2CError(f"--resume: options differ from the run in {self.out}: {'; '.join(conflicts)}")
        o.bn, o.seed, o.no_augment = info.get("bn"), int(info.get("seed", 0)), bool(info.get("no_augment"))
        if o.batch is None and o.subdivisions is None and o.size is None:
            self._recorded_overrides = dict(info.get("overrides") or {})
        if o.weights is not None:
            self.notes.append(f"--resume: WEIGHTS {o.weights} ignored; continuing from the last snapshot")
        if o.max_batches is None and info.get("max_batches") is not None:
            o.max_batches = int(info["max_batches"])

    def _latest_snapshot(self) -> Path:
        path = self.out / LATEST
        try:
            latest = json.loads(path.read_text(encoding="utf-8"))
            snap = self.out / latest["dir"]
        except FileNotFoundError:
            raise D2CError(f"--resume: {self.out} has no snapshot yet ({LATEST} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise D2CError(f"--resume: cannot read {path}: {exc}") from None
        if not snap.is_dir():
            raise D2CError(f"--resume: {path} names {snap}, which does not exist")
        return snap

    # -- state (snapshot files and in-memory backup) -----------------------------------------
    def _state_meta(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "iteration": self.iteration, "seen": self.sgd.seen, "t": self.sgd.t,
                "rng": self._rng_state(), "avg_loss": float(self.avg_loss), "rows": self.rows,
                "size": [self.width, self.height], "seed": self.seed, "bn": self.bn,
                "cfg_sha256": hashlib.sha256(self.cfg_text.encode()).hexdigest()}

    def _read_state(self, snap: Path) -> dict[str, Any]:
        path = snap / STATE_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                keys = meta["u_keys"]
                buffers = {key: np.array(data[f"u{k}"]) for k, key in enumerate(keys)}
        except FileNotFoundError:
            raise D2CError(f"--resume: {path} is missing; the snapshot is incomplete") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise D2CError(f"--resume: cannot read the solver state {path}: {exc}") from None
        if meta.get("version") != STATE_VERSION:
            raise D2CError(f"--resume: {path} has state version {meta.get('version')}, expected {STATE_VERSION}")
        meta["sgd"] = {"version": meta.pop("sgd_version"), "seen": meta["seen"], "t": meta["t"], "U": buffers}
        return meta

    def _rng_state(self) -> dict[str, Any]:
        """The data Generator's state after the batches used so far (not those drawn ahead)."""
        source = getattr(self, "source", None)
        return source.rng_state() if hasattr(source, "rng_state") else self.rng.bit_generator.state

    def _capture(self) -> dict[str, Any]:
        """Everything one iteration changes, to undo a failed or interrupted iteration."""
        return {"params": {name: [np.array(b.data, copy=True) for b in blobs] for name, blobs in self.net.params.items()},
                "sgd": self.sgd.state_dict(), "rng": copy.deepcopy(self._rng_state()),
                "avg": self.avg_loss, "rows": len(self.rows)}

    def _restore(self, backup: dict[str, Any]) -> None:
        for name, blobs in backup["params"].items():
            for blob, value in zip(self.net.params[name], blobs):
                blob.data[...] = value
        self.sgd.load_state_dict(backup["sgd"])
        if hasattr(self.source, "reset"):
            self.source.reset(backup["rng"])     # drop the batches the loader drew ahead
        else:
            self.rng.bit_generator.state = backup["rng"]
        self.avg_loss = backup["avg"]
        del self.rows[backup["rows"]:]

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> Path:
        """Write snapshots/iter_NNNNNN atomically, point latest.json at it, prune old ones."""
        from d2c.caffe.proto import read_caffemodel_net
        from d2c.darknet.weights import WeightsHeader, write_weights
        from d2c.export import caffe_to_darknet

        snaps = self.out / SNAPSHOT_DIR
        name = f"iter_{self.iteration:06d}"
        final = snaps / name
        stage: Path | None = None
        try:
            snaps.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(dir=snaps, prefix=f".{name}.", suffix=".partial"))
            os.chmod(stage, 0o755)
            model = stage / f"{self.stem}_train.caffemodel"
            self.net.save(str(model))
            fsync_file(model)
            atomic_write_text(stage / f"{self.stem}.cfg", self.cfg_text)
            sidecar = dict(self.base_sidecar, caffemodel=model.name, cfg=f"{self.stem}.cfg",
                           weights_header={"major": 0, "minor": 2, "revision": 0, "seen": self.sgd.seen},
                           train={"iteration": self.iteration, "bn": self.bn})
            sidecar.pop("prototxt", None)
            atomic_write_text(stage / f"{self.stem}.json", json.dumps(sidecar, indent=1, default=_json_default) + "\n")
            exported = caffe_to_darknet(self.base_graph, read_caffemodel_net(model).layers, where=str(model))
            write_weights(stage / f"{self.stem}.weights", WeightsHeader(0, 2, 0, self.sgd.seen), self.base_graph,
                          exported.arrays)
            self._write_state(stage / STATE_FILE)
            if final.exists():   # left by an earlier run that was killed after this iteration
                trash = Path(tempfile.mkdtemp(dir=snaps, prefix=f".{name}.", suffix=".old"))
                os.replace(final, trash / name)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(stage, final)
            stage = None
            fsync_dir(snaps)
            atomic_write_text(self.out / LATEST, json.dumps({"iteration": self.iteration, "seen": self.sgd.seen,
                                                             "dir": f"{SNAPSHOT_DIR}/{name}"}) + "\n")
        except OSError as exc:
            previous = (f"the previous snapshot ({self.last_snapshot}) is intact" if self.last_snapshot
                        else "no earlier snapshot exists")
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise D2CError(f"cannot write the snapshot of iteration {self.iteration} in {snaps}: {reason}; "
                           f"{previous}; free the space and continue with --resume") from None
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        self.last_snapshot = final
        self._prune(snaps, keep=self.options.keep)
        self.write_plot()
        return final

    def _write_state(self, path: Path) -> None:
        state = self.sgd.state_dict()
        keys = sorted(state["U"])
        meta = dict(self._state_meta(), u_keys=keys, sgd_version=state["version"])
        arrays = {f"u{k}": state["U"][key] for k, key in enumerate(keys)}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta, default=_json_default)), **arrays)
        with atomic_write(path) as handle:
            handle.write(buffer.getbuffer())

    def _prune(self, snaps: Path, keep: int) -> None:
        """Keep the newest `keep` snapshots; remove leftovers of snapshots a kill interrupted."""
        complete = sorted((p for p in snaps.iterdir() if p.is_dir() and p.name.startswith("iter_")
                           and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in complete[:-keep]:
            if old != self.last_snapshot:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in snaps.iterdir():
            if leftover.name.startswith(".iter_") and leftover.name.endswith((".partial", ".old")):
                shutil.rmtree(leftover, ignore_errors=True)

    # -- logs ---------------------------------------------------------------------------------
    def _io_error(self, what: str, exc: OSError) -> D2CError:
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        last = f"the last snapshot is {self.last_snapshot}" if self.last_snapshot else "no snapshot was written yet"
        return D2CError(f"cannot write {what} in {self.out}: {reason}; {last}")

    def write_logs(self) -> None:
        """train_log.csv and train_log.json, each replaced atomically."""
        try:
            self._write_logs()
        except OSError as exc:
            raise self._io_error("the training log", exc) from None

    def _write_logs(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else repr(row[k]) if isinstance(row.get(k), float)
                                 else row.get(k)) for k in LOG_FIELDS})
        atomic_write_text(self.out / LOG_CSV, text.getvalue())
        doc = {"d2c_train_log": 1, "cfg": str(self.cfg_path), "data": str(self.options.data), "bn": self.bn,
               "batch": self.b, "subdivisions": self.S, "seed": self.seed, "no_augment": self.options.no_augment,
               "max_batches": self.max_batches, "dropped_samples": self.dropped, "rows": self.rows}
        atomic_write_text(self.out / LOG_JSON, json.dumps(doc, indent=1, default=_json_default) + "\n")

    def write_plot(self) -> None:
        """loss.png: the loss and Darknet's running average per iteration."""
        xs = [r["iteration"] for r in self.rows]
        try:
            self._plot(xs)
        except OSError as exc:
            raise self._io_error("the loss plot", exc) from None

    def _plot(self, xs: list[int]) -> None:
        from d2c.plots import plot_curves

        plot_curves(self.out / LOSS_PNG,
                    [("loss", xs, [r["loss"] if r["loss"] is not None else math.nan for r in self.rows], "tab:blue"),
                     ("avg loss (0.9/0.1)", xs,
                      [r["avg_loss"] if r["avg_loss"] is not None else math.nan for r in self.rows], "tab:red")],
                    title=f"d2c train {self.stem}: b={self.b} S={self.S} bn={self.bn}")

    # -- multi-scale ---------------------------------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        """Rebuild the train net at a new input size and carry every blob and the solver state over."""
        from d2c.darknet.cfg import parse_cfg
        from d2c.darknet.graph import build_graph
        from d2c.solver import DarknetSGD

        if (width, height) == (self.width, self.height):
            return
        text = override_net_keys(self.cfg_text, {"width": str(width), "height": str(height)})
        graph = build_graph(parse_cfg(self.cfg_path, text))
        conversion = self._convert(graph)
        net = self._load(conversion)
        for name, blobs in net.params.items():
            old = self.net.params[name]
            for blob, value in zip(blobs, old):
                blob.data[...] = value.data
        state = self.sgd.state_dict()
        sgd = DarknetSGD(net, conversion, self.train_cfg, seen=self.sgd.seen, t=self.sgd.t)
        sgd.load_state_dict(state)
        self.graph, self.conversion, self.net, self.sgd = graph, conversion, net, sgd
        self.width, self.height = width, height
        if hasattr(self, "source"):
            self.source.width, self.source.height = width, height

    def _maybe_resize(self) -> None:
        """pjreddie train_detector: every 10 batches, (rand()%10+10)*32, 608 in the last 200."""
        if not self.random or self.iteration % 10:
            return
        dim = (int(self.rng.integers(0, 1 << 31)) % 10 + 10) * 32
        if self.iteration + 200 > self.train_cfg.policy.max_batches:
            dim = 608
        self.resize(dim, dim)

    # -- training ----------------------------------------------------------------------------
    def _loss_stats(self) -> dict[str, float]:
        from d2c.loss import caffe_layers

        totals = {k: 0.0 for k in STAT_KEYS}
        count, no_obj, heads = 0.0, 0.0, 0
        layers = caffe_layers.loss_layers(self.net)
        for name in self.sgd.loss_blobs:
            s = layers[name].stats
            c = float(s.get("count", 0.0))
            if c > 0:
                for k in STAT_KEYS:
                    if math.isfinite(s.get(k, math.nan)):
                        totals[k] += s[k] * c
                count += c
            if math.isfinite(s.get("no_obj", math.nan)):
                no_obj += s["no_obj"]
                heads += 1
        out = {k: (totals[k] / count if count else math.nan) for k in STAT_KEYS}
        out["no_obj"] = no_obj / heads if heads else math.nan
        out["count"] = count
        return out

    def step(self) -> dict[str, Any]:
        """One Darknet iteration: load b*S images, S forward/backward passes, one update."""
        start = time.perf_counter()
        self._maybe_resize()
        batches = self.source.next()
        self.last_batches = batches
        sums = {k: 0.0 for k in (*STAT_KEYS, "no_obj", "count")}
        heads_seen = 0
        total = F32(0)
        for x, truth in batches:   # DarknetSGD.step, unrolled to collect the loss layers' statistics
            err, _ = self.sgd.train_minibatch(self.net, x, truth)
            total = F32(total + F32(err))
            stats = self._loss_stats()
            if stats["count"]:
                for k in STAT_KEYS:
                    if math.isfinite(stats[k]):
                        sums[k] += stats[k] * stats["count"]
                sums["count"] += stats["count"]
            if math.isfinite(stats["no_obj"]):
                sums["no_obj"] += stats["no_obj"]
                heads_seen += 1
        loss = F32(total / F32(len(batches) * self.b))   # train_network's return value
        if not np.isfinite(loss):
            raise NumericError(f"the loss is {float(loss)} (not finite)")
        self.avg_loss = loss if self.avg_loss < 0 else F32(F32(self.avg_loss * F32(0.9)) + F32(loss * F32(0.1)))
        count = sums["count"]
        row: dict[str, Any] = {"iteration": self.iteration, "seen": self.sgd.seen, "loss": float(loss),
                               "avg_loss": float(self.avg_loss), "rate": float(self.sgd.rate())}
        for k in STAT_KEYS:
            row[k] = _finite_or_none(sums[k] / count) if count else None
        row["no_obj"] = _finite_or_none(sums["no_obj"] / heads_seen) if heads_seen else None
        row["count"] = int(count)
        row.update(width=self.width, height=self.height, seconds=round(time.perf_counter() - start, 4))
        self.rows.append(row)
        return row

    def run(self, callback: Callable[[Trainer, dict[str, Any]], None] | None = None) -> TrainResult:
        """Train until max_batches; snapshot every K iterations, on Ctrl-C, on NaN and at the end.

        `callback(trainer, row)` runs after each completed iteration (tests use it to interrupt).
        KeyboardInterrupt: the state of the last completed iteration is snapshotted, then re-raised.
        NaN/inf: the state before the failing iteration is snapshotted, then NumericError.
        """
        o = self.options
        if self.iteration >= self.max_batches and not o.resume:
            raise D2CError(f"the weights have seen {self.sgd.seen} images = batch {self.iteration} >= max_batches "
                           f"{self.max_batches}; nothing to train (use --clear to restart the schedule at 0, or "
                           f"--max-batches)")
        bar = None
        if o.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.max_batches, initial=min(self.iteration, self.max_batches), unit="batch",
                       desc=f"train {self.stem}", dynamic_ncols=True, file=sys.stderr)
        self.write_logs()
        try:
            while self.iteration < self.max_batches:
                if self.stop_requested:
                    raise KeyboardInterrupt
                backup = self._capture()
                failing = self.iteration + 1
                try:
                    row = self.step()
                except (KeyboardInterrupt, NumericError) as exc:
                    self._restore(backup)
                    if isinstance(exc, KeyboardInterrupt):
                        self._snapshot_once()
                        raise
                    raise NumericError(f"iteration {failing}: {exc}; training stopped. {self._save_after_nan()}")
                del backup
                self.write_logs()
                self._report(bar, row)
                if self.iteration % o.snapshot_every == 0:
                    self.snapshot()
                if callback is not None:
                    callback(self, row)
            final = self._snapshot_once()
        except KeyboardInterrupt:
            saved = self._snapshot_once()
            if bar is not None:
                bar.close()
                bar = None
            print(f"d2c train: interrupted at iteration {self.iteration}; snapshot {saved} "
                  f"(continue with --resume)", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
            if hasattr(self.source, "close"):
                self.source.close()      # workers stop; a later step() starts them again
        final_weights = self.out / f"{self.stem}_final.weights"
        try:
            with atomic_write(final_weights) as handle, open(final / f"{self.stem}.weights", "rb") as src:
                shutil.copyfileobj(src, handle)
        except OSError as exc:
            raise self._io_error(final_weights.name, exc) from None
        self.write_logs()
        self.write_plot()
        result = TrainResult(out=self.out, start_iteration=self.start_iteration, iteration=self.iteration,
                             rows=self.rows, snapshot=final, final_weights=final_weights, dropped=self.dropped,
                             notes=self.notes)
        if o.evaluate_map:
            result.map_result = self.evaluate_map(progress=o.progress)
        return result

    def _save_after_nan(self) -> str:
        """Snapshot the state before the failing iteration if it is finite; say where it is."""
        finite = all(np.all(np.isfinite(b.data)) for blobs in self.net.params.values() for b in blobs)
        advice = "lower learning_rate in the cfg (or check the data) and train again"
        if finite:
            snap = self._snapshot_once()
            return (f"The state after iteration {self.iteration} is saved in {snap}; {advice} from its weights "
                    f"({snap / f'{self.stem}.weights'}) into a new --out, or --resume to retry as is")
        if self.last_snapshot is None:
            return (f"The weights were already non-finite after iteration {self.iteration} and there is no earlier "
                    f"snapshot; {advice}")
        return (f"The weights were already non-finite after iteration {self.iteration}, so no snapshot was written; "
                f"the last good snapshot is {self.last_snapshot}; {advice} from "
                f"{self.last_snapshot / f'{self.stem}.weights'}")

    def _snapshot_once(self) -> Path:
        """Snapshot unless the newest snapshot already holds this very iteration."""
        if self.last_snapshot is not None and self.last_snapshot.name == f"iter_{self.iteration:06d}" \
                and self.last_snapshot.is_dir():
            return self.last_snapshot
        return self.snapshot()

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        def fmt(value: Any, spec: str) -> str:
            return "nan" if value is None else format(value, spec)

        if bar is not None:
            bar.update(max(0, min(row["iteration"], self.max_batches) - bar.n))
            bar.set_postfix_str(f"loss {row['loss']:.3f} avg {row['avg_loss']:.3f} IoU {fmt(row['avg_iou'], '.3f')} "
                                f"R {fmt(row['recall50'], '.3f')} lr {row['rate']:.3g}")
        elif self.options.verbose:   # Darknet's line, plus the loss layers' averages
            print(f"{row['iteration']}: {row['loss']:f}, {row['avg_loss']:f} avg, {row['rate']:f} rate, "
                  f"{row['seconds']:f} seconds, {row['iteration'] * self.big_b} images; Avg IOU "
                  f"{fmt(row['avg_iou'], 'f')}, .5R {fmt(row['recall50'], 'f')}", flush=True)

    def evaluate_map(self, split: str = "valid", progress: bool = False) -> Any:
        """mAP@0.5 of the current weights (inference BN) on the .data file's valid list."""
        from d2c.dataset import load_split
        from d2c.metrics import CaffeDetector, map_on_samples
        from d2c.parity import caffe_arrays

        samples, _problems = load_split(self.spec, split, classes=self.classes, skip_bad=True)
        detector = CaffeDetector.from_arrays(self.base_graph, caffe_arrays(self.net, self.conversion))
        names = None
        with contextlib.suppress(D2CError):
            names = self.spec.names(self.classes)
        return map_on_samples(lambda p: detector.detect(p), samples, self.classes, names, progress=progress)


def train(options: TrainOptions, callback: Callable[[Trainer, dict[str, Any]], None] | None = None) -> TrainResult:
    """Build a Trainer and run it (see Trainer.run)."""
    return Trainer(options).run(callback)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def gpu_error(gpus: int) -> None:
    """`--gpus N`: refuse clearly. This Caffe is built CPU_ONLY; the multi-GPU design (README,
    "Several GPUs") is written down but not implemented, because it cannot be tested here."""
    if gpus < 0:
        raise D2CError(f"--gpus must be >= 1, got {gpus}")
    raise D2CError(f"--gpus {gpus}: this Caffe build is CPU-only (tools/build_caffe.sh builds CPU_ONLY), so it has no "
                   f"GPU or NCCL support; train on the CPU (omit --gpus). The README's \"Several GPUs\" section "
                   f"describes how Darknet's -gpus splits the batch.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="Darknet .data file (classes, train, valid, names, backup)")
    p.add_argument("cfg", nargs="?", help="Darknet .cfg with [yolo] or [region] heads")
    p.add_argument("weights", nargs="?", help="pretrained .weights (all layers, or the first L with --load-upto)")
    p.add_argument("--max-batches", type=int, help="stop at this batch number (default: the cfg's max_batches)")
    p.add_argument("--snapshot-every", type=int, default=100, help="snapshot every K iterations (default 100)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a run from its last snapshot: `--resume RUN_DIR` alone, or DATA CFG --resume --out DIR")
    p.add_argument("--gpus", type=int, default=0, metavar="N",
                   help="train on N GPUs (needs a CUDA build of Caffe; this build is CPU-only)")
    p.add_argument("--out", help="output directory (default: the .data file's backup directory)")
    p.add_argument("--load-upto", type=int, metavar="L",
                   help="load only layers 0..L-1 from WEIGHTS (Darknet's partial backbone, e.g. 15 for yolov3-tiny); "
                        "seen starts at 0")
    p.add_argument("--bn", choices=["exact", "stock"], help="BatchNorm: exact Darknet (Python layer, default) or "
                                                           "stock Caffe BatchNorm (faster, approximate)")
    p.add_argument("--no-augment", action="store_true", help="no jitter/HSV/flip: deterministic batches")
    p.add_argument("--skip-bad", action="store_true", help="drop bad samples (counted) instead of stopping")
    p.add_argument("--seed", type=int, help="seed of sample picks, augmentation and fresh layers (default: random, "
                                            "recorded in run.json)")
    p.add_argument("--batch", type=int, help="mini-batch b (Darknet's batch/subdivisions)")
    p.add_argument("--subdivisions", type=int, help="mini-batches per update S")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="network input size")
    p.add_argument("--clear", action="store_true", help="start the schedule at seen = 0 (Darknet's -clear)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, help=f"snapshots kept (default {DEFAULT_KEEP})")
    p.add_argument("--map", action="store_true", help="report mAP@0.5 on the .data file's valid list at the end")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes that prepare the next batches "
                                                          "(default 2; 0: load between steps, in this process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-iteration lines")


def resume_arguments(args: argparse.Namespace) -> None:
    """`--resume RUN_DIR`: the run directory is --out, and DATA and CFG come from its run.json
    (the cfg the run recorded, with its [net] overrides already applied)."""
    if args.resume is True or args.resume is False:
        return
    run_dir = Path(args.resume)
    if args.out and Path(args.out) != run_dir:
        raise D2CError(f"--resume {run_dir} and --out {args.out} name different runs")
    args.out = str(run_dir)
    path = run_dir / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        recorded_data, recorded_cfg = info["data"], info["cfg"]
    except FileNotFoundError:
        raise D2CError(f"--resume {run_dir}: no {RUN_FILE} here; is this a `d2c train` output directory?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise D2CError(f"--resume {run_dir}: cannot read {path}: {exc}") from None
    if args.data is None:
        data = Path(recorded_data)
        if not data.is_file():
            raise D2CError(f"--resume {run_dir}: the run's .data file {data} is not found from here; pass DATA CFG "
                           f"--resume --out {run_dir}")
        args.data = str(data)
    if args.cfg is None:
        args.cfg = str(run_dir / recorded_cfg)
    args.resume = True


def run(args: argparse.Namespace) -> int:
    if args.gpus:
        gpu_error(args.gpus)
    resume_arguments(args)
    if args.data is None or args.cfg is None:
        raise D2CError("DATA and CFG are required (or `--resume RUN_DIR` to continue a run)")
    options = TrainOptions(
        data=Path(args.data), cfg=Path(args.cfg), weights=Path(args.weights) if args.weights else None,
        out=Path(args.out) if args.out else None, max_batches=args.max_batches, snapshot_every=args.snapshot_every,
        resume=bool(args.resume), load_upto=args.load_upto, bn=args.bn, no_augment=args.no_augment,
        skip_bad=args.skip_bad, seed=args.seed, batch=args.batch, subdivisions=args.subdivisions,
        size=tuple(args.size) if args.size else None, clear=args.clear, keep=args.keep,
        progress=not args.quiet and sys.stderr.isatty(), verbose=not args.quiet, evaluate_map=args.map,
        workers=args.workers)
    trainer = Trainer(options)
    for note in trainer.notes:
        print(f"note: {note}", file=sys.stderr)
    if trainer.dropped:
        print(f"warning: --skip-bad: dropped {trainer.dropped} bad sample(s), e.g.:", file=sys.stderr)
        for problem in trainer.dropped_problems[:5]:
            print(f"  {problem}", file=sys.stderr)
    if options.verbose:
        print(f"d2c train: {options.cfg} on {options.data}: {len(trainer.samples)} images, b={trainer.b} S={trainer.S} "
              f"bn={trainer.bn} seed={trainer.seed}, batches {trainer.iteration} -> {trainer.max_batches}, "
              f"out {trainer.out}", file=sys.stderr)
    previous = None
    with contextlib.suppress(ValueError):   # not the main thread: no handler, Ctrl-C raises at once

        def on_sigint(signum: int, frame: Any) -> None:
            if trainer.stop_requested:
                raise KeyboardInterrupt
            trainer.stop_requested = True
            print("\nd2c train: Ctrl-C: stopping after this iteration and snapshotting (Ctrl-C again: at once)",
                  file=sys.stderr)

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = trainer.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    last = result.rows[-1] if result.rows else None
    print(f"d2c train: done at iteration {result.iteration}"
          + (f", loss {last['loss']:.4f}, avg {last['avg_loss']:.4f}" if last else ""))
    print(f"  snapshot          : {result.snapshot}")
    print(f"  Darknet weights   : {result.final_weights}")
    print(f"  log               : {result.out / LOG_CSV}, {result.out / LOG_JSON}, {result.out / LOSS_PNG}")
    if result.dropped:
        print(f"  dropped samples   : {result.dropped} (--skip-bad)")
    if result.map_result is not None:
        print(f"  {result.map_result.summary()}")
    return 0
