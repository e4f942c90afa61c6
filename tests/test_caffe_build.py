"""The Caffe that tools/build_caffe.sh builds: its faster CPU loops must not change a single bit.

tools/caffe_perf routes Caffe's max pooling forward, 4-D crop and im2col through d2c_fast_cpu.hpp
(see `d2c bench`: 81 -> 45 ms for yolov3-tiny). Three checks, each able to fail:
  * the header against per-element reference loops in C++ (20000 random pooling and im2col cases
    and their large, thread-split versions, 2000 crops; with the build's own flags, without AVX2
    and at -O0);
  * pycaffe's Pooling layer (values, both argmax outputs, and the backward that reads them) against
    a numpy reference of Caffe's pooling rules, on shapes that use the vector and the scalar paths;
  * pycaffe's Convolution (im2col + GEMM) against a float64 numpy convolution over pad, stride
    and dilation.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from d2c.engines import caffe_build_info, import_caffe

ROOT = Path(__file__).resolve().parents[1]
HEADER_DIR = ROOT / "tools" / "caffe_perf"
CHECK_SOURCE = Path(__file__).with_name("caffe_perf") / "check_fast_cpu.cpp"


def our_build_info() -> dict | None:
    """build-info.json of the pycaffe in use when tools/build_caffe.sh built it, else None."""
    info = caffe_build_info(Path(import_caffe().__file__).parent)
    return info if info and "cxxflags" in info else None


@pytest.mark.parametrize("flags", ["build", "-O3 -march=x86-64-v2 -ffp-contract=off", "-O0"],
                         ids=["build-flags", "no-avx2", "O0"])
def test_fast_loops_match_reference_loops(tmp_path, flags):
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to check tools/caffe_perf (tools/build_caffe.sh installs build-essential)"
    build = our_build_info() or {}
    if flags == "build":
        flags = build.get("cxxflags", "-O3 -march=x86-64-v2 -ffp-contract=off")
    # Linked to the OpenBLAS Caffe uses: the loops split large work over its thread count.
    blas_dir = build.get("blas_dir", "/usr/lib/x86_64-linux-gnu/openblas-pthread")
    exe = tmp_path / "check_fast_cpu"
    subprocess.run([compiler, *flags.split(), f"-I{HEADER_DIR}", str(CHECK_SOURCE), "-o", str(exe), "-pthread",
                    f"-L{blas_dir}", "-lopenblas", f"-Wl,-rpath,{blas_dir}"], check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = re.findall(r"(\w+) cases (\d+) mismatches (\d+)", run.stdout)
    assert [name for name, _, _ in counts] == ["pool", "crop", "im2col"], run.stdout
    assert all(int(cases) > 1000 and mismatches == "0" for _, cases, mismatches in counts), run.stdout


def test_our_build_records_its_patches():
    """Our build says whether it carries the loops (the bench prints it): with them unless
    D2C_CAFFE_FAST=0 asked for Caffe's own. A pycaffe the machine already had has no record."""
    build = our_build_info()
    if build is None:
        return
    expected = os.environ.get("D2C_CAFFE_FAST", "1") != "0"
    assert bool(build.get("patches")) == expected, f"build-info.json patches {build.get('patches')!r}"


# ------------------------------------------------------------------------------------------------
# pycaffe Pooling vs a numpy reference of Caffe's rules
# ------------------------------------------------------------------------------------------------

