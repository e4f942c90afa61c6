"""The deploy-target contract: one module per toolchain, registered by name like the layer converters.

Why a registry: a deployment toolchain (OpenVINO's Model Optimizer, MNN's converter, RKNN-Toolkit2, ...)
reads Caffe files with its own importer, which knows fewer layer types than BVLC Caffe. A target says
which Caffe layer types and parameters its importer accepts (and where the vendor says so), which
exact rewrites (d2c.targets.rewrites) turn d2c's stock output into a form it accepts, and how to run
a converted model in the real toolchain (d2c.targets.verify). The lint runs on the net d2c emits
before anything is written: every layer the target would reject is listed with the cfg line it
came from, and one without an exact rewrite is an error, never a silent approximation.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from d2c.caffe.proto import CaffeLayer
from d2c.errors import D2CError, EngineError, UnsupportedLayerError

if TYPE_CHECKING:  # pragma: no cover
    from d2c.caffe.emitter import Emitter
    from d2c.darknet.graph import Graph

#: Every Caffe layer type d2c's deploy nets can contain (d2c/layers emits nothing else).
D2C_DEPLOY_TYPES = frozenset({"BNLL", "BatchNorm", "Concat", "Convolution", "Crop", "Deconvolution", "Dropout",
                              "ELU", "Eltwise", "Flatten", "InnerProduct", "Pooling", "Power", "ReLU", "Reshape",
                              "Scale", "Sigmoid", "Slice", "Softmax", "TanH"})


@dataclass(frozen=True)
class Rule:
    """A parameter-level limit of an importer: `check(layer, net_outputs)` returns why it rejects
    the layer (or None); `rewrite` names the exact rewrite that removes the problem."""

    name: str
    check: Callable[[CaffeLayer, frozenset[str]], str | None]
    rewrite: str | None


@dataclass
class Finding:
    """One layer a target would reject: where it comes from, why, and the rewrite that fixes it."""

    where: str          # cfg file:line [section] of the Darknet layer that emitted it
    layer: str          # Caffe layer name
    type: str           # Caffe layer type
    reason: str
    rewrite: str | None

    def line(self) -> str:
        fix = f"-> rewrite '{self.rewrite}'" if self.rewrite else "-> no exact form"
        return f"{self.where}: Caffe layer {self.layer} ({self.type}): {self.reason} {fix}"


class Target:
    """Base class; subclasses set the class attributes and, when runnable, the toolchain fields."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Caffe layer types the importer has a converter for (of those d2c can emit)
    accepts: ClassVar[frozenset[str]] = D2C_DEPLOY_TYPES
    #: where the vendor says so (source file or document), in our words
    source: ClassVar[str] = ""
    #: layer type the importer lacks -> the exact rewrite that replaces it
    type_rewrites: ClassVar[dict[str, str]] = {}
    #: parameter-level limits
    rules: ClassVar[tuple[Rule, ...]] = ()
    #: toolchain: its own venv under the d2c cache, pinned requirements
    venv: ClassVar[str | None] = None
    requirements: ClassVar[tuple[str, ...]] = ()
    precision: ClassVar[str] = "f32"
    #: why the real toolchain cannot run here (None: it can)
    not_runnable: ClassVar[str | None] = None

    def findings(self, layers: list[CaffeLayer], where_of: Callable[[str], str]) -> list[Finding]:
        """Every layer of `layers` this target's importer would reject, in net order."""
        outputs = net_outputs(layers)
        found: list[Finding] = []
        for layer in layers:
            if layer.type not in self.accepts:
                found.append(Finding(where_of(layer.name), layer.name, layer.type,
                                     f"the {self.name} importer has no '{layer.type}' layer",
                                     self.type_rewrites.get(layer.type)))
                continue
            for rule in self.rules:
                reason = rule.check(layer, outputs)
                if reason:
                    found.append(Finding(where_of(layer.name), layer.name, layer.type, reason, rule.rewrite))
        return found


