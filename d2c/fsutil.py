"""Atomic file output: write to a temp file in the target directory, fsync, rename.

Why: an error or a kill must leave the previous file intact and never a partial one. Every
writer in d2c (convert, export, snapshots, reports) goes through `atomic_write`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from d2c.errors import D2CError


@contextlib.contextmanager
def input_errors(path: Path | str, missing: str, expected: str, error: type[D2CError]) -> Iterator[None]:
    """Turn a failure to open or read an input file into `error` naming the file: "no such
    <missing> file", "is a directory, expected a <expected> file", "not UTF-8 text" (for files
    read as text) or the OS reason."""
    try:
        yield
    except FileNotFoundError:
        raise error(f"{path}: no such {missing} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {expected} file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte offset {exc.start}); expected a {expected} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_output_file(path: str | Path, option: str) -> None:
    """Refuse, before any work starts, an output file path that cannot be written: an existing
    directory, a path under a file, or a folder without write permission. Why: a long run
    (parity, bench) must not fail only at the end, when it writes its report."""
    target = Path(path)
    if target.is_dir():
        raise D2CError(f"{option} {target}: is a directory; name the file to write")
    existing = next((p for p in target.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise D2CError(f"{option} {target}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise D2CError(f"{option} {target}: cannot write in {existing} (permission denied)")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file handle; on success the content replaces `path` atomically, else nothing changes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def staged_outputs(out_dir: str | Path, tag: str) -> Iterator[Path]:
    """Yield a hidden staging directory inside `out_dir`; on success move its files into `out_dir`.

    Why: a conversion writes several files that only make sense together (prototxt, caffemodel,
    sidecar). Writing them all to staging first means an error or a kill part-way leaves every
    earlier output untouched; the final renames are on one file system, so each is atomic. On
    failure the staging directory is removed, and so are the directories this call created.
    """
    out = Path(out_dir)
    created = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=f".{tag}.", suffix=".d2c-staging"))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        for name in names:  # check first: a rename failing half-way would mix old and new files
            if (out / name).is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory, cannot be replaced by a file",
                                        str(out / name))
        for name in names:
            os.replace(stage / name, out / name)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for directory in created:
            with contextlib.suppress(OSError):  # rmdir only removes empty directories
                directory.rmdir()
        raise
    stage.rmdir()


def fsync_file(path: Path) -> None:
    """Flush a file that was written in place (e.g. by pycaffe) before it is renamed into view."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames durable (best effort: some file systems refuse fsync on directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
