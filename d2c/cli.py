"""`d2c` command line: argparse subcommands over the library.

Every D2CError becomes one clear message (plus the collected problems) and exit status 2
(3 when a real engine is missing); a file the user named that cannot be opened or written is
the same kind of one-line error, and so is a command-line mistake. `--debug` (anywhere on the
line) shows the traceback. Subcommand modules are imported lazily so `d2c info` and
`d2c convert` start fast and never need pycaffe.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from d2c.errors import D2CError


class D2CArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what is wrong, and where the help is) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_debug(p: argparse.ArgumentParser) -> None:
    """--debug after the subcommand too; SUPPRESS keeps the top-level value when it is absent."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="Darknet cfg + weights -> Caffe prototxt + caffemodel + JSON sidecar")
    p.add_argument("cfg", help="Darknet .cfg")
    p.add_argument("weights", nargs="?", help=".weights (omit for seeded random weights)")
    p.add_argument("-o", "--out", default="out", help="output directory (default: out)")
    p.add_argument("--name", help="output file stem (default: the cfg's stem)")
    p.add_argument("--darknet", choices=["pjreddie", "alexeyab"],
                   help="which Darknet's numerics to reproduce (default: inferred from the cfg)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm+Scale into the convolutions")
    p.add_argument("--train", action="store_true", help="also write <stem>_train.prototxt and <stem>_solver.prototxt")
    p.add_argument("--bn", choices=["exact", "stock", "frozen"], default="exact",
                   help="BatchNorm in the train net: exact Darknet (Python layer), stock Caffe BatchNorm, or frozen")
    p.add_argument("--batch", type=int, help="train net batch (default: [net] batch/subdivisions)")
    p.add_argument("--allow-trailing", action="store_true", help="accept extra bytes after the last layer")
    p.add_argument("--continue-on-error", action="store_true",
                   help="convert up to the first unsupported section, reporting every problem")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and the data layer's picks/augmentation")
    p.add_argument("--names", help="class names file (e.g. coco.names) to record in the sidecar for `d2c detect`; "
                                   "must have one name per class")
    p.add_argument("--data", help="with --train: a Darknet .data file the train net reads (DarknetDetectionData), "
                                  "so `caffe train` runs as is")
    p.add_argument("--max-iter", type=int, help="with --train: solver max_iter (default: max_batches - seen/B)")
    from d2c.targets import REGISTRY as TARGETS
    p.add_argument("--target", default="caffe", choices=sorted(TARGETS),
                   help="deploy toolchain the model must load in: lints d2c's net against its importer and "
                        "applies exact rewrites for what it lacks (default: caffe, the plain stock output)")
    p.add_argument("--split-heads", action="store_true",
                   help="int8-friendly [yolo] heads: each split by stock layers into x/y (after the logistic), "
                        "w/h and objectness+classes (after the logistic), so each gets its own int8 scale")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import d2c
    rep = d2c.convert(args.cfg, args.weights, args.out, flavor=args.darknet, fold_bn=args.fold_bn,
                      continue_on_error=args.continue_on_error, allow_trailing=args.allow_trailing,
                      seed=args.seed, train=args.train, bn=args.bn, batch=args.batch, progress=True,
                      name=args.name, names=args.names, data=args.data,
                      max_iter=args.max_iter, target=args.target, split_heads=args.split_heads)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"d2c convert: {args.cfg}" + (f" + {args.weights}" if args.weights else " (random weights, seed "
                                                                                 f"{args.seed})"))
    print(f"  Darknet semantics : {rep.flavor} ({rep.flavor_reason})")
    print(f"  Darknet layers    : {rep.layers}   Caffe layers: {rep.caffe_layers}   params: {rep.params:,}")
    if rep.outputs:
        print(f"  outputs           : {', '.join(rep.outputs)}")
    else:
        print("  outputs           : no detection head (a classifier): Caffe's output is the last layer's blob")
    if args.target != "caffe":
        print(f"  target            : {args.target}")
        for finding in rep.target["lint"]:
            print(f"    lint: {finding['where']}: {finding['layer']} ({finding['type']}): {finding['reason']} "
                  f"-> {finding['rewrite']}")
        for rewrite, count in rep.target["rewrites"].items():
            print(f"    rewrote: {rewrite} x{count}")
    for path in (rep.prototxt, rep.caffemodel, rep.sidecar, *rep.extra):
        print(f"  wrote             : {path}")
    print(f"  time              : {rep.seconds:.2f} s")
    return 0


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="run a converted model on images, folders, lists or videos, "
                                      "Darknet-exact pre/post-processing")
    p.add_argument("model", help="output directory of `d2c convert` or its .prototxt; or a `d2c train` run "
                                 "directory or snapshot (converted on the fly, class names from its .data)")
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image, folder (its images, sorted by name), @LIST (one path per line) or video "
                        "(.mp4, .avi, ...: frame by frame)")
    p.add_argument("--thresh", type=float, default=0.25,
                   help="report a class when objectness x class probability > this (default 0.25; pjreddie "
                        "Darknet's `darknet detect`/`detector test` default to 0.5: pass --thresh 0.5 to match)")
    p.add_argument("--hier", type=float, default=0.5,
                   help="Darknet's hierarchical (YOLO9000 tree) threshold; only for tree heads, which d2c "
                        "does not decode, so it has no effect on other models (default 0.5)")
    p.add_argument("--nms", type=float, default=0.45,
                   help="IoU above which a lower-scored box of the same class is suppressed (do_nms_sort; "
                        "0 turns NMS off; default 0.45 as `darknet detector test`; `darknet yolo test` for "
                        "YOLOv1 uses 0.4)")
    p.add_argument("--names", help="class names file, one per class (default: the names given at convert, "
                                   "else COCO/VOC names by class count, else numbers)")
    p.add_argument("--engine", choices=["caffe", "opencv"], default="caffe",
                   help="run the Caffe files in pycaffe (default) or in OpenCV's dnn module")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print one JSON document to stdout: a list of records, one per image or frame "
                          "(failed inputs included, with their error)")
    fmt.add_argument("--jsonl", action="store_true",
                     help="print JSON Lines to stdout: one record per image or frame as soon as it is done")
    p.add_argument("--skip-bad", action="store_true",
                   help="report an unreadable or missing input and go on (exit 0); without it the run "
                        "stops at one (JSON modes record it, finish the others, then exit 2)")
    p.add_argument("--frame-stride", type=int, default=1, metavar="N",
                   help="videos: detect on every N-th frame (default 1)")
    p.add_argument("--max-frames", type=int, metavar="N", help="videos: at most N frames per video")
    p.add_argument("-o", "--out", help="write the image with labelled boxes: a file for one image (format from "
                                       "its extension: .png, .jpg, ...), else a folder of PNGs")
    p.set_defaults(func=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from d2c.detect import run_detect_cli
    return run_detect_cli(args)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="where Darknet, Caffe and OpenCV were found, and their versions")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from d2c.engines import engine_info
    for key, value in engine_info().items():
        print(f"{key:10s} {value}")
    return 0


