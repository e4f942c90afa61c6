"""d2c.tolerances: the derived bounds follow their definitions, on functions whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from d2c.tolerances import (CEILINGS, EPS32, SAFETY, delta_check, derived_bound, formula_check, head_sensitivity,
                            loss_bound, ulp)


def _toy_delta(z: np.ndarray) -> np.ndarray:
    """A head-like delta, 2 anchors x 3 entries: entry 0 couples to entry 1 of the same anchor and cell."""
    z5 = z.reshape(z.shape[0], 2, 3, *z.shape[2:]).astype(np.float64)
    out = np.empty_like(z5)
    out[:, :, 0] = np.exp(z5[:, :, 0]) * z5[:, :, 1]
    out[:, :, 1] = -3.0 * z5[:, :, 1]
    out[:, :, 2] = np.tanh(z5[:, :, 2])
    return out.reshape(z.shape).astype(np.float32)


def test_head_sensitivity_is_the_jacobian_times_the_input_difference() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, (2, 6, 4, 5)).astype(np.float32)
    dz = rng.uniform(-1e-5, 1e-5, z.shape)
    sens = head_sensitivity(_toy_delta, z, dz, entries=3)
    z5, d5 = z.reshape(2, 2, 3, 4, 5).astype(np.float64), dz.reshape(2, 2, 3, 4, 5)
    expected = np.empty_like(z5)
    expected[:, :, 0] = np.exp(z5[:, :, 0]) * (np.abs(z5[:, :, 1] * d5[:, :, 0]) + np.abs(d5[:, :, 1]))
    expected[:, :, 1] = 3.0 * np.abs(d5[:, :, 1])
    expected[:, :, 2] = (1 - np.tanh(z5[:, :, 2]) ** 2) * np.abs(d5[:, :, 2])
    assert_allclose(sens.bound.reshape(expected.shape), expected, rtol=5e-3, atol=1e-12)
    # the signed prediction is the first-order change of the delta
    direct = _toy_delta((z + dz).astype(np.float32)).astype(np.float64) - _toy_delta(z)
    assert_allclose(sens.predicted, _toy_delta(z.astype(np.float64) + dz) - _toy_delta(z).astype(np.float64),
                    rtol=0, atol=2e-6)
    assert np.max(np.abs(direct)) > 0


def test_a_jump_inside_the_step_is_not_a_slope() -> None:
    """A threshold crossed on one side of the finite difference (ignore_thresh) gives no sensitivity."""
    z = np.full((1, 3, 1, 1), 0.5, np.float32)
    z[0, 0] = 0.7 + 2e-4                                   # just above a threshold at 0.7
    step = lambda x: np.where(x > 0.7, 1.0, 0.0).astype(np.float32)  # noqa: E731
    sens = head_sensitivity(step, z, np.full(z.shape, 1e-6), entries=3)
    assert_allclose(sens.bound, 0.0, atol=0)
    # negative control: a smooth slope of the same size is seen
    sens = head_sensitivity(lambda x: (1000.0 * x).astype(np.float32), z, np.full(z.shape, 1e-6), entries=3)
    assert_allclose(sens.bound, 1e-3, rtol=1e-2)


def test_derived_bound_is_capped_but_keeps_its_floor() -> None:
    assert derived_bound(1e-6, 3.0, 1.0, 0.0) == pytest.approx(SAFETY * 3e-6)
    assert derived_bound(1.0, 1.0, 1e-3, 1e-9) == pytest.approx(1e-3 + 1e-9)


def test_delta_check_bound_and_failure() -> None:
    theirs = np.array([[1.0, -2.0, 0.5]], np.float32)
    ours = theirs + np.array([[1e-6, 0, 0]], np.float32)
    direct = np.array([[1e-6, 0, 0]])
    check = delta_check("d", theirs, ours, None, direct)
    assert check.ok and check.bound == pytest.approx(2e-6 + 2 * float(ulp(2.0)))
    assert_allclose(check.value, 1e-6, rtol=0.1)
    wrong = delta_check("d", theirs, -theirs, None, direct)          # a flipped sign: far above the ceiling
    assert not wrong.ok and wrong.bound <= CEILINGS["delta_max_abs"] + 1e-6


def test_formula_check_counts_ulps() -> None:
    theirs = np.array([1.0, 3.0, -0.25, 0.0], np.float32)
    ours = theirs.copy()
    assert formula_check("f", theirs, ours).value == 0
    ours[1] = np.nextafter(ours[1], np.float32(4))
    assert formula_check("f", theirs, ours).value == pytest.approx(1.0) and formula_check("f", theirs, ours).ok
    ours[2] = np.float32(-0.25000003)                                # an ulp of 1 off a small term: rounding
    assert formula_check("f", theirs, ours).value == pytest.approx(1.0)    # still element 1: 1/4 ulp of 1 here
    assert formula_check("f", theirs, ours).ok
    ours[2] = np.float32(-0.2500006)                                 # 5 ulps of 1 off: a formula error
    check = formula_check("f", theirs, ours)
    assert not check.ok and check.value == pytest.approx(5.0, rel=0.05) and check.detail["worst"]["index"] == [2]


def test_loss_bound_from_the_delta_differences() -> None:
    d = np.array([3.0, -4.0], np.float32)
    dd = np.array([1e-6, 0.0], np.float32)
    loss = float(np.sum(d.astype(np.float64) ** 2))
    step = float((d + dd)[0]) - 3.0                                  # the float32 difference really made
    expected = SAFETY * (2 * 3.0 * step + step * step) / loss + 8 * EPS32
    assert loss_bound(loss, [(d, d + dd)]) == pytest.approx(expected, rel=1e-3)
    assert loss_bound(loss, [(d, -d)]) == pytest.approx(CEILINGS["loss_rel"] + 8 * EPS32)


def test_delta_check_uses_the_jacobian_and_evaluates_only_flipped_decisions() -> None:
    theirs = np.array([[1.0, 0.0, 0.5]], np.float32)
    ours = np.array([[1.0 - 2e-6, 0.0, 0.5]], np.float32)
    z = np.zeros((1, 3, 1, 1), np.float32)
    sens = head_sensitivity(lambda x: (x * 1.5).astype(np.float32), z, np.full(z.shape, 1e-6), entries=3)
    smooth = delta_check("d", theirs, ours, sens, np.array([[2e-6, 0, 0]]))
    assert smooth.detail["threshold_flips"] == 0
    assert_allclose(smooth.detail["amplified"], 1.5e-6, rtol=1e-2)
    assert smooth.ok and smooth.bound == pytest.approx(SAFETY * 1.5e-6 + 2 * float(ulp(1.0)), rel=1e-2)
    # a decision flipped by the input difference: its evaluated jump is the amplification ...
    jumped = np.array([[1.0 - 1e-4, 0.0, 0.5]], np.float32)
    flip = delta_check("d", theirs, jumped, sens, np.array([[1e-4, 0, 0]]))
    assert flip.ok and flip.detail["threshold_flips"] == 1
    # ... but never beyond the ceiling
    far = delta_check("d", theirs, theirs - np.float32(0.3), sens, np.array([[0.3, 0, 0]]))
    assert not far.ok and far.bound <= CEILINGS["delta_max_abs"] + 1e-6
