"""Where the AlexeyAB-era test cfgs live (../shared/darknet-cfg, data only, never copied here).

Why one place: a clone elsewhere than beside `shared/` must not quietly test fewer cfgs. The
directory is $D2C_SHARED_CFG, else ../shared/darknet-cfg next to this checkout, else
/work/shared/darknet-cfg; when none has a cfg, `alexeyab_cfgs()` returns one missing path so the
tests that use it fail with its name instead of being collected empty (and skipped).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_cfg_dir() -> Path:
    candidates = [Path(os.environ["D2C_SHARED_CFG"])] if os.environ.get("D2C_SHARED_CFG") else []
    candidates += [ROOT.parent / "shared" / "darknet-cfg", Path("/work/shared/darknet-cfg")]
    for directory in candidates:
        if any(directory.glob("*.cfg")):
            return directory
    return candidates[0]


def alexeyab_cfgs() -> list[Path]:
    """Every cfg in the shared directory (or one missing path, so the tests fail loudly)."""
    directory = shared_cfg_dir()
    return sorted(directory.glob("*.cfg")) or [directory / "MISSING-set-D2C_SHARED_CFG.cfg"]
