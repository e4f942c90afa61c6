"""Darknet's exact SGD update, driven from Python over a pycaffe Net.

Why not Caffe's SGDSolver: Caffe keeps its momentum history *after* multiplying by the learning
rate, Darknet keeps it *before*, Caffe has no burn-in, and
pycaffe cannot reach the solver history to fix either. So the update is done here, literally as
pjreddie's update_convolutional_layer does it, on the blobs of a Caffe net whose
forward/backward computes the gradients:

- per mini-batch (train_network_datum): seen += b; forward; backward; the parameter diffs are
  turned into Darknet's summed negative gradients G = -b*diff and added into the Darknet-style
  buffers U (reading and clearing the diffs after every pass also avoids Caffe's Scale N = 1
  gamma bug); the update fires when (seen/b) % S == 0;
- update: eta = get_current_rate (k = seen/(b*S) after the increment), then for every learnable
  blob, with rho = lr_mult and B = b*S, in float32 exactly as the C code rounds:
  weights: U += (-lambda*B)*W;  W += (eta*rho/B)*U;  U *= mu
  biases, Scale gamma/beta (decay_mult 0): W += (eta*rho/B)*U;  U *= mu.

Which blob is what comes from the train prototxt (d2c.train_files writes it): layer type plus
ParamSpec. Convolution/Deconvolution/InnerProduct blob 0 are weights (decayed when decay_mult
> 0), blob 1 biases; Scale blob 0 gamma, blob 1 beta; lr_mult 0 blobs (BN statistics, the fixed
upsample/reorg helper weights) are never touched, exactly as Darknet never updates them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from d2c.darknet.cfg import Section
from d2c.errors import CfgError, ParamError

F32 = np.float32
F64 = np.float64

POLICIES = ("constant", "step", "steps", "exp", "poly", "sigmoid", "random")
LEARNABLE_TYPES = {"Convolution": ("weights", "biases"), "Deconvolution": ("weights", "biases"),
                   "InnerProduct": ("weights", "biases"), "Scale": ("scales", "biases")}
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Learning-rate policy (network.c: get_current_rate)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LrPolicy:
    """The [net] keys get_current_rate reads (defaults as parse_net_options sets them)."""

    learning_rate: float = 0.001
    policy: str = "constant"
    burn_in: int = 0
    power: float = 4.0
    step: int = 1
    scale: float = 1.0
    steps: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    gamma: float = 1.0
    max_batches: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ParamError(f"learning-rate policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "steps" and (not self.steps or len(self.scales) < len(self.steps)):
            raise ParamError("policy 'steps' needs steps and at least as many scales "
                             f"(got {len(self.steps)} steps, {len(self.scales)} scales)")
        if self.policy == "step" and self.step == 0:
            raise ParamError("policy 'step' with step=0 divides by zero in Darknet")
        if self.burn_in < 0:
            raise ParamError(f"burn_in must be >= 0, got {self.burn_in}")

    @classmethod
    def from_section(cls, sec: Section) -> "LrPolicy":
        """Read [net] like pjreddie's parse_net_options (unknown policy -> constant, as Darknet)."""
        name = sec.get_str("policy", "constant")
        policy = name if name in POLICIES else "constant"
        kw: dict[str, Any] = {"learning_rate": sec.get_float("learning_rate", 0.001), "policy": policy,
                              "burn_in": sec.get_int("burn_in", 0), "power": sec.get_float("power", 4.0),
                              "max_batches": sec.get_int("max_batches", 0)}
        if policy == "step":
            kw.update(step=sec.get_int("step", 1), scale=sec.get_float("scale", 1.0))
            if kw["step"] == 0:
                raise CfgError(f"{sec.where_key('step')}: step=0 makes Darknet divide by zero")
        elif policy == "steps":
            if not sec.has("steps") or not sec.has("scales"):
                raise CfgError(f"{sec.where_key('steps')}: policy=steps needs both steps and scales "
                               f"(Darknet: 'STEPS policy must have steps and scales in cfg file')")
            steps = sec.get_int_list("steps", required=True)
            scales = sec.get_float_list("scales", required=True)
            if len(scales) < len(steps):
                raise CfgError(f"{sec.where_key('scales')}: {len(steps)} steps but only {len(scales)} scales "
                               f"(Darknet reads one scale per step and would read past the list)")
            kw.update(steps=tuple(steps), scales=tuple(scales[: len(steps)]))
        elif policy in ("exp", "sigmoid"):
            kw["gamma"] = sec.get_float("gamma", 1.0)
            if policy == "sigmoid":
                kw["step"] = sec.get_int("step", 1)
        return cls(**kw)


