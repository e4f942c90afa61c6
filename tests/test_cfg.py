"""The cfg parser follows Darknet's lexical rules and reports problems with file:line."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared_cfgs import alexeyab_cfgs

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.errors import CfgError, UnsupportedLayerError

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"


def write(tmp_path: Path, text: str, name: str = "t.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_whitespace_comments_and_first_key_wins(tmp_path: Path) -> None:
    text = NET + "# comment\n; other\n[conv]\n filters = 8 \nsize=3\nfilters=16\nactivation = leaky\n"
    cfg = parse_cfg(write(tmp_path, text))
    conv = cfg.layers[0]
    assert conv.type == "convolutional" and conv.line == 7 and conv.index == 0
    assert conv.get_int("filters") == 8  # Darknet reads the first occurrence
    assert conv.options["filters"].line == 8
    assert any("repeated" in w for w in cfg.warnings)


def test_anchor_lists_with_spaces(tmp_path: Path) -> None:
    cfg = parse_cfg(write(tmp_path, NET + "[yolo]\nanchors = 10,13,  16,30 , 33,23\n"))
    assert cfg.layers[0].get_float_list("anchors") == [10, 13, 16, 30, 33, 23]


@pytest.mark.parametrize("text, fragment", [
    ("", "no sections"),
    ("[conv]\nfilters=1\n", "first section must be [net]"),
    (NET + "[conv]\nfilters\n", "not a key=value line"),
    (NET + "[conv]\nfilters=\n", "has no value"),
    (NET + "[conv\nfilters=2\n", "no closing"),
    ("width=3\n" + NET, "before the first section"),
    (NET, "no layers"),
])
def test_lexical_errors_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(CfgError) as info:
        parse_cfg(write(tmp_path, text))
    assert fragment in info.value.render()
    assert str(tmp_path / "t.cfg") in info.value.render()


def test_binary_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "bin.cfg").write_bytes(b"[net]\x00\x01")
    with pytest.raises(CfgError, match="binary"):
        parse_cfg(tmp_path / "bin.cfg")
    (tmp_path / "latin.cfg").write_bytes(NET.encode() + b"[conv]\n# caf\xe9\n")
    with pytest.raises(CfgError, match=r"latin.cfg:6: not UTF-8"):
        parse_cfg(tmp_path / "latin.cfg")
    with pytest.raises(CfgError, match="no such cfg"):
        parse_cfg(tmp_path / "missing.cfg")


def test_bad_numbers_name_key_and_line(tmp_path: Path) -> None:
    cfg = parse_cfg(write(tmp_path, NET + "[conv]\nfilters=abc\n"))
    with pytest.raises(CfgError) as info:
        build_graph(cfg)
    assert "t.cfg:6 [conv] 'filters': expects an integer" in info.value.render()


def test_unsupported_sections_are_collected_in_one_error(tmp_path: Path) -> None:
    text = NET + "[conv]\nfilters=4\n[lstm]\noutput=3\n[conv]\nfilters=2\n[gru]\noutput=2\n"
    with pytest.raises(UnsupportedLayerError) as info:
        build_graph(parse_cfg(write(tmp_path, text)))
    problems = info.value.problems
    assert len(problems) == 2
    assert "t.cfg:7: [lstm] (layer 1)" in problems[0] and "t.cfg:11: [gru] (layer 3)" in problems[1]


def test_continue_on_error_reports_where_it_stopped(tmp_path: Path) -> None:
    text = NET + "[conv]\nfilters=4\n[lstm]\noutput=3\n"
    graph = build_graph(parse_cfg(write(tmp_path, text)), continue_on_error=True)
    assert len(graph.nodes) == 1 and "[lstm]" in graph.skipped[0]


@pytest.mark.parametrize("ref", ["-5", "3", "7"])
def test_route_references_out_of_range(tmp_path: Path, ref: str) -> None:
    text = NET + "[conv]\nfilters=4\n[conv]\nfilters=4\n[route]\nlayers=" + ref + "\n"
    with pytest.raises(CfgError) as info:
        build_graph(parse_cfg(write(tmp_path, text)))
    assert "t.cfg:10 [route] 'layers': layer reference" in info.value.render()


def test_unknown_keys_are_warnings_with_lines(tmp_path: Path) -> None:
    graph = build_graph(parse_cfg(write(tmp_path, NET + "[conv]\nfilters=4\nfliters=3\n")))
    assert any("t.cfg:7" in w and "fliters" in w for w in graph.warnings)


def test_absurd_network_refused_before_allocation(tmp_path: Path) -> None:
    text = "[net]\nwidth=100000\nheight=100000\nchannels=3\n[conv]\nfilters=10000000\nsize=3\n"
    with pytest.raises(CfgError, match="GiB"):
        build_graph(parse_cfg(write(tmp_path, text)))


@pytest.mark.parametrize("cfg", sorted(Path("/usr/share/darknet/cfg").glob("yolov[23]*.cfg")))
def test_every_debian_yolo_cfg_builds(cfg: Path) -> None:
    graph = build_graph(parse_cfg(cfg))
    assert graph.flavor == "pjreddie"
    assert graph.heads(), "a YOLO cfg has detection heads"


@pytest.mark.parametrize("cfg", alexeyab_cfgs(), ids=lambda p: p.name)
def test_alexeyab_cfgs_infer_their_flavor(cfg: Path) -> None:
    try:
        graph = build_graph(parse_cfg(cfg))
    except UnsupportedLayerError as exc:  # reported, with lines, for sections not supported yet
        assert exc.problems
        return
    if cfg.name not in ("yolov3-spp.cfg", "yolov3_5l.cfg", "yolov3-tiny-prn.cfg"):  # pjreddie-compatible keys only
        assert graph.flavor == "alexeyab", graph.flavor_reason


@pytest.mark.parametrize("tail, fragment", [
    ("[convolutional]\nfilters=100000\nsize=1\n[reorg]\nstride=1\n", "fixed weights"),
    ("[convolutional]\nfilters=20000\nsize=1\n[reorg3d]\nstride=2\n", "fixed weights"),
    ("[local]\nfilters=2\nsize=1\nstride=1\n", "Caffe layers"),
])
def test_absurd_stock_forms_are_refused_before_allocation(tmp_path: Path, tail: str, fragment: str) -> None:
    text = "[net]\nwidth=128\nheight=128\nchannels=3\n" + tail
    with pytest.raises(CfgError) as info:  # the graph collects the converter's refusal
        build_graph(parse_cfg(write(tmp_path, text)))
    assert fragment in info.value.render() and "t.cfg:" in info.value.render()
