"""Per-check parity bounds: what the inputs of a check already differ by, times how much the check
amplifies that difference, with a safety factor, a float32 floor, and a fixed ceiling.

Why not constants: a head delta downstream of a steep function (an exp of w/h, a rescored
objectness) differs between two correct engines by more than its inputs do, so one constant is
either too tight for that case or too loose to catch a real mistake. The bound of each check is
derived from the measured difference of its own inputs:

    bound = min(ceiling, SAFETY * input difference * sensitivity) + floor

The ceiling is what a real mistake exceeds (a flipped gradient sign, wrong anchors, Caffe's BN
eps, a transposed kernel all fail it); the floor is the float32 resolution of the compared value.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)
SAFETY = 2.0
#: Fixed ceilings (a real mistake exceeds them); also the report's `tolerances`.
CEILINGS: dict[str, float] = {
    "forward_max_rel": 2e-5,        # per layer, |a-b| / max|darknet blob|: identical inputs, float order only
    "loss_rel": 1e-4,               # per mini-batch, relative to Darknet's loss
    "delta_max_abs": 1e-3,          # head delta and what reaches the layer below, absolute
    # d2c's loss on Darknet's own head input vs Darknet's delta, in float32 ulps of max(|delta|, 1):
    # a delta term is a difference of O(1) operands (targets, logistic outputs, log ratios), so its
    # rounding is an ulp of 1, not of a small result. Measured: 0 on pjreddie logistic heads; 0.006
    # on yolov2's softmax (libmvec's vector expf in Debian's build, 3 ulps of a 0.0037 output); 1 on
    # AlexeyAB's -Ofast box terms of yolov4-tiny
    "formula_ulps": 2.0,
    "update_of_change": 5e-2,       # learned arrays after a step, relative to that step's change
    "momentum_rel": 5e-2,           # Darknet's update accumulators after a step, relative to their size
    "stats_max_rel": 1e-4,          # BN rolling statistics after a step, relative to max|value|
}
#: A learned step smaller than this many float32 ulps of the array's size is rounding: an update check
#: over it would compare nothing (it fails instead of passing vacuously).
VISIBLE_ULPS = 4.0
#: Finite-difference step of the head Jacobian (float32 head inputs are O(1-10)).
FD_STEP = 1e-3


def derived_bound(difference: float, sensitivity: float, ceiling: float, floor: float) -> float:
    """min(ceiling, SAFETY * difference * sensitivity) + floor (the floor is never capped: a value
    cannot be compared more finely than its float32 resolution)."""
    return min(ceiling, SAFETY * difference * sensitivity) + floor


def ulp(x: float | np.ndarray) -> Any:
    """float32 spacing at |x|."""
    return np.spacing(np.abs(np.asarray(x, F32))).astype(np.float64)


@dataclass
class Check:
    """One compared figure: its value, its bound, and how the bound was derived."""

    name: str
    value: float
    bound: float
    detail: dict[str, Any] = field(default_factory=dict)
    #: the value must reach the bound instead of staying below it (how far the weights moved)
    at_least: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.value >= self.bound) if self.at_least else bool(self.value <= self.bound)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": float(self.value), "bound": float(self.bound), "ok": self.ok,
                **({"at_least": True} if self.at_least else {}), **self.detail}


def worst(checks: list[Check], name: str) -> Check:
    """The check with the largest value/bound ratio, renamed (a table row for a group)."""
    seen = [c for c in checks if c.value > 0 or c.bound > 0] or checks   # 0 of 0 (nothing moved) says nothing
    pick = max(seen, key=lambda c: c.value / c.bound if c.bound > 0 else (np.inf if c.value > 0 else 0.0))
    return Check(name, pick.value, pick.bound, {**pick.detail, "where": pick.name})


# ---------------------------------------------------------------------------------------------
# Head deltas
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadSensitivity:
    """First-order effect of the head-input difference dx on d2c's delta, per element."""

    bound: np.ndarray        # sum over the anchor's inputs of |d delta/d x| * |dx|
    predicted: np.ndarray    # sum of d delta/d x * dx (signed), to compare with the measured difference
    jacobian: np.ndarray     # (b, n, entries_out, entries_in, H, W) one-sided-min slopes


