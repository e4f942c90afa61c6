"""Darknet's update driven from Python (DarknetSGD), its learning rates, and the solver file.

Checked against: Debian's get_current_rate (bit for bit, every policy incl. burn-in), a
hand-written numpy transcription of update_convolutional_layer over 3 steps with burn-in
(bit-exact in float32, incl. exact resume from state_dict), stock Caffe's SGDSolver loaded
from the written solver file (one step from a fresh start: equal in real arithmetic), and a
real Darknet train_network step on a conv+BN+yolo net (weights within 1e-5 after one step).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

from d2c.caffe.proto import CaffeLayer, CaffeNet, parse_prototxt  # noqa: E402
from d2c.convert import convert, load_graph  # noqa: E402
from d2c.darknet.cfg import parse_cfg  # noqa: E402
from d2c.darknet.runtime import DarknetProcess  # noqa: E402
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights  # noqa: E402
from d2c.engines import import_caffe  # noqa: E402
from d2c.errors import CfgError, ParamError  # noqa: E402
from d2c.loss import caffe_layers  # noqa: E402
from d2c.solver import DarknetSGD, LrPolicy, TrainConfig, darknet_rate, param_slots  # noqa: E402
from d2c.train_files import map_solver  # noqa: E402

F32 = np.float32
caffe = import_caffe()

CONV = "\n[convolutional]\nfilters=1\nsize=1\nactivation=linear\n"
NET = "[net]\nbatch={batch}\nsubdivisions={subdivisions}\nwidth=8\nheight=8\nchannels=1\n"


# ------------------------------------------------------------------------------------------
# Learning rate: against the real get_current_rate
# ------------------------------------------------------------------------------------------

POLICIES = {
    "constant_burn_in": ("learning_rate=0.05\nburn_in=1000\n", [0, 1, 2, 7, 500, 999, 1000, 5000]),
    "steps_burn_in_power": ("learning_rate=0.001\nburn_in=10\npower=2\npolicy=steps\nsteps=20,40,40,-5\n"
                            "scales=.1,10,.5,3\n", [0, 3, 10, 19, 20, 21, 39, 40, 41, 100]),
    "step": ("learning_rate=0.1\npolicy=step\nstep=7\nscale=.3\n", [0, 1, 6, 7, 13, 14, 100]),
    "exp": ("learning_rate=0.1\npolicy=exp\ngamma=.999\n", [0, 1, 2, 1000, 12345]),
    "poly": ("learning_rate=0.1\npolicy=poly\npower=3\nmax_batches=300\nburn_in=5\n", [1, 4, 5, 6, 150, 299, 300]),
    "sigmoid": ("learning_rate=0.05\npolicy=sigmoid\ngamma=.01\nstep=100\nburn_in=10\n",
                [1, 9, 10, 11, 99, 100, 101, 150, 300]),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_darknet_rate_is_bit_exact_against_get_current_rate(tmp_path, name):
    keys, ks = POLICIES[name]
    cfg = tmp_path / "rate.cfg"
    cfg.write_text(NET.format(batch=6, subdivisions=3) + keys + CONV)
    policy = LrPolicy.from_section(parse_cfg(cfg).net)
    b, s = 2, 3
    with DarknetProcess(cfg) as dn:
        expected = []
        for k in ks:
            dn.set_seen(k * b * s)
            expected.append(dn.current_rate())
    got = [float(darknet_rate(policy, k)) for k in ks]
    assert got == expected
    if name == "sigmoid":   # size_t wrap-around: zero below `step`, as in Darknet
        assert got[ks.index(99)] == 0.0 and got[ks.index(101)] > 0


def test_policy_errors_name_the_cfg_line(tmp_path):
    with pytest.raises(CfgError, match=r"rate.cfg:\d+ \[net\] 'steps'.*needs both"):
        LrPolicy.from_section(parse_cfg("rate.cfg", NET.format(batch=1, subdivisions=1)
                                        + "policy=steps\nsteps=10\n" + CONV).net)
    with pytest.raises(CfgError, match="2 steps but only 1 scales"):
        LrPolicy.from_section(parse_cfg("rate.cfg", NET.format(batch=1, subdivisions=1)
                                        + "policy=steps\nsteps=10,20\nscales=.1\n" + CONV).net)
    with pytest.raises(ParamError, match="uniform"):
        darknet_rate(LrPolicy(policy="random"), 3)
    assert darknet_rate(LrPolicy(policy="random", learning_rate=0.5, power=2), 3, uniform=0.5) == F32(0.125)
    unknown = LrPolicy.from_section(parse_cfg("r.cfg", NET.format(batch=1, subdivisions=1) + "policy=cosine\n" + CONV).net)
    assert unknown.policy == "constant"   # Darknet: "Couldn't find policy", constant


# ------------------------------------------------------------------------------------------
# A small conv+BN+yolo train net, shared by the update tests
# ------------------------------------------------------------------------------------------

TRAIN_CFG = """[net]
batch=4
subdivisions=2
width=16
height=16
channels=3
learning_rate={lr}
momentum=0.9
decay=0.0005
{policy}
max_batches=100

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
learning_rate=0.5