REGISTRY: dict[str, Target] = {}


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make a target available under its name."""
    if not cls.name or cls.name in REGISTRY:
        raise TypeError(f"target {cls.__name__}: missing or duplicate name {cls.name!r}")
    REGISTRY[cls.name] = cls()
    return cls


def get_target(name: str) -> Target:
    """The registered target `name`, or a one-line error listing the known ones."""
    if name not in REGISTRY:
        raise D2CError(f"--target {name}: unknown target; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def net_outputs(layers: list[CaffeLayer]) -> frozenset[str]:
    """Blobs Caffe makes net outputs: written by some layer and read by none after its last write."""
    outputs: set[str] = set()
    for layer in layers:
        outputs.difference_update(layer.bottom)
        outputs.update(layer.top)
    return frozenset(outputs)


def is_inplace_output_writer(layer: CaffeLayer, outputs: frozenset[str]) -> bool:
    """An in-place layer (a head conv's logistic, say) whose blob is a net output."""
    return len(layer.top) == 1 and layer.top == layer.bottom and layer.top[0] in outputs


def output_writer_rule(consequence: str) -> Rule:
    """The importer names (or finds) net outputs by the layer that wrote them, not by the blob."""
    return Rule("in-place output writer",
                lambda layer, outputs: (f"an in-place layer writes net output '{layer.top[0]}': {consequence}"
                                        if is_inplace_output_writer(layer, outputs) else None),
                "outputs-out-of-place")


def where_function(em: Emitter, graph: Graph) -> Callable[[str], str]:
    """Caffe layer name -> `cfg:line [section]` of the Darknet layer that emitted it."""
    def where(name: str) -> str:
        index = em.origin.get(name)
        return graph.nodes[index].section.where if index is not None and index >= 0 else f"{graph.cfg.path} (net input)"
    return where


@dataclass
class TargetReport:
    """What --target changed: the findings on d2c's plain net and the rewrites applied."""

    target: str
    findings: list[Finding] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)    # rewrite name -> layers rewritten

    def to_json(self) -> dict:
        return {"name": self.target, "rewrites": self.rewrites,
                "lint": [{"where": f.where, "layer": f.layer, "type": f.type, "reason": f.reason,
                          "rewrite": f.rewrite} for f in self.findings]}


def apply_target(em: Emitter, graph: Graph, target: Target) -> TargetReport:
    """Lint d2c's net for `target`, refuse what has no exact form, apply the rewrites, lint again."""
    from d2c.targets.rewrites import REWRITES
    where = where_function(em, graph)
    report = TargetReport(target.name, target.findings(em.layers, where))
    hopeless = [f for f in report.findings if f.rewrite is None]
    if hopeless:
        raise UnsupportedLayerError(f"{hopeless[0].where}: the {target.name} toolchain would reject Caffe layer "
                                    f"{hopeless[0].layer} ({hopeless[0].type}) and d2c has no exact form it "
                                    f"accepts ({len(hopeless)} such layer(s))", [f.line() for f in hopeless])
    for name in dict.fromkeys(f.rewrite for f in report.findings):
        report.rewrites[name] = REWRITES[name](em)
    left = target.findings(em.layers, where)
    if left:  # a rewrite that does not remove what it claims to fix is a d2c bug
        raise AssertionError(f"after rewriting for {target.name}: {left[0].line()}")
    return report


def cache_root() -> Path:
    """The d2c cache ($D2C_CACHE, else ~/.cache/d2c); toolchain venvs live in its targets/ folder."""
    return Path(os.environ.get("D2C_CACHE") or Path.home() / ".cache" / "d2c")


def venv_dir(target: Target) -> Path:
    if target.venv is None:
        raise D2CError(f"target {target.name} has no toolchain venv")
    return cache_root() / "targets" / target.venv


def toolchain_python(target: Target) -> Path:
    """The Python of the target's toolchain venv; EngineError (exit 3) with the fix when it is absent."""
    if target.not_runnable:
        raise EngineError(f"target {target.name}: {target.not_runnable}")
    python = venv_dir(target) / "bin" / "python"
    if not (venv_dir(target) / STAMP).is_file() or not python.exists():
        raise EngineError(f"target {target.name}: its toolchain is not installed in {venv_dir(target)}; "
                          f"run `make targets` (or `.venv/bin/python tools/setup_targets.py {target.name}`)")
    return python


#: written into a toolchain venv once its pinned requirements are installed (tools/setup_targets.py)
STAMP = ".d2c-installed.json"
