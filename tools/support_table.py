#!/usr/bin/env python3
"""Print the README's layer support table (markdown) from the converter registry.

Why generated: the table must say exactly what the code registers, so adding a converter
module (and its tests/layers/test_<section>.py) updates the README with no hand edits.
Usage: python tools/support_table.py > table.md   (the lead pastes it into README.md)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2c.layers import REGISTRY  # noqa: E402  (imports and registers every converter)
from d2c.layers.common import ACTIVATIONS, PJREDDIE_ACTIVATIONS  # noqa: E402

TESTS = ROOT / "tests" / "layers"


def _cell(text: str) -> str:
    """Markdown-safe table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "—"


def layer_rows() -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name in sorted(REGISTRY):
        converter = REGISTRY[name]
        test = TESTS / f"test_{name}.py"
        lineage = "AlexeyAB only" if converter.alexeyab_only else "pjreddie + AlexeyAB"
        rows.append((f"`[{name}]`", converter.summary, converter.caffe_layers, lineage,
                     f"`{test.relative_to(ROOT)}`" if test.exists() else "—"))
    return rows


def activation_rows() -> list[tuple[str, str, str]]:
    return [(f"`{name}`", form, "pjreddie + AlexeyAB" if name in PJREDDIE_ACTIVATIONS else "AlexeyAB only")
            for name, form in sorted(ACTIVATIONS.items())]


def render() -> str:
    lines = ["| Section | What is converted | Stock Caffe layers | Darknet | Tests |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in layer_rows()]
    lines += ["", "| Activation | Stock Caffe form | Darknet |", "|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in activation_rows()]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
