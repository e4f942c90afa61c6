"""The preprocessing contract: what Darknet feeds the network, written where no toolchain can lose it.

Why: a Caffe file says nothing about its input. Darknet feeds RGB floats in 0..1 (each byte / 255),
planar NCHW, letterboxed on a 0.5 grey canvas (pjreddie's test_detector; AlexeyAB's resizes unless
`[net] letter_box=1`; YOLOv1 stretches) with Darknet's bilinear resize. A deployment toolchain that
is given uint8 camera frames must be told to divide by 255 and in which channel order they come,
or its detections silently drift (int8 calibration scales included). So `d2c convert` writes the
contract into the sidecar (`preprocess`), and `deploy_preprocess` turns it into each toolchain's own
configuration for uint8 0..255 frames, letterboxed by the caller to the network size.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from d2c.errors import D2CError

#: Darknet divides each byte by 255 (src/image_opencv.cpp, load_image_cv).
SCALE_DIVISOR = 255.0
LETTERBOX_FILL = 0.5
#: The value a uint8 frame holds where Darknet's letterbox canvas is 0.5 (rint(127.5), round half to even).
LETTERBOX_FILL_U8 = 128
TARGETS = ("caffe", "opencv", "openvino", "mnn", "rknn", "tpu-mlir")
FRAME_ORDERS = ("RGB", "BGR")


def resize_rule(flavor: str, letter_box: int, head_kinds: list[str]) -> str | None:
    """How Darknet's detector sizes an image for this network: 'letterbox' or 'stretch'.

    pjreddie's test_detector always letterboxes; AlexeyAB's only with `[net] letter_box=1`; YOLOv1's
    `yolo test` stretches. A classifier (no detection head) has no detector rule: None.
    """
    if not head_kinds:
        return None
    if "detection" in head_kinds:
        return "stretch"
    if flavor == "alexeyab":
        return "letterbox" if letter_box else "stretch"
    return "letterbox"


def contract(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's `preprocess` (written by `d2c convert`), or the same derived from its input and
    heads for sidecars written before the field existed."""
    if isinstance(sidecar.get("preprocess"), dict):
        return sidecar["preprocess"]
    inp = sidecar.get("input") or {}
    kinds = [str(h.get("kind")) for h in sidecar.get("heads") or []]
    return make_contract(int(inp.get("width", 0)), int(inp.get("height", 0)), int(inp.get("channels", 3)),
                         str(sidecar.get("flavor", "pjreddie")), int(inp.get("letter_box", 0)), kinds)


def make_contract(width: int, height: int, channels: int, flavor: str, letter_box: int,
                  head_kinds: list[str]) -> dict[str, Any]:
    """The `preprocess` sidecar field: Darknet's input, stated in full."""
    resize = resize_rule(flavor, letter_box, head_kinds)
    return {
        "channel_order": "RGB" if channels == 3 else "GRAY",
        "layout": "NCHW",
        "dtype": "float32",
        "range": [0.0, 1.0],
        "scale": 1.0 / SCALE_DIVISOR,          # network input = byte * scale - mean
        "mean": [0.0] * channels,
        "resize": resize,
        "letterbox_fill": LETTERBOX_FILL if resize == "letterbox" else None,
        "interpolation": "darknet-bilinear",   # src/image.c resize_image (two passes, edge copies)
        "width": width,
        "height": height,
    }


def deploy_preprocess(sidecar: dict[str, Any], target: str, frame_order: str = "RGB") -> dict[str, Any]:
    """The contract in one toolchain's own terms, for uint8 0..255 frames in `frame_order`, already
    sized to the network (letterboxed when the contract says so: pad with 128).

    Keys common to every target: `mean_values`, `std_values` (network input = (byte - mean) / std),
    `channel_order` (of the frames), `reverse_channels` (whether the toolchain must swap them),
    `letterbox`, `pad_value`; then `config`, the toolchain's own arguments.
    """
    if target not in TARGETS:
        raise D2CError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    if frame_order not in FRAME_ORDERS:
        raise D2CError(f"frame channel order '{frame_order}': choose RGB or BGR")
    c = contract(sidecar)
    channels = len(c["mean"])
    std = 1.0 / float(c["scale"])
    mean = [float(m) * std for m in c["mean"]]
    reverse = channels == 3 and frame_order != c["channel_order"]
    letterbox = c["resize"] == "letterbox"
    common = {"mean_values": mean, "std_values": [std] * channels, "channel_order": frame_order,
              "reverse_channels": reverse, "letterbox": letterbox,
              "pad_value": LETTERBOX_FILL_U8 if letterbox else None, "input_dtype": "uint8"}
    return dict(common, target=target, config=_toolchain_config(target, c, mean, std, reverse, letterbox))


