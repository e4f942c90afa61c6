"""The per-layer tier covers every registered section, and the README support table lists them all."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from d2c.layers import REGISTRY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("section", sorted(REGISTRY))
def test_every_section_has_a_test_file(section):
    converter = REGISTRY[section]
    assert (ROOT / "tests" / "layers" / f"test_{section}.py").exists(), f"[{section}] has no per-layer test file"
    assert converter.summary and converter.caffe_layers, f"[{section}] needs summary and caffe_layers"
    assert isinstance(converter.keys, frozenset)


def test_support_table_lists_every_section():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "support_table.py")], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `[")]
    assert sorted(row.split("`")[1].strip("[]") for row in rows) == sorted(REGISTRY)
    for row in rows:
        assert row.count(" | ") == 4 and "tests/layers/test_" in row
