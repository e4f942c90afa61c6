"""`d2c detect` over folders, @lists and videos, JSON Lines records, --skip-bad, -o formats, colours.

Why: a daily tool runs on a folder or a video, and one corrupt file must not hide the results
of the others. Runs the real yolov3-tiny in pycaffe; the video is written here with OpenCV's
VideoWriter and the per-frame detections are checked against the Detector API on the frames
as OpenCV reads them back.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose

import d2c
from d2c import cli
from d2c.detect import class_color, darknet_get_color
from d2c.image import bgr_bytes_to_rgb_planar

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/darknet/data")
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
DARKNET_IMAGES = sorted(p.name for p in DATA.glob("*.jpg"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    d2c.convert(TINY_CFG, TINY_WEIGHTS, out)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """5 frames, 320x240, MJPG in AVI: dog, horses, dog, horses, dog."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (320, 240))
    assert writer.isOpened()
    stills = [cv2.resize(cv2.imread(str(DATA / name)), (320, 240)) for name in ("dog.jpg", "horses.jpg")]
    for k in range(5):
        writer.write(stills[k % 2])
    writer.release()
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["detect", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_darknet_data_folder_gives_one_record_per_image(model, capsys) -> None:
    rc, out, err = _run(capsys, model, DATA, "--jsonl")
    assert rc == 0, err
    records = _jsonl(out)
    assert [Path(r["image"]).name for r in records] == DARKNET_IMAGES     # sorted, images only
    assert all(r["frame"] is None and "error" not in r for r in records)
    # The folder gives exactly what the images given one by one give.
    rc, out, _ = _run(capsys, model, *(DATA / n for n in DARKNET_IMAGES), "--json")
    assert rc == 0 and json.loads(out) == records
    dog = records[DARKNET_IMAGES.index("dog.jpg")]
    assert {"dog", "bicycle"} <= {d["name"] for d in dog["detections"]}


@pytest.fixture()
def folder_with_corrupt(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(DATA / "dog.jpg", folder / "a_dog.jpg")
    (folder / "b_broken.jpg").write_bytes((DATA / "dog.jpg").read_bytes()[:200])   # truncated JPEG
    shutil.copy(DATA / "horses.jpg", folder / "c_horses.jpg")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def test_corrupt_file_gives_an_error_record_and_the_others(model, folder_with_corrupt, capsys) -> None:
    rc, out, err = _run(capsys, model, folder_with_corrupt, "--jsonl")
    records = _jsonl(out)
    assert [Path(r["image"]).name for r in records] == ["a_dog.jpg", "b_broken.jpg", "c_horses.jpg"]
    assert "error" not in records[0] and "error" not in records[2]
    assert records[0]["detections"] and records[2]["detections"]
    assert "b_broken.jpg" in records[1]["error"] and "detections" not in records[1]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--skip-bad" in err   # not silently ok
    rc, out_json, err = _run(capsys, model, folder_with_corrupt, "--json", "--skip-bad")
    assert rc == 0 and json.loads(out_json) == records and "skipped 1" in err
    # Table mode without --skip-bad stops at the bad one with one line; with it, goes on.
    rc, out, err = _run(capsys, model, folder_with_corrupt)
    assert rc == 2 and "a_dog.jpg" in out and "c_horses.jpg" not in out and len(err.strip().splitlines()) == 1
    rc, out, err = _run(capsys, model, folder_with_corrupt, "--skip-bad")
    assert rc == 0 and "c_horses.jpg" in out and "skipped" in err


def test_missing_input_with_skip_bad_is_a_record(model, tmp_path, capsys) -> None:
    rc, out, err = _run(capsys, model, tmp_path / "nope.jpg", DATA / "dog.jpg", "--jsonl", "--skip-bad")
    records = _jsonl(out)
    assert rc == 0 and "no such image" in records[0]["error"] and records[1]["detections"]


def test_list_file_keeps_its_order(model, tmp_path, capsys) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{DATA / 'horses.jpg'}\n\n{DATA / 'dog.jpg'}\n")
    rc, out, _ = _run(capsys, model, f"@{listing}", "--jsonl")
    assert rc == 0 and [Path(r["image"]).name for r in _jsonl(out)] == ["horses.jpg", "dog.jpg"]


def test_video_gives_per_frame_records(model, video, capsys) -> None:
    rc, out, err = _run(capsys, model, video, "--jsonl")
    records = _jsonl(out)
    assert rc == 0, err
    assert [r["frame"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["image"] == str(video) and (r["width"], r["height"]) == (320, 240) for r in records)
    # Each record is the Detector's answer on the frame as OpenCV decodes it.
    detector = d2c.Detector(model)
    capture = cv2.VideoCapture(str(video))
    for record in records:
        ok, bgr = capture.read()
        assert ok
        expected = detector(bgr_bytes_to_rgb_planar(bgr))
        assert [d["class"] for d in record["detections"]] == [d["class"] for d in expected["detections"]]
        assert_allclose([d["box"] for d in record["detections"]], [d["box"] for d in expected["detections"]],
                        rtol=0, atol=0)
    capture.release()
    assert "dog" in {d["name"] for d in records[0]["detections"]}
    assert "horse" in {d["name"] for d in records[1]["detections"]}
    rc, out, _ = _run(capsys, model, video, "--jsonl", "--frame-stride", "2", "--max-frames", "2")
    assert rc == 0 and [r["frame"] for r in _jsonl(out)] == [0, 2]


def test_video_frames_drawn_into_a_folder(model, video, tmp_path, capsys) -> None:
    out_dir = tmp_path / "drawn"
    rc, _, err = _run(capsys, model, video, "--max-frames", "2", "-o", out_dir)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["clip_000000.png", "clip_000001.png"]


@pytest.mark.parametrize(("name", "magic"), [("x.jpg", b"\xff\xd8\xff"), ("x.png", b"\x89PNG"),
                                             ("x.bmp", b"BM")])
def test_output_format_follows_the_extension(model, tmp_path, capsys, name: str, magic: bytes) -> None:
    rc, _, err = _run(capsys, model, DATA / "dog.jpg", "-o", tmp_path / name)
    assert rc == 0, err
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_box_colours_are_darknets(model, tmp_path, capsys) -> None:
    """Darknet: offset = c*123457 % classes, red = get_color(2), green = get_color(1), blue = get_color(0)."""
    assert class_color(16, 80) == (0, 255, 255)      # dog: offset 32, ratio 2 -> colors[2]: yellow
    assert class_color(0, 80) == (255, 0, 255)       # magenta
    assert class_color(1, 80) == (0, 15, 255)        # offset 17, ratio 1.0625 -> red, green 255*0.0625
    assert darknet_get_color(1, 17, 80) == np.float32(0.0625)
    # The drawn dog box (first pixel of its left edge) has that colour, in the PNG's BGR bytes.
    png = tmp_path / "dog.png"
    assert cli.main(["detect", str(model), str(DATA / "dog.jpg"), "-o", str(png), "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    dog = next(d for d in record["detections"] if d["name"] == "dog")
    left, top, right, bottom = dog["box_px"]
    drawn = cv2.imread(str(png))
    assert tuple(int(v) for v in drawn[(top + bottom) // 2, left]) == (0, 255, 255)


def test_python_api_matches_the_cli(model, capsys) -> None:
    record = d2c.Detector(model, engine="opencv")(DATA / "dog.jpg")
    rc, out, _ = _run(capsys, model, DATA / "dog.jpg", "--json", "--engine", "opencv")
    assert rc == 0 and json.loads(out) == [record]


def test_names_given_at_convert_label_the_boxes(tmp_path, capsys) -> None:
    names = tmp_path / "mine.names"
    names.write_text("".join(f"thing{i}\n" for i in range(80)))
    assert cli.main(["convert", str(TINY_CFG), str(TINY_WEIGHTS), "-o", str(tmp_path / "m"),
                     "--names", str(names)]) == 0
    sidecar = json.loads((tmp_path / "m" / "yolov3-tiny.json").read_text())
    assert sidecar["names"][16] == "thing16"
    capsys.readouterr()
    rc, out, _ = _run(capsys, tmp_path / "m", DATA / "dog.jpg", "--json")
    assert rc == 0 and "thing16" in {d["name"] for d in json.loads(out)[0]["detections"]}
    # --names at detect still wins.
    rc, out, _ = _run(capsys, tmp_path / "m", DATA / "dog.jpg", "--json", "--names", DATA / "coco.names")
    assert rc == 0 and "dog" in {d["name"] for d in json.loads(out)[0]["detections"]}