# Subcommands implemented in their own modules, each providing add_arguments(p) and run(args);
# those modules keep heavy imports (pycaffe, the Darknet library) inside run().
MODULE_COMMANDS = [
    ("parity", "d2c.parity", "run real Darknet and Caffe side by side: forward, loss, gradient, N-step update"),
    ("train", "d2c.train", "train a Darknet cfg in Caffe from a Darknet-style dataset"),
    ("export", "d2c.export", "Caffe caffemodel -> Darknet .weights"),
    ("bench", "d2c.bench", "conversion, forward and training speed side by side"),
    ("verify", "d2c.targets.verify", "run a converted model in a deploy toolchain (OpenVINO, MNN, RKNN, ...) and "
                                     "compare heads and detections"),
    ("shapes", "d2c.shapes", "write the seeded demo detection dataset (coloured shapes) in Darknet's layout"),
    ("quantize", "d2c.quantize", "int8 on an NPU toolchain (RKNN) calibrated from the Darknet dataset, with "
                                 "per-layer analysis and an automatic fp16 fallback until it agrees with Darknet"),
]


def build_parser() -> argparse.ArgumentParser:
    from d2c import __version__
    parser = D2CArgumentParser(prog="d2c", description="Port Darknet YOLO models to stock Caffe and prove the "
                                                       "port is exact.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the subcommand)")
    parser.add_argument("--version", action="version", version=f"d2c {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_detect(sub)
    _add_info(sub)
    for name, module, helptext in MODULE_COMMANDS:
        p = sub.add_parser(name, help=helptext)
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ImportError as exc:  # pragma: no cover - a broken install
            p.set_defaults(func=lambda a, exc=exc: _missing(exc))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    for p in sub.choices.values():
        _add_debug(p)
    return parser


def _missing(exc: Exception) -> int:
    print(f"d2c: this command is unavailable: {exc}", file=sys.stderr)
    return 3


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except D2CError as exc:
        if args.debug:
            raise
        print(f"d2c {args.command}: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"d2c {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file the user named: missing, a directory, not writable, disk full
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"d2c {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in d2c: still one line for the user, the traceback with --debug
        if args.debug:
            raise
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"d2c {args.command}: internal error: {type(exc).__name__}: {first_line} "
              f"(this is a d2c bug; rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
