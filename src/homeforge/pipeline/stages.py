"""Each pipeline stage: where its artifact goes, whether it is up to date, and running it.

Running a stage calls the library function its command calls (``data.prepare.run``,
``train.run.run``, ``evaluate.run.run``, ``compress.run.run``, ``export.run_export``,
``registry``, ``serve.app.serve``); whether it is up to date comes from the same plan
those functions make (``data.plan.dataset_plan``, ``model_up_to_date``, ``report_plan``,
``output_plan``, ``export_plan``): the artifacts' manifests are the only bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from homeforge import artifacts
from homeforge.errors import HomeforgeError
from homeforge.pipeline.spec import ORDER, Pipeline, stage_config

OUT_NAMES = {"prepare": "data", "train": "train", "eval": "eval", "compress": "compress", "export": "export"}


@dataclass
class Status:
    run: bool
    reason: str


class StageFailed(HomeforgeError):
    """A stage stopped the pipeline (its own error's exit code is kept)."""


# --------------------------------------------------------------------------- paths


def output(pipe: Pipeline, name: str) -> Path:
    """The stage's artifact directory (a train stage: its run directory)."""
    cfg = pipe.stage_cfg(name)
    if name in ("prepare", "train") and f"{name}.output_dir" in pipe.lines:
        return Path(cfg.output_dir).expanduser().absolute()
    return pipe.workdir / OUT_NAMES[name]


def artifact(pipe: Pipeline, name: str) -> Path:
    """The artifact another stage reads: the dataset, or the model directory."""
    return output(pipe, name) / "model" if name == "train" else output(pipe, name)


def ref_path(pipe: Pipeline, stage: str, fld: str) -> Path | str:
    """A link's target: a stage's artifact, a path, or a ``registry:`` reference (kept as it is)."""
    ref = pipe.links[stage][fld]
    if ref in ORDER:
        return artifact(pipe, ref)
    if ref.startswith("registry:"):
        return ref
    return Path(ref).expanduser().absolute()


def _existing(pipe: Pipeline, stage: str, fld: str) -> Path:
    p = ref_path(pipe, stage, fld)
    if isinstance(p, str):
        from homeforge.registry.store import Registry

        return Registry().resolve(p.removeprefix("registry:")).path
    if not p.exists():
        ref = pipe.links[stage][fld]
        if ref in ORDER:
            raise HomeforgeError(f"stage {stage} reads the {ref} stage's artifact {p}, which does not exist yet",
                                 where=pipe.where(f"{stage}.{fld}" if f"{stage}.{fld}" in pipe.lines else stage),
                                 fix=f"run the pipeline with the {ref} stage first (without --from)")
        raise HomeforgeError(f"{stage}.{fld}: {p} does not exist", where=pipe.where(f"{stage}.{fld}"),
                             fix="check the path, or name a stage of this pipeline")
    return p


def configs(pipe: Pipeline, name: str):
    """The stage's config with the pipeline's links filled in (what its command would have been given)."""
    cfg = stage_config(pipe, name)
    if name == "prepare":
        return cfg.model_copy(update={"output_dir": str(output(pipe, name))})
    if name == "train":
        data = ref_path(pipe, "train", "data")
        return cfg.model_copy(update={"output_dir": str(output(pipe, name)), "data": str(data)})
    return cfg


# --------------------------------------------------------------------------- up to date?


def _why(plan) -> str:
    found = artifacts.existing(plan.out)
    if found is None:
        return "no artifact yet"
    try:
        m = artifacts.read_manifest(plan.out, check=False)
    except HomeforgeError:
        return "its folder is not a complete artifact"
    if m.get("inputs") != plan.inputs:
        changed = sorted(k for k in set(m.get("inputs", {})) | set(plan.inputs)
                         if m.get("inputs", {}).get(k) != plan.inputs.get(k))
        return f"inputs changed ({', '.join(changed[:4])}{'...' if len(changed) > 4 else ''})"
    return "config changed"


def _plan_status(plan) -> Status:
    return Status(False, "up to date (same inputs and config)") if plan.up_to_date else Status(True, _why(plan))


def status(pipe: Pipeline, name: str) -> Status:
    """Would this stage run now (its upstream stages being as they are on disk), and why."""
    if name == "prepare":
        from homeforge.data.plan import dataset_plan

        return _plan_status(dataset_plan(configs(pipe, name)))
    if name == "train":
        from homeforge.train.run import model_up_to_date, resumable

        cfg = configs(pipe, name)
        _existing(pipe, "train", "data")
        if model_up_to_date(cfg):
            return Status(False, "up to date (same dataset and config)")
        ck = resumable(cfg)
        model = output(pipe, name) / "model"
        why = "no model yet"
        if model.exists():
            inputs = {"dataset": artifacts.hash_input(cfg.data)} if cfg.data else {}
            why = _why(artifacts.Plan(model, "train", {}, inputs, ""))
        return Status(True, why + (f"; resumes from checkpoint {ck.name}" if ck else ""))
    if name == "eval":
        from homeforge.evaluate.run import report_plan

        base = _baseline(pipe)
        return _plan_status(report_plan(_existing(pipe, name, "model"), _existing(pipe, name, "data"),
                                        configs(pipe, name), base, output(pipe, name)))
    if name == "compress":
        from homeforge.compress.run import output_plan

        return _plan_status(output_plan(_existing(pipe, name, "model"), _existing(pipe, name, "data"),
                                        configs(pipe, name), output(pipe, name)))
    if name == "export":
        from homeforge.export import export_plan

        return _plan_status(export_plan(_existing(pipe, name, "model"), output(pipe, name), configs(pipe, name)))
    if name == "register":
        from homeforge.registry.store import Registry

        reg_cfg = pipe.cfg.register
        model = _existing(pipe, name, "model")
        found = Registry().find(reg_cfg.name, artifacts.read_manifest(model)["content_hash"])
        if found is None:
            return Status(True, "this model is not in the registry yet")
        aliases = Registry().aliases_of(reg_cfg.name, found["version"])
        want = reg_cfg.promote_to or reg_cfg.alias
        if want not in aliases:
            return Status(True, f"registered as version {found['version']}, not yet @{want}")
        return Status(False, f"up to date (version {found['version']} is @{want})")
    return Status(True, "a server always starts")


def _baseline(pipe: Pipeline) -> Path | None:
    ref = pipe.cfg.eval.baseline
    if not ref:
        return None
    if ref.startswith("registry:"):
        from homeforge.registry.store import Registry

        return Registry().resolve(ref.removeprefix("registry:")).path
    p = Path(ref).expanduser().absolute()
    if not p.exists():
        raise HomeforgeError(f"eval.baseline: {p} does not exist", where=pipe.where("eval.baseline"),
                             fix="check the path, or use registry:NAME@champion")
    return p


# --------------------------------------------------------------------------- running


STAGE_NAMES = {"prepare": "prepare", "eval": "eval", "compress": "compress"}


@contextlib.contextmanager
def _replacing(out: Path, stage: str):
    """Let a stage replace its own out-of-date artifact in the workdir (its command would refuse one made from
    other inputs): it is moved aside (``.NAME.tmp-PID-stale``: removed after a crash by the next writer there),
    deleted when the new one is in place, put back if the stage wrote nothing. Anything else stays refused."""
    found = artifacts.existing(out)
    aside = None
    if found is not None and found[0] == "artifact":
        if artifacts.read_manifest(out, check=False).get("stage") == stage:
            aside = out.with_name(f".{out.name}.tmp-{os.getpid()}-stale")
            os.replace(out, aside)
    try:
        yield
    finally:
        if aside is not None:
            if out.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, out)


