"""`d2c parity` against AlexeyAB's Darknet (CPU build, commit 59596d7): one training step of yolov4-tiny
(random weights, 160 px, batch 2, no burn-in so the weights move) agrees in loss, head deltas, every
learned array and the BN statistics, with the engine's CPU training emulated on the Caffe side
(d2c/alexeyab_cpu.py: BN rolling factor 0.9, BN betas without gradient, conv backward zeroing its
input's delta).

Measured floors (how: `d2c parity ... --darknet-engine alexeyab --json`, seeds 0-3):
- one step, seed 3: loss rel 0, head delta rel 4.5e-6, learned arrays 3.3e-7 abs for a largest
  change of 0.16, BN statistics rel 5.1e-7;
- ten steps (lr 1e-4, each step compared from the engine's state): until the kept deltas were
  emulated, every step after the first moved the backbone 30-95% of its change away from the
  engine: AlexeyAB's CPU forward_network never clears a route's or upsample's delta, so those
  layers pass on the sum over the whole run (d2c/alexeyab_cpu.py; it had been blamed on maxpool
  near-ties, but no argmax flipped). Now (the kept deltas resynchronised too): loss rel 5.3e-7,
  head delta rel 5.8e-6, BN statistics 1.3e-6, learned arrays 1.2e-7 (1 ulp) on the 7 steps
  without a flip and up to 3.6e-5 (change 0.018) on the 3 with one: a leaky pre-activation within
  float order of zero has the other sign in Caffe (1-3 per step, e.g. layers 18, 20 and 32 at
  step 8), its gradient is scaled by 0.1 instead of 1, and the layers below move up to 1.6% of
  their change apart in that step.

Where the one-step floors of the deep nets come from (traced; d2c/train_layers.py, tools/alexeyab_floor.py):
- every layer of the *training* forward, fed the engine's own inputs, matches it: convolutions to
  their summation order (yolov4 at 96 px: worst 4.6e-6, layer 114; yolov7-tiny: 3.3e-6, layer 42),
  maxpool (SPP included), route, shortcut and upsample bit for bit, BN bit for bit
  (tests/test_alexeyab_bn.py). No layer differs in what it computes.
- chained, those roundings grow because training-mode BN normalises by batch statistics: yolov4's
  training forward differs by 4e-7 at layer 0, 1e-5 at layer 60, 9e-5 at layer 114, 1.1e-3 at 160
  (96 px). Layer 114 is the 1x1 convolution after the SPP concat: at 96 px the 5/9/13 stride-1
  windows cover the whole 3x3 map, so three of the four concatenated blocks are spatially constant,
  its outputs sit far from their batch mean (max|x|/sigma = 16 over the 18 values a channel has,
  about 4 elsewhere) and BN divides the convolution's rounding by that small sigma.
- the engine disagrees with itself by as much: the same source built with its own AVX=1 option
  (8-wide loops, another summation order) against the shipped AVX=0 build, same protocol, one step,
  160 px, seed 3, lr 1e-4: yolov4 head delta rel 3.0e-4, BN statistics 2.7e-5, learned arrays 2.1e-4
  (change 0.021); yolov7-tiny head delta rel 4.0e-5, BN statistics 2.3e-6, learned 8.6e-6 (change
  5e-3). d2c against the engine: yolov4 4.9e-4, 3.8e-5, 2.8e-4; yolov7-tiny 6.2e-5, 2.9e-6, 8.6e-6.
  Those are float-order floors: the issue's 1e-5 targets are below what two builds of the engine
  itself agree to.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.parity import run_parity
from d2c.train_layers import training_layers
from shared_cfgs import shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
TINY4 = shared_cfg_dir() / "yolov4-tiny.cfg"
SIZE = (160, 160)
MOVING = {"burn_in": "0"}
LOSS_REL, DELTA_REL, STATS_REL = 5e-6, 1e-5, 1e-5
LEARNED_OF_CHANGE = 1e-4     # learned arrays within 1e-4 of their largest change


def learned_change(report) -> float:
    return max(row["moved"] for row in report.update["arrays"] if row["array"] in ("weights", "scales", "biases"))


@pytest.fixture(scope="module")
def one_step():
    return run_parity(TINY4, None, batch=2, steps=1, size=SIZE, seed=3, net_overrides=MOVING)


def test_engine_is_picked_automatically_and_said(one_step) -> None:
    assert one_step.engine == "alexeyab" and "route groups" in one_step.engine_reason
    assert one_step.to_json()["engine"] == "alexeyab"
    assert any("col2im_cpu_ext" in note for note in one_step.emulated_defects)


def test_one_step_of_yolov4_tiny_matches_alexeyab_darknet(one_step) -> None:
    r = one_step
    assert r.forward["max_rel"] <= 1e-5
    assert r.loss["rel"] <= LOSS_REL, r.loss
    assert r.grad["max_rel"] <= DELTA_REL, r.grad
    change = learned_change(r)
    assert change >= 1e-3, "the weights must really move"
    assert r.update["max_abs"] <= LEARNED_OF_CHANGE * change, (r.update["max_abs"], change)
    assert r.update["stats_max_rel"] <= STATS_REL
    assert r.update["seen_darknet"] == r.update["seen_caffe"] == 2


def test_mutation_without_the_cpu_emulation_fails() -> None:
    """The check can fail: without emulating the CPU build (BN betas learn, 0.99 rolling factor,
    gradients summed through routes) the learned arrays differ by far more than the tolerance."""
    r = run_parity(TINY4, None, batch=2, steps=1, size=SIZE, seed=3, net_overrides=MOVING, darknet_compat=False)
    assert r.emulated_defects == []
    assert r.update["max_abs"] > 100 * LEARNED_OF_CHANGE * learned_change(r)


def test_cli_engine_flag_and_json(tmp_path: Path) -> None:
    """Exit status 0: every check passes, the "delta formula" checks included, whose bound for this
    engine is its -Ofast heads' arithmetic (vector expf, rcpps + one Newton step; d2c.alexeyab_cpu)
    propagated through d2c's Jacobian, instead of 4 ulps of each delta (2-12 ulps measured here)."""
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "d2c.cli", "parity", str(TINY4), "--size", "96", "96", "--steps", "0",
                           "--darknet-engine", "alexeyab", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    formula = [check for check in report["checks"] if check["name"].endswith("delta formula")]
    assert len(formula) == 2 and all(check["ok"] and "rcpps" in check["engine_arithmetic"] for check in formula)
    assert "engine: AlexeyAB Darknet (asked for)" in proc.stdout
    assert report["engine"] == "alexeyab"
    refused = subprocess.run([sys.executable, "-m", "d2c.cli", "parity", str(TINY4), "--darknet-engine", "debian"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert refused.returncode != 0 and "use --darknet-engine alexeyab" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("key, factor", [("iou_normalizer", 1.01), ("scale_x_y", 1 / 1.05)])
def test_mutation_delta_formula_is_caught_against_the_ofast_engine(monkeypatch: pytest.MonkeyPatch, key: str,
                                                                   factor: float) -> None:
    """The -Ofast bound of the "delta formula" check stays tight: iou_normalizer 1% off, or yolov4-tiny's
    scale_x_y 1.05 read as 1.0, fails it by far (the unmutated run passes: test_cli_engine_flag_and_json)."""
    from d2c.layers import yolo as yolo_layer

    original = yolo_layer.Yolo.build

    def mutated(self, sec, graph):
        node = original(self, sec, graph)
        node.attrs[key] *= factor
        return node

    monkeypatch.setattr(yolo_layer.Yolo, "build", mutated)
    r = run_parity(TINY4, None, batch=2, steps=0, size=(96, 96), seed=0, engine="alexeyab")
    formula = [check for check in r.checks if check.name.endswith("delta formula")]
    assert len(formula) == 2 and "engine_arithmetic" in formula[0].detail
    assert max(check.value / check.bound for check in formula) > 10, [(c.value, c.bound) for c in formula]
    assert not r.ok


def test_one_step_of_yolov7_tiny_with_objectness_smooth() -> None:
    """yolov7-tiny's heads use objectness_smooth=1, iou_thresh=0.2, new_coords, scale_x_y=2, ciou.
    Measured (seed 3, lr 1e-4): loss rel 1.8e-7, head delta rel 6.2e-5, learned arrays 8.6e-6 for a
    change of 5e-3, BN statistics 2.9e-6. The head delta floor is the training forward's float order
    (module docstring): the head inputs differ by 2-3e-5, the loss is exact on the same input, and
    the engine's own AVX=1 build differs from the shipped one by 4.0e-5 (the largest rel is on the
    delta that reaches the logistic layer below, whose y(1-y) factor shrinks the magnitude it is
    measured against)."""
    r = run_parity(shared_cfg_dir() / "yolov7-tiny.cfg", None, batch=2, steps=1, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    assert r.loss["rel"] <= LOSS_REL, r.loss
    assert r.grad["max_rel"] <= 1.5e-4, r.grad          # measured 6.0e-5
    change = learned_change(r)
    assert change >= 1e-3
    assert r.update["max_abs"] <= 2e-3 * change, (r.update["max_abs"], change)   # measured 1.1e-3 of it
    assert r.update["stats_max_rel"] <= STATS_REL


def test_mutation_objectness_smooth_ignored_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: reading yolov7-tiny's heads without objectness_smooth puts the loss 0.5%
    and the head deltas 100% off."""
    from d2c.layers import yolo as yolo_layer

    original = yolo_layer.Yolo.build

    def without_smooth(self, sec, graph):
        node = original(self, sec, graph)
        node.attrs["objectness_smooth"] = 0
        return node

    monkeypatch.setattr(yolo_layer.Yolo, "build", without_smooth)
    r = run_parity(shared_cfg_dir() / "yolov7-tiny.cfg", None, batch=2, steps=0, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0"})
    assert r.loss["rel"] > 1e-3 and r.grad["max_rel"] > 0.5


def test_one_step_of_yolov4_at_its_measured_floor() -> None:
    """yolov4 (mish, SPP, ciou, iou_thresh, scale_x_y 1.2/1.1/1.05) at 96 px, seed 3, lr 1e-4. Measured:
    loss rel 7.5e-6, head delta rel 5.9e-4, learned arrays 4.9e-4 (change 0.012), BN statistics rel
    1.1e-4; the engine's AVX=1 build against its shipped build on the same step: loss 2.4e-6, 3.5e-4,
    2.8e-4, 6.8e-5. A float-order floor, traced in the module docstring (the drift after the SPP block
    is BN's batch statistics dividing layer 114's rounding by a small sigma, not the SPP). At 96 px the
    head inputs differ by ~1e-3, so the loss is a float-order lottery too: 5.8e-7 before BN's double
    division was matched, 7.5e-6 after, with no layer moving by more than its rounding; at 160 px
    (the README's case) it is 2.8e-6."""
    r = run_parity(shared_cfg_dir() / "yolov4.cfg", None, batch=2, steps=1, size=(96, 96), seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    assert r.forward["max_rel"] <= 1e-5
    assert r.loss["rel"] <= 3e-5, r.loss                # measured 7.5e-6 (see above)
    assert r.grad["max_rel"] <= 1.5e-3, r.grad
    assert learned_change(r) >= 1e-3
    assert r.update["stats_max_rel"] <= 3e-4


def check_training_layers(rows, conv_rel: float) -> None:
    """Convolutions within their summation order, every other layer bit for bit."""
    conv = [r for r in rows if r.kind == "convolutional"]
    others = [r for r in rows if r.kind != "convolutional"]
    worst = max(conv, key=lambda r: r.max_rel)
    assert worst.max_rel <= conv_rel, (worst.index, worst.max_rel)
    assert [(r.index, r.kind, r.max_abs) for r in others if r.max_abs != 0] == []


def test_yolov4_training_forward_layer_by_layer() -> None:
    """yolov4 at 96 px (SPP windows covering the whole 3x3 map, mish, shortcuts): fed the engine's
    inputs, every layer of the training forward matches. Measured: convolutions 4.6e-6 (layer 114),
    maxpool/route/shortcut/upsample exact."""
    rows = training_layers(shared_cfg_dir() / "yolov4.cfg", size=(96, 96), seed=3)
    kinds = {r.kind for r in rows}
    assert {"maxpool", "route", "shortcut", "upsample"} <= kinds and len(rows) > 140
    check_training_layers(rows, 1e-5)


def test_yolov7_tiny_training_forward_layer_by_layer() -> None:
    """Measured: convolutions 3.3e-6 (layer 42, after the SPP concat), maxpool/route/upsample exact."""
    rows = training_layers(shared_cfg_dir() / "yolov7-tiny.cfg", size=SIZE, seed=3)
    assert {"maxpool", "route", "upsample"} <= {r.kind for r in rows}
    check_training_layers(rows, 1e-5)


def test_mutation_training_forward_with_pjreddie_bn_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer-by-layer check can fail: normalising with pjreddie's sqrt(var) + 1e-6 instead of the
    engine's sqrt(var + 1e-5) puts BN layers far past the convolution tolerance."""
    from d2c.loss import caffe_layers

    original = caffe_layers.bn_train_forward

    def pjreddie_bn(x, mean, variance, flavor, *args, **kwargs):
        return original(x, mean, variance, "pjreddie", *args, **kwargs)

    monkeypatch.setattr(caffe_layers, "bn_train_forward", pjreddie_bn)
    rows = training_layers(shared_cfg_dir() / "yolov7-tiny.cfg", size=SIZE, seed=3)
    assert max(r.max_rel for r in rows if r.kind == "convolutional") > 1e-4


def test_ten_steps_of_yolov4_tiny_with_kept_route_deltas() -> None:
    """Ten steps, each compared from the engine's state. Bounds: the issue's targets for the loss,
    head deltas and BN statistics; the learned arrays at the measured leaky-flip floor (3.6e-5 for a
    change of 0.018, 2e-3 of it; 1 ulp on flip-free steps, see the module docstring). Parity itself
    passes: the flips are found (d2c.activation_flips) and only the arrays they reach take their
    measured effect into their bounds."""
    r = run_parity(TINY4, None, batch=2, steps=10, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    assert any("never cleared" in note for note in r.emulated_defects)
    assert r.loss["rel"] <= LOSS_REL, r.loss["rel"]
    assert r.grad["max_rel"] <= DELTA_REL, r.grad["max_rel"]
    assert r.update["stats_max_rel"] <= STATS_REL
    change = learned_change(r)
    assert change >= 1e-3
    assert r.update["max_abs"] <= 5e-3 * change, (r.update["max_abs"], change)
    flip_free = [row["max_abs"] for row in r.update["arrays"] if row["step"] in (1, 3, 4, 6, 7, 9)
                 and "of_change" in row]
    assert max(flip_free) <= 2.4e-7      # 2 ulps of the arrays (|w| < 2): no gradient differs
    # the leaky sign flips are found, one element each, and the update/momentum checks pass with
    # their measured effect in the bounds of exactly the arrays they reach
    assert r.update["activation_flips"] == LEAKY_FLIPS, r.update["activation_flips"]
    assert r.ok, [(c.name, c.value, c.bound) for c in r.checks if not c.ok]
    reached = {(row["step"], row["layer"]) for row in r.update["arrays"] if row.get("activation_flips")}
    assert {(8, 18), (8, 20), (2, 4)} <= reached and not any(step in (1, 3, 4, 6, 7, 9) for step, _ in reached)
    assert not any(layer > 20 and layer != 32 for step, layer in reached if step == 8)   # nothing above the flips


#: seed 3, lr 1e-4, 160 px: the leaky pre-activations that take the other sign in Caffe, per step
LEAKY_FLIPS = {0: {"layer 7 (convolutional)": 1}, 2: {"layer 4 (convolutional)": 1},
               5: {"layer 1 (convolutional)": 1, "layer 5 (convolutional)": 1},
               8: {"layer 18 (convolutional)": 1, "layer 20 (convolutional)": 1, "layer 32 (convolutional)": 1}}


def test_leaky_flip_effect_is_the_measured_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flips' effect (Caffe's backward of the two gradient factors' difference at exactly the
    flipped elements) is the difference the engines show: step 8 of yolov4-tiny, where the three flips
    move layer 18's weights 1.6% of their accumulator apart. Negative control: without the flips'
    effect in the bounds the same run fails its momentum check at that step."""
    from d2c import activation_flips

    r = run_parity(TINY4, None, batch=2, steps=9, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    row = next(row for row in r.update["arrays"] if (row["step"], row["layer"], row["array"]) == (8, 18, "weights"))
    np.testing.assert_allclose(row["momentum_rel"], row["flip_effect"], rtol=0.2)     # measured 0.0159 vs 0.0174
    assert row["momentum_rel"] > 100 * (row["momentum_bound"] - 2 * row["flip_effect"])
    assert r.ok, [(c.name, c.value, c.bound) for c in r.checks if not c.ok]
    monkeypatch.setattr(activation_flips, "find_activation_flips", lambda *args: activation_flips.ActivationFlips())
    blind = run_parity(TINY4, None, batch=2, steps=9, size=SIZE, seed=3,
                       net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    momentum = next(c for c in blind.checks if c.name == "momentum")
    assert not momentum.ok and momentum.detail["where"].startswith("step 8"), (momentum.value, momentum.bound)


def test_mutation_wrong_leaky_slope_fails_despite_the_flips(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real mistake is not hidden by the flips' allowance: Caffe's leaky slope 0.11 instead of 0.1
    moves every negative element's gradient, and the momentum check fails on the first step (as the
    forward and the heads do; the update check's bound follows the momentum difference)."""
    from d2c.layers import convolutional

    original = convolutional.emit_activation

    def wrong_slope(em, node, blob, act):
        out = original(em, node, blob, act)
        for layer in em.layers:
            if layer.name == f"{node.prefix}_leaky":
                layer.params["relu_param"] = {"negative_slope": 0.11}
        return out

    monkeypatch.setattr(convolutional, "emit_activation", wrong_slope)
    r = run_parity(TINY4, None, batch=2, steps=1, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    failed = {c.name for c in r.checks if not c.ok}
    assert {"forward", "momentum"} <= failed, [(c.name, c.value, c.bound) for c in r.checks]
    momentum = next(c for c in r.checks if c.name == "momentum")
    assert momentum.value > 10 * momentum.bound, (momentum.value, momentum.bound)


def test_mutation_route_deltas_cleared_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: clearing every delta (as the GPU build and Caffe do) puts the second step's
    backbone updates 30-95% of their change away from the CPU engine's."""
    from d2c import alexeyab_cpu

    monkeypatch.setattr(alexeyab_cpu, "keep_deltas", lambda graph, conversion, consumers: [])
    r = run_parity(TINY4, None, batch=2, steps=2, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    second = [row["of_change"] for row in r.update["arrays"] if row["step"] == 1 and "of_change" in row]
    assert max(second) > 0.2


def test_yolov7_tiny_head_delta_is_at_the_engines_own_float_order_floor() -> None:
    """The floor is measured, not assumed: the same engine source built with its own AVX=1 option
    (tools/alexeyab_floor.py; built once into the d2c cache) disagrees with the shipped build on
    yolov7-tiny's one-step head deltas by 4.0e-5, and d2c's differ from the shipped build by 6.2e-5:
    d2c sits at the floor, above the issue's 1e-5 because the engine cannot agree with itself there."""
    sys.path.insert(0, str(ROOT / "tools"))
    from alexeyab_floor import engine_floor

    cfg = shared_cfg_dir() / "yolov7-tiny.cfg"
    floor = engine_floor(cfg, size=160, seed=3, lr="0.0001", steps=1)
    assert floor["head_delta_rel"] > 1e-5, floor          # the engine's builds differ beyond the target
    r = run_parity(cfg, None, batch=2, steps=1, size=SIZE, seed=3, net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    assert r.grad["max_rel"] <= 2.5 * floor["head_delta_rel"], (r.grad["max_rel"], floor)
    assert r.update["max_abs"] <= 2.5 * floor["learned_max_abs"], (r.update["max_abs"], floor)


def test_ten_steps_of_yolov7_tiny() -> None:
    """Measured (seed 3, lr 1e-4, each step from the engine's state): loss rel 5.8e-7, BN statistics
    3.5e-6 (the issue's targets), head delta rel 6.2e-5 and learned arrays 1.6e-5 for a change of
    0.02 (floors: the engine's own AVX=1 build differs by 4.0e-5 and 8.6e-6 after one step; the
    larger learned values come from steps with a leaky sign flip, e.g. layer 86 at step 4)."""
    r = run_parity(shared_cfg_dir() / "yolov7-tiny.cfg", None, batch=2, steps=10, size=SIZE, seed=3,
                   net_overrides={"burn_in": "0", "learning_rate": "0.0001"})
    assert r.loss["rel"] <= LOSS_REL, r.loss["rel"]
    assert r.update["stats_max_rel"] <= STATS_REL
    assert r.grad["max_rel"] <= 1.5e-4, r.grad["max_rel"]
    change = learned_change(r)
    assert change >= 1e-3
    assert r.update["max_abs"] <= 2e-3 * change, (r.update["max_abs"], change)
