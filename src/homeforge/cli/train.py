"""`homeforge train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Overrides, app, console, err_console, load


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


@app.command()
def train(
    ctx: typer.Context,
    overrides: Overrides = None,
    config: ConfigFile = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="dataset directory (from `homeforge prepare`)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory (checkpoints, metrics, model/)")] = None,
    method: Annotated[str | None, typer.Option(help="pretrain, sft, lora or classify")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="continue a run: 'latest' or a checkpoint directory",
                                               show_default=False)] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="processes on this machine (launches torchrun)")] = 1,
    force: Annotated[bool, typer.Option("--force", help="delete the run directory's old checkpoints and start over")] = False,
) -> None:
    """Train a model (pretrain, SFT, LoRA, classifier) on a prepared dataset; stop and resume at any step.

    Writes checkpoints every `checkpoint.every` steps and at the best validation loss,
    metrics.jsonl, TensorBoard events (and MLflow with `tracking.mlflow=true`), loss.png
    and the final Hugging Face model in OUTPUT/model. `--nproc N` runs N processes with
    torchrun (DDP, or FSDP2 with `distributed.strategy=fsdp`); for several machines run
    `torchrun --nnodes ... -m homeforge train ...` yourself.

    Examples:

        homeforge train --data runs/data --output runs/pre model.preset=tiny max_steps=2000
        homeforge train --config examples/lora-smollm2.yaml --output runs/lora optim.lr=3e-4
        homeforge train --output runs/pre --resume latest
        homeforge train --config pre.yaml --nproc 2 distributed.strategy=fsdp
    """
    from homeforge.config import TrainConfig

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from homeforge.train.distributed import launch

        code = launch(nproc, _without_nproc(sys.argv[1:]))
        if code:
            err_console.print(f"[bold red]error:[/] torchrun exited with code {code} (see the messages above)")
        raise typer.Exit(code)
    base = None
    if resume is not None and config is None:  # continue with the checkpoint's own config (+ overrides)
        from homeforge.train.checkpoint import read_config, resolve_resume

        run_dir = output if output is not None else Path(TrainConfig().output_dir)
        base = read_config(resolve_resume(run_dir, resume))
    cfg = load(ctx, TrainConfig, config, overrides, base=base, data=data, output_dir=output, method=method)
    from homeforge.train.run import run

    run(cfg, resume=resume, force=force, console=console)
