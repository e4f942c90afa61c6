"""Darknet's detection dataset format: the .data file, image lists, label files.

Why exact: training in Caffe must see the same images and boxes Darknet's `train_detector`
would, so paths and labels follow pjreddie's code (src/option_list.c read_data_cfg/read_option,
src/data.c get_paths/fill_truth_detection/read_boxes, src/utils.c find_replace/strip).

Where d2c is stricter than Darknet, and why (Darknet silently trains on garbage here):
- A bad label line is an error naming file and line. Darknet's `fscanf("%d %f %f %f %f")` stops
  at the first unparsable token and ignores the rest of the file, and it reads the stream, not
  lines, so a sixth field shifts every later box. d2c wants exactly 5 fields per line.
- class < 0 or >= classes, non-finite numbers, x or y outside [0, 1], w or h outside (0, 1],
  and x == y == 0 (Darknet turns such a box into a 999999-sized one: correct_boxes) are errors.
- A missing label file is an error. pjreddie's Darknet exits ("Couldn't open file", exit(0));
  AlexeyAB's treats it as empty with a message. An image without objects needs an empty file.
- An image whose label path does not end in .txt (an extension the rule does not replace, e.g.
  .bmp or .jpeg) is an error: Darknet would read labels/x.bmp, or the image bytes themselves
  when nothing in the path matched, as a label file and find no boxes.
- Unreadable images are errors (Darknet substitutes a 10x10 black image and appends the name
  to bad.list). By default only the file signature is checked (`check_images="header"`);
  "decode" decodes every image, "none" checks nothing.
With `skip_bad=True` every sample with a problem is dropped and the problems are returned, so
the caller can report the count; otherwise all problems are collected and raised together.

Paths: Darknet opens list entries and .data values relative to the current directory. d2c
tries that first, then the .data file's directory, then the list file's directory, so a
dataset directory works from anywhere. List lines are stripped of surrounding whitespace and
blank lines skipped (Darknet would keep the whitespace, including a CRLF file's '\\r', in the
path and fail to open it).

Label path rule (fill_truth_detection): on the image path as listed, replace the *first*
occurrence of each of "images", "JPEGImages", "raw" by "labels", then of ".jpg", ".png",
".JPG", ".JPEG" by ".txt", in that order, anywhere in the path, exactly as Darknet's
find_replace does. So "/data/raw/images/a.jpg" reads "/data/labels/labels/a.txt", and
"/data/drawings/images/a.jpg" reads "/data/dlabelsings/labels/a.txt".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from d2c.errors import DatasetError
from d2c.fsutil import input_errors

F32 = np.float32

#: fill_truth_detection's find_replace chain, in order (pjreddie src/data.c).
LABEL_RULE: tuple[tuple[str, str], ...] = (
    ("images", "labels"), ("JPEGImages", "labels"), ("raw", "labels"),
    (".jpg", ".txt"), (".png", ".txt"), (".JPG", ".txt"), (".JPEG", ".txt"),
)
#: The keys Darknet's detector reads from a .data file, with its defaults (examples/detector.c).
DARKNET_DEFAULTS = {"train": "data/train.list", "valid": "data/train.list", "names": "data/names.list",
                    "backup": "/backup/"}
CHECK_MODES = ("header", "decode", "none")
MAX_REPORTED = 50


def find_replace(text: str, orig: str, rep: str) -> str:
    """Darknet's find_replace: the first occurrence only, or the text unchanged."""
    pos = text.find(orig)
    return text if pos < 0 else text[:pos] + rep + text[pos + len(orig):]


def label_path_for(image_path: str) -> str:
    """The label file Darknet reads for an image path (fill_truth_detection)."""
    out = image_path
    for orig, rep in LABEL_RULE:
        out = find_replace(out, orig, rep)
    return out