def darknet_rate(policy: LrPolicy, k: int, uniform: float | None = None) -> np.float32:
    """get_current_rate for batch number k = seen/(b*S) (after the increment), float-faithful.

    C types matter: the burn-in and poly ratios are float; pow/exp run in double and the
    product with the float learning rate is rounded to float; `steps` multiplies in float;
    sigmoid computes `batch_num - step` in size_t, so for k < step it wraps around to ~1.8e19
    and the rate becomes 0 (gamma > 0), which this reproduces. `random` needs the uniform
    draw (Darknet's rand() cannot be reproduced) and raises without it.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ParamError(f"darknet_rate: batch number must be a non-negative integer, got {k!r}")
    k = int(k)
    lr = F32(policy.learning_rate)
    power = F64(F32(policy.power))
    if k < policy.burn_in:
        ratio = F32(F32(k) / F32(policy.burn_in))
        return F32(F64(lr) * math.pow(F64(ratio), power))
    name = policy.policy
    if name == "constant":
        return lr
    if name == "step":
        exponent = k // policy.step if policy.step > 0 else (k % (1 << 64)) // (policy.step % (1 << 64))
        return F32(F64(lr) * _pow(F64(F32(policy.scale)), F64(exponent)))
    if name == "steps":
        rate = lr
        for step, scale in zip(policy.steps, policy.scales):
            if (step % (1 << 64)) > k:  # int compared with size_t: negative steps never pass
                return rate
            rate = F32(rate * F32(scale))
        return rate
    if name == "exp":
        return F32(F64(lr) * _pow(F64(F32(policy.gamma)), F64(k)))
    if name == "poly":
        with np.errstate(divide="ignore", invalid="ignore"):
            base = F32(F32(1) - F32(F32(k) / F32(policy.max_batches)))
        return F32(F64(lr) * _pow(F64(base), power))
    if name == "sigmoid":
        wrapped = (k - policy.step) % (1 << 64)             # size_t arithmetic
        with np.errstate(over="ignore", invalid="ignore"):
            g = F32(F32(policy.gamma) * F32(wrapped))       # size_t -> float, float product
            e = np.exp(F64(g))
            return F32(F64(lr) * (1.0 / (1.0 + e)))
    if name == "random":
        if uniform is None:
            raise ParamError("policy 'random' draws rand() in Darknet; pass the uniform value explicitly")
        return F32(F64(lr) * _pow(F64(F32(uniform)), power))
    raise ParamError(f"unknown policy {name!r}")  # pragma: no cover - __post_init__ checks


def _pow(base: np.float64, exponent: np.float64) -> np.float64:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return F64(np.power(base, exponent))


# --------------------------------------------------------------------------------------------
# [net] training hyper-parameters
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Darknet's training settings: b = batch/subdivisions images per pass, S passes per update."""

    batch: int                 # b, the mini-batch (net->batch after the division)
    subdivisions: int          # S
    momentum: float = 0.9
    decay: float = 0.0001
    policy: LrPolicy = field(default_factory=LrPolicy)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.subdivisions < 1:
            raise ParamError(f"batch ({self.batch}) and subdivisions ({self.subdivisions}) must be >= 1")

    @property
    def images_per_update(self) -> int:
        """B = b*S: Darknet's update_args.batch."""
        return self.batch * self.subdivisions

    @classmethod
    def from_section(cls, sec: Section, batch: int | None = None) -> "TrainConfig":
        """From [net]; `batch` overrides b (e.g. a smaller mini-batch for a parity run)."""
        total = sec.get_int("batch", 1)
        subdivisions = sec.get_int("subdivisions", 1)
        if total < 1 or subdivisions < 1:
            raise CfgError(f"{sec.where}: batch and subdivisions must be >= 1 (got {total}, {subdivisions})")
        b = total // subdivisions * sec.get_int("time_steps", 1)
        if batch is not None:
            b = batch
        if b < 1:
            raise CfgError(f"{sec.where_key('subdivisions')}: batch/subdivisions = {total}/{subdivisions} "
                           f"is 0 images per pass")
        policy = LrPolicy.from_section(sec)
        return cls(batch=b, subdivisions=subdivisions, momentum=sec.get_float("momentum", 0.9),
                   decay=sec.get_float("decay", 0.0001), policy=policy)


# --------------------------------------------------------------------------------------------
# Which Caffe blobs are learned, and how
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSlot:
    """One learnable Caffe blob and the Darknet update rule it gets."""

    layer: str
    index: int
    kind: str            # weights, biases, scales
    lr_mult: float       # Darknet's per-layer learning_rate (rho)
    decay_mult: float    # 1 for weights, 0 for biases and BN scales

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.index}"


