"""Darknet's detection augmentation in numpy: bit-exact against libdarknet's own loader, plus properties."""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest

from d2c.augment import (GlibcRand, augment_detection, correct_boxes, darknet_load_batches, darknet_load_detection,
                         detection_batch, distort_image, hsv_to_rgb, rgb_to_hsv, truth_record)
from d2c.dataset import load_samples, parse_labels
from d2c.errors import DatasetError
from d2c.image import load_image_rgb

F32 = np.float32
DOG = Path("/usr/share/darknet/data/dog.jpg")
SEEDS = list(range(1, 13))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Darknet-layout images (odd sizes, PNG and JPEG) with many boxes each, some tiny, some clipped."""
    import cv2
    root = tmp_path_factory.mktemp("aug")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(300, 400), (416, 416), (500, 333), (97, 131), (200, 200)]):
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(noise, (9, 9), 3)
        img[: h // 5, : w // 5] = (128, 128, 128)         # grey patch: hue undefined (0/0) in rgb_to_hsv
        img[h // 2:, w // 2:, 0] = 255                     # saturated patch: clipping in hsv_to_rgb
        path = root / "images" / f"im{i}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    shutil.copy(DOG, root / "images" / "dog.jpg")
    paths.append(root / "images" / "dog.jpg")
    for path in paths:
        lines = []
        for k in range(12 if path.stem != "im4" else 95):   # im4: more boxes than [yolo]'s 90
            x, y = rng.uniform(0.02, 0.98, 2)
            w, h = rng.uniform(0.0005, 0.6, 2)             # some below .001 once scaled: dropped
            lines.append(f"{k % 7} {x:.6f} {y:.6f} {w:.6f} {h:.6f}")
        (root / "labels" / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    return paths


def _ours(path: Path, seed: int, w: int, h: int, **kw) -> tuple[np.ndarray, np.ndarray, bool]:
    src = GlibcRand(seed)
    src.rand()   # load_data_detection's rand() % m path choice
    boxes, problems = parse_labels(path.parent.parent / "labels" / f"{path.stem}.txt", 80)
    assert not problems
    sample = augment_detection(load_image_rgb(path), boxes, w, h, rng=src, **kw)
    return sample.image, sample.truth, sample.params.flip


def test_glibc_rand_matches_libc() -> None:
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [ctypes.c_uint]
    for seed in (0, 1, 42, 2 ** 31 + 7, 2 ** 32 - 1):
        libc.srand(seed)
        want = [libc.rand() for _ in range(400)]
        src = GlibcRand(seed)
        assert [src.rand() for _ in range(400)] == want


@pytest.mark.parametrize("w, h, settings", [
    (416, 416, dict(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0)),
    (416, 416, dict(jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5)),
    (320, 224, dict(jitter=0.2, hue=0.05, saturation=1.2, exposure=0.8, max_boxes=30)),
], ids=["darknet-no-jitter", "yolov3-style", "non-square-region"])
def test_bit_exact_against_darknet_loader(images: list[Path], w: int, h: int, settings: dict) -> None:
    """Same rand() stream (srand(seed) in Darknet, GlibcRand(seed) here): same tensor and truth, bit for bit."""
    paths = [p for p in images for _ in SEEDS]
    seeds = [s for _ in images for s in SEEDS]
    kw = dict(settings)
    max_boxes = kw.pop("max_boxes", 90)
    ref = darknet_load_detection(paths, seeds, w, h, max_boxes=max_boxes, classes=80, **kw)
    flips = set()
    for path, seed, (x_ref, y_ref) in zip(paths, seeds, ref):
        x, y, flip = _ours(path, seed, w, h, max_boxes=max_boxes, **kw)
        flips.add(flip)
        np.testing.assert_array_equal(x, x_ref, err_msg=f"{path.name} seed {seed}")
        np.testing.assert_array_equal(y, y_ref, err_msg=f"{path.name} seed {seed}")
    assert flips == {False, True}    # both branches were compared


def test_batches_equal_darknets(images: list[Path], tmp_path: Path) -> None:
    """A whole train_detector batch: n picks of rand() % m with replacement, then each image."""
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in images))
    samples, _ = load_samples(tmp_path / "list.txt", 80)
    kw = dict(jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5)
    seeds = [21, 22]
    ref = darknet_load_batches([[str(s.image_path) for s in samples]] * 2, [8, 8], seeds, 160, 128, **kw)
    cache: dict = {}
    for seed, (x_ref, y_ref) in zip(seeds, ref):
        batch = detection_batch(samples, 8, 160, 128, rng=GlibcRand(seed), image_cache=cache, **kw)
        assert len(set(batch.indices.tolist())) > 1
        np.testing.assert_array_equal(batch.images, x_ref)
        np.testing.assert_array_equal(batch.truth, y_ref)
    fixed = detection_batch(samples, 3, 160, 128, indices=[0, 1, 0], no_augment=True, image_cache=cache)
    np.testing.assert_array_equal(fixed.images[0], fixed.images[2])
    assert fixed.truth.shape == (3, 450)


def _sorted_rows(truth: np.ndarray) -> np.ndarray:
    rows = truth.reshape(-1, 5)
    return rows[np.lexsort(rows.T[::-1])]


def test_no_augment_equals_darknet_without_flip(images: list[Path]) -> None:
    """no_augment on a square image = Darknet's loader at jitter 0/hue 0/sat 1/exp 1 whenever it
    happens not to flip; the truth holds the same boxes (Darknet shuffles their order)."""
    square = next(p for p in images if p.stem == "im1")
    ref = darknet_load_detection([square] * len(SEEDS), SEEDS, 416, 416, jitter=0.0, hue=0.0,
                                 saturation=1.0, exposure=1.0)
    boxes, _ = parse_labels(square.parent.parent / "labels" / "im1.txt", 80)
    ours = augment_detection(load_image_rgb(square), boxes, 416, 416, no_augment=True)
    compared = 0
    for seed, (x_ref, y_ref) in zip(SEEDS, ref):
        if _ours(square, seed, 416, 416, jitter=0.0)[2]:
            continue   # Darknet flipped this one; it has no switch to turn flipping off
        compared += 1
        np.testing.assert_allclose(ours.image, x_ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ours.image, x_ref)     # in fact bit-exact
        np.testing.assert_array_equal(_sorted_rows(ours.truth), _sorted_rows(y_ref))
    assert compared >= 3
    # In file order, clipped to the image: exactly the boxes of the file, mapped by the identity.
    same = truth_record(correct_boxes(boxes, F32(0), F32(0), F32(1), F32(1), False), 90)
    np.testing.assert_array_equal(ours.truth, same)
    inside = (boxes[:, 1] - boxes[:, 3] / 2 > 0) & (boxes[:, 1] + boxes[:, 3] / 2 < 1) & \
             (boxes[:, 2] - boxes[:, 4] / 2 > 0) & (boxes[:, 2] + boxes[:, 4] / 2 < 1)
    rows = ours.truth.reshape(-1, 5)
    assert inside.any()
    np.testing.assert_allclose(rows[: len(boxes)][inside, :4], boxes[inside, 1:5], atol=1e-7)


def test_no_augment_is_deterministic_and_centred(images: list[Path]) -> None:
    im = load_image_rgb(images[0])                                # 400 x 300 -> 416 x 312 centred
    boxes = np.array([[3, 0.5, 0.5, 0.2, 0.4]], F32)
    a = augment_detection(im, boxes, 416, 416, no_augment=True)
    b = augment_detection(im, boxes, 416, 416, no_augment=True)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.params.nh == 312 and a.params.dy == 52 and not a.params.flip
    assert np.all(a.image[:, :52] == F32(0.5)) and np.all(a.image[:, 52 + 312:] == F32(0.5))
    np.testing.assert_allclose(a.truth[:5], [0.5, 0.5, 0.2, 0.4 * 312 / 416, 3], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Properties with a numpy Generator
# --------------------------------------------------------------------------------------------

class Replay:
    """A rand() source replaying fixed integers (to change one draw and keep the others)."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)

    def rand(self) -> int:
        return self.values.pop(0)