def run(pipe: Pipeline, name: str, console: Console) -> None:
    """Run one stage through its library function (each skips itself when up to date)."""
    cfg = configs(pipe, name)
    if name in ("prepare", "eval", "compress", "export"):
        stage = f"export-{cfg.format}" if name == "export" else STAGE_NAMES[name]
        with _replacing(output(pipe, name), stage):
            return _run(pipe, name, cfg, console)
    return _run(pipe, name, cfg, console)


def _run(pipe: Pipeline, name: str, cfg, console: Console) -> None:
    from homeforge.vision.task import (
        is_vision_model,  # image classifiers: their own eval and ONNX export
    )

    if name == "prepare":
        from homeforge.data.prepare import run as prepare

        if cfg.kind == "image-classification":
            from homeforge.vision.prepare import run as prepare
        prepare(cfg, console=console)
    elif name == "train":
        _train(pipe, cfg, console)
    elif name == "eval" and is_vision_model(_existing(pipe, name, "model")):
        from homeforge.vision.evaluate import run_eval

        run_eval(_existing(pipe, name, "model"), _existing(pipe, name, "data"), cfg.split, output(pipe, name), False,
                 console, cfg.gates.min_accuracy)
    elif name == "eval":
        from homeforge.evaluate.run import run as evaluate

        evaluate(_existing(pipe, name, "model"), _existing(pipe, name, "data"), cfg, _baseline(pipe),
                 output(pipe, name), False, console)
    elif name == "compress":
        from homeforge.compress.run import run as compress

        compress(_existing(pipe, name, "model"), _existing(pipe, name, "data"), cfg, output(pipe, name), False,
                 console)
    elif name == "export" and is_vision_model(_existing(pipe, name, "model")):
        from homeforge.vision.evaluate import run_export as export_image

        export_image(_existing(pipe, name, "model"), output(pipe, name), cfg.onnx.int8, False, console)
    elif name == "export":
        from homeforge.export import run_export

        run_export(_existing(pipe, name, "model"), output(pipe, name), cfg, console=console)
    elif name == "register":
        _register(pipe, console)
    elif name == "serve":
        _serve(pipe, console)


