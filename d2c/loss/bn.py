"""Darknet's batch normalisation in training, as a numpy reference and a Caffe Python layer.

Why a Python layer: Caffe's BatchNorm normalises with the *biased* batch variance and
`sqrt(var + eps)`, and back-propagates its own exact gradient. Darknet (src/batchnorm_layer.c
and src/blas.c) normalises with the *unbiased* variance and `sqrt(var) + 1e-6` (pjreddie;
AlexeyAB `sqrt(var + 1e-5)`), and back-propagates the textbook biased-variance
formula evaluated with the unbiased variance and eps = 1e-5 *inside* the sqrt, which is not the
gradient of its own forward. The Caffe layer `DarknetBatchNorm` (defined in
d2c.loss.caffe_layers so that converting never imports pycaffe) reproduces both; the stock
Scale layer that follows it carries gamma/beta, so the Caffe pair equals one Darknet BN block.

AlexeyAB (its CPU build, checked bit for bit in tests/test_alexeyab_bn.py): forward
(x - mean) / sqrt(var + 1e-5f) with the division in double, backward first term dy/(sqrt(var) + 1e-5). Its CPU build uses a 0.9/0.1 rolling factor, its GPU build 0.99/0.01;
the layer defaults to 0.99 for both flavors (param "momentum" changes it).

Float fidelity (the Debian -Ofast build):
- batch mean: sequential float sum in (image, spatial) order, times (float)(1/m). numpy's
  float32 cumsum is that exact sequential loop, so the mean is bit-exact and fast. All sums and
  per-element formulas run on cache-sized (C, k) blocks in that order (same bits, ~2x faster on a
  batch-16 416x416 layer than whole-array numpy).
- batch variance: each (x - mean) in float, squared and added in double, the accumulator rounded
  to float after every step, times (float)(1/(m-1)). Emulated exactly by a loop over the m
  positions (vectorised over channels, ~2 us per position); for m > EXACT_SUM_LIMIT a float32
  cumsum of the rounded squares is used instead, measured within 2 ulp of the exact loop
  (the float64 sum a plain numpy `var` gives differs by up to ~600 ulp for m = 173056).
- normalise: (x - mean) in float, divided in double by sqrt((double)var) + (double)1e-6f,
  rounded to float.
- rolling statistics: r = (float)(r*0.99f) + (float)(0.01f*v), once per training forward.
- backward: mean_delta and variance_delta are sequential float sums, scaled in double;
  the per-element sum is evaluated in double from the float pieces and rounded once. -Ofast
  reassociated normalize_delta_cpu: the first term multiplies by the hoisted double 1/sqrt,
  the mean term is mean_delta times the float reciprocal (float)(1/m), and the sum is
  (first + mean term) + variance term (found by testing the candidate orders against the
  library: this one is bit-exact on ~12k elements, the source order is not).
Measured against Debian's libdarknet.so (tests/test_bn.py): training forward x̂, rolling
statistics, inference forward and the backward delta are all bit-exact (for m above
EXACT_SUM_LIMIT: x̂ within 4.8e-7, delta within 1.2e-7 at m = 86528).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2c.errors import ParamError
from d2c.loss.params import dump_params
from d2c.numerics import ALEXEYAB_EPS_INSIDE, bn_denominator

F32 = np.float32
F64 = np.float64

BACKWARD_EPS = F32(1e-5)        # mean_delta/variance_delta/normalize_delta: var + .00001f
EXACT_SUM_LIMIT = 65536         # m = b*H*W up to which the variance loop is bit-exact
BLOCK_ELEMENTS = 1 << 16        # elements per (channels x spatial) block: cache-sized pieces
FLAVORS = ("pjreddie", "alexeyab")


# --------------------------------------------------------------------------------------------
# numpy reference (pure functions)
# --------------------------------------------------------------------------------------------

def _check_input(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 4:
        raise ParamError(f"{what}: expected a 4-D (batch, channels, height, width) blob, got shape {arr.shape}")
    if arr.shape[0] * arr.shape[2] * arr.shape[3] < 2:
        raise ParamError(f"{what}: batch*height*width must be >= 2 for an unbiased variance, got shape {arr.shape}")
    return np.asarray(arr, dtype=F32)


def _by_channel(x: np.ndarray) -> np.ndarray:
    """(b, C, H, W) -> (C, b*H*W) in Darknet's summation order (image outer, spatial inner)."""
    b, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(b, c, h * w).transpose(1, 0, 2).reshape(c, b * h * w))