def head_sensitivity(delta_of: Callable[[np.ndarray], np.ndarray], z: np.ndarray, dz: np.ndarray,
                     entries: int, step: float = FD_STEP) -> HeadSensitivity:
    """Jacobian of a head's delta with respect to its input, by finite differences on d2c's own loss
    (`delta_of`, float32 as Darknet computes it), block-diagonal per anchor and cell.

    Each input channel of an anchor (x, y, w, h, objectness, classes) is moved by +-step in every
    cell at once; a delta depends on the inputs of its own anchor and cell (through its box, IoU and
    softmax), so each evaluation gives one column of every block. The magnitude used for the bound
    is the smaller of the two one-sided slopes: a threshold crossing inside +-step (ignore_thresh,
    the best-IoU truth) is a jump on one side only, not a slope.
    """
    b, c, h, w = z.shape
    n = c // entries
    z5 = np.asarray(z, F32).reshape(b, n, entries, h, w)
    dz5 = np.asarray(dz, np.float64).reshape(b, n, entries, h, w)
    base = np.asarray(delta_of(z5.reshape(z.shape)), np.float64).reshape(b, n, entries, h, w)
    jac = np.zeros((b, n, entries, entries, h, w))
    bound = np.zeros((b, n, entries, h, w))
    predicted = np.zeros((b, n, entries, h, w))
    for k in range(entries):
        slopes = []
        for sign in (1.0, -1.0):
            moved = z5.copy()
            moved[:, :, k] = (moved[:, :, k] + F32(sign * step)).astype(F32)
            actual = (moved[:, :, k].astype(np.float64) - z5[:, :, k]) * sign   # the float32 step taken
            out = np.asarray(delta_of(moved.reshape(z.shape)), np.float64).reshape(b, n, entries, h, w)
            slopes.append((out - base) * sign / actual[:, :, None])
        central = 0.5 * (slopes[0] + slopes[1])
        magnitude = np.minimum(np.abs(slopes[0]), np.abs(slopes[1]))
        jac[:, :, :, k] = magnitude
        bound += magnitude * np.abs(dz5[:, :, k:k + 1])
        predicted += central * dz5[:, :, k:k + 1]
    return HeadSensitivity(bound.reshape(z.shape), predicted.reshape(z.shape), jac)


#: A difference of d2c's own loss between the two head inputs this many times the first-order bound
#: is a flipped discrete decision, not a slope.
JUMP_FACTOR = 10.0


def delta_check(name: str, theirs: np.ndarray, ours: np.ndarray, sens: HeadSensitivity | None,
                direct: np.ndarray | None) -> Check:
    """A head delta (or what reaches the layer below): bound from the head-input difference through
    the head's Jacobian (`sens`); where d2c's loss evaluated on both inputs (`direct`) differs by
    more than JUMP_FACTOR times that, the input difference flipped a discrete decision and the
    evaluated difference is used; floor 2 ulp of the largest delta."""
    theirs = np.asarray(theirs, np.float64)
    diff = theirs - np.asarray(ours, np.float64).reshape(theirs.shape)
    value = float(np.max(np.abs(diff))) if diff.size else 0.0
    mag = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    amp = np.zeros(theirs.shape) if sens is None else sens.bound.reshape(theirs.shape)
    flips = 0
    if direct is not None:
        # where d2c's loss on the two inputs differs by far more than its slopes allow, a discrete
        # decision (ignore_thresh, the best truth) flipped: that evaluated difference is the amplification
        jump = np.abs(direct).reshape(theirs.shape)
        flipped = jump > JUMP_FACTOR * amp + 4 * ulp(theirs)
        flips = int(np.count_nonzero(flipped))
        amp = np.where(flipped, jump, amp)
    derived = float(np.max(amp)) if amp.size else 0.0
    bound = derived_bound(derived, 1.0, CEILINGS["delta_max_abs"], 2 * float(ulp(mag)))
    detail: dict[str, Any] = {"max_abs": value, "max_rel": value / mag if mag else value, "magnitude": mag,
                              "amplified": derived, "threshold_flips": flips}
    if value and sens is not None:
        at = np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape)
        detail["worst"] = {"index": [int(i) for i in at], "measured": float(diff[at]),
                           "predicted": float(sens.predicted.reshape(diff.shape)[at]),
                           "bound_here": float(SAFETY * amp[at])}
    return Check(name, value, bound, detail)


def formula_check(name: str, darknet_delta: np.ndarray, ours_on_darknet_input: np.ndarray) -> Check:
    """d2c's loss applied to Darknet's own head input against Darknet's delta, in float32 ulps of
    max(|delta|, 1) (see CEILINGS): separates a formula error from amplification of input differences."""
    theirs = np.asarray(darknet_delta, F32)
    ours = np.asarray(ours_on_darknet_input, F32).reshape(theirs.shape)
    diff = np.abs(theirs.astype(np.float64) - ours)
    scale = ulp(np.maximum(np.abs(theirs), F32(1)))
    in_ulps = diff / scale
    ulps = float(np.max(in_ulps)) if diff.size else 0.0
    detail: dict[str, Any] = {"max_abs": float(np.max(diff)) if diff.size else 0.0}
    if ulps:
        at = np.unravel_index(int(np.argmax(in_ulps)), diff.shape)
        detail["worst"] = {"index": [int(i) for i in at], "darknet": float(theirs[at]), "d2c": float(ours[at])}
    return Check(name, ulps, CEILINGS["formula_ulps"], detail)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def loss_bound(loss: float, deltas: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Relative bound of a mini-batch loss from its heads' measured delta differences.

    Darknet's cost of a head is sum(delta^2) (the mean over heads is the mini-batch's loss), so
    |d cost| <= sum(2 |delta| |d delta| + d delta^2); floor: 8 float32 ulps of the sum.
    """
    if not deltas:
        return CEILINGS["loss_rel"]
    change = 0.0
    for theirs, ours in deltas:
        t = np.asarray(theirs, np.float64)
        d = np.abs(t - np.asarray(ours, np.float64).reshape(t.shape))
        change += float(np.sum(2 * np.abs(t) * d + d * d))
    change /= len(deltas)
    return derived_bound(change / max(abs(loss), 1e-30), 1.0, CEILINGS["loss_rel"], 8 * EPS32)
