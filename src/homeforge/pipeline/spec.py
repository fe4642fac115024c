"""The pipeline file: one section per stage (each the stage's own typed config), the artifacts linking them.

::

    workdir: runs/docs            # every stage's artifact goes under it
    prepare: {inputs: [docs/]}    # PrepareConfig
    train: {max_steps: 300}       # TrainConfig (data: the prepare stage)
    eval: {gates: {max_ppl: 80}}  # EvalConfig + model/data/baseline
    compress: {method: int8-dynamic}
    export: {format: gguf}
    register: {name: docs}
    serve: {port: 8000}

A link (``model:``, ``data:``, ``baseline:``, train's ``data:``) names a stage of this file or an artifact
path; unset links follow the usual route (prepare -> train -> eval -> register -> serve, compress and export
beside it). The stages run in the order their links give (a cycle is refused).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from homeforge.config import (
    CompressConfig,
    EvalConfig,
    ExportConfig,
    PrepareConfig,
    Section,
    ServeConfig,
    TrainConfig,
    format_validation_error,
    register_stage,
)
from homeforge.errors import ConfigError, HomeforgeError

ORDER = ("prepare", "train", "eval", "compress", "export", "register", "serve")
MODEL_STAGES = ("train", "compress", "export")  # stages whose artifact is a model directory


class EvalStage(EvalConfig):
    """`homeforge eval` as a pipeline stage: a failed gate stops the pipeline."""

    model: str | None = Field(None, description="stage or model directory to evaluate (default: train)")
    data: str | None = Field(None, description="stage or dataset artifact to evaluate on (default: prepare)")
    baseline: str | None = Field(None, description="model directory or `registry:NAME@ALIAS` to compare against "
                                 "(paired tests; gates.max_regression)")


class CompressStage(CompressConfig):
    """`homeforge compress` as a pipeline stage."""

    model: str | None = Field(None, description="stage or model directory to compress (default: train)")
    data: str | None = Field(None, description="stage or dataset artifact for the quality gate (default: prepare)")


class ExportStage(ExportConfig):
    """`homeforge export` as a pipeline stage."""

    model: str | None = Field(None, description="stage or model directory to export (default: compress, else train)")


class PromoteGates(Section):
    """When a candidate may replace the champion (`homeforge registry promote`)."""

    metric: str = Field("perplexity", description="perplexity (lower is better) or accuracy (higher is better)")
    min_improvement: float = Field(0.0, ge=0, description="smallest improvement over the champion that counts "
                                   "(relative for perplexity, absolute for accuracy)")
    p_value: float = Field(0.01, gt=0, lt=1, description="the improvement must be significant at this level "
                           "(paired test on the same held-out data)")


class RegisterStage(Section):
    """`homeforge registry register` (and optionally `promote`) as a pipeline stage."""

    name: str = Field(description="registry name of the model")
    model: str | None = Field(None, description="stage or model directory to register (default: the model eval "
                              "evaluated, else train)")
    alias: str = Field("candidate", description="alias the new version gets")
    promote_to: str | None = Field(None, description="then promote it to this alias (e.g. champion) when it passes "
                                   "the gates; when it does not, the alias keeps its version and the pipeline "
                                   "goes on (serving that version)")
    gates: PromoteGates = Field(default_factory=PromoteGates)


class ServeStage(ServeConfig):
    """`homeforge serve` as the last stage (runs until Ctrl-C)."""

    model: str | None = Field(None, description="stage, model directory or `registry:NAME@ALIAS` to serve "
                              "(default: registry:NAME@champion when promoting, @candidate when registering, "
                              "else the export or trained model)")


warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning)


class PipelineConfig(Section):  # `register` shadows only ABCMeta.register (a class method nothing here uses)
    """`homeforge run`: folder -> dataset -> model -> evaluation -> compression -> export -> registry -> server."""

    workdir: str = Field("homeforge-runs/pipeline", description="folder of every stage's artifact "
                         "(relative paths, here and in links: to the working directory, as in every command)")
    prepare: PrepareConfig | None = Field(None, description="`homeforge prepare` (output_dir: WORKDIR/data)")
    train: TrainConfig | None = Field(None, description="`homeforge train` (data: prepare; output_dir: WORKDIR/train)")
    eval: EvalStage | None = Field(None, description="`homeforge eval` (output: WORKDIR/eval)")
    compress: CompressStage | None = Field(None, description="`homeforge compress` (output: WORKDIR/compress)")
    export: ExportStage | None = Field(None, description="`homeforge export` (output: WORKDIR/export)")
    register: RegisterStage | None = Field(None, description="`homeforge registry register` into the model registry")
    serve: ServeStage | None = Field(None, description="`homeforge serve` (the last stage; runs until stopped)")


register_stage("run", PipelineConfig)

# the fields a stage's link may be in, per stage
LINKS = {"train": ("data",), "eval": ("model", "data"), "compress": ("model", "data"), "export": ("model",),
         "register": ("model",), "serve": ("model",)}


# --------------------------------------------------------------------------- YAML with line numbers


def _lines(node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line of every mapping key in a composed YAML node."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _lines(v, key + ".", out)
    return out


@dataclass
class Pipeline:
    cfg: PipelineConfig
    path: Path
    lines: dict[str, int]
    workdir: Path
    order: list[str] = field(default_factory=list)  # enabled stages in run order
    links: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> field -> stage name or path

    def where(self, dotted: str) -> str:
        """``FILE:LINE`` of a key (or of its nearest parent that is in the file)."""
        key = dotted
        while key and key not in self.lines:
            key = key.rpartition(".")[0]
        return f"{self.path}:{self.lines[key]}" if key else str(self.path)

    def stage_cfg(self, name: str):
        return getattr(self.cfg, name)


def load(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and check a pipeline file: typed stage configs, links, order; every problem names its line."""
    from homeforge.config import load_config

    p = Path(path)
    if not p.is_file():
        raise HomeforgeError(f"pipeline file {p} does not exist", fix="check the path, or write one with "
                             "`homeforge run --init DOCS_FOLDER`")
    text = p.read_text(encoding="utf-8")
    try:
        lines = _lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError([f"YAML syntax error: {exc}"], where=str(p)) from None
    try:
        cfg = load_config(PipelineConfig, p, overrides)
    except ConfigError as exc:
        raise ConfigError([_with_line(prob, lines, p) for prob in exc.problems], where=str(p)) from None
    workdir = Path(cfg.workdir).expanduser().absolute()
    pipe = Pipeline(cfg, p, lines, workdir)
    _resolve(pipe)
    return pipe