def param_slots(spec: Any, blob_counts: dict[str, int] | None = None) -> list[ParamSlot]:
    """The blobs Darknet would update, from a CaffeNet (or prototxt path) and its ParamSpecs.

    `blob_counts` (layer -> number of blobs in the live net) catches learnable blobs the spec
    does not describe. Learnable blobs of any other layer type are an error: Darknet has no
    update rule to copy for them.
    """
    net = _load_spec(spec)
    slots: list[ParamSlot] = []
    for layer in net.layers:
        specs = list(layer.params.get("param", []) or [])
        if blob_counts is not None:
            count = blob_counts.get(layer.name, 0)
        else:
            count = len(layer.blobs) or len(specs)
        for index in range(count):
            ps = specs[index] if index < len(specs) else {}
            lr_mult = float(ps.get("lr_mult", 1.0))
            decay_mult = float(ps.get("decay_mult", 1.0))
            if layer.type == "BatchNorm" or lr_mult == 0.0:
                continue  # BN statistics / fixed helpers: Darknet never updates them
            kinds = LEARNABLE_TYPES.get(layer.type)
            if kinds is None or index >= len(kinds):
                raise ParamError(f"Caffe layer '{layer.name}' ({layer.type}) blob {index} has lr_mult {lr_mult}, "
                                 f"but Darknet has no update rule for it; set lr_mult: 0 or remove it")
            slots.append(ParamSlot(layer.name, index, kinds[index], lr_mult, decay_mult))
    return slots


def _load_spec(spec: Any):
    from d2c.caffe.proto import CaffeNet, net_from_prototxt

    if isinstance(spec, CaffeNet):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ParamError(f"{path}: cannot read the train prototxt ({exc.strerror})") from None
        return net_from_prototxt(text, str(path))
    if hasattr(spec, "net") and hasattr(spec.net, "layers"):  # a d2c.convert.Conversion
        return spec.net
    raise ParamError(f"expected a CaffeNet, a Conversion or a prototxt path, got {type(spec).__name__}")


def loss_tops(spec: Any) -> list[str]:
    """The top blobs of d2c's loss layers, in net order."""
    from d2c.loss.emit import is_loss_layer

    net = _load_spec(spec)
    return [layer.top[0] for layer in net.layers if is_loss_layer(layer)]


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------

def darknet_update(w: np.ndarray, u: np.ndarray, rate: np.float32, slot: ParamSlot, cfg: TrainConfig) -> None:
    """update_convolutional_layer for one blob, in place, float32 as the C code rounds.

    `u` holds Darknet's accumulator (momentum history + this update's summed gradient).
    """
    big_b = cfg.images_per_update
    lr = F32(F32(rate) * F32(slot.lr_mult))             # a.learning_rate * l.learning_rate_scale
    alpha = F32(lr / F32(big_b))                        # learning_rate/batch
    if slot.decay_mult != 0.0:
        decay = F32(-F32(cfg.decay) * F32(big_b))       # -decay*batch
        if slot.decay_mult != 1.0:
            decay = F32(decay * F32(slot.decay_mult))
        u += (decay * w).astype(F32)                    # axpy_cpu(-decay*batch, W, U)
    w += (alpha * u).astype(F32)                        # axpy_cpu(lr/batch, U, W)
    u *= F32(cfg.momentum)                              # scal_cpu(momentum, U)