def _block_width(x: np.ndarray) -> int:
    """Spatial positions per block: about BLOCK_ELEMENTS elements over all channels."""
    return max(1, BLOCK_ELEMENTS // max(x.shape[1], 1))


def _spatial_blocks(x: np.ndarray) -> list[tuple[int, int, int]]:
    """(image, start, stop) pieces of the H*W axis in Darknet's order (image outer, spatial inner).

    Why blocks: every formula here is per element or a per-channel running sum, so working on
    (C, ~BLOCK_ELEMENTS/C) pieces gives the same bits as whole-array numpy while the float64
    temporaries stay in cache (2.4-3x faster on a batch-16 416x416 layer).
    """
    b = x.shape[0]
    hw = int(np.prod(x.shape[2:]))
    width = _block_width(x)
    return [(n, start, min(start + width, hw)) for n in range(b) for start in range(0, hw, width)]


class _SequentialChannelSum:
    """Per-channel float32 sum added strictly left to right over successive (C, k) blocks.

    The running total is put in front of each block and the block cumulatively summed, which is
    the one sequential float loop Darknet runs (np.sum would add pairwise)."""

    def __init__(self, channels: int, width: int) -> None:
        self.total = np.zeros(channels, F32)
        self._buf = np.empty((channels, width + 1), F32)

    def add(self, block: np.ndarray) -> None:
        k = block.shape[1]
        view = self._buf[:, :k + 1]
        view[:, 0] = self.total
        view[:, 1:] = block
        np.cumsum(view, axis=1, dtype=F32, out=view)
        self.total = view[:, k].copy()


def _planes(x: np.ndarray) -> np.ndarray:
    """(b, C, H, W) as (b, C, H*W) without copying."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def batch_mean(x: np.ndarray) -> np.ndarray:
    """mean_cpu: sequential float sum times (float)(1/m); bit-exact."""
    x = _check_input(x, "batch_mean")
    planes = _planes(x)
    total = _SequentialChannelSum(x.shape[1], _block_width(x))
    for n, a, z in _spatial_blocks(x):
        total.add(planes[n, :, a:z])
    scale = F32(1.0 / (planes.shape[0] * planes.shape[2]))
    return (total.total * scale).astype(F32)


def batch_variance(x: np.ndarray, mean: np.ndarray, exact_sums: str = "auto") -> np.ndarray:
    """variance_cpu: unbiased, (x-mean) in float, squares added in double, float accumulator.

    exact_sums: "always" runs the bit-exact loop, "never" the float32-cumsum approximation
    (within 2 ulp), "auto" the loop when m <= EXACT_SUM_LIMIT.
    """
    x = _check_input(x, "batch_variance")
    if exact_sums not in ("auto", "always", "never"):
        raise ParamError(f"batch_variance: exact_sums must be auto, always or never, got {exact_sums!r}")
    planes = _planes(x)
    m = planes.shape[0] * planes.shape[2]
    mean_col = np.asarray(mean, F32)[:, None]
    if exact_sums == "always" or (exact_sums == "auto" and m <= EXACT_SUM_LIMIT):
        rows = _by_channel(x)
        diff = (rows - mean_col).astype(F32)
        squares = diff.astype(F64) * diff.astype(F64)  # exact: a float product fits a double
        acc64 = np.zeros(rows.shape[0], F64)
        acc32 = np.zeros(rows.shape[0], F32)
        by_step = np.ascontiguousarray(squares.T)
        for step in by_step:
            np.add(acc32, step, out=acc64)
            acc32[...] = acc64
        total = acc32
    else:
        running = _SequentialChannelSum(x.shape[1], _block_width(x))
        for n, a, z in _spatial_blocks(x):
            diff = (planes[n, :, a:z] - mean_col).astype(F64)
            running.add((diff * diff).astype(F32))
        total = running.total
    return (total * F32(1.0 / (m - 1))).astype(F32)


def normalize(x: np.ndarray, mean: np.ndarray, variance: np.ndarray, flavor: str) -> np.ndarray:
    """normalize_cpu: (x-mean) in float, divided in double by pjreddie's sqrt(var)+1e-6 or AlexeyAB's
    sqrt(var+1e-5f) (the float sum widened; an all-float division is 1 ulp off in ~28% of the
    elements of AlexeyAB's CPU build, measured on yolov7-tiny's 2.5M training-forward values)."""
    x = np.asarray(x, F32)
    mean_col = np.asarray(mean, F32)[:, None]
    var = np.asarray(variance, F32)[:, None]
    if flavor == "pjreddie":
        den = bn_denominator(var, flavor)
    elif flavor == "alexeyab":   # sqrt of the float sum var + 1e-5f, in double
        den = np.sqrt((var + F32(ALEXEYAB_EPS_INSIDE)).astype(F32).astype(F64))
    else:
        raise ParamError(f"normalize: flavor must be one of {FLAVORS}, got {flavor!r}")
    if x.ndim != 4:
        raise ParamError(f"normalize: expected a 4-D (batch, channels, height, width) blob, got shape {x.shape}")
    out = np.empty(x.shape, F32)
    planes, out_planes = _planes(x), _planes(out)
    for n, a, z in _spatial_blocks(x):
        centred = (planes[n, :, a:z] - mean_col).astype(F32)
        out_planes[n, :, a:z] = centred.astype(F64) / den     # (x - mean) in float, divided in double
    return out


def rolling_update(rolling: np.ndarray, batch_stat: np.ndarray, momentum: float = 0.99) -> np.ndarray:
    """scal_cpu(momentum) then axpy_cpu(1-momentum): r = (float)(r*m) + (float)((1-m)*v)."""
    keep = F32(momentum)
    add = F32(1.0 - float(momentum))  # equals 0.01f for 0.99 (and 0.1f for AlexeyAB's CPU 0.9)
    return ((np.asarray(rolling, F32) * keep).astype(F32)
            + (add * np.asarray(batch_stat, F32)).astype(F32)).astype(F32)


@dataclass
class BNTrainResult:
    """What Darknet's training forward leaves behind (x̂ is l.x_norm, before gamma/beta)."""

    x_norm: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    rolling_mean: np.ndarray
    rolling_variance: np.ndarray


def bn_train_forward(x: np.ndarray, rolling_mean: np.ndarray, rolling_variance: np.ndarray,
                     flavor: str = "pjreddie", momentum: float = 0.99,
                     exact_sums: str = "auto") -> BNTrainResult:
    """forward_batchnorm_layer with net.train = 1: batch statistics, rolling update, x̂."""
    x = _check_input(x, "bn_train_forward")
    mean = batch_mean(x)
    variance = batch_variance(x, mean, exact_sums)
    return BNTrainResult(
        x_norm=normalize(x, mean, variance, flavor), mean=mean, variance=variance,
        rolling_mean=rolling_update(rolling_mean, mean, momentum),
        rolling_variance=rolling_update(rolling_variance, variance, momentum))


def bn_infer_forward(x: np.ndarray, rolling_mean: np.ndarray, rolling_variance: np.ndarray,
                     flavor: str = "pjreddie") -> np.ndarray:
    """forward_batchnorm_layer with net.train = 0: the rolling statistics, Darknet's denominator."""
    return normalize(np.asarray(x, F32), rolling_mean, rolling_variance, flavor)


def bn_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                flavor: str = "pjreddie") -> np.ndarray:
    """The backward for x̂ only (dy = gradient w.r.t. x̂, i.e. after the gamma factor).

    With v = unbiased batch variance, e = 1e-5f, m = b*H*W, per channel:
      dmu = (sum dy) * (-1/sqrt(v+e)),  dvar = (sum dy*(x-mu)) * (-0.5*(v+e)^(-3/2)),
      dx  = dy/sqrt(v+e) + dvar*2*(x-mu)/m + dmu/m      (AlexeyAB: first term dy/(sqrt(v)+e)).
    Linear in dy, so Darknet's delta and Caffe's diff (opposite signs) both go through it.
    """
    dy = np.asarray(dy, F32)
    x = np.asarray(x, F32)
    if dy.shape != x.shape or dy.ndim != 4:
        raise ParamError(f"bn_backward: dy {dy.shape} and x {x.shape} must be equal 4-D shapes")
    b, c, h, w = x.shape
    m = b * h * w
    if flavor not in FLAVORS:
        raise ParamError(f"bn_backward: flavor must be one of {FLAVORS}, got {flavor!r}")
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean_col = np.asarray(mean, F32)[:, None]
    var_e = (np.asarray(variance, F32) + BACKWARD_EPS).astype(F32)            # float add
    root = np.sqrt(var_e.astype(F64))                                            # double sqrt
    blocks = _spatial_blocks(x)
    dy_planes, x_planes = _planes(dy), _planes(x)
    # Pass 1: the two per-channel sequential float sums, sum(dy) and sum(dy * (x - mean)).
    sum_dy = _SequentialChannelSum(x.shape[1], _block_width(x))
    sum_dy_centred = _SequentialChannelSum(x.shape[1], _block_width(x))
    for n, a, z in blocks:
        d = dy_planes[n, :, a:z]
        sum_dy.add(d)
        sum_dy_centred.add(d * (x_planes[n, :, a:z] - mean_col).astype(F32))
    mean_delta = (sum_dy.total.astype(F64) * (-1.0 / root)).astype(F32)
    pow_term = np.power(var_e.astype(F64), F64(F32(-1.5)))
    variance_delta = (sum_dy_centred.total.astype(F64) * (-0.5 * pow_term)).astype(F32)
    # Pass 2, per element in double, rounded once. pjreddie multiplies by the hoisted double
    # reciprocal; AlexeyAB divides by sqrt(v) + e.
    first_factor = (1.0 / root)[:, None] if flavor == "pjreddie" else \
        (np.sqrt(np.asarray(variance, F32).astype(F64)) + F64(BACKWARD_EPS))[:, None]
    twice_vd = variance_delta.astype(F64)[:, None] * 2.0
    # mean_delta/(spatial*batch) is a float division by a loop invariant; -Ofast turned it into a
    # multiply by the float reciprocal (measured: bit-exact only this way).
    third = (mean_delta * F32(1.0 / m)).astype(F32).astype(F64)[:, None]
    out = np.empty(x.shape, F32)
    out_planes = _planes(out)
    for n, a, z in blocks:
        d = dy_planes[n, :, a:z].astype(F64)
        first = d * first_factor if flavor == "pjreddie" else d / first_factor
        centred = (x_planes[n, :, a:z] - mean_col).astype(F32).astype(F64)
        second = twice_vd * centred / F64(m)
        # Debian's compiled order: (first + third) + second, in double, rounded once.
        out_planes[n, :, a:z] = (first + third) + second
    return out


