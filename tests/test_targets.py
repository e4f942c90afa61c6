"""Deploy targets without their toolchains: registry, lint, --target conversion, and every rewrite
proven exact (or within its measured float error) in pycaffe against the plain net and Darknet's math.

Why here and not in the toolchain tests: these run in seconds on the d2c venv; the real importers
(tests/test_targets_toolchains.py) then only have to show they accept what this file proves correct.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c.caffe.emitter import ConvertOptions, Emitter
from d2c.caffe.runtime import caffe_forward, load_caffe
from d2c.convert import build_conversion, convert, load_graph
from d2c.darknet.weights import WeightsHeader, random_weights
from d2c.errors import D2CError, UnsupportedLayerError
from d2c.forward_check import with_input_size
from d2c.targets import REGISTRY, get_target
from d2c.targets.base import D2C_DEPLOY_TYPES, net_outputs
from d2c.targets.rewrites import REWRITES
from shared_cfgs import shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_cfg_dir()
DEBIAN = Path("/usr/share/darknet/cfg")
# Measured: the sigmoid form of tanh(softplus) against Darknet's float mish, x in [-100, 100].
MISH_ABS_TOL = 2.5e-6
MISH_ABS_TOL_NEGATIVE = 5e-8     # x < -20: true mish is ~x e^x (|.| < 4.2e-8); Darknet's float tanh gives 0
RUNNABLE = ["openvino", "mnn", "rknn"]


def darknet_mish(x: np.ndarray) -> np.ndarray:
    """AlexeyAB's float mish: softplus thresholds at +-20, tanh as 2/(1+e^-2u)-1."""
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        sp = np.where(x > 20, x, np.where(x < -20, np.exp(x), np.log(np.exp(x) + np.float32(1)))).astype(np.float32)
        tanh = (np.float32(2) / (np.float32(1) + np.exp(np.float32(-2) * sp)) - np.float32(1)).astype(np.float32)
    return (x * tanh).astype(np.float32)


def conversion(cfg: Path, target: str = "caffe", size: int | None = None, tmp: Path | None = None, seed: int = 3):
    if size is not None:
        cfg = with_input_size(cfg, size, size, tmp)
    graph = load_graph(cfg)
    return build_conversion(graph, random_weights(graph, seed), WeightsHeader(),
                            ConvertOptions(flavor=graph.flavor, target=target))


def heads(conv, x: np.ndarray) -> list[np.ndarray]:
    blobs = caffe_forward(load_caffe(conv.net), {"data": x})
    return [blobs[h.blob] for h in conv.emitter.heads]


def tiny_net(layers: list[tuple], shape: tuple[int, ...]) -> Emitter:
    """An Emitter holding hand-written layers over a (1, C, H, W) input, for rewrite unit tests."""
    em = Emitter(net_name="t", options=ConvertOptions(), input_shape=shape[1:])
    for type_, name, bottom, top, params in layers:
        em.add(type_, name, bottom, top, **params)
    return em


# -- registry -------------------------------------------------------------------------------------

def test_registry_declares_every_target():
    assert set(REGISTRY) == {"caffe", "opencv", "openvino", "mnn", "rknn", "tpu-mlir"}
    for target in REGISTRY.values():
        assert target.summary and target.source, target.name
        assert target.accepts <= D2C_DEPLOY_TYPES, target.name
        fixes = list(target.type_rewrites.values()) + [r.rewrite for r in target.rules if r.rewrite]
        assert set(fixes) <= set(REWRITES), target.name
    for name in RUNNABLE:
        assert REGISTRY[name].venv and REGISTRY[name].requirements and REGISTRY[name].not_runnable is None
    assert "3.10" in REGISTRY["tpu-mlir"].not_runnable
    with pytest.raises(D2CError, match="unknown target; choose from caffe, mnn"):
        get_target("tensorrt")


# -- lint ----------------------------------------------------------------------------------------