def _with_line(problem: str, lines: dict[str, int], path: Path) -> str:
    key = problem.split(":", 1)[0].strip()
    while key and key not in lines:
        key = key.rpartition(".")[0]
    return f"{problem} ({path}:{lines[key]})" if key else problem


def _default_links(pipe: Pipeline, enabled: set[str]) -> dict[str, dict[str, str]]:
    c = pipe.cfg
    model_default = "train" if "train" in enabled else None
    out: dict[str, dict[str, str | None]] = {
        "train": {"data": c.train.data if c.train and c.train.data else ("prepare" if "prepare" in enabled else None)},
        "eval": {"model": c.eval.model if c.eval else None, "data": c.eval.data if c.eval else None},
        "compress": {"model": c.compress.model if c.compress else None, "data": c.compress.data if c.compress else None},
        "export": {"model": c.export.model if c.export else None},
        "register": {"model": c.register.model if c.register else None},
        "serve": {"model": c.serve.model if c.serve else None},
    }
    data_default = "prepare" if "prepare" in enabled else None
    for st in ("eval", "compress"):
        out[st]["model"] = out[st]["model"] or model_default
        out[st]["data"] = out[st]["data"] or data_default
    out["export"]["model"] = out["export"]["model"] or ("compress" if "compress" in enabled else model_default)
    out["register"]["model"] = out["register"]["model"] or (out["eval"]["model"] if "eval" in enabled else model_default)
    if not out["serve"]["model"]:
        if "register" in enabled:
            alias = c.register.promote_to or c.register.alias
            out["serve"]["model"] = f"registry:{c.register.name}@{alias}"
        else:
            out["serve"]["model"] = "export" if "export" in enabled and c.export.format != "gguf" else (
                "compress" if "compress" in enabled else model_default)
    return {st: {k: v for k, v in links.items() if v} for st, links in out.items() if st in enabled}


