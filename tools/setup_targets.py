#!/usr/bin/env python3
"""Create the deploy toolchains' venvs in the d2c cache (`make targets`), one per target, pinned.

Why separate venvs: OpenVINO's Model Optimizer wants protobuf<4, RKNN-Toolkit2 and MNN pin their own
numpy/protobuf/onnx; none of them can share d2c's venv. Idempotent: a venv whose stamp
(.d2c-installed.json) lists exactly the target's requirements and this Python's version is reused as it
is, so later runs take a second; anything else (no stamp, other pins, a half-finished install) is
rebuilt from scratch, through the pip cache in the d2c cache. Usage:
    .venv/bin/python tools/setup_targets.py [NAME ...] [--force]      (default: every runnable target)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.targets import REGISTRY  # noqa: E402
from d2c.targets.base import STAMP, Target, cache_root, venv_dir  # noqa: E402


def base_python() -> str:
    """The interpreter the venvs are made from: the one d2c's venv was made from (its base)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def python_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def wanted_stamp(target: Target, version: str) -> dict:
    return {"requirements": list(target.requirements), "python_version": version}


def is_current(target: Target, version: str) -> bool:
    """The venv is there, works, and its stamp names the same pins and Python version."""
    directory = venv_dir(target)
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("requirements") != list(target.requirements):
        return False
    python = directory / "bin" / "python"
    if not python.exists():
        return False
    have = stamp.get("python_version") or python_version(str(python))   # older stamps named the interpreter only
    return have == version


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def install(target: Target, python: str, version: str) -> dict:
    """Fresh venv + pinned pip install; the stamp is written last, so an interrupted run is redone."""
    directory = venv_dir(target)
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        subprocess.run([python, "-m", "venv", str(directory)], check=True)
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        subprocess.run([str(directory / "bin" / "python"), "-m", "pip", "install", "-q", "--cache-dir",
                        str(cache_root() / "pip"), *target.requirements], check=True, env=env)
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        shutil.rmtree(directory, ignore_errors=True)
        raise
    stamp = {**wanted_stamp(target, version), "python": python,
             "seconds": round(time.perf_counter() - start, 1), "bytes": folder_bytes(directory)}
    tmp = directory / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(directory / STAMP)
    return stamp


def main(argv: list[str] | None = None) -> int:
    runnable = sorted(name for name, t in REGISTRY.items() if t.venv and not t.not_runnable)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"targets (default: {' '.join(runnable)})")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp says it is current")
    args = ap.parse_args(argv)
    for name in args.names:
        if name not in REGISTRY:
            ap.error(f"unknown target '{name}'; choose from {', '.join(runnable)}")
        if REGISTRY[name].not_runnable or not REGISTRY[name].venv:
            ap.error(f"target '{name}' has no toolchain to install here: "
                     f"{REGISTRY[name].not_runnable or 'it runs in d2c itself'}")
    python = base_python()
    version = python_version(python)
    from tqdm import tqdm
    for name in tqdm(args.names or runnable, desc="toolchains", unit="venv", leave=False):
        target = REGISTRY[name]
        if not args.force and is_current(target, version):
            tqdm.write(f"{name}: {venv_dir(target)} is current ({' '.join(target.requirements)})")
            continue
        tqdm.write(f"{name}: installing {' '.join(target.requirements)} into {venv_dir(target)} ...")
        stamp = install(target, python, version)
        tqdm.write(f"{name}: done in {stamp['seconds']:.0f} s, {stamp['bytes'] / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