def parse_float32(token: str) -> np.float32:
    """A decimal string rounded once to float32, as glibc's scanf("%f") (strtof) does.

    float(token) is the correctly rounded double; rounding that to float32 is wrong only when
    the double lands exactly on a float32 midpoint (then the decimal decides). ValueError if the
    token is not a number.
    """
    value = float(token)
    single = F32(value)
    if not math.isfinite(value) or float(single) == value:
        return single
    lower = single if float(single) < value else np.nextafter(single, F32(-np.inf))
    upper = np.nextafter(lower, F32(np.inf))
    midpoint = (Fraction(float(lower)) + Fraction(float(upper))) / 2
    if Fraction(value) != midpoint:
        return single
    exact = Fraction(token.strip())
    if exact == midpoint:   # a true tie: round half to even, like strtof
        return lower if int(lower.view(np.uint32)) % 2 == 0 else upper
    return upper if exact > midpoint else lower


# --------------------------------------------------------------------------------------------
# The .data file
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataOption:
    value: str | None   # None: a line without '=' (Darknet stores a NULL value, i.e. absent)
    line: int


@dataclass
class DataSpec:
    """A parsed .data file. Paths are resolved on access, with errors naming file and line."""

    path: Path
    options: dict[str, DataOption]
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> DataSpec:
        """Parse with read_data_cfg's rules: whitespace removed anywhere in a line, '#'/';'
        comments, split at the first '=', first occurrence of a key wins."""
        p = Path(path)
        with input_errors(p, ".data", ".data", DatasetError):
            raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DatasetError(f"{p}:{line}: not UTF-8 text; is this really a .data file?") from None
        options: dict[str, DataOption] = {}
        warnings: list[str] = []
        problems: list[str] = []
        saw_cr = False
        for number, raw_line in enumerate(text.split("\n"), start=1):
            if raw_line.endswith("\r"):
                saw_cr = True
                raw_line = raw_line[:-1]
            line = "".join(ch for ch in raw_line if ch not in " \t\n")   # Darknet's strip()
            if not line or line[0] in "#;":
                continue
            if "=" not in line:
                warnings.append(f"{p}:{number}: {line!r} has no '='; Darknet ignores it")
                options.setdefault(line, DataOption(None, number))
                continue
            key, value = line.split("=", 1)
            if value == "":
                problems.append(f"{p}:{number}: {line!r} has no value after '=' "
                                f"(Darknet: \"Config file error line {number}, could parse\")")
                continue
            if key in options:
                warnings.append(f"{p}:{number}: key {key!r} repeated; Darknet uses the first "
                                f"(line {options[key].line})")
                continue
            written = raw_line.split("=", 1)[1].strip()
            if any(ch in written for ch in " \t"):
                warnings.append(f"{p}:{number}: Darknet removes the spaces inside {written!r}, reading {value!r}")
            options[key] = DataOption(value, number)
        if saw_cr:
            warnings.append(f"{p}: has CRLF line endings; d2c accepts them, Darknet would keep the '\\r' in values")
        if problems:
            raise DatasetError(f"{p}: {len(problems)} problem(s) in the .data file", problems)
        return cls(path=p, options=options, warnings=warnings)

    def value(self, key: str) -> str | None:
        opt = self.options.get(key)
        return None if opt is None else opt.value

    def where(self, key: str) -> str:
        opt = self.options.get(key)
        return f"{self.path}:{opt.line} '{key}'" if opt else f"{self.path} '{key}'"

    @property
    def classes(self) -> int | None:
        """`classes` (None when absent: Darknet's trainer takes the count from the cfg's head)."""
        value = self.value("classes")
        if value is None:
            return None
        try:
            count = int(value)
        except ValueError:
            raise DatasetError(f"{self.where('classes')}: expects an integer, got {value!r}") from None
        if count <= 0:
            raise DatasetError(f"{self.where('classes')}: must be > 0, got {count}")
        return count

    def resolve(self, value: str) -> Path | None:
        """Darknet's CWD-relative path first, then relative to the .data file's directory."""
        p = Path(value)
        if p.is_absolute():
            return p if p.exists() else None
        for base in (Path.cwd(), self.path.parent):
            candidate = base / p
            if candidate.exists():
                return candidate
        return None

    def file(self, key: str, *, required: bool = True) -> Path | None:
        """The file a key names, resolved, with an error naming the .data line when missing."""
        value = self.value(key)
        if value is None:
            if not required:
                return None
            raise DatasetError(f"{self.path}: no '{key}' key (Darknet would fall back to "
                               f"{DARKNET_DEFAULTS.get(key, 'nothing')!r}); add '{key} = <file>'")
        found = self.resolve(value)
        if found is None or not found.is_file():
            raise DatasetError(f"{self.where(key)}: {value!r} not found (looked in {Path.cwd()} and "
                               f"{self.path.parent})" if found is None else f"{self.where(key)}: {found} is not a file")
        return found

    @property
    def train(self) -> Path:
        return self.file("train")  # type: ignore[return-value]

    @property
    def valid(self) -> Path:
        return self.file("valid")  # type: ignore[return-value]

    @property
    def backup(self) -> Path | None:
        """The backup directory as written (resolved like the other paths; may not exist yet)."""
        value = self.value("backup")
        if value is None:
            return None
        return self.resolve(value) or (Path(value) if Path(value).is_absolute() else self.path.parent / value)

    def names(self, classes: int | None = None) -> list[str]:
        """Class names, one a line (get_labels); at least `classes` of them."""
        path = self.file("names")
        assert path is not None
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read the class names ({exc})") from None
        if lines and lines[-1] == "":
            lines.pop()
        names = [line.rstrip("\r") for line in lines]
        want = classes if classes is not None else self.classes
        if want is not None and len(names) < want:
            raise DatasetError(f"{path}: {len(names)} name(s) for {want} classes")
        return names


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One training image and its boxes: (k, 5) float32 rows of class, x, y, w, h."""

    image_path: Path
    label_path: Path
    boxes: np.ndarray
    source: str = ""   # "list:line", for messages

    @property
    def classes(self) -> np.ndarray:
        return self.boxes[:, 0].astype(np.int64)


def parse_labels(label_path: str | Path, classes: int) -> tuple[np.ndarray, list[str]]:
    """Boxes of one label file and the problems found (each naming file and line)."""
    p = Path(label_path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return np.zeros((0, 5), F32), [f"{p}: label file not found (pjreddie's Darknet exits here; "
                                       f"an image without objects needs an empty label file)"]
    except OSError as exc:
        return np.zeros((0, 5), F32), [f"{p}: cannot read the label file ({exc.strerror or exc})"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return np.zeros((0, 5), F32), [f"{p}: not a text label file"]
    rows: list[list[np.float32]] = []
    problems: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{p}:{number}"
        if len(fields) != 5:
            problems.append(f"{where}: expected 5 fields 'class x y w h', got {len(fields)}: {line.strip()!r}")
            continue
        try:
            cls = int(fields[0])
        except ValueError:
            problems.append(f"{where}: class {fields[0]!r} is not an integer")
            continue
        if not 0 <= cls < classes:
            problems.append(f"{where}: class {cls} is outside 0..{classes - 1} ({classes} classes)")
            continue
        try:
            x, y, w, h = (parse_float32(f) for f in fields[1:])
        except (ValueError, ArithmeticError):
            problems.append(f"{where}: x y w h must be numbers, got {' '.join(fields[1:])!r}")
            continue
        if not all(np.isfinite(v) for v in (x, y, w, h)):
            problems.append(f"{where}: non-finite coordinate in {' '.join(fields[1:])!r}")
            continue
        bad = [f"{name}={float(v):g}" for name, v in (("x", x), ("y", y)) if not 0 <= v <= 1]
        bad += [f"{name}={float(v):g}" for name, v in (("w", w), ("h", h)) if not 0 < v <= 1]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} out of range (x, y in [0, 1]; w, h in (0, 1])")
            continue
        if x == 0 and y == 0:
            problems.append(f"{where}: a box centred at x = y = 0 becomes a 999999-sized box in Darknet "
                            f"(correct_boxes); move it off the corner")
            continue
        rows.append([F32(cls), x, y, w, h])
    boxes = np.array(rows, dtype=F32).reshape(-1, 5)
    return boxes, problems


def read_list(list_path: str | Path) -> list[tuple[int, str]]:
    """(line number, path as listed) for each non-blank line of an image list (get_paths)."""
    p = Path(list_path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{p}: no such image list") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{p}: cannot read the image list ({exc})") from None
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _search_dirs(list_path: Path, extra: tuple[Path, ...]) -> list[Path]:
    out: list[Path] = []
    for d in (Path.cwd(), *extra, list_path.parent):
        if d not in out:
            out.append(d)
    return out


def _image_problem(path: Path, mode: str) -> str | None:
    if mode == "none":
        return None
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path}: cannot read the image ({exc.strerror or exc})"
    if size == 0:
        return f"{path}: empty image file"
    from d2c.engines import import_cv2
    cv2 = import_cv2()
    if mode == "header":
        return None if cv2.haveImageReader(str(path)) else f"{path}: not an image OpenCV can read"
    raw = np.fromfile(path, dtype=np.uint8)
    if cv2.imdecode(raw, cv2.IMREAD_COLOR) is None:
        return f"{path}: OpenCV cannot decode this image"
    return None


def load_samples(list_path: str | Path, classes: int, skip_bad: bool = False, *,
                 search_dirs: tuple[str | Path, ...] = (), check_images: str = "header"
                 ) -> tuple[list[Sample], list[str]]:
    """All samples of an image list, and the problems found (one entry per bad sample).

    Relative entries are looked up in the CWD (Darknet), then `search_dirs` (e.g. the .data
    file's directory), then the list's directory; the label path is derived from the entry as
    listed and resolved against the same directory. Without `skip_bad` any problem raises one
    DatasetError listing them all; with it, bad samples are dropped and the problems returned.
    """
    if check_images not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, got {check_images!r}")
    if classes <= 0:
        raise DatasetError(f"{list_path}: classes must be > 0, got {classes}")
    lp = Path(list_path)
    dirs = _search_dirs(lp, tuple(Path(d) for d in search_dirs))
    samples: list[Sample] = []
    problems: list[str] = []
    entries = read_list(lp)
    for number, listed in entries:
        where = f"{lp}:{number}"
        label_listed = label_path_for(listed)
        if label_listed == listed or not label_listed.endswith(".txt"):
            what = ("does not change this path; Darknet would read the image as its own label file"
                    if label_listed == listed else f"gives {label_listed!r}, not a .txt file")
            problems.append(f"{where}: {listed!r}: the label rule (images->labels, .jpg/.png/.JPG/.JPEG->.txt) "
                            f"{what}")
            continue
        base = None
        if Path(listed).is_absolute():
            base = Path("/")
        else:
            base = next((d for d in dirs if (d / listed).is_file()), None)
        if base is None:
            looked = ", ".join(str(d) for d in dirs)
            problems.append(f"{where}: image {listed!r} not found (looked in {looked})")
            continue
        image = Path(listed) if Path(listed).is_absolute() else base / listed
        label = Path(label_listed) if Path(label_listed).is_absolute() else base / label_listed
        issue = _image_problem(image, check_images)
        boxes, label_problems = parse_labels(label, classes)
        sample_problems = ([f"{where}: {issue}"] if issue else []) + label_problems
        if sample_problems:   # one entry per bad sample, so len(problems) is the number dropped
            problems.append("\n    ".join(sample_problems))
            continue
        samples.append(Sample(image_path=image, label_path=label, boxes=boxes, source=where))
    if problems and not skip_bad:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more")
        raise DatasetError(f"{lp}: {len(problems)} of {len(entries)} listed image(s) have problems; fix them or "
                           f"pass --skip-bad to drop those samples", shown)
    if not samples and entries:
        raise DatasetError(f"{lp}: none of the {len(entries)} listed image(s) is usable", problems[:MAX_REPORTED])
    if not entries:
        raise DatasetError(f"{lp}: the image list is empty")
    return samples, problems


def load_split(spec: DataSpec, split: str = "train", *, classes: int | None = None, skip_bad: bool = False,
               check_images: str = "header") -> tuple[list[Sample], list[str]]:
    """The samples of the .data file's `train` or `valid` list (classes: the .data's unless given)."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    count = classes if classes is not None else spec.classes
    if count is None:
        raise DatasetError(f"{spec.path}: no 'classes' key; add 'classes = N'")
    list_path = spec.file(split)
    assert list_path is not None
    return load_samples(list_path, count, skip_bad, search_dirs=(spec.path.parent,), check_images=check_images)
