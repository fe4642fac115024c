"""`homeforge eval` and `homeforge compress`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, Overrides, app, console, load


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help="local model directory (causal LM or sequence classifier)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset artifact (made by `homeforge prepare`)")],
    overrides: Overrides = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", "-b", help="model to compare against (paired tests)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="report directory (default MODEL_DIR-eval)")] = None,
    split: Annotated[str | None, typer.Option(help="dataset split (default val)")] = None,
    config: ConfigFile = None,
    force: Force = False,
) -> None:
    """Evaluate a model on a dataset: perplexity, generation metrics and speed, or classifier metrics.

    Also robustness under seeded typos, paired significance tests against a baseline, and
    quality gates (exit code 3 when one fails); writes eval.json, eval.md and PNG plots.

    Examples:

        homeforge eval runs/qs/model --data runs/qs/data
        homeforge eval runs/sft/model --data data/sft --baseline runs/base/model gates.max_regression=0.02
        homeforge eval runs/cls/model --data data/tickets gates.min_accuracy=0.9 robustness.enabled=false
        homeforge eval runs/qs/model-int8-dynamic --data runs/qs/data gates.max_ppl=40
    """
    from homeforge.artifacts import read_manifest
    from homeforge.config import EvalConfig
    from homeforge.models.io import check_model_dir

    cfg = load(ctx, EvalConfig, config, overrides, split=split)
    from homeforge.vision.task import is_vision_model

    if is_vision_model(model_dir):  # image / image+text classifier
        from homeforge.vision.evaluate import run_eval

        read_manifest(data)
        if baseline is not None:
            from homeforge.errors import HomeforgeError

            raise HomeforgeError("--baseline (paired tests) is not supported for image classifiers yet",
                                 fix="evaluate each model on its own")
        run_eval(model_dir, data, cfg.split, output, force, console, cfg.gates.min_accuracy)
        return
    check_model_dir(model_dir)  # wrong paths are said before torch is imported
    read_manifest(data)
    from homeforge.evaluate.run import run

    run(model_dir, data, cfg, baseline, output, force, console)


@app.command()
def compress(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help="local model directory (causal LM or classifier)")],
    method: Annotated[str | None, typer.Option("--method", "-m", help="int8-dynamic, int8-block (llama.cpp's "
                                               "q8_0 arithmetic), int8-weight-only, int4-weight-only, qat, distill, "
                                               "prune")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="text dataset artifact for the quality gate "
                                              "(and training for qat/distill)")] = None,
    overrides: Overrides = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output model directory "
                                                "(default MODEL_DIR-METHOD)")] = None,
    config: ConfigFile = None,
    force: Annotated[bool, typer.Option("--force", help="write even if the quality gate fails; replace an "
                                        "existing output")] = False,
) -> None:
    """Compress a model into a new model directory: int8/int4 quantization, QAT, distillation or pruning.

    Prints a before/after table (size on disk, latency at batch 1 and 8, perplexity) and
    refuses to write a model that fails the quality gate unless --force.

    Examples:

        homeforge compress runs/qs/model --method int8-dynamic --data runs/qs/data
        homeforge compress runs/qs/model -m int8-block -d runs/qs/data
        homeforge compress runs/qs/model -m int4-weight-only -d runs/qs/data group_size=32 gates.max_ppl_increase=0.1
        homeforge compress runs/qs/model -m prune -d runs/qs/data prune.kind=structured prune.mlp_keep=0.5
        homeforge compress runs/qs/model -m distill -d runs/qs/data distill.student_preset=debug distill.steps=500
        homeforge compress runs/qs/model -m qat -d runs/qs/data qat.steps=100
    """
    from homeforge.artifacts import read_manifest
    from homeforge.config import CompressConfig
    from homeforge.models.io import check_model_dir

    cfg = load(ctx, CompressConfig, config, overrides, method=method)
    check_model_dir(model_dir)  # wrong paths are said before torch is imported
    if data is not None:
        read_manifest(data)
    from homeforge.compress.run import run

    run(model_dir, data, cfg, output, force, console)