[convolutional]
filters=21
size=1
stride=1
activation=linear

[yolo]
mask=0,1,2
anchors=2,3, 4,5, 6,4, 8,8, 12,10, 15,15
classes=2
num=6
ignore_thresh=.5
"""
BURN_IN = "burn_in=5\npower=4\npolicy=steps\nsteps=2\nscales=.5"


def minibatches(seed: int, count: int = 2, b: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.random((b, 3, 16, 16)).astype(F32)
        truth = np.zeros((b, 450), F32)
        for i in range(b):
            for t in range(rng.integers(1, 4)):
                truth[i, 5 * t:5 * t + 5] = [*rng.uniform(0.1, 0.9, 2), *rng.uniform(0.1, 0.6, 2), rng.integers(0, 2)]
        out.append((x, truth))
    return out


def make_train_files(tmp_path: Path, policy: str = BURN_IN, lr: float = 0.1, weights: Path | None = None) -> Path:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(TRAIN_CFG.format(lr=lr, policy=policy))
    if weights is None:
        graph = load_graph(cfg)
        weights = tmp_path / "init.weights"
        write_weights(weights, WeightsHeader(), graph, random_weights(graph, 3))
    convert(cfg, weights, tmp_path / "out", train=True)
    return cfg


def open_net(tmp_path: Path):
    out = tmp_path / "out"
    return caffe.Net(str(out / "net_train.prototxt"), str(out / "net_train.caffemodel"), caffe.TRAIN)


def all_blobs(net) -> dict[str, np.ndarray]:
    return {f"{name}/{i}": blob.data.copy() for name, blobs in net.params.items() for i, blob in enumerate(blobs)}


# (layer, blob, decays, rho) for TRAIN_CFG, written out by hand rather than derived.
HAND_PARAMS = [("layer000_conv", 0, True, 0.5), ("layer000_scale", 0, False, 0.5), ("layer000_scale", 1, False, 0.5),
               ("layer001_conv", 0, True, 1.0), ("layer001_conv", 1, False, 1.0)]


def hand_rate(k: int) -> np.float32:
    """get_current_rate for BURN_IN with learning_rate 0.1, by hand."""
    if k < 5:
        return F32(float(F32(0.1)) * float(F32(F32(k) / F32(5))) ** 4.0)
    return F32(0.1) if k < 2 else F32(F32(0.1) * F32(0.5))


def hand_training(net, steps: list[list[tuple[np.ndarray, np.ndarray]]]) -> tuple[dict, int]:
    """Darknet's train_network_datum + update_convolutional_layer, transcribed in numpy."""
    b, s, big_b = 2, 2, 4
    u = {(layer, i): np.zeros(net.params[layer][i].data.shape, F32) for layer, i, _, _ in HAND_PARAMS}
    seen = 0
    for batches in steps:
        for x, truth in batches:
            seen += b
            caffe_layers.set_seen(net, seen)
            net.blobs["data"].data[...] = x
            net.blobs["truth"].data[...] = truth
            net.clear_param_diffs()
            net.forward()
            net.backward()
            for layer, i, _, _ in HAND_PARAMS:
                u[(layer, i)] = (u[(layer, i)] + (F32(-b) * net.params[layer][i].diff).astype(F32)).astype(F32)
        assert (seen // b) % s == 0
        rate = hand_rate(seen // big_b)
        for layer, i, decays, rho in HAND_PARAMS:
            w = net.params[layer][i].data.astype(F32)
            uu = u[(layer, i)]
            lr = F32(rate * F32(rho))
            if decays:
                uu = (uu + (F32(-F32(0.0005) * F32(big_b)) * w).astype(F32)).astype(F32)
            w = (w + (F32(lr / F32(big_b)) * uu).astype(F32)).astype(F32)
            uu = (uu * F32(0.9)).astype(F32)
            net.params[layer][i].data[...] = w
            u[(layer, i)] = uu
    return u, seen


def test_darknet_sgd_equals_hand_written_update_bit_exact(tmp_path):
    cfg = make_train_files(tmp_path)
    steps = [minibatches(10 + t) for t in range(3)]
    net_a, net_b = open_net(tmp_path), open_net(tmp_path)
    sgd = DarknetSGD(net_a, tmp_path / "out" / "net_train.prototxt", TrainConfig.from_section(parse_cfg(cfg).net))
    assert [(sl.layer, sl.index, sl.decay_mult > 0, sl.lr_mult) for sl in sgd.slots] == \
        [(layer, i, d, rho) for layer, i, d, rho in HAND_PARAMS]
    before = all_blobs(net_a)
    losses = [sgd.step(net_a, batches) for batches in steps]
    u_hand, seen = hand_training(net_b, steps)
    assert (sgd.seen, sgd.t) == (seen, 3)
    after_a, after_b = all_blobs(net_a), all_blobs(net_b)
    for key in after_a:
        np.testing.assert_array_equal(after_a[key], after_b[key], err_msg=key)
        if not key.startswith("layer000_dbn"):
            assert not np.array_equal(after_a[key], before[key]), key   # every learnable blob moved
    for (layer, i), value in u_hand.items():
        np.testing.assert_array_equal(sgd.U[f"{layer}/{i}"], value)
    assert all(np.isfinite(losses)) and losses[0] > 0


def test_state_dict_resumes_bit_exactly(tmp_path):
    cfg = make_train_files(tmp_path)
    train = TrainConfig.from_section(parse_cfg(cfg).net)
    proto = tmp_path / "out" / "net_train.prototxt"
    steps = [minibatches(20 + t) for t in range(3)]
    straight = open_net(tmp_path)
    sgd = DarknetSGD(straight, proto, train)
    for batches in steps:
        sgd.step(straight, batches)
    first = open_net(tmp_path)
    sgd1 = DarknetSGD(first, proto, train)
    for batches in steps[:2]:
        sgd1.step(first, batches)
    state, blobs = sgd1.state_dict(), all_blobs(first)
    resumed = open_net(tmp_path)
    for key, value in blobs.items():
        layer, i = key.rsplit("/", 1)
        resumed.params[layer][int(i)].data[...] = value
    sgd2 = DarknetSGD(resumed, proto, train)
    sgd2.load_state_dict(state)
    sgd2.step(resumed, steps[2])
    for key, value in all_blobs(straight).items():
        np.testing.assert_array_equal(all_blobs(resumed)[key], value, err_msg=key)
    assert (sgd2.seen, sgd2.t) == (sgd.seen, sgd.t)
    bad = dict(state, U={k: v for k, v in list(state["U"].items())[1:]})
    with pytest.raises(ParamError, match="missing"):
        sgd2.load_state_dict(bad)


def test_stock_solver_file_one_step_equals_darknet_sgd(tmp_path, monkeypatch):
    """From a fresh start with a constant rate, stock SGD with the §7.2 mapping is Darknet's step."""
    cfg = make_train_files(tmp_path, policy="policy=constant\nburn_in=0", lr=0.02)
    (x, truth), = minibatches(30, count=1)
    net = open_net(tmp_path)
    sgd = DarknetSGD(net, tmp_path / "out" / "net_train.prototxt", TrainConfig.from_section(parse_cfg(cfg).net))
    sgd.step(net, [(x, truth), (x, truth)])   # Input blobs cannot change between iter_size passes
    monkeypatch.chdir(tmp_path / "out")
    solver = caffe.SGDSolver("net_solver.prototxt")
    solver.net.copy_from("net_train.caffemodel")
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["truth"].data[...] = truth
    solver.step(1)
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_allclose(solver.net.params[name][i].data, blob.data, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}/{i}")


# ------------------------------------------------------------------------------------------
# Against the real Darknet: one (and a second, with momentum) train_network step
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["policy=constant\nburn_in=0", BURN_IN])
def test_one_train_step_matches_real_darknet(tmp_path, policy):
    cfg = tmp_path / "net.cfg"
    cfg.write_text(TRAIN_CFG.format(lr=0.1, policy=policy))
    steps = [minibatches(40 + t) for t in range(2)]
    layers = (0, 1)
    with DarknetProcess(cfg, clear=True) as dn:
        dn.save_weights(tmp_path / "init.weights")
        losses_dn, params_dn, seen_dn = [], [], []
        for batches in steps:
            x = np.concatenate([bx for bx, _ in batches])
            t = np.concatenate([bt for _, bt in batches])
            losses_dn.append(dn.train_step(x, t))
            params_dn.append({i: dn.layer_params(i) for i in layers})
            seen_dn.append(dn.seen())
    make_train_files(tmp_path, policy=policy, lr=0.1, weights=tmp_path / "init.weights")
    net = open_net(tmp_path)
    sgd = DarknetSGD(net, tmp_path / "out" / "net_train.prototxt", TrainConfig.from_section(parse_cfg(cfg).net))
    names = {0: {"weights": ("layer000_conv", 0), "scales": ("layer000_scale", 0), "biases": ("layer000_scale", 1),
                 "rolling_mean": ("layer000_dbn", 0), "rolling_variance": ("layer000_dbn", 1)},
             1: {"weights": ("layer001_conv", 0), "biases": ("layer001_conv", 1)}}
    tolerance = [1e-5, 5e-5]    # abs; the second step compounds float differences through momentum
    for step, batches in enumerate(steps):
        loss = sgd.step(net, batches)
        np.testing.assert_allclose(loss, losses_dn[step], rtol=1e-5)
        assert sgd.seen == seen_dn[step]
        for i in layers:
            for array, (layer, blob) in names[i].items():
                np.testing.assert_allclose(net.params[layer][blob].data, params_dn[step][i][array], rtol=0,
                                           atol=tolerance[step], err_msg=f"step {step + 1} layer {i} {array}")


# ------------------------------------------------------------------------------------------
# Parameter classification and the solver-file mapping
# ------------------------------------------------------------------------------------------

def test_param_slots_follow_layer_types_and_param_specs():
    fixed = [{"lr_mult": 0.0, "decay_mult": 0.0}]
    net = CaffeNet("n", [("data", (1, 1, 4, 4))], [
        CaffeLayer("c", "Convolution", ["data"], ["c"], {"param": [{"lr_mult": 2.0, "decay_mult": 1.0},
                                                                  {"lr_mult": 2.0, "decay_mult": 0.0}]},
                   [np.zeros((1, 1, 1, 1), F32), np.zeros(1, F32)]),
        CaffeLayer("bn", "BatchNorm", ["c"], ["c"], {"param": fixed * 3}, [np.zeros(1, F32)] * 3),
        CaffeLayer("up", "Deconvolution", ["c"], ["u"], {"param": fixed}, [np.ones((1, 1, 2, 2), F32)]),
        CaffeLayer("s", "Scale", ["u"], ["u"], {"param": [{"lr_mult": 1.0, "decay_mult": 0.0}] * 2},
                   [np.ones(1, F32), np.zeros(1, F32)]),
    ])
    slots = param_slots(net)
    assert [(s.key, s.kind, s.lr_mult, s.decay_mult) for s in slots] == [
        ("c/0", "weights", 2.0, 1.0), ("c/1", "biases", 2.0, 0.0), ("s/0", "scales", 1.0, 0.0),
        ("s/1", "biases", 1.0, 0.0)]
    net.layers.append(CaffeLayer("p", "PReLU", ["u"], ["u"], {}, [np.zeros(1, F32)]))
    with pytest.raises(ParamError, match="'p' \\(PReLU\\).*no update rule"):
        param_slots(net)


def solver_fields(policy: LrPolicy, seen: int = 0, **kw):
    cfg = TrainConfig(batch=2, subdivisions=4, momentum=0.9, decay=5e-4, policy=policy)
    return map_solver(cfg, seen=seen, net_file="n_train.prototxt", snapshot_prefix="n", mini_batch=2, **kw)


def test_solver_mapping_rebases_policies_on_seen():
    steps = LrPolicy(learning_rate=0.01, policy="steps", steps=(100, 200, 300), scales=(0.1, 0.1, 0.1),
                     max_batches=400)
    m = solver_fields(steps, seen=150 * 8)        # k0 = 150: the first step already passed
    assert m.fields["lr_policy"] == "multistep" and m.fields["stepvalue"] == [49, 149]
    assert m.fields["base_lr"] == float(F32(F32(0.01) * F32(0.1))) and m.fields["max_iter"] == 250
    assert m.fields["iter_size"] == 4 and m.fields["weight_decay"] == 5e-4
    assert not any("burn_in" in d for d in m.deviations)
    uneven = solver_fields(LrPolicy(learning_rate=0.01, policy="steps", steps=(10, 20), scales=(0.1, 0.5),
                                    burn_in=50, max_batches=30))
    assert any("unequal scales" in d for d in uneven.deviations)
    assert any(d.startswith("burn_in = 50") for d in uneven.deviations)
    poly = solver_fields(LrPolicy(learning_rate=0.1, policy="poly", power=2.0, max_batches=100), seen=9 * 8)
    # Darknet at iter 0 (k = 10): 0.1*(1 - 10/100)^2; Caffe: base_lr*(1 - 0/max_iter)^power
    assert poly.fields["max_iter"] == 90
    np.testing.assert_allclose(poly.fields["base_lr"], 0.1 * 0.9 ** 2, rtol=1e-6)
    exp = solver_fields(LrPolicy(learning_rate=0.1, policy="exp", gamma=0.99))
    np.testing.assert_allclose(exp.fields["base_lr"], 0.1 * 0.99, rtol=1e-6)
    sig = solver_fields(LrPolicy(learning_rate=0.1, policy="sigmoid", gamma=0.5, step=40))
    assert sig.fields["gamma"] == -0.5 and sig.fields["stepsize"] == 39
    assert any("size_t" in d for d in sig.deviations)
    odd = solver_fields(LrPolicy(), seen=3, bn_mode="stock", has_region=True)
    assert any("not a multiple" in d for d in odd.deviations)
    assert any("biased variance" in d for d in odd.deviations) and any("region" in d for d in odd.deviations)


def test_written_solver_file_parses_and_lists_deviations(tmp_path):
    make_train_files(tmp_path)
    text = (tmp_path / "out" / "net_solver.prototxt").read_text()
    fields = parse_prototxt(text, "net_solver.prototxt", "SolverParameter")
    assert fields["net"] == "net_train.prototxt" and fields["iter_size"] == 2
    assert fields["lr_policy"] == "multistep" and fields["stepvalue"] == [1]
    assert "# DEVIATION: burn_in = 5" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"net_train.prototxt", "net_train.caffemodel",
                                                              "net_solver.prototxt"}
