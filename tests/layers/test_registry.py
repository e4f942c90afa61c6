"""The per-layer tier covers every registered section, the README support table lists them all, and
export, training init and the .weights layout dispatch through the registry."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.node import Node, ParamArray
from d2c.errors import UnsupportedLayerError, WeightsError
from d2c.layers import REGISTRY, LayerConverter

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


# --------------------------------------------------------------------------------------------
# A section with parameters owns its whole life: export, Darknet's init, .weights layout
# --------------------------------------------------------------------------------------------

PARAMETER_SECTIONS = {"convolutional", "connected", "batchnorm", "local"}


def _overrides(converter: LayerConverter, method: str) -> bool:
    return getattr(type(converter), method) is not getattr(LayerConverter, method)


@pytest.mark.parametrize("section", sorted(REGISTRY))
def test_sections_with_parameters_define_export_and_init(section):
    """Every converter that lists arrays has its export and Darknet init; the others inherit the
    refusing defaults (which return nothing for a node without parameters)."""
    converter = REGISTRY[section]
    owns = _overrides(converter, "export"), _overrides(converter, "darknet_init")
    assert owns == ((True, True) if section in PARAMETER_SECTIONS else (False, False)), section
    # What the real engines hold for it (parity reads them): every section with parameters says so.
    assert _overrides(converter, "engine_arrays") or section not in PARAMETER_SECTIONS, section


def _fake_graph(monkeypatch) -> SimpleNamespace:
    """A graph with one node of an unknown-to-d2c section that has parameters."""

    class Fancy(LayerConverter):
        section = "fancy"

    monkeypatch.setitem(REGISTRY, "fancy", Fancy())
    sec = parse_cfg("fancy.cfg", "[net]\nwidth=4\nheight=4\nchannels=1\n[fancy]\n").layers[0]
    node = Node(index=0, kind="fancy", section=sec, inputs=[-1], in_shapes=[(1, 4, 4)], out_shape=(1, 4, 4),
                params=[ParamArray("weights", (1, 1, 3, 3))])
    return SimpleNamespace(nodes=[node], flavor="pjreddie")


def test_parameters_without_init_are_an_error_not_a_guess(monkeypatch):
    from d2c.train import darknet_init

    with pytest.raises(UnsupportedLayerError, match=r"\[fancy\] has parameters but its converter defines no "
                                                    r"Darknet random init"):
        darknet_init(_fake_graph(monkeypatch), seed=0)


def test_parameters_without_export_are_an_error(monkeypatch):
    from d2c.export import caffe_to_darknet

    with pytest.raises(WeightsError, match=r"\[fancy\] has parameters but its converter defines no export"):
        caffe_to_darknet(_fake_graph(monkeypatch), [])


def test_weights_layout_is_the_converters(monkeypatch, tmp_path):
    """The .weights reader and writer ask the converter for the stored layout (default: as is)."""
    from d2c.darknet.weights import WeightsHeader, read_weights, write_weights

    graph = _fake_graph(monkeypatch)
    weights = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    path = tmp_path / "fancy.weights"
    write_weights(path, WeightsHeader(), graph, {0: {"weights": weights}})
    np.testing.assert_array_equal(read_weights(path, graph)[1][0]["weights"], weights)

    class Flipped(type(REGISTRY["fancy"])):
        def read_array(self, node, spec, stored, header):
            return stored[::-1].reshape(spec.shape)

    monkeypatch.setitem(REGISTRY, "fancy", Flipped())
    np.testing.assert_array_equal(read_weights(path, graph)[1][0]["weights"].ravel(), np.arange(9)[::-1])


# Outside d2c/layers, nothing names a section with parameters to switch on it. cfg.py is exempt:
# its alias table and the list of sections Darknet parses name sections without switching on them.
_SWITCH = re.compile(r'(==|!=|\bin)\s*\(?[^\n]*"(convolutional|connected|batchnorm|local)"'
                     r'|"(CONVOLUTIONAL|CONNECTED|BATCHNORM|LOCAL)"')


def _section_switches(text: str, name: str) -> list[str]:
    return [f"{name}:{k}: {line.strip()}" for k, line in enumerate(text.splitlines(), 1) if _SWITCH.search(line)]


def test_no_module_outside_layers_switches_on_a_parameter_section():
    found = [hit for path in sorted((ROOT / "d2c").rglob("*.py"))
             if "layers" not in path.parts and path.name != "cfg.py"
             for hit in _section_switches(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
    # The check can fail: the switches this replaced are seen.
    assert _section_switches('        if kind == "BATCHNORM" and not updates:\n', "x")
    assert _section_switches('        kind = "_conv" if node.kind == "convolutional" else "_fc"\n', "x")
