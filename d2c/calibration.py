"""Calibration images for int8: from a Darknet dataset, preprocessed by the model's contract.

Why here: int8 scales are only as good as the images they are measured on, and those must be fed
exactly as deployment feeds them: Darknet's letterbox (or stretch) to the network size, as the
uint8 frame the toolchain receives (d2c.preprocess). The images come from the `.data` file's train
list (the model's own training images), an image list file or a folder. `leave_one_out` gives the
set for scoring an image with a model calibrated without it.

The prepared tensors are cached by content (image bytes, network size, resize rule, dtype) under
the d2c cache, so tests and repeated builds do not redo the resizes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2c.dataset import DataSpec, read_list
from d2c.errors import DatasetError
from d2c.fsutil import atomic_write, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
INPUT_KINDS = ("uint8", "float")


def cache_dir() -> Path:
    return Path(os.environ.get("D2C_CACHE") or Path.home() / ".cache" / "d2c") / "calibration"


def calibration_images(source: str | Path, limit: int | None = None) -> list[Path]:
    """The images of a `.data` file's train list, an image list (one path a line) or a folder,
    in listed (or name) order, at most `limit` of them (evenly spread over the list)."""
    src = Path(source)
    if not src.exists():
        raise DatasetError(f"{src}: no such .data file, image list or folder")
    if src.is_dir():
        images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        where = f"{src}: no images ({', '.join(IMAGE_SUFFIXES)})"
    elif src.suffix == ".data":
        spec = DataSpec.load(src)
        list_path = spec.train
        images = _resolve_list(list_path, (spec.path.parent,))
        where = f"{spec.where('train')}: the train list {list_path} has no images"
    else:
        images = _resolve_list(src, ())
        where = f"{src}: the image list is empty"
    if not images:
        raise DatasetError(where)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--images {limit}: must be at least 1")
        if limit < len(images):
            picks = np.linspace(0, len(images) - 1, limit).round().astype(int)
            images = [images[i] for i in picks]
    return images


def _resolve_list(list_path: Path, extra: tuple[Path, ...]) -> list[Path]:
    """Darknet's relative-to-CWD entries, then the .data file's and the list's directories."""
    out = []
    for number, listed in read_list(list_path):
        candidates = [Path(listed)] if Path(listed).is_absolute() else \
            [base / listed for base in (Path.cwd(), *extra, list_path.parent)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetError(f"{list_path}:{number}: image {listed!r} not found")
        out.append(found)
    return out


def leave_one_out(images: list[Path], held: Path) -> list[Path]:
    """The calibration set for scoring `held`: every other image."""
    rest = [p for p in images if Path(p).resolve() != Path(held).resolve()]
    if not rest:
        raise DatasetError(f"{held}: leave-one-out needs at least two calibration images")
    return rest


def network_input(image_path: Path, sidecar: dict[str, Any]) -> np.ndarray:
    """(3, H, W) float32 0..1: what Darknet's detector feeds the network for this image."""
    from d2c.detect_alexeyab import network_input as sized
    from d2c.image import load_image_rgb
    from d2c.preprocess import contract
    pre = contract(sidecar)
    return sized(load_image_rgb(image_path), int(pre["width"]), int(pre["height"]), pre["resize"] != "stretch")


def toolchain_tensor(image_path: Path, sidecar: dict[str, Any], kind: str = "uint8") -> np.ndarray:
    """(1, 3, H, W) as the toolchain receives it: uint8 bytes (the contract's frame) or float 0..1."""
    from d2c.preprocess import to_uint8_frame
    tensor = network_input(image_path, sidecar)
    if kind == "uint8":
        return to_uint8_frame(tensor).transpose(2, 0, 1)[None].copy()
    if kind == "float":
        return tensor[None].copy()
    raise ValueError(f"kind must be one of {INPUT_KINDS}")


@dataclass
class PreparedSet:
    """Prepared tensors (.npy, NCHW) and the list file a toolchain reads them from."""

    list_file: Path
    tensors: dict[Path, Path]      # image -> its .npy


def prepare(images: list[Path], sidecar: dict[str, Any], kind: str = "uint8", name: str = "set") -> PreparedSet:
    """Write (or reuse) the toolchain tensors of `images` and a list file naming them."""
    from d2c.preprocess import contract
    pre = contract(sidecar)
    key = f"{pre['width']}x{pre['height']}-{pre['resize']}-{kind}"
    root = cache_dir() / key
    tensors: dict[Path, Path] = {}
    for image in images:
        try:
            digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()[:24]
        except OSError as exc:
            raise DatasetError(f"{image}: cannot read the image ({exc.strerror or exc})") from None
        target = root / f"{digest}.npy"
        if not target.is_file():
            array = toolchain_tensor(Path(image), sidecar, kind)
            with atomic_write(target) as handle:
                np.save(handle, array)
        tensors[Path(image)] = target
    listing = "\n".join(str(tensors[Path(p)]) for p in images) + "\n"
    list_file = root / "lists" / f"{name}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}.txt"
    if not list_file.is_file():
        atomic_write_text(list_file, listing)
    return PreparedSet(list_file=list_file, tensors=tensors)