class DarknetSGD:
    """Darknet's training loop over a pycaffe Net (TRAIN phase, d2c train prototxt).

    Use `step(net, batches)` with S (x, truth) pairs for one Darknet iteration, or
    `train_minibatch` for train_network_datum granularity. `seen` and `t` follow Darknet;
    start from seen % (b*S) == 0 for "one step = one update".
    """

    def __init__(self, net: Any, spec: Any, cfg: TrainConfig, *, seen: int = 0, t: int = 0,
                 data_blob: str = "data", truth_blob: str = "truth") -> None:
        if seen < 0 or t < 0:
            raise ParamError(f"seen ({seen}) and t ({t}) must be >= 0")
        self.cfg = cfg
        self.seen = int(seen)
        self.t = int(t)
        self.data_blob = data_blob
        self.truth_blob = truth_blob
        counts = {name: len(blobs) for name, blobs in net.params.items()}
        self.slots = param_slots(spec, counts)
        self.loss_blobs = loss_tops(spec)
        self.U: dict[str, np.ndarray] = {}
        for slot in self.slots:
            blob = self._blob(net, slot)
            self.U[slot.key] = np.zeros(blob.data.shape, F32)
        self._batch_losses: list[float] = []

    @staticmethod
    def _blob(net: Any, slot: ParamSlot):
        try:
            return net.params[slot.layer][slot.index]
        except (KeyError, IndexError):
            raise ParamError(f"the Caffe net has no parameter blob {slot.key} described by the prototxt") from None

    def rate(self) -> np.float32:
        """The rate the next update would use if it fired now (k = seen/(b*S))."""
        return darknet_rate(self.cfg.policy, self.seen // self.cfg.images_per_update)

    def train_minibatch(self, net: Any, x: np.ndarray, truth: np.ndarray | None,
                        before_backward: Callable[[Any], None] | None = None) -> tuple[float, bool]:
        """train_network_datum: seen += b, forward, backward, accumulate; update when due.

        Returns (Darknet's err for this mini-batch = mean over heads of sum(delta^2), updated?).
        `before_backward(net)` runs between the two passes (parity takes Darknet's near-tie decisions).
        """
        from d2c.loss import caffe_layers

        b = self.cfg.batch
        self.seen += b
        self._feed(net, x, truth)
        caffe_layers.set_seen(net, self.seen)
        net.clear_param_diffs()
        net.forward()
        if before_backward is not None:
            before_backward(net)
        net.backward()
        gain = F32(-b)
        for slot in self.slots:
            diff = self._blob(net, slot).diff
            self.U[slot.key] += (gain * diff).astype(F32)      # G = -b*diff, summed like U
        net.clear_param_diffs()
        err = float(sum(float(np.asarray(net.blobs[top].data).reshape(-1)[0]) for top in self.loss_blobs)) * b
        updated = (self.seen // b) % self.cfg.subdivisions == 0
        if updated:
            self.update(net)
        return err, updated

    def step(self, net: Any, batches: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> float:
        """S mini-batches = one Darknet iteration; returns train_network's loss (sum err)/(S*b)."""
        if len(batches) != self.cfg.subdivisions:
            raise ParamError(f"step needs subdivisions = {self.cfg.subdivisions} mini-batches, got {len(batches)}")
        total = F32(0)
        for x, truth in batches:
            err, _ = self.train_minibatch(net, x, truth)
            total = F32(total + F32(err))
        return float(F32(total / F32(len(batches) * self.cfg.batch)))

    def update(self, net: Any) -> np.float32:
        """update_network: t += 1, eta = get_current_rate, then every learnable blob."""
        rate = self.rate()
        self.t += 1
        for slot in self.slots:
            blob = self._blob(net, slot)
            w = np.array(blob.data, dtype=F32, copy=True)
            darknet_update(w, self.U[slot.key], rate, slot, self.cfg)
            blob.data[...] = w
        return rate

    def _feed(self, net: Any, x: np.ndarray, truth: np.ndarray | None) -> None:
        data = net.blobs[self.data_blob]
        arr = np.asarray(x, F32)
        if arr.shape != tuple(data.data.shape):
            raise ParamError(f"input batch has shape {arr.shape}, the net's '{self.data_blob}' blob is "
                             f"{tuple(data.data.shape)}")
        data.data[...] = arr
        if truth is not None:
            tb = net.blobs[self.truth_blob]
            t_arr = np.asarray(truth, F32)
            if t_arr.size != tb.data.size or t_arr.shape[0] != tb.data.shape[0]:
                raise ParamError(f"truth has shape {t_arr.shape}, the net's '{self.truth_blob}' blob is "
                                 f"{tuple(tb.data.shape)}")
            tb.data[...] = t_arr.reshape(tb.data.shape)

    # -- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly: U buffers, seen, t."""
        return {"version": STATE_VERSION, "seen": self.seen, "t": self.t,
                "U": {key: value.copy() for key, value in self.U.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ParamError(f"solver state: expected a dict with version {STATE_VERSION}")
        buffers = state.get("U")
        if not isinstance(buffers, dict) or set(buffers) != set(self.U):
            missing = sorted(set(self.U) - set(buffers or {}))
            extra = sorted(set(buffers or {}) - set(self.U))
            raise ParamError(f"solver state: momentum buffers do not match the net "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for key, value in buffers.items():
            arr = np.asarray(value)
            if arr.shape != self.U[key].shape:
                raise ParamError(f"solver state: buffer {key} has shape {arr.shape}, the net needs {self.U[key].shape}")
        seen, t = state.get("seen"), state.get("t")
        if not isinstance(seen, (int, np.integer)) or not isinstance(t, (int, np.integer)) or seen < 0 or t < 0:
            raise ParamError(f"solver state: seen and t must be non-negative integers, got {seen!r}, {t!r}")
        self.U = {key: np.array(value, dtype=F32, copy=True) for key, value in buffers.items()}
        self.seen, self.t = int(seen), int(t)