def _resolve(pipe: Pipeline) -> None:
    """Links, checks (a link to a missing stage or one that makes no model, a cycle) and the run order."""
    enabled = {name for name in ORDER if pipe.stage_cfg(name) is not None}
    if not enabled:
        raise HomeforgeError("the pipeline has no stages", where=str(pipe.path),
                             fix=f"add at least one of: {', '.join(ORDER)}")
    pipe.links = _default_links(pipe, enabled)
    deps: dict[str, set[str]] = {name: set() for name in enabled}
    problems = []
    for st, links in pipe.links.items():
        for fld in LINKS.get(st, ()):
            if fld not in links:
                what = "dataset" if fld == "data" else "model"
                problems.append(f"{st}.{fld}: no {what} to read: name a stage or an artifact path "
                                f"({pipe.where(st)})")
                continue
            ref = links[fld]
            if ref in ORDER:
                if ref not in enabled:
                    problems.append(f"{st}.{fld}: stage {ref!r} is not in this pipeline ({pipe.where(f'{st}.{fld}')})")
                elif fld == "data" and ref != "prepare" or fld == "model" and ref not in MODEL_STAGES:
                    problems.append(f"{st}.{fld}: stage {ref!r} does not make a "
                                    f"{'dataset' if fld == 'data' else 'model'} ({pipe.where(f'{st}.{fld}')})")
                elif ref == st:
                    problems.append(f"{st}.{fld}: a stage cannot read its own output ({pipe.where(f'{st}.{fld}')})")
                else:
                    deps[st].add(ref)
    if "eval" in enabled:  # a gate guards what comes after it
        for st in ("register", "serve"):
            if st in enabled:
                deps[st].add("eval")
    if "register" in enabled and "serve" in enabled:
        deps["serve"].add("register")
    if problems:
        raise ConfigError(problems, where=str(pipe.path))
    pipe.order = _toposort(pipe, deps)


def _toposort(pipe: Pipeline, deps: dict[str, set[str]]) -> list[str]:
    order: list[str] = []
    left = dict(deps)
    while left:
        ready = [s for s in ORDER if s in left and not (left[s] - set(order))]
        if not ready:
            cycle = " -> ".join(sorted(left))
            raise ConfigError([f"the stages {cycle} read each other's outputs (a cycle); "
                               f"see {', '.join(pipe.where(s) for s in sorted(left))}"], where=str(pipe.path))
        order.append(ready[0])
        del left[ready[0]]
    return order


def stage_config(pipe: Pipeline, name: str) -> Any:
    """The stage's config as its own command takes it (pipeline-only link fields removed)."""
    cfg = pipe.stage_cfg(name)
    base = {"eval": EvalConfig, "compress": CompressConfig, "export": ExportConfig, "serve": ServeConfig}.get(name)
    if base is None:
        return cfg
    drop = set(type(cfg).model_fields) - set(base.model_fields)
    try:
        return base.model_validate(cfg.model_dump(exclude=drop))
    except ValidationError as exc:  # cannot happen for a validated subclass; said plainly if it does
        raise ConfigError(format_validation_error(base, exc), where=pipe.where(name)) from None
