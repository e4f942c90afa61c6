"""Darknet dataset reading (.data, lists, label rule, labels) and the generated shapes dataset."""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.dataset import DataSpec, label_path_for, load_samples, load_split, parse_float32, parse_labels
from d2c.errors import DatasetError
from d2c.shapes import CLASSES, make_shapes_dataset, render_shapes_image

ROOT = Path(__file__).resolve().parents[1]
F32 = np.float32


# --------------------------------------------------------------------------------------------
# The .data file
# --------------------------------------------------------------------------------------------

def test_data_file_follows_darknets_lexical_rules(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("")
    data = tmp_path / "x.data"
    data.write_text("# comment\n; also a comment\n\n  classes =  3 \ntrain = list.txt\nclasses=7\n"
                    "names = my names.txt\nloose line\n")
    spec = DataSpec.load(data)
    assert spec.classes == 3                                   # the first occurrence wins
    assert spec.value("names") == "mynames.txt"               # every space removed, as strip() does
    assert spec.value("loose line") is None and spec.value("looseline") is None
    warnings = "\n".join(spec.warnings)
    assert "x.data:6: key 'classes' repeated; Darknet uses the first (line 4)" in warnings
    assert "removes the spaces inside 'my names.txt'" in warnings
    assert "x.data:8: 'looseline' has no '='" in warnings


def test_data_file_errors_name_the_line(tmp_path: Path) -> None:
    data = tmp_path / "x.data"
    data.write_text("classes=3\ntrain=\n")
    with pytest.raises(DatasetError) as info:
        DataSpec.load(data)
    assert "x.data:2: 'train=' has no value" in info.value.render()
    data.write_text("classes=three\ntrain=a.txt\n")
    with pytest.raises(DatasetError, match=r"x.data:1 'classes': expects an integer, got 'three'"):
        DataSpec.load(data).classes
    data.write_text("classes=0\n")
    with pytest.raises(DatasetError, match=r"x.data:1 'classes': must be > 0"):
        DataSpec.load(data).classes
    data.write_text("classes=2\n")
    with pytest.raises(DatasetError, match="no 'train' key.*data/train.list"):
        DataSpec.load(data).train
    data.write_text("classes=2\ntrain=nowhere.txt\n")
    with pytest.raises(DatasetError, match=r"x.data:2 'train': 'nowhere.txt' not found"):
        DataSpec.load(data).train
    with pytest.raises(DatasetError, match="no such .data file"):
        DataSpec.load(tmp_path / "missing.data")


def test_paths_resolve_from_cwd_first_then_the_data_dir(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "ds" / "train.txt").write_text("a\n")
    (tmp_path / "ds" / "x.data").write_text("classes=1\ntrain=train.txt\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert DataSpec.load(tmp_path / "ds" / "x.data").train == tmp_path / "ds" / "train.txt"
    (tmp_path / "cwd" / "train.txt").write_text("b\n")
    assert DataSpec.load(tmp_path / "ds" / "x.data").train == Path.cwd() / "train.txt"   # Darknet's choice


def test_crlf_data_file_is_accepted_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("")
    (tmp_path / "x.data").write_bytes(b"classes = 2\r\ntrain = t.txt\r\n")
    spec = DataSpec.load(tmp_path / "x.data")
    assert spec.classes == 2 and spec.value("train") == "t.txt"
    assert any("CRLF" in w for w in spec.warnings)


def test_names(tmp_path: Path) -> None:
    (tmp_path / "n.names").write_text("cat\ndog\r\n")
    (tmp_path / "x.data").write_text("classes=2\nnames=n.names\n")
    assert DataSpec.load(tmp_path / "x.data").names() == ["cat", "dog"]
    (tmp_path / "x.data").write_text("classes=3\nnames=n.names\n")
    with pytest.raises(DatasetError, match="2 name\\(s\\) for 3 classes"):
        DataSpec.load(tmp_path / "x.data").names()


# --------------------------------------------------------------------------------------------
# Label path rule and number parsing, against the real C functions
# --------------------------------------------------------------------------------------------

TRICKY_PATHS = ["data/images/a.jpg", "/x/JPEGImages/b.JPEG", "/d/raw/images/c.png", "/d/drawings/images/a.jpg",
                "/images/x/images/y.jpg", "img.jpg.jpg", "/a/b.JPG", "/a/b.jpeg", "/a/b.bmp", "pics/raw.png"]


def test_label_rule_equals_darknets_find_replace_chain() -> None:
    """Darknet's own find_replace (libdarknet.so, in a child process) on the same chain."""
    code = r"""
import ctypes, json, sys
lib = ctypes.CDLL('/usr/lib/darknet/libdarknet.so')
chain = [("images", "labels"), ("JPEGImages", "labels"), ("raw", "labels"), (".jpg", ".txt"),
         (".png", ".txt"), (".JPG", ".txt"), (".JPEG", ".txt")]
out = []
for path in json.loads(sys.stdin.read()):
    buf = ctypes.create_string_buffer(path.encode(), 4096)
    for orig, rep in chain:
        lib.find_replace(buf, orig.encode(), rep.encode(), buf)
    out.append(buf.value.decode())
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(TRICKY_PATHS), capture_output=True,
                          text=True, check=True)
    assert [label_path_for(p) for p in TRICKY_PATHS] == json.loads(proc.stdout)
    assert label_path_for("/d/drawings/images/a.jpg") == "/d/dlabelsings/labels/a.txt"


def test_numbers_round_like_strtof() -> None:
    libc = ctypes.CDLL(None)
    libc.strtof.restype = ctypes.c_float
    libc.strtof.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    rng = np.random.default_rng(0)
    tokens = [f"{v:.6f}" for v in rng.uniform(0, 1, 2000)] + [f"{v:.9g}" for v in rng.uniform(0, 1, 2000)]
    # Decimals whose nearest double is exactly a float32 midpoint: double rounding would be wrong.
    tokens += ["1.0000000596046447753906251", "1.0000000596046447753906249", "1.000000059604644775390625",
               "0.50000002980232238769531251", "1e-3", ".5", "0"]
    for token in tokens:
        want = F32(libc.strtof(token.encode(), None))
        assert parse_float32(token).view(np.uint32) == want.view(np.uint32), token
    assert parse_float32("1.0000000596046447753906251") == np.nextafter(F32(1), F32(2))


# --------------------------------------------------------------------------------------------
# Labels and samples
# --------------------------------------------------------------------------------------------

def _layout(root: Path, labels: dict[str, str | None], image_bytes: bytes | None = None) -> Path:
    """images/<name>.png with labels/<name>.txt (None: no label file); returns the list file."""
    import cv2
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", np.full((8, 8, 3), 100, np.uint8))
    assert ok
    for name, text in labels.items():
        (root / "images" / f"{name}.png").write_bytes(image_bytes if image_bytes is not None else png.tobytes())
        if text is not None:
            (root / "labels" / f"{name}.txt").write_text(text)
    (root / "list.txt").write_text("".join(f"images/{n}.png\n" for n in labels))
    return root / "list.txt"


def test_good_labels_parse_exactly(tmp_path: Path) -> None:
    lst = _layout(tmp_path, {"a": "0 0.5 0.5 0.2 0.3\n\n2 1 0.25 1 0.1\r\n", "empty": ""})
    samples, problems = load_samples(lst, 3)
    assert problems == [] and len(samples) == 2
    np.testing.assert_array_equal(samples[0].boxes, np.array([[0, .5, .5, .2, .3], [2, 1, .25, 1, .1]], F32))
    assert samples[0].label_path == tmp_path / "labels" / "a.txt"
    assert samples[1].boxes.shape == (0, 5)   # an image without objects


BAD_LABELS = {
    "fields": ("0 0.5 0.5 0.2\n", r"a.txt:1: expected 5 fields 'class x y w h', got 4"),
    "class_float": ("1.0 .5 .5 .2 .2\n", r"a.txt:1: class '1.0' is not an integer"),
    "class_big": ("0 .5 .5 .2 .2\n3 .5 .5 .2 .2\n", r"a.txt:2: class 3 is outside 0..2 \(3 classes\)"),
    "class_negative": ("-1 .5 .5 .2 .2\n", r"a.txt:1: class -1 is outside 0..2"),
    "nan": ("0 nan .5 .2 .2\n", r"a.txt:1: non-finite coordinate"),
    "inf": ("0 .5 .5 inf .2\n", r"a.txt:1: non-finite coordinate"),
    "text": ("0 .5 .5 .2 wide\n", r"a.txt:1: x y w h must be numbers"),
    "range": ("0 1.5 .5 .2 0\n", r"a.txt:1: x=1.5, h=0 out of range"),
    "corner": ("0 0 0 .2 .2\n", r"a.txt:1: a box centred at x = y = 0 becomes a 999999-sized box"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_label_is_an_error_naming_file_and_line(tmp_path: Path, case: str) -> None:
    text, pattern = BAD_LABELS[case]
    lst = _layout(tmp_path, {"a": text, "good": "1 .5 .5 .2 .2\n"})
    with pytest.raises(DatasetError) as info:
        load_samples(lst, 3)
    rendered = info.value.render()
    assert "--skip-bad" in str(info.value)
    import re
    assert re.search(pattern, rendered), rendered
    samples, problems = load_samples(lst, 3, skip_bad=True)
    assert [s.image_path.name for s in samples] == ["good.png"] and len(problems) == 1


def test_missing_label_unreadable_and_missing_images(tmp_path: Path) -> None:
    lst = _layout(tmp_path, {"nolabel": None, "ok": "0 .5 .5 .2 .2\n"})
    (tmp_path / "images" / "junk.png").write_text("not an image")
    (tmp_path / "labels" / "junk.txt").write_text("")
    with open(lst, "a") as handle:
        handle.write("images/junk.png\nimages/gone.png\nimages/pic.bmp\n\n")
    (tmp_path / "images" / "pic.bmp").write_bytes(b"BM")
    samples, problems = load_samples(lst, 1, skip_bad=True)
    assert [s.image_path.name for s in samples] == ["ok.png"]
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "labels/nolabel.txt: label file not found" in text
    assert "list.txt:3: " in text and "junk.png: not an image OpenCV can read" in text
    assert "list.txt:4: image 'images/gone.png' not found" in text
    assert "list.txt:5: 'images/pic.bmp': the label rule" in text
    with pytest.raises(DatasetError, match="4 of 5 listed image\\(s\\) have problems"):
        load_samples(lst, 1)


def test_decode_check_catches_truncated_images(tmp_path: Path) -> None:
    import cv2
    ok, jpg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lst = _layout(tmp_path, {"cut": ""}, image_bytes=jpg.tobytes()[:40])
    assert load_samples(lst, 1)[1] == []                        # the signature is fine
    with pytest.raises(DatasetError, match="none of the 1 listed image") as info:
        load_samples(lst, 1, skip_bad=True, check_images="decode")
    assert "cut.png: OpenCV cannot decode this image" in info.value.render()


def test_list_entries_resolve_cwd_first_then_data_dir(tmp_path: Path, monkeypatch) -> None:
    lst = _layout(tmp_path / "ds", {"a": "0 .5 .5 .2 .2\n"})
    (tmp_path / "ds" / "x.data").write_text(f"classes=1\ntrain={lst}\n")
    monkeypatch.chdir(tmp_path)
    samples, _ = load_split(DataSpec.load(tmp_path / "ds" / "x.data"), "train")
    assert samples[0].image_path == tmp_path / "ds" / "images" / "a.png"
    assert samples[0].label_path == tmp_path / "ds" / "labels" / "a.txt"
    # An images/ directory under the CWD wins, as in Darknet; its labels/ are used with it.
    _layout(tmp_path, {"a": "0 .25 .25 .1 .1\n"})
    samples, _ = load_split(DataSpec.load(tmp_path / "ds" / "x.data"), "train")
    assert samples[0].image_path == Path.cwd() / "images" / "a.png"
    np.testing.assert_array_equal(samples[0].boxes[0], F32([0, .25, .25, .1, .1]))


def test_skip_bad_counts_samples_not_lines(tmp_path: Path) -> None:
    lst = _layout(tmp_path, {"two_bad": "0 .5 .5 .2\n7 .5 .5 .2 .2\n", "ok": "0 .5 .5 .2 .2\n"})
    samples, problems = load_samples(lst, 3, skip_bad=True)
    assert len(samples) == 1 and len(problems) == 1
    assert "two_bad.txt:1:" in problems[0] and "two_bad.txt:2:" in problems[0]


def test_parse_labels_direct(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("1 0.1 0.2 0.3 0.4\n")
    boxes, problems = parse_labels(tmp_path / "l.txt", 2)
    assert problems == [] and boxes.dtype == F32
    np.testing.assert_array_equal(boxes, F32([[1, .1, .2, .3, .4]]))
    _, problems = parse_labels(tmp_path / "missing.txt", 2)
    assert "label file not found" in problems[0]


# --------------------------------------------------------------------------------------------
# The generated dataset
# --------------------------------------------------------------------------------------------

def test_shapes_dataset_layout_and_determinism(tmp_path: Path) -> None:
    a = make_shapes_dataset(tmp_path / "a", count=12, size=96, seed=5)
    b = make_shapes_dataset(tmp_path / "b", count=12, size=96, seed=5)
    c = make_shapes_dataset(tmp_path / "c", count=12, size=96, seed=6)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert {"shapes.data", "shapes.names", "train.txt", "valid.txt"} <= {str(f) for f in files}
    assert len([f for f in files if f.suffix == ".jpg"]) == 12 and len([f for f in files if f.suffix == ".txt"]) == 14
    for f in files:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    assert (a.root / "images/shape_0000.jpg").read_bytes() != (c.root / "images/shape_0000.jpg").read_bytes()
    spec = DataSpec.load(a.data_file)
    assert spec.classes == 3 and spec.names() == list(CLASSES) and spec.warnings == []
    train, problems = load_split(spec, "train", check_images="decode")
    valid, _ = load_split(spec, "valid")
    assert problems == [] and len(train) == 10 and len(valid) == 2
    assert {s.image_path for s in train}.isdisjoint({s.image_path for s in valid})
    boxes = np.concatenate([s.boxes for s in train + valid])
    assert len(boxes) >= 12 and set(boxes[:, 0].astype(int)) == {0, 1, 2}
    # Growing the dataset keeps the earlier images.
    d = make_shapes_dataset(tmp_path / "d", count=14, size=96, seed=5)
    assert (d.root / "images/shape_0003.jpg").read_bytes() == (a.root / "images/shape_0003.jpg").read_bytes()


def test_shape_labels_match_what_was_drawn() -> None:
    """Each label box is the drawn shape's pixel extent (within anti-aliasing), objects never overlap."""
    for seed in range(20):
        img, shapes, masks = render_shapes_image(np.random.default_rng([7, seed]), 128)
        assert img.shape == (128, 128, 3) and 1 <= len(shapes) <= 4
        for shape, mask in zip(shapes, masks):
            ys, xs = np.nonzero(mask > 127)
            x0, y0, x1, y1 = shape.box
            # anti-aliasing spreads the mask by up to ~1.2 px on each side (measured), symmetrically
            assert -1.25 <= xs.min() - x0 <= 0 <= xs.max() + 1 - x1 <= 1.25, (shape, xs.min(), xs.max())
            assert -1.25 <= ys.min() - y0 <= 0.1 and -0.1 <= ys.max() + 1 - y1 <= 1.25, (shape, ys.min(), ys.max())
            centre = img[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
            if shape.cls != 2:   # a triangle's box centre can fall outside it
                assert np.abs(centre - np.array(shape.color)).max() <= 16   # grain only
        covered = sum((m > 0).astype(int) for m in masks)
        assert covered.max() <= 1


def test_shapes_tool_cli(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shapes_dataset.py"), str(tmp_path / "s"),
                           "--count", "4", "--size", "64", "--format", "png", "--absolute"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 train + 1 valid images" in proc.stdout
    first = (tmp_path / "s" / "train.txt").read_text().splitlines()[0]
    assert Path(first).is_absolute() and first.endswith(".png")
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shapes_dataset.py"), str(tmp_path / "t"),
                          "--count", "1"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "count must be >= 2" in bad.stderr
