"""What `d2c detect` reads: images, folders, `@list` files and videos, one frame at a time.

Why a module of its own: the decoding in d2c.detect must stay Darknet-exact and small, while
the inputs a user points at are messy (a folder with a README in it, a list file with a
typo, a truncated JPEG, a video). Everything here turns those into a flat, ordered list of
sources up front (so a missing path fails before a model is loaded) and then into frames,
each either an image array or the one-line reason it could not be read, so one bad file
never hides the results of the good ones.

Frames are planar float32 RGB (3, h, w) in [0, 1], exactly as d2c.image.load_image_rgb
makes them: video frames come out of OpenCV as BGR bytes like imread's, and go through the
same conversion Darknet's OpenCV loader uses.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2c.errors import D2CError, DatasetError
from d2c.fsutil import input_errors

# Extensions OpenCV's imdecode reads in the opencv-python wheels (what a folder contributes).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".sr", ".ras"})
# Files read frame by frame with OpenCV's VideoCapture.
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                              ".flv", ".3gp", ".ts", ".mjpeg", ".mjpg"})


@dataclass(frozen=True)
class Source:
    """One input after expansion: an image or video file, or a path that cannot be used.

    `problem` is set (and `kind` is "bad") when the path was given but is missing or of no
    known kind; with --skip-bad it becomes an error record instead of stopping the run.
    """

    path: Path
    kind: str                 # "image", "video" or "bad"
    problem: str = ""


@dataclass
class Frame:
    """One image to detect on: a still image (frame None) or a video frame (its index)."""

    source: Path
    frame: int | None
    image: np.ndarray | None  # (3, h, w) float32 RGB, None when `error` is set
    error: str = ""

    @property
    def label(self) -> str:
        """How records and tables name it: the path, plus `#frame` for a video frame."""
        return str(self.source) if self.frame is None else f"{self.source}#{self.frame}"


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def _folder(path: Path) -> list[Source]:
    """Image files directly in `path`, sorted by name (sub-folders and other files are left out)."""
    try:
        entries = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None
    return [Source(p, "image") for p in entries]


def _list_file(path: Path) -> list[Source]:
    """`@list.txt`: one path per line (blank lines and '#' comments skipped), as Darknet's
    train/valid lists; relative paths are taken from the current directory, like Darknet,
    and else from the list file's own folder."""
    with input_errors(f"@{path}", "list", "list (one image path per line)", DatasetError):
        lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Source] = []
    for lineno, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        candidate = Path(entry)
        if not candidate.is_absolute() and not candidate.exists() and (path.parent / candidate).exists():
            candidate = path.parent / candidate
        out.append(_single(candidate, f"{path}:{lineno}: "))
    return out


def _single(path: Path, where: str = "") -> Source:
    if path.is_file():
        return Source(path, _kind(path))
    if path.is_dir():
        return Source(path, "bad", f"{where}{path}: is a folder (list files may name images and videos only)")
    return Source(path, "bad", f"{where}{path}: no such image, video or folder")


