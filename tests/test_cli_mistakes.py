"""A table of ordinary mistakes across every subcommand: each is one line, exit 2, no traceback.

Why: a user who mistypes a path, points -o at the wrong place or feeds a classifier to
`detect` must be told what is wrong and where, never "internal error ... this is a d2c bug"
(which is reserved for real bugs). The first rows are the commands a new user actually ran.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

import d2c
from d2c.cli import build_parser, main
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights
from d2c.errors import D2CError

DATA = Path("/usr/share/darknet/data")
CFGS = Path("/usr/share/darknet/cfg")
NET = "[net]\nwidth=16\nheight=16\nchannels=3\nbatch=2\n"
GOOD = (NET + "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n")
# Two strided [shortcut]s (16x16 onto 8x8, 8x8 onto 4x4) with a [cost] between them: all three
# must be reported in one pass (Darknet keeps the shape through both kinds, so d2c shapes on).
STRIDED = (NET + "[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=leaky\n"
           "[convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
           "[shortcut]\nfrom=-2\nactivation=linear\n[cost]\n"
           "[convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
           "[shortcut]\nfrom=-2\nactivation=linear\n"
           "[convolutional]\nfilters=4\nsize=1\nactivation=leaky\n")
CLASSIFIER = NET + "[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=leaky\n[avgpool]\n[softmax]\n"
YOLOV1 = ("[net]\nwidth=4\nheight=4\nchannels=3\n[connected]\noutput=6\nactivation=linear\n"
          "[detection]\nclasses=1\ncoords=4\nnum=1\nside=1\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Cfgs, weights, three converted models (detector, classifier, YOLOv1), images and lists."""
    root = tmp_path_factory.mktemp("mistakes")
    out: dict[str, Path] = {"dir": root}
    for name, text in {"good.cfg": GOOD, "typo.cfg": GOOD.replace("filters=8", "filtres=8"),
                       "strided.cfg": STRIDED, "classifier.cfg": CLASSIFIER, "yolov1.cfg": YOLOV1,
                       "empty.cfg": "", "lstm.cfg": GOOD + "[lstm]\noutput=4\n",
                       "gray.cfg": GOOD.replace("channels=3", "channels=1"),
                       "negative.cfg": GOOD.replace("filters=8", "filters=-8")}.items():
        (root / name).write_text(text)
        out[name] = root / name
    graph = build_graph(parse_cfg(out["good.cfg"]))
    write_weights(root / "good.weights", WeightsHeader(), graph, random_weights(graph))
    data = (root / "good.weights").read_bytes()
    (root / "long.weights").write_bytes(data + b"\0" * 8)
    (root / "short.weights").write_bytes(data[:-40])
    for name in ("good.weights", "long.weights", "short.weights"):
        out[name] = root / name
    for name in ("good", "classifier", "yolov1", "gray"):
        d2c.convert(out[f"{name}.cfg"], None, root / f"model-{name}")
        out[f"model-{name}"] = root / f"model-{name}"
    shutil.copy(DATA / "dog.jpg", root / "dog.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "existing.png").write_bytes(b"x")
    (root / "folder").mkdir()
    (root / "empty-folder").mkdir()
    (root / "list.txt").write_text(f"{root / 'dog.jpg'}\n{root / 'nope.jpg'}\n")
    (root / "three.names").write_text("a\nb\nc\n")
    (root / "empty.txt").write_text("# nothing listed yet\n")
    for name in ("dog.jpg", "corrupt.jpg", "existing.png", "folder", "empty-folder", "list.txt", "three.names", "empty.txt"):
        out[name] = root / name
    return out


# (command line with {placeholders}, fragments the one line must contain). Exit status 2 always.
MISTAKES: dict[str, tuple[str, list[str]]] = {
    # --- the issue's repro commands
    "parity: missing cfg": ("parity {dir}/missing.cfg", ["missing.cfg", "no such cfg file"]),
    "detect: -o an existing file, two images": ("detect {model-good} {dog.jpg} {dog.jpg} -o {existing.png}",
                                                ["existing.png", "is an existing file", "folder"]),
    "parity: --json a directory": ("parity {good.cfg} --json {folder}", ["--json", "is a directory"]),
    "parity: --plot a directory": ("parity {good.cfg} --plot {folder}", ["--plot", "is a directory"]),
    "detect: a classifier": ("detect {model-classifier} {dog.jpg}", ["no detection head", "classifier"]),
    "detect: names count": ("detect {model-good} {dog.jpg} --names " + str(DATA / "voc.names"),
                            ["voc.names", "20 class name(s)", "1 classes"]),
    "convert: key typo with weights": ("convert {typo.cfg} {good.weights} -o {dir}/o",
                                       ["typo.cfg", "unknown key", "fix the cfg first"]),
    "convert: recurrent": ("convert " + str(CFGS / "rnn.cfg") + " -o {dir}/o", ["recurrent layers"]),
    "convert: strided shortcut and cost together": ("convert {strided.cfg} -o {dir}/o",
                                                    ["1 unsupported section(s) and 2 other problem(s)"]),
    # --- convert
    "convert: missing cfg": ("convert {dir}/nope.cfg -o {dir}/o", ["nope.cfg", "no such cfg file"]),
    "convert: cfg is a directory": ("convert {folder} -o {dir}/o", ["is a directory"]),
    "convert: empty cfg": ("convert {empty.cfg} -o {dir}/o", ["no sections"]),
    "convert: lstm": ("convert {lstm.cfg} -o {dir}/o", ["[lstm]", "recurrent"]),
    "convert: missing weights": ("convert {good.cfg} {dir}/nope.weights -o {dir}/o", ["no such weights file"]),
    "convert: short weights": ("convert {good.cfg} {short.weights} -o {dir}/o", ["40 bytes short"]),
    "convert: trailing weights": ("convert {good.cfg} {long.weights} -o {dir}/o", ["--allow-trailing"]),
    "convert: weights is a directory": ("convert {good.cfg} {folder} -o {dir}/o", ["is a directory"]),
    "convert: -o under a file": ("convert {good.cfg} -o {dog.jpg}/o", ["cannot write"]),
    "convert: bad --name": ("convert {good.cfg} --name a/b -o {dir}/o", ["plain file stem"]),
    "convert: --names count": ("convert {good.cfg} --names {three.names} -o {dir}/o", ["3 class name(s)"]),
    "convert: --names missing": ("convert {good.cfg} --names {dir}/nope.names -o {dir}/o",
                                 ["no such class names file"]),
    "convert: unknown --darknet": ("convert {good.cfg} --darknet darknet2", ["invalid choice", "--help"]),
    "convert: --seed not a number": ("convert {good.cfg} --seed x", ["invalid int value"]),
    "convert: no cfg": ("convert", ["required", "cfg"]),
    # --- detect
    "detect: 1-channel model": ("detect {model-gray} {dog.jpg}", ["1 input channel(s)", "3"]),
    "detect: missing model": ("detect {dir}/nope {dog.jpg}", ["no such model directory"]),
    "detect: folder without a model": ("detect {folder} {dog.jpg}", ["no d2c sidecar"]),
    "detect: missing image": ("detect {model-good} {dir}/nope.jpg", ["nope.jpg", "no such image"]),
    "detect: corrupt image": ("detect {model-good} {corrupt.jpg}", ["corrupt.jpg", "OpenCV can decode",
                                                                      "--skip-bad"]),
    "detect: empty folder": ("detect {model-good} {empty-folder}", ["no image files"]),
    "detect: missing list": ("detect {model-good} @{dir}/nope.txt", ["no such list file"]),
    "detect: list names a missing image": ("detect {model-good} @{list.txt}", ["list.txt:2", "nope.jpg"]),
    "detect: list is a folder": ("detect {model-good} @{folder}", ["is a directory"]),
    "detect: empty list": ("detect {model-good} @{empty.txt}", ["the list names no images"]),
    "detect: --names missing": ("detect {model-good} {dog.jpg} --names {dir}/nope.names",
                                ["no such class names file"]),
    "detect: --names is a folder": ("detect {model-good} {dog.jpg} --names {folder}", ["is a directory"]),
    "detect: --thresh above 1": ("detect {model-good} {dog.jpg} --thresh 2", ["--thresh", "between 0 and 1"]),
    "detect: --nms negative": ("detect {model-good} {dog.jpg} --nms -1", ["--nms", "between 0 and 1"]),
    "detect: -o unknown extension": ("detect {model-good} {dog.jpg} -o {dir}/x.xyz", ["cannot write '.xyz'"]),
    "detect: -o without extension": ("detect {model-good} {dog.jpg} -o {dir}/plain", ["no extension"]),
    "detect: two images -o x.jpg": ("detect {model-good} {dog.jpg} {dog.jpg} -o {dir}/x.jpg", ["names one image", "folder"]),
    "detect: --frame-stride 0": ("detect {model-good} {dog.jpg} --frame-stride 0", ["--frame-stride"]),
    "detect: --json and --jsonl": ("detect {model-good} {dog.jpg} --json --jsonl", ["not allowed with"]),
    "detect: unknown engine": ("detect {model-good} {dog.jpg} --engine tensorrt", ["invalid choice"]),
    # --- parity
    "parity: cfg without heads": ("parity {classifier.cfg}", ["heads all have a training loss"]),
    "parity: bad --set": ("parity {good.cfg} --set burn_in", ["--set", "KEY=VALUE"]),
    "parity: --batch 0": ("parity {good.cfg} --batch 0", ["must be >= 1"]),
    "parity: --json under a file": ("parity {good.cfg} --json {dog.jpg}/r.json", ["is a file"]),
    # --- train, export, bench, top level
    "train: missing .data": ("train {dir}/nope.data {good.cfg}", ["nope.data", "no such .data file"]),
    "export: missing model": ("export {dir}/nope -o {dir}/x.weights", ["no such model"]),
    "export: -o a directory": ("export {model-good} -o {folder}", ["is a directory"]),
    "export: no -o": ("export {model-good}", ["required", "-o"]),
    "parity: cfg mistake names the cfg": ("parity {negative.cfg}", ["negative.cfg:7 [convolutional] 'filters'"]),
    "parity: --size 0 0": ("parity {good.cfg} --size 0 0", ["overrides", "good.cfg:1 [net]", "0x0x3"]),
    "bench: cfg mistake names the cfg": ("bench {negative.cfg}", ["negative.cfg:7 [convolutional] 'filters'"]),
    "bench: --size 0": ("bench {good.cfg} --size 0", ["--size 0", ">= 1"]),
    "bench: missing cfg": ("bench {dir}/nope.cfg", ["no such cfg file"]),
    "bench: --json a directory": ("bench {good.cfg} --json {folder}", ["--json", "is a directory"]),
    "unknown command": ("detekt {model-good} {dog.jpg}", ["invalid choice", "detect"]),
    # --- int8: split heads and quantize (all refused before any toolchain runs)
    "convert: --split-heads on YOLOv1": ("convert {yolov1.cfg} --split-heads -o {dir}/o",
                                         ["only [yolo] heads can be split", "[detection]"]),
    "convert: --split-heads --train": ("convert {good.cfg} --split-heads --train -o {dir}/o",
                                       ["--split-heads", "without --train"]),
    "quantize: missing model": ("quantize {dir}/nope --data {folder}", ["no such model directory"]),
    "quantize: missing .data": ("quantize {model-good} --data {dir}/nope.data", ["nope.data", "no such .data file"]),
    "quantize: folder without images": ("quantize {model-good} --data {empty-folder}", ["no images"]),
    "quantize: list names a missing image": ("quantize {model-good} --data {list.txt}", ["list.txt:2", "nope.jpg"]),
    "quantize: --max-fp16 -1": ("quantize {model-good} --data {dog.jpg} --max-fp16 -1", ["--max-fp16 -1"]),
    "quantize: no --data": ("quantize {model-good}", ["required", "--data"]),
}


def _argv(line: str, env: dict[str, Path]) -> list[str]:
    for key, path in env.items():
        line = line.replace("{" + key + "}", str(path))
    return line.split()


@pytest.mark.parametrize("case", list(MISTAKES))
def test_mistake_is_one_line_exit_2(env, capsys, case: str) -> None:
    line, fragments = MISTAKES[case]
    argv = _argv(line, env)
    try:
        rc = main(argv)
    except SystemExit as exc:   # argparse mistakes exit through SystemExit
        rc = exc.code
    captured = capsys.readouterr()
    assert rc == 2, (case, captured.err)
    assert captured.out == ""
    err_lines = captured.err.rstrip("\n").split("\n")
    head = argv[0] if argv and argv[0] in build_parser()._subparsers._group_actions[0].choices else ""
    assert err_lines[0].startswith(f"d2c {head}: error: " if head else "d2c: error: "), captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert all(line.startswith("  ") for line in err_lines[1:]), captured.err   # details are indented
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    assert not (env["dir"] / "o").exists()


def test_table_is_large_and_covers_every_subcommand() -> None:
    commands = {line.split()[0] for line, _ in MISTAKES.values()}
    assert len(MISTAKES) >= 40
    assert {"convert", "detect", "parity", "train", "export", "bench"} <= commands


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_anywhere_shows_the_real_exception(env, position: str) -> None:
    argv = ["parity", str(env["dir"] / "missing.cfg")]
    argv = ["--debug", *argv] if position == "before" else [*argv, "--debug"]
    with pytest.raises(D2CError, match="no such cfg file"):
        main(argv)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"d2c {d2c.__version__}"


def test_every_option_has_help() -> None:
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subparsers.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert missing == []
    assert "hierarchical" in subparsers["detect"].format_help()


def test_train_trailing_hint_names_load_upto(env) -> None:
    """`d2c train` has no --allow-trailing; its fix for a longer (pretrained) file is --load-upto."""
    from d2c.train import initial_weights
    graph = build_graph(parse_cfg(env["good.cfg"]))
    with pytest.raises(D2CError, match="--load-upto L") as exc:
        initial_weights(graph, env["long.weights"], load_upto=None, seed=0, clear=False)
    assert "--allow-trailing" not in str(exc.value)


def test_convert_note_for_classifiers_and_yolov1_detects(env, capsys) -> None:
    assert main(["convert", str(env["classifier.cfg"]), "-o", str(env["dir"] / "cls")]) == 0
    out = capsys.readouterr().out
    outputs_line = next(line for line in out.splitlines() if "outputs" in line)
    assert outputs_line.split(":", 1)[1].strip(), "no empty outputs line"
    assert "classifier" in outputs_line
    # A YOLOv1 [detection] model is decoded (tests/test_detect_yolov1.py checks it against Darknet).
    assert main(["detect", str(env["model-yolov1"]), str(env["dog.jpg"]), "--jsonl"]) == 0
    assert '"detections": [' in capsys.readouterr().out


def test_every_problem_in_one_pass(env) -> None:
    """resnet-style: the [cost] and the strided [shortcut] in one error, each with its line."""
    from d2c.errors import UnsupportedLayerError
    with pytest.raises(UnsupportedLayerError) as exc:
        d2c.convert(env["strided.cfg"], None, env["dir"] / "o")
    problems = exc.value.problems
    assert len(problems) == 3, problems
    assert problems[0].endswith("[cost] (layer 3)") and "strided.cfg:20:" in problems[0]
    assert "strided.cfg:18 [shortcut] 'from': layer 0 is 16x16 but the previous layer is 8x8" in problems[1]
    assert "strided.cfg:28 [shortcut] 'from': layer 3 is 8x8 but the previous layer is 4x4" in problems[2]


REPRO = ["parity: missing cfg", "detect: -o an existing file, two images", "parity: --json a directory",
         "detect: a classifier", "detect: names count", "convert: key typo with weights", "convert: recurrent",
         "convert: strided shortcut and cost together"]


@pytest.mark.parametrize("case", REPRO)
def test_issue_repro_through_the_installed_script(env, case: str) -> None:
    """The issue's commands as a user runs them: the real console script, a real process."""
    import subprocess
    script = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "d2c"
    line, fragments = MISTAKES[case]
    proc = subprocess.run([str(script), *_argv(line, env)], capture_output=True, text=True, timeout=300,
                          cwd=env["dir"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    first, *details = proc.stderr.rstrip("\n").split("\n")
    assert first.startswith(f"d2c {line.split()[0]}: error: ") and all(d.startswith("  ") for d in details)
    assert all(fragment in proc.stderr for fragment in fragments)


def test_empty_input_path_is_named(env, capsys) -> None:
    """`d2c detect M ""` (an unset shell variable): not "no image files in folder '.'"."""
    assert main(["detect", str(env["model-good"]), ""]) == 2
    assert capsys.readouterr().err == "d2c detect: error: an empty input path (--skip-bad reports it and goes on)\n"