def _train(pipe: Pipeline, cfg, console: Console) -> None:
    from homeforge.train.run import model_up_to_date, resumable
    from homeforge.train.run import run as train

    if model_up_to_date(cfg):
        return
    ck = resumable(cfg)
    if ck is not None:
        console.print(f"resuming from checkpoint {ck}")
    # no matching checkpoint: this run directory is the pipeline's own; its old checkpoints are of another config
    train(cfg, resume=str(ck) if ck else None, force=ck is None, console=console)


def _register(pipe: Pipeline, console: Console) -> None:
    from homeforge.registry.store import Registry

    rc = pipe.cfg.register
    reg = Registry()
    model = _existing(pipe, "register", "model")
    eval_dir = output(pipe, "eval") if pipe.cfg.eval is not None else None
    version, created = reg.register(model, rc.name, eval_dir=eval_dir, alias=rc.alias)
    console.print(f"{'registered' if created else 'already registered:'} {rc.name} version {version['version']} "
                  f"(@{rc.alias})", highlight=False)
    if rc.promote_to:
        from homeforge.registry.store import GateRefused

        try:
            res = reg.promote(rc.name, rc.alias, rc.promote_to, rc.gates)
        except GateRefused as exc:  # a normal outcome: the candidate is kept, the current version stays
            stays = reg.index(rc.name)["aliases"].get(rc.promote_to)
            console.print(f"[yellow]not promoted[/]: {exc.what}; @{rc.promote_to} stays version {stays}",
                          highlight=False)
            return
        console.print(res["message"], highlight=False)


def _serve(pipe: Pipeline, console: Console) -> None:
    from homeforge.serve.app import serve

    cfg = configs(pipe, "serve")
    target = ref_path(pipe, "serve", "model")
    serve(cfg.model_copy(update={"model_dir": str(target)}), console=console)