def bn_infer_backward(dy: np.ndarray, rolling_variance: np.ndarray, flavor: str = "pjreddie") -> np.ndarray:
    """Gradient of the inference formula (statistics are constants): dy / Darknet's denominator."""
    if flavor not in FLAVORS:
        raise ParamError(f"bn_infer_backward: flavor must be one of {FLAVORS}, got {flavor!r}")
    den = bn_denominator(np.asarray(rolling_variance, F32).reshape(1, -1, 1, 1), flavor)
    return (np.asarray(dy, F32).astype(F64) / den).astype(F32)


# --------------------------------------------------------------------------------------------
# Emission (called from d2c.layers.convolutional.emit_batchnorm with --bn exact)
# --------------------------------------------------------------------------------------------

def darknet_bn_layer(em, node, blob: str, arrays: dict[str, np.ndarray], flavor: str, rho: float) -> None:
    """DarknetBatchNorm (rolling stats as lr_mult-0 blobs) + Scale (gamma, beta: lr_mult rho, no decay).

    The Python layer is named `<prefix>_dbn`, not `_bn`: its 2 blobs are raw Darknet statistics,
    while the deploy model's `_bn` BatchNorm has 3 blobs in Caffe's own convention, and loading
    one into the other must fail by name rather than silently (or by a Caffe CHECK abort).
    """
    if flavor not in FLAVORS:
        raise ParamError(f"{node.where}: unknown flavor {flavor!r}")
    name = f"{node.prefix}_dbn"
    param_str = dump_params({"name": name, "flavor": flavor})
    em.add("Python", name, [blob], [blob], [arrays["rolling_mean"], arrays["rolling_variance"]],
           python_param={"module": "d2c.loss.caffe_layers", "layer": "DarknetBatchNorm",
                         "param_str": param_str},
           param=[{"lr_mult": 0.0, "decay_mult": 0.0}] * 2)
    em.add("Scale", f"{node.prefix}_scale", [blob], [blob], [arrays["scales"], arrays["biases"]],
           scale_param={"bias_term": True},
           param=[{"lr_mult": rho, "decay_mult": 0.0}, {"lr_mult": rho, "decay_mult": 0.0}])