def _toolchain_config(target: str, c: dict[str, Any], mean: list[float], std: float, reverse: bool,
                      letterbox: bool) -> dict[str, Any]:
    """Each toolchain's spelling of (byte - mean) / std and the channel swap."""
    channels = len(mean)
    if target == "rknn":
        # rknn.config(): the NPU subtracts mean_values and divides by std_values on the uint8 input.
        # RKNN-Toolkit2 2.x has no channel reorder for Caffe inputs: swap the frames' channels on the
        # host when they are BGR (quant_img_RGB2BGR only affects its own reading of calibration JPEGs).
        return {"mean_values": [mean], "std_values": [[std] * channels], "host_reverse_channels": reverse}
    if target == "openvino":
        args = ["--mean_values", f"data[{','.join(_num(m) for m in mean)}]",
                "--scale_values", f"data[{','.join(_num(std) for _ in range(channels))}]"]
        return {"mo_args": args + (["--reverse_input_channels"] if reverse else [])}
    if target == "mnn":
        # MNN's ImageProcess (CV.ImageProcess / Interpreter input): dst = (src - mean) * normal.
        return {"image_process": {"sourceFormat": c["channel_order"] if not reverse else _other(c),
                                  "destFormat": c["channel_order"], "mean": mean,
                                  "normal": [1.0 / std] * channels}}
    if target == "opencv":
        return {"blobFromImage": {"scalefactor": 1.0 / std, "mean": mean, "swapRB": reverse, "crop": False}}
    if target == "caffe":
        return {"transformer": {"input_scale": 1.0 / std, "mean": mean, "channel_swap": [2, 1, 0] if reverse
                                else list(range(channels)), "transpose": [2, 0, 1]}}
    # tpu-mlir model_transform: (x - mean) * scale; it resizes images itself when preparing inputs.
    args = ["--mean", ",".join(_num(m) for m in mean),
            "--scale", ",".join(_num(1.0 / std) for _ in range(channels)),
            "--pixel_format", "rgb" if channels == 3 else "gray"]
    if letterbox:
        args += ["--keep_aspect_ratio", "--pad_type", "center", "--pad_value", str(LETTERBOX_FILL_U8)]
    return {"model_transform_args": args, "input_frames_order": "bgr" if reverse else "rgb"}


def _other(c: dict[str, Any]) -> str:
    return "BGR" if c["channel_order"] == "RGB" else "RGB"


def _num(value: float) -> str:
    """Shortest text that reads back as the same double."""
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(float(value))


def to_uint8_frame(tensor: np.ndarray, frame_order: str = "RGB") -> np.ndarray:
    """A Darknet network input (3, H, W) float in 0..1 -> the (H, W, 3) uint8 frame a camera pipeline
    would hand the toolchain (rounded to the nearest byte; the 0.5 canvas becomes 128)."""
    planar = np.asarray(tensor, dtype=np.float64)
    if planar.ndim != 3:
        raise D2CError(f"expected a (C, H, W) network input, got shape {planar.shape}")
    frame = np.rint(np.clip(planar, 0.0, 1.0) * SCALE_DIVISOR).astype(np.uint8).transpose(1, 2, 0)
    if frame_order == "BGR":
        frame = frame[:, :, ::-1]
    return np.ascontiguousarray(frame)


def from_uint8_frame(frame: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """What a toolchain configured with `pre` (from deploy_preprocess) computes from a uint8 frame:
    (1, C, H, W) float32 = (byte - mean) / std, channels swapped when the config says so."""
    hwc = np.asarray(frame)
    if hwc.dtype != np.uint8 or hwc.ndim != 3:
        raise D2CError(f"expected an (H, W, C) uint8 frame, got {hwc.dtype} {hwc.shape}")
    if pre["reverse_channels"]:
        hwc = hwc[:, :, ::-1]
    mean = np.asarray(pre["mean_values"], dtype=np.float32)
    std = np.asarray(pre["std_values"], dtype=np.float32)
    out = (hwc.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None])
