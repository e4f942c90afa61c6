"""AlexeyAB's Darknet (commit 59596d7) as a real engine: its build, its ctypes binding, and every layer
of every shared AlexeyAB-era cfg against d2c's Caffe conversion (never skipped: a missing engine fails).

Forward floor: conv layers sum in another order than the engine's own gemm loop (OpenBLAS with
FMA vs gcc -Ofast), ~2e-7 relative on the first layer; through 100-200 layers of random weights it
grows to at most 4.2e-6 (measured: yolov3-spp, 160 px). The tolerance leaves ~2x headroom.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from d2c.darknet.alexeyab import COMMIT, build_dir, version_info
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.header import parse_header
from d2c.darknet.runtime import DarknetProcess
from d2c.errors import CfgError, EngineError, ParamError
from d2c.forward_check import compare_forward, format_table, with_input_size
from header_offsets import offsets_by_gcc_and_parser
from shared_cfgs import alexeyab_cfgs, shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_CFG = shared_cfg_dir()
FORWARD_REL = 1e-5        # per layer, |a-b| / max|engine blob|; measured worst 4.2e-6
LAYOUT_STRUCTS = ("layer", "network", "network_state", "update_args", "image", "box", "detection",
                  "matrix", "data")


def input_size(cfg: Path) -> int:
    """160 px for every cfg but the sam/reorg3d one, whose routes need a multiple of 64 (at 160 its
    6x6 and 5x5 maps meet in a route, which the engine concatenates as flat vectors)."""
    return 256 if "reorg" in cfg.name else 160


# ------------------------------------------------------------------------------------------
# 1. the build
# ------------------------------------------------------------------------------------------
def test_build_is_cached_pinned_and_shown_by_info() -> None:
    directory = build_dir()
    info = json.loads((directory / "build-info.json").read_text())
    assert info["commit"] == COMMIT and "LIBSO=1" in info["make"] and "GPU=0" in info["make"]
    assert (directory / "libdarknet.so").is_file() and (directory / "include" / "darknet.h").is_file()
    start = time.perf_counter()
    out = subprocess.run(["bash", str(ROOT / "tools" / "build_alexeyab.sh")], capture_output=True, text=True,
                         check=True, timeout=600)
    assert Path(out.stdout.strip()) == directory and time.perf_counter() - start < 10   # cached
    assert version_info()["available"] and version_info()["commit"] == COMMIT
    cli = subprocess.run([sys.executable, "-m", "d2c.cli", "info"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert cli.returncode == 0 and f"{directory}/libdarknet.so" in cli.stdout and COMMIT[:7] in cli.stdout


def test_missing_build_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("D2C_CACHE", str(tmp_path))
    with pytest.raises(EngineError, match="tools/build_alexeyab.sh"):
        build_dir()
    with pytest.raises(EngineError, match="tools/build_alexeyab.sh"):
        DarknetProcess(SHARED_CFG / "yolov4-tiny.cfg", engine="alexeyab")
    monkeypatch.setenv("D2C_ALEXEYAB_DIR", str(tmp_path))
    with pytest.raises(EngineError, match="no libdarknet.so"):
        build_dir()


# ------------------------------------------------------------------------------------------
# 2. the binding: layouts from its own header, values the library writes
# ------------------------------------------------------------------------------------------
def test_parsed_offsets_equal_gcc_offsetof(tmp_path: Path) -> None:
    """Every member offset and struct size of AlexeyAB's darknet.h agrees with gcc on the same header."""
    include = build_dir() / "include"
    header = parse_header(include / "darknet.h")
    names, expected, got = offsets_by_gcc_and_parser(header, LAYOUT_STRUCTS, include, tmp_path)
    assert len(names) > 400   # AlexeyAB's layer alone has ~330 members
    mismatches = [(n, e, g) for n, e, g in zip(names, expected, got) if e != g]
    assert not mismatches and len(got) == len(expected), mismatches[:10]
    # Its layout differs from Debian's: the same parser, other numbers.
    assert header.enum("LAYER_TYPE")["YOLO"] != 23 or ctypes.sizeof(header.struct("layer")) != 1752


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> DarknetProcess:
    cfg = with_input_size(SHARED_CFG / "yolov4-tiny.cfg", 160, 160, tmp_path_factory.mktemp("tiny4"))
    proc = DarknetProcess(cfg, engine="alexeyab", batch=1)
    yield proc
    proc.close()


