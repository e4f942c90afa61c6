#!/usr/bin/env bash
# Build AlexeyAB's Darknet (commit 59596d7) CPU-only as a shared library: the second real engine that
# d2c's AlexeyAB-era conversions (v4, v4-tiny, v4-csp, v7, ...) are checked against. Cached under the d2c
# cache, keyed by the source's sha256, so a second run is instant. Prints the build directory, which holds
# libdarknet.so, the darknet binary, include/darknet.h and build-info.json.
#
# Source, first found: $D2C_ALEXEYAB_SRC (a directory or a .tar.gz); alexeyab-darknet-59596d7.tar.gz kept
# in the cache from an earlier run; the same tarball in an engines/ folder of any directory beside the
# checkout (offline machines; it is then kept in the cache, so later clones elsewhere find it); else a git
# clone of the pinned commit.
set -euo pipefail
COMMIT=59596d7880f6504768df41d6daa586f5cb2b932f
TARBALL=alexeyab-darknet-${COMMIT:0:7}.tar.gz
CACHE=${D2C_CACHE:-$HOME/.cache/d2c}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[build_alexeyab] $*" >&2; }

src=${D2C_ALEXEYAB_SRC:-}
if [ -z "$src" ]; then
  kept="$CACHE/src/$TARBALL"
  for candidate in "$kept" "$here"/../../*/engines/"$TARBALL"; do
    if [ -f "$candidate" ]; then src=$(cd "$(dirname "$candidate")" && pwd)/$TARBALL; break; fi
  done
  if [ -n "$src" ] && [ "$src" != "$kept" ]; then   # keep the offline copy for clones in other places
    mkdir -p "$CACHE/src" && cp "$src" "$kept.tmp" && mv "$kept.tmp" "$kept" && src="$kept"
  fi
fi
if [ -z "$src" ]; then
  # No local copy: clone the pinned commit once into the cache (needs a network).
  src="$CACHE/src/alexeyab-darknet-${COMMIT:0:7}"
  if [ ! -f "$src/.d2c-cloned" ]; then
    command -v git >/dev/null || { log "git is needed to fetch AlexeyAB/darknet (or set D2C_ALEXEYAB_SRC)"; exit 2; }
    log "cloning AlexeyAB/darknet at $COMMIT"
    rm -rf "$src"; mkdir -p "$src"
    git -C "$src" init -q
    git -C "$src" fetch -q --depth 1 https://github.com/AlexeyAB/darknet.git "$COMMIT" >&2
    git -C "$src" checkout -q FETCH_HEAD
    touch "$src/.d2c-cloned"
  fi
fi
[ -e "$src" ] || { log "D2C_ALEXEYAB_SRC=$src does not exist"; exit 2; }

# Key: the tarball's sha256, or for a directory the sha256 of its sorted file list and contents.
if [ -f "$src" ]; then
  key=$(sha256sum "$src" | cut -c1-16)
else
  key=$(cd "$src" && find src include 3rdparty Makefile -type f -print0 2>/dev/null | LC_ALL=C sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-16)
fi
MAKE_ARGS=(GPU=0 CUDNN=0 OPENCV=0 OPENMP=0 AVX=0 LIBSO=1)
prefix="$CACHE/alexeyab-darknet-$key"
if [ -f "$prefix/.built" ]; then echo "$prefix"; exit 0; fi

deps=(build-essential)
missing=()
for p in "${deps[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build deps: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

build="$prefix-build.$$"
rm -rf "$build"; mkdir -p "$build"
trap 'rm -rf "$build"' EXIT
if [ -f "$src" ]; then
  tar -xzf "$src" -C "$build" --strip-components=1
else
  (cd "$src" && tar -cf - --exclude=.git --exclude=obj --exclude='*.o' --exclude='*.so' .) | tar -xf - -C "$build"
fi
jobs=$(nproc 2>/dev/null || echo 2)
log "building $src (make ${MAKE_ARGS[*]}, -j$jobs)"
start=$(date +%s)
make -C "$build" -j"$jobs" "${MAKE_ARGS[@]}" >"$build/build.log" 2>&1 || { tail -20 "$build/build.log" >&2; log "build failed"; exit 1; }
log "built in $(( $(date +%s) - start )) s"

# Install the artefacts next to each other, then mark done last (a killed build leaves no .built).
stage="$prefix.tmp.$$"
rm -rf "$stage"; mkdir -p "$stage/include"
cp "$build/libdarknet.so" "$build/darknet" "$stage/"
cp "$build/include/darknet.h" "$stage/include/"
cat > "$stage/build-info.json" <<EOF
{"commit": "$COMMIT", "source": "$src", "source_key": "$key",
 "make": "make ${MAKE_ARGS[*]}", "opts": "$(sed -n 's/^OPTS=//p' "$build/Makefile" | head -1)",
 "cc": "$(gcc --version | head -1)"}
EOF
rm -rf "$prefix"; mv "$stage" "$prefix"
touch "$prefix/.built"
echo "$prefix"