def expand_inputs(items: list[str]) -> list[Source]:
    """Turn the command-line inputs into sources, in the order given.

    A folder contributes its image files sorted by name; `@FILE` contributes the paths listed
    in FILE; a file with a video extension is read frame by frame; any other file is an image.
    An empty folder or list is an error: it is almost always a wrong path.
    """
    sources: list[Source] = []
    for item in items:
        if not item.strip():
            sources.append(Source(Path(item), "bad", "an empty input path"))
            continue
        if item.startswith("@") and len(item) > 1:
            listed = _list_file(Path(item[1:]))
            if not listed:
                raise DatasetError(f"{item}: the list names no images")
            sources.extend(listed)
            continue
        path = Path(item)
        if path.is_dir():
            found = _folder(path)
            if not found:
                raise DatasetError(f"{path}: no image files in this folder "
                                   f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
            sources.extend(found)
            continue
        sources.append(_single(path))
    return sources


def first_problem(sources: list[Source]) -> str | None:
    """The first unusable source's reason, checked before any model is loaded."""
    return next((s.problem for s in sources if s.kind == "bad"), None)


def iter_frames(sources: list[Source], *, frame_stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Every image, and every `frame_stride`-th frame of every video (at most `max_frames` per
    video), in order. Unreadable inputs come out as frames with `error` set, never as exceptions."""
    if frame_stride < 1:
        raise D2CError(f"--frame-stride {frame_stride}: must be >= 1")
    if max_frames is not None and max_frames < 1:
        raise D2CError(f"--max-frames {max_frames}: must be >= 1")
    from d2c.image import load_image_rgb
    for source in sources:
        if source.kind == "bad":
            yield Frame(source.path, None, None, source.problem)
        elif source.kind == "image":
            try:
                yield Frame(source.path, None, load_image_rgb(source.path))
            except DatasetError as exc:
                yield Frame(source.path, None, None, str(exc))
        else:
            yield from _video_frames(source.path, frame_stride, max_frames)


def _video_frames(path: Path, stride: int, max_frames: int | None) -> Iterator[Frame]:
    """Frames 0, stride, 2*stride, ... of a video; a video OpenCV cannot open is one error frame."""
    from d2c.engines import import_cv2
    from d2c.image import bgr_bytes_to_rgb_planar
    cv2 = import_cv2()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            yield Frame(path, None, None, f"{path}: not a video OpenCV can open")
            return
        index = emitted = 0
        while max_frames is None or emitted < max_frames:
            if not capture.grab():
                break
            if index % stride == 0:
                ok, bgr = capture.retrieve()
                if not ok or bgr is None:
                    yield Frame(path, index, None, f"{path}#{index}: OpenCV could not decode this frame")
                else:
                    yield Frame(path, index, bgr_bytes_to_rgb_planar(bgr))
                emitted += 1
            index += 1
        if index == 0:
            yield Frame(path, None, None, f"{path}: OpenCV opened the video but read no frame from it")
    finally:
        capture.release()


class OutputNamer:
    """-o for drawn images: a file for one still image, else a folder of one file per image or
    frame (`<stem>.png`, `<stem>_<frame>.png` for video frames; `_2`, `_3`, ... when two inputs
    share a name). The file's format is the one its extension names, as OpenCV writes it.

    Checked when constructed, before any model is loaded: an existing file where a folder is
    needed, or an extension OpenCV cannot write, is an error at once, not after the first image.
    """

    def __init__(self, out: str | None, sources: list[Source]) -> None:
        self.out = Path(out) if out else None
        self.single = bool(out) and len(sources) == 1 and sources[0].kind == "image" and not Path(out).is_dir()
        self._used: dict[str, int] = {}
        if self.out is None:
            return
        if self.single:
            check_image_extension(self.out)
            if self.out.parent.exists() and not self.out.parent.is_dir():
                raise D2CError(f"-o {self.out}: {self.out.parent} is a file, not a folder")
        elif self.out.exists() and not self.out.is_dir():
            raise D2CError(f"-o {self.out}: is an existing file; with several images or a video, "
                           "-o names a folder to write one image per input into")
        elif not self.out.exists() and self.out.suffix.lower() in IMAGE_EXTENSIONS:
            raise D2CError(f"-o {self.out}: names one image, but there are several images or a video; "
                           "give a folder to write one image per input into")
        elif any(p.exists() and not p.is_dir() for p in self.out.parents):
            raise D2CError(f"-o {self.out}: a parent of this folder is a file")

    def path_for(self, frame: Frame) -> Path | None:
        """Where to write the drawn `frame`, or None without -o."""
        if self.out is None:
            return None
        if self.single:
            return self.out
        stem = frame.source.stem if frame.frame is None else f"{frame.source.stem}_{frame.frame:06d}"
        self._used[stem] = self._used.get(stem, 0) + 1
        suffix = "" if self._used[stem] == 1 else f"_{self._used[stem]}"
        return self.out / f"{stem}{suffix}.png"


def check_image_extension(path: Path) -> None:
    """The drawn image is written in the format its extension names; refuse one OpenCV cannot write."""
    from d2c.engines import import_cv2
    cv2 = import_cv2()
    if not path.suffix:
        raise D2CError(f"-o {path}: no extension; name the image format (.png, .jpg, ...) or give an existing folder")
    if not cv2.haveImageWriter(f"x{path.suffix.lower()}"):
        raise D2CError(f"-o {path}: OpenCV cannot write '{path.suffix}' images; use .png, .jpg, .bmp, .tif or .webp")
