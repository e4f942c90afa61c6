"""Finding the real engines (pycaffe, Debian's libdarknet.so, OpenCV) with clear errors."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

from d2c.errors import EngineError

DARKNET_LIB = Path("/usr/lib/darknet/libdarknet.so")


def import_caffe() -> ModuleType:
    """Import pycaffe quietly (glog), or explain how to get it."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    # Idle OpenBLAS threads otherwise spin and slow the next layer on 2 cores (measured by d2c bench).
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        import caffe  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EngineError(f"pycaffe is not importable ({exc}); run `make setup`, which builds BVLC Caffe "
                          f"from Debian's source package into ~/.cache/d2c") from None
    caffe.set_mode_cpu()
    return caffe


def import_cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise EngineError(f"OpenCV is not importable ({exc}); pip install 'opencv-python-headless<5'") from None
    if int(cv2.__version__.split(".")[0]) >= 5:
        raise EngineError(f"OpenCV {cv2.__version__} dropped the Darknet and Caffe importers; use 4.x")
    return cv2


def _dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "not installed"


def caffe_build_info(caffe_dir: Path | None) -> Any:
    """tools/build_caffe.sh records its flags, BLAS and patches in build-info.json beside python/."""
    if caffe_dir is None:
        return None
    path = caffe_dir.parent.parent / "build-info.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    return {"note": f"no {path.name} (not built by tools/build_caffe.sh, or by an older one)"}


def caffe_tool(caffe_dir: Path | None) -> Path | None:
    """Caffe's own `caffe` binary, which tools/build_caffe.sh installs beside python/ (bin/caffe)."""
    if caffe_dir is None:
        return None
    tool = caffe_dir.parent.parent / "bin" / "caffe"
    return tool if tool.is_file() and os.access(tool, os.X_OK) else None


def engine_info() -> dict[str, str]:
    """One line per engine: where it is and which version (for `d2c info` and reports)."""
    info: dict[str, str] = {}
    info["darknet"] = (f"{DARKNET_LIB} (Debian package darknet {_dpkg_version('darknet')})"
                       if DARKNET_LIB.exists() else "missing: apt-get install darknet")
    from d2c.darknet.alexeyab import version_info as alexeyab_info
    ab = alexeyab_info()
    info["alexeyab"] = (f"{ab['library']} (AlexeyAB commit {str(ab.get('commit', '?'))[:7]}, "
                                f"{ab.get('make', '?')}, {ab.get('opts', '?')})" if ab["available"]
                                else f"missing: {ab['error']}")
    try:
        caffe = import_caffe()
        version = getattr(caffe, "__version__", "1.0.0")
        caffe_dir = Path(caffe.__file__).parent
        build = caffe_build_info(caffe_dir) or {}
        built = (f"; built {build['cxxflags']}, BLAS {build.get('blas', '?')}, "
                 f"patches: {', '.join(build.get('patches') or ['none'])}" if "cxxflags" in build else "")
        info["caffe"] = f"{caffe_dir} (BVLC Caffe {version}, CPU{built})"
        tool = caffe_tool(caffe_dir)
        info["caffe-tool"] = (f"{tool} (Caffe's `caffe` binary; `caffe` on the venv's PATH runs it with the venv's "
                              f"Python)" if tool else "missing: run `make setup` (tools/build_caffe.sh builds it)")
    except EngineError as exc:
        info["caffe"] = f"missing: {exc}"
    try:
        cv2 = import_cv2()
        info["opencv"] = f"{cv2.__version__} ({Path(cv2.__file__).parent})"
    except EngineError as exc:
        info["opencv"] = f"missing: {exc}"
    import numpy
    info["numpy"] = numpy.__version__
    info.update(toolchain_info())
    return info


def toolchain_info() -> dict[str, str]:
    """Deploy toolchains (d2c.targets): which venvs `make targets` has built, read from their stamps."""
    import json

    from d2c.targets import REGISTRY
    from d2c.targets.base import STAMP, venv_dir
    info: dict[str, str] = {}
    for name, target in REGISTRY.items():
        if target.not_runnable:
            info[name] = f"not runnable here: {target.not_runnable}"
        elif target.venv:
            try:
                stamp = json.loads((venv_dir(target) / STAMP).read_text())
                info[name] = f"{venv_dir(target)} ({' '.join(stamp['requirements'])})"
            except (OSError, ValueError, KeyError):
                info[name] = f"missing: run `make targets` ({' '.join(target.requirements)})"
    return info
