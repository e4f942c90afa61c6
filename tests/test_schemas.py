"""The documented JSON schemas (d2c/schemas.py -> docs/json-schemas.md) against real output.

Why: a schema that is only prose drifts; here `d2c detect` records (good and error) and a
real `d2c parity --json` report (Debian's Darknet vs Caffe) are checked against it, and the
generated page must equal what the code renders.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2c import cli
from d2c.schemas import DETECT_RECORD, PARITY_REPORT, SCHEMAS, render_markdown, validate

ROOT = Path(__file__).resolve().parents[1]
DOG = Path("/usr/share/darknet/data/dog.jpg")
GOOD = ("[net]\nwidth=32\nheight=32\nchannels=3\nbatch=2\nlearning_rate=0.001\n"
        "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n")


def test_generated_page_is_up_to_date() -> None:
    assert (ROOT / "docs" / "json-schemas.md").read_text(encoding="utf-8") == render_markdown(), \
        "run .venv/bin/python tools/write_schemas.py"
    assert set(SCHEMAS) >= {"detect", "parity", "bench"}


def test_detect_records_match_the_schema(tmp_path, capsys) -> None:
    cfg = tmp_path / "good.cfg"
    cfg.write_text(GOOD)
    assert cli.main(["convert", str(cfg), "-o", str(tmp_path / "m")]) == 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    capsys.readouterr()
    cli.main(["detect", str(tmp_path / "m"), str(DOG), str(bad), "--jsonl", "--thresh", "0"])
    good_record, error_record = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert good_record["detections"], "thresh 0 on random weights gives boxes to check"
    assert validate(good_record, DETECT_RECORD) == []
    assert validate(error_record, DETECT_RECORD) == []
    # The validator is not vacuous: each of these breaks the schema.
    broken = dict(good_record, detections=[{k: v for k, v in good_record["detections"][0].items() if k != "box_px"}])
    assert validate(broken, DETECT_RECORD) == ["$.detections[0]: missing 'box_px'"]
    assert validate(dict(good_record, error="x"), DETECT_RECORD)         # both kinds at once
    assert validate(dict(good_record, frame="0"), DETECT_RECORD)


def test_parity_report_matches_the_schema(tmp_path, capsys) -> None:
    cfg = tmp_path / "good.cfg"
    cfg.write_text(GOOD)
    report = tmp_path / "parity.json"
    rc = cli.main(["parity", str(cfg), "--steps", "1", "--images", str(DOG), "--json", str(report)])
    data = json.loads(report.read_text())
    assert rc == (0 if data["ok"] else 1)
    assert validate(data, PARITY_REPORT) == []
    assert validate({k: v for k, v in data.items() if k != "ok"}, PARITY_REPORT) == ["$: missing 'ok'"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_are_documented(name: str) -> None:
    schema = SCHEMAS[name]
    assert schema["title"] in render_markdown()
    assert all(prop.get("description") or prop.get("type") for prop in schema["properties"].values())


def test_readme_python_api_example_runs(tmp_path) -> None:
    """The README's Python API block, run as written (file names pointed at the real files)."""
    import re
    import subprocess
    import sys
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    code = (block.replace('"yolov3-tiny.cfg"', '"/usr/share/darknet/cfg/yolov3-tiny.cfg"')
            .replace('"yolov3-tiny.weights"', repr(str(ROOT / "weights" / "yolov3-tiny.weights")))
            .replace('"dog.jpg"', repr(str(DOG))).replace('"out/tiny"', repr(str(tmp_path / "tiny"))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("dog ") for line in lines), proc.stdout
    ok, max_rel = lines[-1].split()                           # parity's verdict and worst forward error
    assert ok in ("True", "False") and float(max_rel) < 1e-4
