"""Darknet .cfg parser that keeps line numbers, Darknet's lexical rules and typed defaults.

Why not configparser: a cfg repeats section names ([convolutional] hundreds of times) and
Darknet's rules differ (all whitespace inside a line is removed, the first occurrence of a key
wins, `#` and `;` start comments). Every value remembers its line so errors can point at it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from d2c.errors import CfgError
from d2c.fsutil import input_errors

# Darknet's accepted section spellings (parser.c: string_to_layer_type) -> canonical name.
SECTION_ALIASES: dict[str, str] = {
    "net": "net", "network": "net",
    "conv": "convolutional", "convolutional": "convolutional",
    "deconv": "deconvolutional", "deconvolutional": "deconvolutional",
    "local": "local", "activation": "activation", "logistic": "logistic", "l2norm": "l2norm",
    "rnn": "rnn", "gru": "gru", "lstm": "lstm", "crnn": "crnn",
    "conn": "connected", "connected": "connected",
    "crop": "crop", "cost": "cost", "region": "region", "yolo": "yolo", "iseg": "iseg",
    "detection": "detection", "soft": "softmax", "softmax": "softmax",
    "lrn": "normalization", "normalization": "normalization", "batchnorm": "batchnorm",
    "max": "maxpool", "maxpool": "maxpool", "reorg": "reorg", "avg": "avgpool",
    "avgpool": "avgpool", "dropout": "dropout", "route": "route", "upsample": "upsample",
    "shortcut": "shortcut",
    # AlexeyAB-only sections.
    "sam": "sam", "scale_channels": "scale_channels", "reorg3d": "reorg3d",
    "implicit_add": "implicit_add", "implicit_mul": "implicit_mul", "contrastive": "contrastive",
    "gaussian_yolo": "gaussian_yolo", "local_avgpool": "local_avgpool", "empty": "empty",
    "silence": "silence", "conv_lstm": "conv_lstm", "history": "history",
}

# Keys Darknet reads in every layer section (parse_network_cfg).
COMMON_KEYS = frozenset({
    "truth", "onlyforward", "stopbackward", "dontsave", "dontload", "numload",
    "dontloadscales", "smooth", "learning_rate", "dont_update", "burnin_update",
    "train_only_bn", "index", "clip",
})


@dataclass
class Option:
    """One `key=value` line: the value as Darknet sees it (whitespace removed) and where it was."""

    value: str
    line: int


@dataclass
class Section:
    """One `[type]` block. `index` is Darknet's layer index (-1 for [net])."""

    type: str
    raw_type: str
    line: int
    path: str
    index: int
    options: dict[str, Option] = field(default_factory=dict)
    duplicates: list[tuple[str, Option]] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        """`file:line [type]` for messages."""
        return f"{self.path}:{self.line} [{self.raw_type}]"

    def where_key(self, key: str) -> str:
        """`file:line` of a key (or of the section header when absent) for messages."""
        opt = self.options.get(key)
        line = opt.line if opt else self.line
        return f"{self.path}:{line} [{self.raw_type}] '{key}'"

    def has(self, key: str) -> bool:
        return key in self.options

    def raw(self, key: str) -> str | None:
        self.used.add(key)
        opt = self.options.get(key)
        return None if opt is None else opt.value

    def error(self, key: str, message: str) -> CfgError:
        return CfgError(f"{self.where_key(key)}: {message}")

    def get_str(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value is None else value

    def get_int(self, key: str, default: int | None = None, *, required: bool = False) -> int:
        """Read an integer. Darknet uses atoi (so '3.5' is 3); we accept that but reject junk."""
        value = self.raw(key)
        if value is None:
            if required or default is None:
                raise self.error(key, "is required")
            return default
        return _to_int(value, lambda msg: self.error(key, msg))

    def get_float(self, key: str, default: float | None = None, *, required: bool = False) -> float:
        value = self.raw(key)
        if value is None:
            if required or default is None:
                raise self.error(key, "is required")
            return default
        return _to_float(value, lambda msg: self.error(key, msg))

    def get_int_list(self, key: str, default: list[int] | None = None, *, required: bool = False) -> list[int]:
        value = self.raw(key)
        if value is None or value == "":
            if required or default is None:
                raise self.error(key, "is required")
            return list(default)
        return [_to_int(v, lambda msg: self.error(key, msg)) for v in _split_list(value)]

    def get_float_list(self, key: str, default: list[float] | None = None, *, required: bool = False) -> list[float]:
        value = self.raw(key)
        if value is None or value == "":
            if required or default is None:
                raise self.error(key, "is required")
            return list(default)
        return [_to_float(v, lambda msg: self.error(key, msg)) for v in _split_list(value)]

    def unused_keys(self) -> list[tuple[str, Option]]:
        """Keys never read (Darknet prints them as 'Unused field'), plus repeated keys."""
        out = [(k, o) for k, o in self.options.items() if k not in self.used and k not in COMMON_KEYS]
        return out + list(self.duplicates)


@dataclass
class Cfg:
    """A parsed cfg: the [net] section and the layer sections in order."""

    path: str
    net: Section
    layers: list[Section]
    warnings: list[str] = field(default_factory=list)


def _split_list(value: str) -> list[str]:
    # anchors lines in AlexeyAB cfgs may end with a comment after '#'.
    value = value.split("#", 1)[0]
    return [v for v in value.split(",") if v != ""]


# Darknet stores every option in a C int or float (atoi/atof); larger values mean nothing there.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
FLOAT_MAX = 3.4028234663852886e38
# ASCII decimal only: Python's int()/float() also take '1_000' and non-ASCII digits ('٣'),
# which atoi/atof read as 1 and 0, so accepting them would build a different network.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _show(value: str) -> str:
    """A value for a message: fuzzed or binary junk can be a megabyte long."""
    return repr(value) if len(value) <= 40 else repr(value[:40]) + f"... ({len(value)} characters)"


def _to_int(value: str, err) -> int:
    if not _DECIMAL.fullmatch(value):
        raise err(f"expects an integer, got {_show(value)}")
    try:
        number = int(value)
    except ValueError:
        try:
            real = float(value)
        except ValueError:
            raise err(f"expects an integer, got {_show(value)}") from None
        if not math.isfinite(real) or real != int(real):
            raise err(f"expects an integer, got {_show(value)}") from None
        number = int(real)
    if not INT_MIN <= number <= INT_MAX:
        raise err(f"{_show(value)} does not fit the 32-bit int Darknet stores it in")
    return number


def _to_float(value: str, err) -> float:
    if not _DECIMAL.fullmatch(value):
        raise err(f"expects a number, got {_show(value)}")
    try:
        number = float(value)
    except ValueError:
        raise err(f"expects a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise err(f"expects a finite number, got {_show(value)}")
    if abs(number) > FLOAT_MAX:
        raise err(f"{_show(value)} does not fit the 32-bit float Darknet stores it in")
    return number


def read_cfg_text(path: str | Path) -> str:
    """Read a cfg as text with a clear error for missing, binary or non-UTF-8 files."""
    p = Path(path)
    with input_errors(p, "cfg", ".cfg", CfgError):
        data = p.read_bytes()
    if b"\x00" in data:
        raise CfgError(f"{p}: is a binary file (NUL byte at offset {data.index(0)}), expected a text .cfg")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CfgError(f"{p}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def parse_cfg(path: str | Path, text: str | None = None) -> Cfg:
    """Parse a cfg the way Darknet's read_cfg does, collecting every lexical problem at once."""
    path_s = str(path)
    if text is None:
        text = read_cfg_text(path)
    sections: list[Section] = []
    problems: list[str] = []
    warnings: list[str] = []
    saw_cr = False
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        if "\r" in raw_line:
            saw_cr = True
        line = "".join(raw_line.split())  # Darknet strips every whitespace char inside the line
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                problems.append(f"{path_s}:{lineno}: section header {line!r} has no closing ']'")
                name = line[1:]
            else:
                name = line[1:-1]
            canonical = SECTION_ALIASES.get(name.lower() if name else name, None)
            index = len(sections) - 1  # [net] is sections[0]; layers start at 0
            sections.append(Section(type=canonical or name, raw_type=name, line=lineno,
                                    path=path_s, index=index))
            continue
        if not sections:
            problems.append(f"{path_s}:{lineno}: option {line!r} before the first section")
            continue
        if "=" not in line:
            problems.append(f"{path_s}:{lineno}: {line!r} is not a key=value line")
            continue
        key, value = line.split("=", 1)
        if key == "":
            problems.append(f"{path_s}:{lineno}: {line!r} has no key before '='")
            continue
        if value == "":
            problems.append(f"{path_s}:{lineno}: key {key!r} has no value")
            continue
        sec = sections[-1]
        opt = Option(value=value, line=lineno)
        if key in sec.options:
            sec.duplicates.append((key, opt))
            warnings.append(f"{path_s}:{lineno}: {sec.raw_type} key {key!r} repeated; Darknet uses the first "
                            f"(line {sec.options[key].line})")
        else:
            sec.options[key] = opt
    if saw_cr:
        warnings.append(f"{path_s}: has CRLF line endings; d2c accepts them, Darknet would not")
    if not sections:
        problems.append(f"{path_s}: no sections (empty cfg)")
    elif sections[0].type != "net":
        problems.append(f"{path_s}:{sections[0].line}: first section must be [net] or [network], "
                        f"got [{sections[0].raw_type}]")
    if problems:
        raise CfgError(f"{path_s}: {len(problems)} problem(s) in cfg", problems)
    net, layers = sections[0], sections[1:]
    if not layers:
        raise CfgError(f"{path_s}: the cfg has a [net] section but no layers")
    return Cfg(path=path_s, net=net, layers=layers, warnings=warnings)
