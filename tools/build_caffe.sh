#!/usr/bin/env bash
# Build BVLC Caffe 1.0 (Debian bullseye source package) CPU-only with the Python layer,
# against the project's venv interpreter. Cached outside the repo, keyed by Caffe version,
# Python version and numpy ABI, so CI reuses it. Prints the directory that holds `caffe/`.
set -euo pipefail
PY=${1:?usage: build_caffe.sh PYTHON}
CAFFE_VERSION=1.0.0+git20180821.99bd997-8
CACHE=${D2C_CACHE:-$HOME/.cache/d2c}
key=$("$PY" -c 'import sys, numpy; v = sys.version_info; print("py%d%d-np%s" % (v[0], v[1], numpy.__version__.split(".")[0]))')

# Build flags (measured with `d2c bench`, see README): -O3 and the widest x86-64 level this CPU
# has (v3 = AVX2+FMA+BMI2...). -ffp-contract=off keeps Caffe's own loops rounding exactly as a
# plain build does (no silent FMA contraction), so results match the reference build bit for bit.
# The key below includes the flags: a machine without AVX2 gets (and builds) its own copy.
level=x86-64-v2
v3_flags=(avx avx2 bmi1 bmi2 f16c fma abm movbe xsave)
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has_v3=1
for f in "${v3_flags[@]}"; do [[ "$cpu_flags" == *" $f "* ]] || has_v3=0; done
[ "$has_v3" = 1 ] && level=x86-64-v3
CXXFLAGS=${D2C_CAFFE_CXXFLAGS:-"-O3 -march=$level -ffp-contract=off"}
# BLAS: Debian's OpenBLAS, pthread or OpenMP flavour, chosen by RUNPATH (no system alternative changes).
BLAS=${D2C_CAFFE_BLAS:-openblas-pthread}
case "$BLAS" in
  openblas-pthread|openblas-openmp|openblas-serial) ;;
  *) echo "[build_caffe] D2C_CAFFE_BLAS must be openblas-pthread, openblas-openmp or openblas-serial" >&2; exit 2;;
esac
# Faster CPU loops for max pooling, im2col and crop (tools/caffe_perf: bit-identical results, measured
# by `d2c bench`); D2C_CAFFE_FAST=0 builds Caffe's own loops for comparison.
FAST=${D2C_CAFFE_FAST:-1}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fast_key=stock
[ "$FAST" = 1 ] && fast_key=$(cat "$here/caffe_perf/apply.py" "$here/caffe_perf/d2c_fast_cpu.hpp" | sha1sum | cut -c1-8)
flags_key=$(printf '%s|%s|%s' "$CXXFLAGS" "$BLAS" "$fast_key" | sha1sum | cut -c1-8)
prefix="$CACHE/caffe-${CAFFE_VERSION//[^A-Za-z0-9.]/_}-$key-$flags_key"

# Caffe's own `caffe` tool (train/test/time from the command line), compiled from tools/caffe.cpp
# against the installed libcaffe.so. Every computation lives in libcaffe.so, which this step never
# touches, so the tool adds no numerics of its own and an existing cached build gets it without a
# rebuild. WITH_PYTHON_LAYER makes a Python layer's exception print its traceback (CMake's tool
# target lacks that define).
build_tool() {
  local src_tree="$1" tool="$prefix/bin/caffe" tmp
  [ -x "$tool" ] && return 0
  [ -f "$src_tree/tools/caffe.cpp" ] || { echo "[build_caffe] $src_tree/tools/caffe.cpp missing" >&2; exit 1; }
  local pyinc_ blasdir_ boost_py
  pyinc_=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  blasdir_=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["blas_dir"])' "$prefix/build-info.json")
  boost_py=$("$PY" -c 'import sys; print("boost_python%d%d" % sys.version_info[:2])')
  echo "[build_caffe] compiling the caffe tool (tools/caffe.cpp) against the cached libcaffe.so" >&2
  mkdir -p "$prefix/bin"
  tmp=$(mktemp "$prefix/bin/.caffe.XXXXXX")
  g++ $CXXFLAGS -DNDEBUG -DCPU_ONLY -DUSE_LMDB -DWITH_PYTHON_LAYER -DCAFFE_VERSION=1.0.0 -DBOOST_BIND_GLOBAL_PLACEHOLDERS -DBOOST_ALLOW_DEPRECATED_HEADERS \
    -I"$src_tree/include" -I"$prefix/include" -I"$pyinc_" "$src_tree/tools/caffe.cpp" -o "$tmp" \
    -L"$prefix/python/caffe" -lcaffe -lglog -lgflags -lprotobuf -lboost_system -l"$boost_py" \
    -Wl,-rpath,"\$ORIGIN/../python/caffe:$blasdir_:/usr/lib/x86_64-linux-gnu/hdf5/serial" \
    $(ldd "$prefix/python/caffe/libcaffe.so" | awk '/libpython/ {print $3}') \
    >&2 || { rm -f "$tmp"; exit 1; }
  mv -f "$tmp" "$tool"
}
if [ -f "$prefix/.built" ] && [ -x "$prefix/bin/caffe" ]; then echo "$prefix/python"; exit 0; fi