def test_lint_names_cfg_lines_and_the_rewrite(tmp_path):
    conv = conversion(SHARED / "yolov4.cfg", size=64, tmp=tmp_path)     # plain net, linted for OpenVINO
    from d2c.targets.base import where_function
    found = REGISTRY["openvino"].findings(conv.emitter.layers, where_function(conv.emitter, conv.graph))
    assert len(found) == 72 and {f.type for f in found} == {"BNLL"}
    assert found[0].where == f"{tmp_path / 'yolov4.cfg'}:29 [convolutional]" and found[0].rewrite == "mish-sigmoid"
    assert not REGISTRY["rknn"].findings(conv.emitter.layers, lambda name: "")
    tpu = REGISTRY["tpu-mlir"].findings(conv.emitter.layers, lambda name: "")
    assert sorted({f.rewrite for f in tpu}) == ["mish-sigmoid", "pool-cascade"]
    # after --target the same lint is clean, and the sidecar says what was done
    for target in ("openvino", "tpu-mlir"):
        done = conversion(SHARED / "yolov4.cfg", target, size=64, tmp=tmp_path)
        assert not REGISTRY[target].findings(done.emitter.layers, lambda name: "")
        assert done.sidecar["target"]["name"] == target and len(done.sidecar["target"]["lint"]) == len(
            REGISTRY[target].findings(conv.emitter.layers, lambda name: ""))


def test_layer_without_exact_form_is_an_error_naming_the_cfg_line(tmp_path):
    cfg = tmp_path / "elu.cfg"
    cfg.write_text("[net]\nwidth=16\nheight=16\nchannels=3\n"
                   "[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=elu\n")
    with pytest.raises(UnsupportedLayerError, match=r"elu\.cfg:5 \[convolutional\]: the tpu-mlir toolchain would "
                                                    r"reject Caffe layer layer000_elu \(ELU\)") as info:
        convert(cfg, None, tmp_path / "out", target="tpu-mlir")
    assert len(info.value.problems) == 1 and "no exact form" in info.value.problems[0]
    assert not (tmp_path / "out").exists()          # nothing half-written
    convert(cfg, None, tmp_path / "out", target="openvino")   # ELU is fine there
    assert json.loads((tmp_path / "out" / "elu.json").read_text())["target"]["name"] == "openvino"


