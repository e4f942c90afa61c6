#!/usr/bin/env bash
# Fresh-machine setup: Debian's Darknet, the project venv, pycaffe and AlexeyAB's Darknet (built once,
# cached), d2c itself.
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need_apt=()
[ -f /usr/lib/darknet/libdarknet.so ] || need_apt+=(darknet)
dpkg -s patchelf >/dev/null 2>&1 || need_apt+=(patchelf)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,caffe]' 2>&1 | grep -v '^WARNING: Location' || true
# pycaffe: reuse one the environment already has; otherwise (or when it is ours) ask the cached
# build for its path: instant when built, and a change of build flags rebuilds it once.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$site/d2c_caffe.pth" ] || ! .venv/bin/python -c 'import caffe' >/dev/null 2>&1; then
  caffe_py=$(bash tools/build_caffe.sh "$(pwd)/.venv/bin/python")
  echo "$caffe_py" > "$site/d2c_caffe.pth"
fi
# AlexeyAB's Darknet (the second real engine, for v4/v7-era cfgs): built once into the cache.
bash tools/build_alexeyab.sh >/dev/null
# `caffe` on the venv's PATH: Caffe's own tool, run with this venv's Python so Python layers
# (d2c's loss, BN and data layers) import d2c, numpy and pycaffe. Embedded Python finds the venv
# through the `python3` first on PATH.
tool="$(dirname "$(cat "$site/d2c_caffe.pth" 2>/dev/null || echo /nonexistent/python)")/bin/caffe"
if [ -x "$tool" ]; then
  venv_bin="$(pwd)/.venv/bin"
  printf '#!/bin/sh\n# Written by tools/setup.sh: BVLC Caffe'"'"'s caffe tool with this venv'"'"'s Python for Python layers.\nPATH="%s:$PATH" exec "%s" "$@"\n' \
    "$venv_bin" "$tool" > .venv/bin/caffe.tmp
  chmod +x .venv/bin/caffe.tmp && mv -f .venv/bin/caffe.tmp .venv/bin/caffe
fi
GLOG_minloglevel=2 .venv/bin/python -c 'import caffe, d2c, cv2; print("[setup] caffe, d2c and OpenCV", cv2.__version__, "import fine")'