def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    pooled = int(np.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def reference_max_pool(x: np.ndarray, kernel: int, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's MAX pooling: clipped windows, first strict maximum, -FLT_MAX / -1 when none wins."""
    n, c, h, w = x.shape
    ph, pw = caffe_pooled_size(h, kernel, stride, pad), caffe_pooled_size(w, kernel, stride, pad)
    out = np.full((n, c, ph, pw), -np.finfo(np.float32).max, np.float32)
    idx = np.full((n, c, ph, pw), -1, np.int64)
    for y in range(ph):
        for xo in range(pw):
            hs, ws = y * stride - pad, xo * stride - pad
            he, we = min(hs + kernel, h), min(ws + kernel, w)
            hs, ws = max(hs, 0), max(ws, 0)
            for hh in range(hs, he):
                for ww in range(ws, we):
                    v = x[:, :, hh, ww]
                    better = v > out[:, :, y, xo]  # NaN compares false: never wins
                    out[:, :, y, xo] = np.where(better, v, out[:, :, y, xo])
                    idx[:, :, y, xo] = np.where(better, hh * w + ww, idx[:, :, y, xo])
    return out, idx


def pooling_net(tmp_path: Path, shape: tuple[int, ...], kernel: int, stride: int, pad: int, mask_top: bool):
    caffe = import_caffe()
    tops = 'top: "pool" top: "mask"' if mask_top else 'top: "pool"'
    text = (f'name: "p" input: "data" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }} '
            f'force_backward: true layer {{ name: "pool" type: "Pooling" bottom: "data" {tops} '
            f"pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }} }}")
    path = tmp_path / f"pool_{kernel}_{stride}_{pad}_{int(mask_top)}.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


def pool_input(rng: np.random.Generator, shape: tuple[int, ...], data: str) -> np.ndarray:
    if data == "ties":
        return rng.integers(0, 3, shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    if data == "nan-inf":
        x[rng.random(shape) < 0.1] = np.nan
        x[rng.random(shape) < 0.1] = -np.inf
    return x


POOL_SHAPES = {"wide": (2, 3, 9, 53), "map13": (1, 4, 13, 13), "tall": (1, 2, 31, 7)}


@pytest.mark.parametrize("data", ["normal", "ties", "nan-inf"])
@pytest.mark.parametrize("kernel,stride,pad", [(2, 2, 0), (2, 1, 1), (3, 2, 1), (3, 1, 1), (5, 1, 2),
                                               (3, 3, 0), (4, 2, 3)])
@pytest.mark.parametrize("shape", list(POOL_SHAPES.values()), ids=list(POOL_SHAPES))
def test_pycaffe_max_pooling_matches_reference(tmp_path, shape, kernel, stride, pad, data):
    x = pool_input(np.random.default_rng(kernel * 100 + stride * 10 + pad), shape, data)
    want, want_idx = reference_max_pool(x, kernel, stride, pad)
    for mask_top in (True, False):
        net = pooling_net(tmp_path, shape, kernel, stride, pad, mask_top)
        net.blobs["data"].data[...] = x
        net.forward()
        got = net.blobs["pool"].data
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg="pooled values")
        if mask_top:
            np.testing.assert_array_equal(net.blobs["mask"].data, want_idx.astype(np.float32), err_msg="mask top")
        if (want_idx < 0).any():
            # A window of only NaN/-inf keeps index -1, and Caffe's backward then writes
            # bottom_diff[-1] (heap corruption in stock Caffe too): forward only for those inputs.
            continue
        # The backward routes each top diff to its argmax (Caffe's internal index when there is
        # one top): a wrong index shows up here.
        top_diff = np.random.default_rng(1).standard_normal(want.shape).astype(np.float32)
        net.blobs["pool"].diff[...] = top_diff
        net.backward()
        expected = np.zeros(x.shape, np.float64)
        n_, c_, _, w_ = x.shape
        for (n, c, y, xo), i in np.ndenumerate(want_idx):
            if i >= 0:
                expected[n, c, i // w_, i % w_] += top_diff[n, c, y, xo]
        np.testing.assert_allclose(net.blobs["data"].diff, expected, rtol=1e-6, atol=1e-6,
                                   err_msg=f"backward through the argmax (mask top: {mask_top})")


# ------------------------------------------------------------------------------------------------
# pycaffe Convolution (im2col + GEMM) vs float64 numpy
# ------------------------------------------------------------------------------------------------

def reference_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, dilation: int) -> np.ndarray:
    n, c, h, wd = x.shape
    m, _, k, _ = w.shape
    span = dilation * (k - 1) + 1
    oh, ow = (h + 2 * pad - span) // stride + 1, (wd + 2 * pad - span) // stride + 1
    xp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    out = np.zeros((n, m, oh, ow)) + b[None, :, None, None]
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i * dilation:i * dilation + stride * (oh - 1) + 1:stride,
                       j * dilation:j * dilation + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,mc->nmhw", patch, w[:, :, i, j])
    return out


@pytest.mark.parametrize("kernel,stride,pad,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (5, 1, 2, 1),
                                                        (3, 1, 2, 2), (3, 3, 0, 1), (4, 2, 3, 2)])
@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 5, 8, 40)], ids=["17x23", "8x40"])
def test_pycaffe_convolution_matches_numpy(tmp_path, shape, kernel, stride, pad, dilation):
    caffe = import_caffe()
    rng = np.random.default_rng(kernel + 10 * stride + 100 * pad + 1000 * dilation)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((6, shape[1], kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    text = (f'name: "c" input: "data" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }} '
            f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ '
            f"num_output: 6 kernel_size: {kernel} stride: {stride} pad: {pad} dilation: {dilation} }} }}")
    path = tmp_path / "conv.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), caffe.TEST)
    net.params["conv"][0].data[...] = w
    net.params["conv"][1].data[...] = b
    net.blobs["data"].data[...] = x
    net.forward()
    want = reference_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, pad, dilation)
    np.testing.assert_allclose(net.blobs["conv"].data, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("offset,axis", [(1, 2), (0, 2), (2, 1), (1, 0), (3, 3)])
def test_pycaffe_crop_matches_numpy(tmp_path, offset, axis):
    caffe = import_caffe()
    big, small = (3, 6, 14, 17), (2, 3, 9, 11)
    ref_shape = tuple(small[a] if a >= axis else big[a] for a in range(4))
    text = (f'name: "c" input: "data" input_shape {{ {" ".join(f"dim: {d}" for d in big)} }} '
            f'input: "ref" input_shape {{ {" ".join(f"dim: {d}" for d in ref_shape)} }} '
            f'layer {{ name: "crop" type: "Crop" bottom: "data" bottom: "ref" top: "crop" '
            f"crop_param {{ axis: {axis} offset: {offset} }} }}")
    path = tmp_path / "crop.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(offset).standard_normal(big).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    index = tuple(slice(offset, offset + ref_shape[a]) if a >= axis else slice(None) for a in range(4))
    np.testing.assert_array_equal(net.blobs["crop"].data, x[index])