log() { echo "[build_caffe] $*" >&2; }
export DEBIAN_FRONTEND=noninteractive
deps=(build-essential cmake dpkg-dev quilt libboost-filesystem-dev libboost-system-dev
      libboost-thread-dev libboost-python-dev libgflags-dev libgoogle-glog-dev libhdf5-dev
      libopenblas-dev "lib${BLAS/-/0-}" libprotobuf-dev protobuf-compiler liblmdb-dev libsnappy-dev patchelf)
missing=()
for p in "${deps[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build deps: ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

src="$CACHE/src"
mkdir -p "$src"
if [ ! -d "$src/caffe-1.0.0+git20180821.99bd997" ]; then
  # A private sources list for bullseye deb-src that reuses the configured mirror: nothing system-wide changes.
  aptdir="$CACHE/apt"; mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
  mirror=$( { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
              grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
            | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "deb-src [trusted=yes] ${mirror%/} bullseye main" > "$aptdir/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$aptdir/lists" -o "APT::Get::List-Cleanup=0")
  log "fetching caffe $CAFFE_VERSION source from $mirror (bullseye)"
  apt-get "${aptopts[@]}" update -qq >&2
  (cd "$src" && apt-get "${aptopts[@]}" source --download-only "caffe=$CAFFE_VERSION" >&2)
  (cd "$src" && dpkg-source --no-check -x caffe_*.dsc >&2)
fi
tree="$src/caffe-1.0.0+git20180821.99bd997"
if [ ! -f "$tree/.d2c-patched" ]; then
  (cd "$tree" && if [ -d debian/patches ] && [ ! -d .pc ]; then QUILT_PATCHES=debian/patches quilt push -a >&2 || true; fi)
  # protobuf >= 3.21: SetTotalBytesLimit takes one argument.
  sed -i 's/SetTotalBytesLimit(kProtoReadBytesLimit, 536870912)/SetTotalBytesLimit(kProtoReadBytesLimit)/' "$tree/src/caffe/util/io.cpp"
  touch "$tree/.d2c-patched"
fi
# A cached library from before the tool was built: add the tool only (the library is not rebuilt).
if [ -f "$prefix/.built" ]; then build_tool "$tree"; echo "$prefix/python"; exit 0; fi
build="$prefix-build"
mkdir -p "$build"  # kept until success, so a failed install step does not rebuild
patches="[]"
if [ "$FAST" = 1 ]; then
  # Patch a private copy: the shared source tree stays as Debian ships it (plus the protobuf fix).
  rm -rf "$build/src"; cp -a "$tree" "$build/src"; tree="$build/src"
  "$PY" "$here/caffe_perf/apply.py" "$tree" >&2
  patches='["d2c_fast_cpu: max pooling forward, im2col, crop forward; threads = OpenBLAS threads (tools/caffe_perf)"]'
fi
pylib=$("$PY" -c 'import sysconfig,os; print(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))')
pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$("$PY" -c 'import numpy; print(numpy.get_include())')
log "configuring (python $pylib; CXXFLAGS $CXXFLAGS; BLAS $BLAS)"
cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCPU_ONLY=ON -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF \
  -DUSE_LMDB=ON -DBUILD_python=ON -DBUILD_python_layer=ON -DBUILD_docs=OFF -DBLAS=Open \
  -Dpython_version=3 -DPYTHON_EXECUTABLE="$PY" -DPYTHON_LIBRARY="$pylib" -DPYTHON_INCLUDE_DIR="$pyinc" \
  -DNUMPY_INCLUDE_DIR="$npinc" -DCMAKE_CXX_FLAGS="$CXXFLAGS" -DCMAKE_CXX_FLAGS_RELEASE="-DNDEBUG" >"$build/cmake.log" 2>&1 || { tail -40 "$build/cmake.log" >&2; exit 1; }
log "building (about 3 minutes on 2 cores)"
make -C "$build" -j"$(nproc)" caffe pycaffe >"$build/make.log" 2>&1 || { tail -60 "$build/make.log" >&2; exit 1; }
rm -rf "$prefix"; mkdir -p "$prefix"
cp -rL "$tree/python" "$prefix/python"
cp -L "$build"/lib/_caffe.so "$prefix/python/caffe/_caffe.so"
cp -a "$build"/lib/libcaffe.so* "$prefix/python/caffe/"
# The build tree is deleted below: make the extension find libcaffe beside itself, and load the
# chosen OpenBLAS flavour (RUNPATH is searched before the system default libopenblas.so.0).
blasdir="/usr/lib/$(gcc -print-multiarch)/$BLAS"
[ -f "$blasdir/libopenblas.so.0" ] || { echo "[build_caffe] $blasdir/libopenblas.so.0 missing" >&2; exit 1; }
for lib in "$prefix/python/caffe/_caffe.so" "$prefix"/python/caffe/libcaffe.so.*; do
  [ -L "$lib" ] || patchelf --set-rpath "\$ORIGIN:$blasdir:/usr/lib/x86_64-linux-gnu/hdf5/serial" "$lib"
done
cp -r "$build/include" "$prefix/include" 2>/dev/null || true
printf '{"caffe": "%s", "cxxflags": "%s", "blas": "%s", "blas_dir": "%s", "key": "%s-%s", "patches": %s}\n' \
  "$CAFFE_VERSION" "$CXXFLAGS" "$BLAS" "$blasdir" "$key" "$flags_key" "$patches" > "$prefix/build-info.json"
build_tool "$tree"
touch "$prefix/.built"
rm -rf "$build"
echo "$prefix/python"