def test_flip_mirrors_image_and_boxes(images: list[Path]) -> None:
    im = load_image_rgb(images[2])
    boxes, _ = parse_labels(images[2].parent.parent / "labels" / "im2.txt", 80)
    draws = [int(v) for v in np.random.default_rng(3).integers(0, 2 ** 31 - 1, 40)]
    flip_at = 9    # jitter w, jitter h, dx, dy, hue, sat, sat coin, exp, exp coin, flip
    even, odd = list(draws), list(draws)
    even[flip_at] = 2 * (draws[flip_at] // 2)
    odd[flip_at] = even[flip_at] + 1
    kw = dict(jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5)
    a = augment_detection(im, boxes, 416, 416, rng=Replay(even), **kw)
    b = augment_detection(im, boxes, 416, 416, rng=Replay(odd), **kw)
    assert not a.params.flip and b.params.flip
    np.testing.assert_array_equal(b.image, a.image[:, :, ::-1])
    ta, tb = a.truth.reshape(-1, 5), b.truth.reshape(-1, 5)
    n = int((ta[:, 0] != 0).sum())
    assert n > 0 and int((tb[:, 0] != 0).sum()) == n
    np.testing.assert_allclose(tb[:n, 0], 1 - ta[:n, 0], atol=2e-7)
    np.testing.assert_allclose(tb[:n, 1:], ta[:n, 1:], atol=2e-7)


def test_random_samples_stay_in_range(images: list[Path]) -> None:
    rng = np.random.default_rng(7)
    im = load_image_rgb(images[0])
    boxes, _ = parse_labels(images[0].parent.parent / "labels" / "im0.txt", 80)
    flips, hues, sats, ars = [], [], [], []
    for _ in range(200):
        s = augment_detection(im, boxes, 64, 48, rng=rng, jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5)
        assert s.image.shape == (3, 48, 64) and s.image.dtype == F32
        assert 0 <= s.image.min() and s.image.max() <= 1
        rows = s.truth.reshape(-1, 5)
        live = rows[rows[:, 0] != 0]
        assert np.all(rows[len(live):] == 0)                       # the list ends at the first x == 0
        assert np.all((live[:, :4] >= 0) & (live[:, :4] <= 1))
        assert np.all((live[:, 2] >= 1e-3) & (live[:, 3] >= 1e-3))
        assert np.all(live[:, 0] - live[:, 2] / 2 >= -1e-6) and np.all(live[:, 0] + live[:, 2] / 2 <= 1 + 1e-6)
        assert set(live[:, 4].astype(int)) <= set(boxes[:, 0].astype(int))
        flips.append(s.params.flip)
        hues.append(s.params.hue)
        sats.append(s.params.saturation)
        ars.append(s.params.new_ar)
    assert 0.35 < np.mean(flips) < 0.65
    assert -0.1 <= min(hues) < -0.05 and 0.05 < max(hues) <= 0.1
    assert 1 / 1.5 - 1e-6 <= min(sats) < 0.8 and 1.3 < max(sats) <= 1.5 + 1e-6
    # new_ar = (400 + U(-120, 120)) / (300 + U(-90, 90)) lies in [280/390, 520/210]
    assert 280 / 390 - 1e-6 <= min(ars) and max(ars) <= 520 / 210 + 1e-6
    assert min(ars) < 1 < max(ars)


def test_truth_record_caps_then_drops_small_boxes() -> None:
    """Darknet truncates to max_boxes first and then drops w or h < .001, so fewer may remain."""
    boxes = np.array([[1, .5, .5, .2, .2], [2, .5, .5, .0005, .2], [3, .4, .4, .1, .1], [4, .3, .3, .1, .1]], F32)
    rec = truth_record(boxes, 3).reshape(3, 5)
    np.testing.assert_array_equal(rec[:, 4], [1, 3, 0])
    np.testing.assert_array_equal(rec[2], 0)


def test_corner_box_becomes_darknets_sentinel() -> None:
    out = correct_boxes(np.array([[5, 0, 0, .1, .1]], F32), F32(0), F32(0), F32(1), F32(1), False)
    np.testing.assert_array_equal(out[0], [5, 999999, 999999, 999999, 999999])


def test_hsv_round_trip_and_grey() -> None:
    rng = np.random.default_rng(1)
    im = rng.uniform(0, 1, (3, 20, 20)).astype(F32)
    im[:, :5, :5] = 0.25                       # grey: hue is 0/0, saturation 0
    back = hsv_to_rgb(rgb_to_hsv(im))
    np.testing.assert_allclose(back, im, atol=3e-7)
    np.testing.assert_array_equal(back[:, :5, :5], 0.25)
    shifted = distort_image(im, 0.5, 1.0, 1.0)
    assert not np.allclose(shifted[:, 5:, 5:], im[:, 5:, 5:], atol=1e-2)   # a half-turn of hue changes colours
    np.testing.assert_array_equal(shifted[:, :5, :5], 0.25)


def test_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="expected a \\(3, h, w\\) image"):
        augment_detection(np.zeros((4, 4), F32), np.zeros((0, 5), F32), 8, 8, no_augment=True)
    with pytest.raises(ValueError, match="needs an rng"):
        augment_detection(np.zeros((3, 4, 4), F32), np.zeros((0, 5), F32), 8, 8)


