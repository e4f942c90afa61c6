"""What `d2c detect MODEL` may be besides a `d2c convert` output: `d2c train`'s run and snapshots.

Why: after training, the natural next step is `d2c detect out/run image.jpg`. A run directory
holds snapshots (a train-net caffemodel, the trained cfg, exported .weights, a sidecar without a
deploy prototxt), not a deploy model, and its class names are in the run's .data file. This
module turns such a path into a deploy model (converted once from the snapshot's .weights and
cfg into `<snapshot>/deploy/`, reused while newer than the weights) and the names file, so
detect itself needs no knowledge of runs.

Accepted: a run directory (run.json + latest.json: its newest snapshot), a snapshot directory
(snapshots/iter_NNNNNN), or a file inside one (e.g. its .caffemodel or .weights). Anything else
is returned unchanged for detect's own resolution.
"""
from __future__ import annotations

import json
from pathlib import Path

from d2c.errors import D2CError

RUN_FILE = "run.json"
LATEST = "latest.json"
DEPLOY_DIR = "deploy"


def _snapshot_of(path: Path) -> Path | None:
    """The snapshot directory `path` names, or None when it is not part of a d2c train run."""
    if path.is_file() and path.parent.name.startswith("iter_"):
        path = path.parent
    if not path.is_dir():
        return None
    if (path / RUN_FILE).is_file() and (path / LATEST).is_file():
        try:
            latest = json.loads((path / LATEST).read_text(encoding="utf-8"))
            snap = path / latest["dir"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise D2CError(f"{path / LATEST}: cannot read the run's latest snapshot ({exc})") from None
        if not snap.is_dir():
            raise D2CError(f"{path / LATEST} names {snap}, which does not exist")
        return snap
    if path.name.startswith("iter_") and any(path.glob("*.weights")) and any(path.glob("*.cfg")):
        return path
    return None


def _names_file(run_dir: Path) -> Path | None:
    """The `names` file of the .data the run was trained on (None when it cannot be found)."""
    from d2c.dataset import DataSpec
    try:
        info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        data = Path(info["data"])
        if not data.is_absolute() and not data.is_file():
            data = run_dir / data
        return DataSpec.load(data).file("names", required=False)
    except (OSError, ValueError, KeyError, TypeError, D2CError):
        return None


def resolve_model(model: str | Path) -> tuple[Path, Path | None]:
    """(what load_model_files accepts, class names file or None) for MODEL."""
    path = Path(model)
    snap = _snapshot_of(path)
    if snap is None:
        return path, None
    weights = sorted(snap.glob("*.weights"))
    cfgs = sorted(snap.glob("*.cfg"))
    if len(weights) != 1 or len(cfgs) != 1:
        raise D2CError(f"{snap}: a d2c train snapshot holds one .weights and one .cfg; found "
                       f"{len(weights)} and {len(cfgs)}")
    deploy = snap / DEPLOY_DIR
    prototxt = deploy / f"{cfgs[0].stem}.prototxt"
    if not prototxt.is_file() or prototxt.stat().st_mtime < weights[0].stat().st_mtime:
        from d2c.convert import convert
        convert(cfgs[0], weights[0], deploy, name=cfgs[0].stem)
    run_dir = snap.parent.parent
    return prototxt, _names_file(run_dir)
