"""One error hierarchy for everything a user can get wrong.

Why: the CLI turns any D2CError into one clear line and exit code 2; anything else is a bug
and shows a traceback only with --debug. Messages always name the file and line (cfg), the
layer index and section (weights), or the image/label file and line (datasets).
"""
from __future__ import annotations


class D2CError(Exception):
    """Base class: bad input or an environment problem the user can fix."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])

    def render(self) -> str:
        """The message plus every collected problem, one per line."""
        lines = [str(self)]
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


class CfgError(D2CError):
    """A Darknet .cfg that cannot be parsed or describes an impossible network."""


class WeightsError(D2CError):
    """A .weights or .caffemodel file whose contents do not fit the network."""


class UnsupportedLayerError(D2CError):
    """Sections or options d2c cannot express exactly with stock Caffe layers."""


class NeedsAlexeyABError(UnsupportedLayerError):
    """A construct only AlexeyAB's Darknet defines; flavor inference retries with it."""


class DatasetError(D2CError):
    """A .data file, image list, image or label file that is wrong."""


class ParamError(D2CError):
    """A Python layer's JSON param_str that is malformed or has unknown keys."""


class NumericError(D2CError):
    """NaN or inf found in a blob where finite values are required."""


class EngineError(D2CError):
    """A real engine (Darknet's libdarknet.so, pycaffe, OpenCV) is missing or failed."""

    exit_code = 3
