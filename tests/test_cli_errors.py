"""Bad input at the command line: one clear line (plus indented problems) on stderr, exit 2.

Why: a user who mistypes a path or feeds the wrong .weights must see what is wrong and where,
not a Python traceback; `--debug` is there for the developer who wants the traceback.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import d2c.convert as convert_module
from d2c.cli import main
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights
from d2c.errors import CfgError, D2CError, UnsupportedLayerError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
D2C = ROOT / ".venv" / "bin" / "d2c"
GOOD = ("[net]\nwidth=16\nheight=16\nchannels=3\n"
        "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A good cfg with matching, short, long and tiny weights files, and some bad cfgs."""
    cfg = tmp_path / "good.cfg"
    cfg.write_text(GOOD)
    graph = build_graph(parse_cfg(cfg))
    weights = tmp_path / "good.weights"
    write_weights(weights, WeightsHeader(), graph, random_weights(graph))
    data = weights.read_bytes()
    out = {"cfg": cfg, "weights": weights, "dir": tmp_path}
    for name, content in {"short.weights": data[:-40], "long.weights": data + b"\0" * 8,
                          "tiny.weights": b"\x01\x02", "empty.weights": b""}.items():
        (tmp_path / name).write_bytes(content)
        out[name] = tmp_path / name
    for name, text in {"empty.cfg": "", "lstm.cfg": GOOD + "[lstm]\noutput=4\n[gru]\noutput=2\n",
                       "negative.cfg": GOOD.replace("filters=8", "filters=-8"),
                       "typos.cfg": GOOD.replace("filters=8", "filters8").replace("size=1", "=1")}.items():
        (tmp_path / name).write_text(text)
        out[name] = tmp_path / name
    (tmp_path / "binary.cfg").write_bytes(b"\x7fELF\x00\x01")
    out["binary.cfg"] = tmp_path / "binary.cfg"
    return out


# (arguments with placeholders, the error class, fragments the message must contain, problem lines)
CASES = {
    "missing cfg": (["{dir}/nope.cfg"], CfgError, ["nope.cfg", "no such cfg file"], 0),
    "cfg is a directory": (["{dir}"], CfgError, ["is a directory"], 0),
    "empty cfg": (["{empty.cfg}"], CfgError, ["1 problem(s)", "no sections"], 1),
    "binary cfg": (["{binary.cfg}"], CfgError, ["binary file", "offset 4"], 0),
    "two lexical problems": (["{typos.cfg}"], CfgError, ["2 problem(s)", ":6:", ":13:", "no key before"], 2),
    "negative filters": (["{negative.cfg}"], CfgError, ["negative.cfg:6", "'filters'",
                                                        "must be > 0"], 1),
    "unsupported sections": (["{lstm.cfg}"], UnsupportedLayerError, ["2 unsupported section(s)", "[lstm]",
                                                                      "[gru]"], 2),
    "missing weights": (["{cfg}", "{dir}/nope.weights"], WeightsError, ["nope.weights", "no such weights file"], 0),
    "short weights": (["{cfg}", "{short.weights}"], WeightsError, ["ran out in layer 1", "40 bytes short"], 0),
    "trailing weights": (["{cfg}", "{long.weights}"], WeightsError, ["8 trailing byte(s)", "--allow-trailing"], 0),
    "tiny weights": (["{cfg}", "{tiny.weights}"], WeightsError, ["2 bytes is too short"], 0),
    "empty weights": (["{cfg}", "{empty.weights}"], WeightsError, ["0 bytes is too short"], 0),
    "bad output name": (["{cfg}", "--name", "a/b"], D2CError, ["plain file stem"], 0),
    "output under a file": (["{cfg}", "-o", "{cfg}/out"], D2CError, ["cannot write"], 0),
}


def _args(template: list[str], files: dict[str, Path]) -> list[str]:
    def fill(arg: str) -> str:
        for key, path in files.items():
            arg = arg.replace("{" + key + "}", str(path))
        return arg

    args = ["convert", *map(fill, template)]
    if "-o" not in args:
        args += ["-o", str(files["dir"] / "out")]
    return args


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(files, capsys, case: str) -> None:
    template, error, fragments, problems = CASES[case]
    rc = main(_args(template, files))
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.rstrip("\n").split("\n")
    assert lines[0].startswith("d2c convert: error: "), captured.err
    assert all(line.startswith("  ") for line in lines[1:]), captured.err
    assert len(lines) == 1 + problems, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    assert not (files["dir"] / "out").exists()


@pytest.mark.parametrize("case", ["missing cfg", "short weights", "unsupported sections"])
def test_debug_raises_the_real_exception(files, case: str) -> None:
    template, error, _, _ = CASES[case]
    with pytest.raises(error):
        main(["--debug", *_args(template, files)])


def test_good_input_still_converts(files, capsys) -> None:
    rc = main(["convert", str(files["cfg"]), str(files["weights"]), "-o", str(files["dir"] / "out")])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (files["dir"] / "out").iterdir()) == ["good.caffemodel", "good.json",
                                                                        "good.prototxt"]


def test_a_bug_is_one_line_exit_1_and_debug_shows_it(files, capsys, monkeypatch) -> None:
    """Anything that is not a D2CError is a d2c bug: still no traceback, unless --debug."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug\nsecond line")

    monkeypatch.setattr(convert_module, "convert", broken)
    rc = main(["convert", str(files["cfg"])])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError: simulated bug" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "convert", str(files["cfg"])])


def test_installed_script_prints_one_line_and_debug_prints_traceback(files) -> None:
    """Once through the real console script, as a user runs it."""
    args = [str(D2C), "convert", str(files["dir"] / "nope.cfg"), "-o", str(files["dir"] / "out")]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=files["dir"])
    assert plain.returncode == 2
    assert plain.stdout == ""
    assert plain.stderr == f"d2c convert: error: {files['dir'] / 'nope.cfg'}: no such cfg file\n"
    debug = subprocess.run([args[0], "--debug", *args[1:]], capture_output=True, text=True, timeout=120,
                           cwd=files["dir"])
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "CfgError" in debug.stderr


def test_module_entry_point_behaves_the_same(files) -> None:
    proc = subprocess.run([sys.executable, "-m", "d2c.cli", "convert", str(files["short.weights"])],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("d2c convert: error: ") and "Traceback" not in proc.stderr