# --------------------------------------------------------------------------------------------
# The fused kernel against the step-by-step reference functions
# --------------------------------------------------------------------------------------------

def _reference_render(im: np.ndarray, H: int, W: int, nw: int, nh: int, dx: int, dy: int, hue, sat, val,
                      flip: bool) -> np.ndarray:
    from d2c.augment import FILL, flip_image, place_image
    sized = np.full((3, H, W), FILL, F32)
    place_image(im, nw, nh, dx, dy, sized)
    sized = distort_image(sized, hue, sat, val)
    return flip_image(sized) if flip else sized


def test_kernel_equals_the_reference_functions_bit_for_bit() -> None:
    """Random sizes, offsets (also off the canvas), same-size axes, byte-valued and grey/black
    patches, hue shifts either way and none, both mirror states: every float identical."""
    from d2c.augment_kernel import render, source_from_bgr, source_from_planar
    rng = np.random.default_rng(0)
    for trial in range(240):
        ih, iw = (int(v) for v in rng.integers(5, 120, 2))
        im = rng.random((3, ih, iw), dtype=F32)
        if trial % 3 == 0:
            im = (np.round(im * 255) / 255).astype(F32)
            im[:, : ih // 3, : iw // 3] = im[0, : ih // 3, : iw // 3]     # grey
        if trial % 5 == 0:
            im[:, ih // 2:, iw // 2:] = 0                                  # black
        H, W = (int(v) for v in rng.integers(8, 100, 2))
        nw, nh = (int(v) for v in rng.integers(1, 140, 2))
        nw = iw if trial % 4 == 1 else nw                                  # the image keeps its width
        nh = ih if trial % 8 in (1, 2) else nh
        dx, dy = (int(v) for v in rng.integers(-20, 60, 2))
        hue = F32(rng.uniform(-0.5, 0.5)) if trial % 7 else F32(0)
        sat, val = F32(rng.uniform(0.5, 1.6)), F32(rng.uniform(0.5, 1.6))
        flip = bool(trial % 2)
        want = _reference_render(im, H, W, nw, nh, dx, dy, hue, sat, val, flip)
        got = np.empty((3, H, W), F32)
        render(source_from_planar(im), got, nw, nh, dx, dy, hue, sat, val, flip)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"trial {trial}")
        if trial % 3 == 0:                  # byte-valued: the decoded-file source (bytes) gives the same
            bgr = np.ascontiguousarray(np.round(im * 255).astype(np.uint8)[::-1].transpose(1, 2, 0))
            render(source_from_bgr(bgr), got, nw, nh, dx, dy, hue, sat, val, flip)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"bytes {trial}")


def test_kernel_hue_edge_cases() -> None:
    """Ties between channels, grey and black, and a red pixel whose hue rounds to exactly 1
    (Darknet's index 6 falls to its last case with f = 0)."""
    from d2c.augment_kernel import distort_into
    px = [(1.0, 0.0, 1e-8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.4), (0, 0, 0), (0.3, 0.2, 0.3), (1.0, 1.0, 0.5),
          (0.25, 0.75, 0.75), (1.0, 0.5, float(np.nextafter(F32(0.5), F32(1)))), (0.2, 0.9, 0.2), (0.1, 0.2, 0.9)]
    x = np.array(px, F32).T[:, None, :]
    for hue in (0.0, 0.1, -0.1, 1e-9, -0.5):
        for sat, val in ((1.3, 0.8), (1.5, 1.5), (0.6, 1.0)):
            got = np.empty_like(x)
            distort_into(x.copy(), got, F32(hue), F32(sat), F32(val))
            want = distort_image(x, F32(hue), F32(sat), F32(val))
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{hue} {sat} {val}")