def test_library_written_fields_match_the_cfg(tiny4: DarknetProcess) -> None:
    """Shapes, yolo settings and the net size as the engine parsed them equal d2c's own reading."""
    graph = build_graph(parse_cfg(tiny4.cfg_path), "alexeyab")
    assert tiny4.n_layers == len(graph.nodes) == 38
    net = tiny4.net_info()
    assert (net["batch"], net["w"], net["h"], net["c"]) == (1, 160, 160, 3)
    for node in graph.nodes:
        info = tiny4.layer_info(node.index)
        assert info["type"].lower() == node.kind, node.index
        assert info["out_shape"] == tuple(node.out_shape), (node.index, info, node.out_shape)
        if node.kind == "yolo":
            assert info["mask"] == list(node.attrs["mask"])
            assert info["scale_x_y"] == pytest.approx(node.attrs["scale_x_y"])
            assert info["nms_kind"] == "GREEDY_NMS" and info["beta_nms"] == pytest.approx(0.6)
            np.testing.assert_allclose(info["anchors"], np.ravel(node.attrs["anchors"]), rtol=0)


def test_process_isolation_and_errors(tiny4: DarknetProcess, tmp_path: Path) -> None:
    """The -Ofast library flushes denormals in its child only; bad input is refused with a name."""
    assert tiny4.denormals_flushed() is True
    assert bool(np.float32(1e-40) * np.float32(1) != 0)      # this process keeps IEEE denormals
    with pytest.raises(ParamError, match="shape"):
        tiny4.forward(np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(CfgError, match="nope.cfg"):
        DarknetProcess(tmp_path / "nope.cfg", engine="alexeyab")
    with pytest.raises(ParamError, match="unknown Darknet engine"):
        DarknetProcess(SHARED_CFG / "yolov4-tiny.cfg", engine="opencv")
    crash = tmp_path / "crash.cfg"
    crash.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[shortcut]\nfrom=-9\n")   # SIGABRT in the engine
    with pytest.raises(EngineError, match="AlexeyAB Darknet crashed while starting: killed by signal SIGABRT"):
        DarknetProcess(crash, engine="alexeyab")


# ------------------------------------------------------------------------------------------
# 3. forward: every layer of every shared cfg
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", alexeyab_cfgs(), ids=lambda p: p.name)
def test_every_layer_matches_alexeyab_darknet(cfg: Path, tmp_path: Path) -> None:
    size = input_size(cfg)
    report = compare_forward(with_input_size(cfg, size, size, tmp_path), None, seed=7, with_opencv=False,
                             engine="alexeyab")
    print(format_table(report))
    assert report.flavor == "alexeyab" and len(report.layers) == len(parse_cfg(cfg).layers)
    worst = max(report.layers, key=lambda d: d.max_rel)
    assert worst.max_rel <= FORWARD_REL, f"{cfg.name}: layer {worst.index} {worst.kind} rel {worst.max_rel:.3g}"


def test_mutation_pjreddie_bn_epsilon_is_caught(tmp_path: Path) -> None:
    """The check can fail: converting with pjreddie's BN (sqrt(var) + 1e-6) instead of AlexeyAB's
    sqrt(var + 1e-5) puts the first layer 6e-6 and the net 2.6e-5 off."""
    import d2c.forward_check as forward_check

    cfg = with_input_size(SHARED_CFG / "yolov3-tiny-prn.cfg", 160, 160, tmp_path)
    original = forward_check.prepare

    def pjreddie_prepare(*args, **kwargs):
        kwargs["flavor"] = "pjreddie"
        return original(*args, **kwargs)

    forward_check.prepare = pjreddie_prepare
    try:
        report = compare_forward(cfg, None, seed=7, with_opencv=False, engine="alexeyab")
    finally:
        forward_check.prepare = original
    assert report.max_rel > FORWARD_REL, report.max_rel


def test_ftz_isolation_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Loading the AlexeyAB library in-process switches FTZ on, as Debian's does: hence the child."""
    script = textwrap.dedent(f"""
        import numpy as np
        from d2c.darknet.alexeyab import AlexeyABNet
        before = bool(np.float32(1e-40) * np.float32(1) != 0)
        net = AlexeyABNet({str(SHARED_CFG / 'yolov4-tiny.cfg')!r}, batch=1, quiet=True)
        print(before, bool(np.float32(1e-40) * np.float32(1) != 0))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-2:] == ["True", "False"]
