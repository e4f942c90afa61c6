"""Write docs/json-schemas.md from d2c/schemas.py (the tests fail when it is out of date)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2c.fsutil import atomic_write_text  # noqa: E402
from d2c.schemas import render_markdown  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "json-schemas.md"

if __name__ == "__main__":
    atomic_write_text(DOC, render_markdown())
    print(f"wrote {DOC}")