def test_cli_target_one_line_error_and_lint_printout(tmp_path):
    cfg = tmp_path / "elu.cfg"
    cfg.write_text("[net]\nwidth=16\nheight=16\nchannels=3\n[convolutional]\nfilters=4\nsize=3\nactivation=elu\n")
    cmd = [sys.executable, "-m", "d2c.cli", "convert", str(cfg), "-o", str(tmp_path / "o"), "--target"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    bad = subprocess.run(cmd + ["tpu-mlir"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "elu.cfg:5 [convolutional]: the tpu-mlir toolchain would reject" in bad.stderr
    unknown = subprocess.run(cmd + ["tensorrt"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "invalid choice: 'tensorrt'" in unknown.stderr
    mish = tmp_path / "mish.cfg"
    mish.write_text(cfg.read_text().replace("elu", "mish"))
    ok = subprocess.run(cmd[:4] + [str(mish)] + cmd[5:] + ["openvino"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "lint: " in ok.stdout and "mish.cfg:5 [convolutional]: layer000_softplus (BNLL)" in ok.stdout
    assert "rewrote: mish-sigmoid x1" in ok.stdout
    assert "BNLL" not in (tmp_path / "o" / "mish.prototxt").read_text()


# -- rewrites, each proven ------------------------------------------------------------------------

def mish_grid() -> np.ndarray:
    x = np.concatenate([np.linspace(-100, 100, 200001), np.linspace(-21, -19, 4001), np.linspace(19, 21, 4001),
                        [-1e4, -88.0, -87.0, -30.0, 0.0, 1e-30, -1e-30, 30.0, 1e4]])
    return x.astype(np.float32)


def mish_nets(x: np.ndarray, rewrite: bool) -> np.ndarray:
    """d2c's mish (BNLL -> TanH -> PROD) over x in pycaffe, rewritten or not."""
    em = tiny_net([("BNLL", "sp", ["data"], ["sp"], {}), ("TanH", "tanh", ["sp"], ["sp"], {}),
                   ("Eltwise", "mish", ["data", "sp"], ["mish"], {"eltwise_param": {"operation": "PROD"}})],
                  (1, 1, 1, x.size))
    if rewrite:
        assert REWRITES["mish-sigmoid"](em) == 1
        assert "BNLL" not in {layer.type for layer in em.layers}
    return caffe_forward(load_caffe(em.net()), {"data": x.reshape(1, 1, 1, -1)})["mish"].ravel()


def test_mish_sigmoid_form_matches_darknet_mish():
    x = mish_grid()
    ref = darknet_mish(x)
    ours = mish_nets(x, rewrite=True)
    plain = mish_nets(x, rewrite=False)
    err = np.abs(ours.astype(np.float64) - ref)
    assert err.max() <= MISH_ABS_TOL, (err.max(), x[err.argmax()])
    neg = x < -20
    assert_allclose(ours[neg], ref[neg], rtol=0, atol=MISH_ABS_TOL_NEGATIVE)
    assert_allclose(ours[x > 20], x[x > 20], rtol=0, atol=0)          # tanh saturates to 1 exactly
    # the plain BNLL form is the reference the rewrite replaces: the same error class
    assert np.abs(plain.astype(np.float64) - ref).max() <= MISH_ABS_TOL
    # negative control: a plausible wrong form (softplus without the 1+ in the denominator) is caught
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-x.astype(np.float64)))
    wrong = x * s * (2 - s)
    assert np.abs(wrong - ref).max() > 1e-2


def test_pool_cascade_is_bit_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 13, 13)).astype(np.float32)
    x[0, 0] = np.round(x[0, 0])            # ties
    x[0, 1, :, :4] = -np.inf
    for k in (7, 9, 13):
        em = tiny_net([("Pooling", "p", ["data"], ["p"],
                        {"pooling_param": {"pool": "MAX", "kernel_size": k, "stride": 1, "pad": (k - 1) // 2}})],
                      x.shape)
        plain = caffe_forward(load_caffe(em.net()), {"data": x})["p"]
        assert REWRITES["pool-cascade"](em) == 1
        kernels = [layer.params["pooling_param"]["kernel_size"] for layer in em.layers]
        assert max(kernels) <= 5 and sum(k_ - 1 for k_ in kernels) == k - 1
        assert_array_equal(caffe_forward(load_caffe(em.net()), {"data": x})["p"], plain)
    # negative control: a stride-2 or asymmetric pool is not a 'same' SPP pool and is left alone
    em = tiny_net([("Pooling", "p", ["data"], ["p"], {"pooling_param": {"pool": "MAX", "kernel_size": 9,
                                                                        "stride": 2, "pad": 4}})], x.shape)
    assert REWRITES["pool-cascade"](em) == 0


def test_eltwise_pairs_and_flatten_are_bit_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 5, 5)).astype(np.float32)
    for op, coeff in (("SUM", [0.5, -1.25, 3.0]), ("SUM", None), ("PROD", None), ("MAX", None)):
        param = {"operation": op, **({"coeff": coeff} if coeff else {})}
        em = tiny_net([("Sigmoid", "a", ["data"], ["a"], {}), ("TanH", "b", ["data"], ["b"], {}),
                       ("Eltwise", "e", ["data", "a", "b"], ["e"], {"eltwise_param": param}),
                       ("Flatten", "f", ["e"], ["f"], {"flatten_param": {"axis": 1}})], x.shape)
        plain = caffe_forward(load_caffe(em.net()), {"data": x})["f"]
        assert REWRITES["eltwise-pairs"](em) == 1 and REWRITES["flatten-reshape"](em) == 1
        assert all(len(layer.bottom) <= 2 for layer in em.layers) and "Flatten" not in [l.type for l in em.layers]
        out = caffe_forward(load_caffe(em.net()), {"data": x})["f"]
        assert out.shape == plain.shape == (1, 100)
        assert_array_equal(out, plain)
        if coeff:  # negative control: dropping the coefficients changes the result
            em.layers[2].params["eltwise_param"].pop("coeff")
            assert np.abs(caffe_forward(load_caffe(em.net()), {"data": x})["f"] - plain).max() > 0.1


def test_outputs_out_of_place_keeps_heads_and_values(tmp_path):
    plain = conversion(SHARED / "yolov7-tiny.cfg", size=64, tmp=tmp_path)
    mnn = conversion(SHARED / "yolov7-tiny.cfg", "mnn", size=64, tmp=tmp_path)
    assert mnn.sidecar["target"]["rewrites"] == {"outputs-out-of-place": 3}
    blobs = [h["blob"] for h in mnn.sidecar["heads"]]
    assert len(blobs) == 3 and all(b.endswith("_logistic") for b in blobs)    # named like their layer
    assert [b[:8] for b in blobs] == [h["blob"][:8] for h in plain.sidecar["heads"]]   # same layers
    assert set(blobs) == net_outputs(mnn.net.layers) and set(blobs) == set(mnn.sidecar["blobs"].values()) & set(blobs)
    assert not any(layer.top == layer.bottom and layer.top[0] in blobs for layer in mnn.net.layers)
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    for a, b in zip(heads(plain, x), heads(mnn, x), strict=True):
        assert_array_equal(a, b)


@pytest.mark.parametrize("target", ["openvino", "tpu-mlir"])
def test_whole_yolov4_rewritten_matches_plain_in_pycaffe(tmp_path, target):
    """mish (72 sites) and SPP on the whole of yolov4: heads against the plain BNLL net."""
    plain = conversion(SHARED / "yolov4.cfg", size=64, tmp=tmp_path)
    done = conversion(SHARED / "yolov4.cfg", target, size=64, tmp=tmp_path)
    x = np.random.default_rng(4).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    for a, b in zip(heads(plain, x), heads(done, x), strict=True):
        assert_allclose(b, a, rtol=0, atol=5e-5 * np.abs(a).max())


# -- toolchain venvs: reuse by stamp (no install here; tests/test_targets_toolchains.py uses the real ones) ------

def test_setup_targets_reuses_a_venv_only_when_its_stamp_matches(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import setup_targets
    monkeypatch.setenv("D2C_CACHE", str(tmp_path))
    target = REGISTRY["mnn"]
    version = setup_targets.python_version(sys.executable)
    venv = tmp_path / "targets" / target.venv
    assert not setup_targets.is_current(target, version)                     # nothing there
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert not setup_targets.is_current(target, version)                     # no stamp: half-finished install
    stamp = venv / ".d2c-installed.json"
    stamp.write_text(json.dumps(setup_targets.wanted_stamp(target, version)))
    assert setup_targets.is_current(target, version)
    assert not setup_targets.is_current(target, "3.10")                      # another Python
    stamp.write_text(json.dumps({"requirements": ["mnn==3.6.0"], "python_version": version}))
    assert not setup_targets.is_current(target, version)                     # other pins
    stamp.write_text(json.dumps({"requirements": list(target.requirements), "python": sys.executable}))
    assert setup_targets.is_current(target, version)                         # older stamp: asks the venv's Python
    with pytest.raises(SystemExit):
        setup_targets.main(["tpu-mlir"])                                     # declared, not installable here
    makefile = (ROOT / "Makefile").read_text()
    assert "setup: $(VENV)/.d2c-setup weights/yolov3-tiny.weights targets" in makefile
    assert "\t$(VPY) tools/setup_targets.py" in makefile
