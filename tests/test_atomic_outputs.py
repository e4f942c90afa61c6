"""A failed, interrupted or killed convert leaves no new or partial file and keeps earlier outputs.

Why: the prototxt, caffemodel and JSON sidecar only make sense together. A user who reruns a
conversion that fails (bad cfg, disk full, Ctrl-C, kill -9) must still have the previous,
complete conversion, and no half-written caffemodel under the real name.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import d2c.caffe.proto as proto
import d2c.convert as convert_module
from d2c.convert import convert
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights
from d2c.errors import D2CError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
GOOD = ("[net]\nwidth=16\nheight=16\nchannels=3\nbatch=2\n"
        "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n")
# Same stem, different net: a successful run would change every file.
OTHER = GOOD.replace("filters=8", "filters=16").replace("width=16\nheight=16", "width=32\nheight=32")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every entry in the directory (hidden ones too) with its bytes."""
    return {p.name: (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(directory.iterdir())}


@pytest.fixture()
def previous(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """An output directory holding a complete earlier conversion of net.cfg."""
    cfg = tmp_path / "net.cfg"
    cfg.write_text(GOOD)
    out = tmp_path / "out"
    convert(cfg, None, out, seed=1)
    before = snapshot(out)
    assert sorted(before) == ["net.caffemodel", "net.json", "net.prototxt"]
    cfg.write_text(OTHER)  # the rerun would produce different bytes in every file
    return cfg, out, before


def test_success_replaces_all_files_and_leaves_no_staging(previous) -> None:
    cfg, out, before = previous
    convert(cfg, None, out, seed=1)
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    assert all(after[name] != before[name] for name in before)
    sidecar = json.loads(after["net.json"])
    assert sidecar["caffemodel"] == "net.caffemodel" and sidecar["prototxt"] == "net.prototxt"


def test_bad_cfg_leaves_previous_output_intact(previous) -> None:
    cfg, out, before = previous
    cfg.write_text(GOOD.replace("filters=18", "filters=-18"))
    with pytest.raises(D2CError):
        convert(cfg, None, out, seed=1)
    assert snapshot(out) == before


def test_caffemodel_writer_raising_midway_leaves_previous_output_intact(previous, monkeypatch) -> None:
    """A bug in the writer after part of the caffemodel is on disk."""
    cfg, out, before = previous
    real = proto._write_parts
    calls = []

    def write_then_fail(handle, parts):
        real(handle, parts)
        handle.flush()
        calls.append(os.fstat(handle.fileno()).st_size)
        if len(calls) == 3:
            raise RuntimeError("simulated bug in the middle of the caffemodel")

    monkeypatch.setattr(proto, "_write_parts", write_then_fail)
    with pytest.raises(RuntimeError, match="simulated bug"):
        convert(cfg, None, out, seed=1)
    assert len(calls) == 3 and calls[-1] > 0  # part of the file really was on disk
    assert snapshot(out) == before


def test_disk_full_during_caffemodel_is_a_clear_error_and_changes_nothing(previous, monkeypatch) -> None:
    cfg, out, before = previous
    real = proto._write_parts
    calls = []

    def fill_disk(handle, parts):
        calls.append(1)
        if len(calls) == 2:
            real(handle, parts[: len(parts) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(handle, parts)

    monkeypatch.setattr(proto, "_write_parts", fill_disk)
    with pytest.raises(D2CError) as info:
        convert(cfg, None, out, seed=1)
    assert "No space left on device" in str(info.value) and str(out) in str(info.value)
    assert snapshot(out) == before


def test_write_caffemodel_replaced_by_one_that_raises(previous, monkeypatch) -> None:
    """The brief's case: convert's write_caffemodel itself writes part of a file and raises."""
    cfg, out, before = previous

    def partial(net, path):
        Path(path).write_bytes(b"\x0a\x03net" + b"\x00" * 100)
        raise WeightsError(f"{path}: simulated failure after 105 bytes")

    monkeypatch.setattr(convert_module, "write_caffemodel", partial)
    with pytest.raises(WeightsError):
        convert(cfg, None, out, seed=1)
    assert snapshot(out) == before


@pytest.mark.parametrize("failing_suffix", [".prototxt", ".json"])
def test_failure_on_a_later_file_keeps_the_earlier_files_old(previous, monkeypatch, failing_suffix: str) -> None:
    """The caffemodel is written first: it must not be swapped in when the sidecar then fails."""
    cfg, out, before = previous
    real = convert_module.atomic_write_text

    def fail_on(path, text):
        if str(path).endswith(failing_suffix):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path, text)

    monkeypatch.setattr(convert_module, "atomic_write_text", fail_on)
    with pytest.raises(D2CError, match="Input/output error"):
        convert(cfg, None, out, seed=1)
    assert snapshot(out) == before


def test_keyboard_interrupt_midway_changes_nothing(previous, monkeypatch) -> None:
    cfg, out, before = previous
    real = convert_module.atomic_write_text

    def interrupted(path, text):
        real(path, text)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(cfg, None, out, seed=1)
    assert snapshot(out) == before


def test_failure_into_a_new_directory_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(GOOD)
    monkeypatch.setattr(convert_module, "atomic_write_text",
                        lambda path, text: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(D2CError, match="Permission denied"):
        convert(cfg, None, tmp_path / "a" / "b" / "out")
    assert not (tmp_path / "a").exists()


def test_unwritable_output_directory_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(GOOD)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(D2CError) as info:
        convert(cfg, None, tmp_path / "file" / "out")
    assert "cannot write" in str(info.value)


def test_a_directory_in_the_way_of_an_output_changes_nothing(previous) -> None:
    cfg, out, before = previous
    (out / "net.json").unlink()
    (out / "net.json").mkdir()
    before = snapshot(out)
    with pytest.raises(D2CError, match="is a directory"):
        convert(cfg, None, out, seed=1)
    assert snapshot(out) == before


def test_output_name_with_a_path_is_refused(previous) -> None:
    cfg, out, before = previous
    with pytest.raises(D2CError, match="plain file stem"):
        convert(cfg, None, out, name="../escape")
    assert snapshot(out) == before


def test_train_files_are_staged_with_the_rest(previous, monkeypatch) -> None:
    cfg, out, before = previous
    report = convert(cfg, None, out, seed=1, train=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["net.caffemodel", "net.json", "net.prototxt", *(p.name for p in report.extra)])
    assert all(p.parent == out and p.exists() for p in report.extra)
    with_train = snapshot(out)
    cfg.write_text(GOOD)
    import d2c.train_files as train_files

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_files, "write_train_files", broken)
    with pytest.raises(D2CError, match="No space left"):
        convert(cfg, None, out, seed=1, train=True)
    assert snapshot(out) == with_train


KILLER = textwrap.dedent("""
    import os, signal, sys
    import d2c.caffe.proto as proto
    from d2c.convert import convert
    real = proto._write_parts
    calls = []
    def write_then_die(handle, parts):
        calls.append(1)
        real(handle, parts[: max(1, len(parts) // 2)])
        if len(calls) == 2:
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(handle, parts[max(1, len(parts) // 2):])
    proto._write_parts = write_then_die
    convert(sys.argv[1], None, sys.argv[2], seed=1)
""")


def test_kill_9_in_the_middle_of_the_caffemodel_keeps_previous_output(previous) -> None:
    """kill -9 runs no cleanup: the real-named files must still be the old ones."""
    cfg, out, before = previous
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg), str(out)], capture_output=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    leftovers = sorted(set(after) - set(before))
    # Only a hidden staging directory may remain, holding the partial file.
    assert len(leftovers) == 1 and leftovers[0].startswith(".net.") and leftovers[0].endswith(".d2c-staging")


def test_write_weights_failure_keeps_previous_weights(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(GOOD)
    graph = build_graph(parse_cfg(cfg))
    arrays = random_weights(graph, seed=2)
    path = tmp_path / "net.weights"
    write_weights(path, WeightsHeader(), graph, arrays)
    before = snapshot(tmp_path)
    del arrays[1]["weights"]  # layer 1's arrays come after layer 0's are already written
    with pytest.raises(WeightsError, match="no 'weights' for layer 1"):
        write_weights(path, WeightsHeader(), graph, arrays)
    assert snapshot(tmp_path) == before
