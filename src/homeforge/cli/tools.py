"""`homeforge generate`, `homeforge doctor` and `homeforge config show`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homeforge import __version__
from homeforge.cli._common import app, config_app, console
from homeforge.errors import HomeforgeError


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="local model directory")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 50,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens (0 = off)")] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = False,
) -> None:
    """Generate text from a local model directory (greedy by default).

    Examples:

        homeforge generate homeforge-runs/quickstart/model --prompt "Return the number of"
        homeforge generate MODEL --prompt "Hello" --temperature 0.8 --top-p 0.95 --seed 1
    """
    from homeforge.models.io import check_model_dir, load_causal_lm

    check_model_dir(model_dir)  # a wrong path is said before torch is imported
    from homeforge.models.generate import generate_text

    model, tok = load_causal_lm(model_dir)
    for p in prompt:
        text = generate_text(model, tok, p, max_new_tokens, temperature, top_p, top_k, seed, chat=chat)
        console.print(f"[bold]{p}[/]{text}", highlight=False)


@app.command()
def doctor(
    path: Annotated[Path, typer.Option(help="where runs will be written (for the free-disk check)")] = Path("."),
) -> None:
    """Show what this machine is and can do: CPU, memory, GPU, versions, disk, network guard.

    Examples:

        homeforge doctor
        homeforge doctor --path /data/runs
    """
    from homeforge.doctor import checks

    table = Table(title=f"homeforge {__version__} doctor")
    for col in ("check", "value", "status", "fix"):
        table.add_column(col)
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    failed = False
    for name, value, status, fix in checks(str(path)):
        failed |= status == "fail"
        table.add_row(name, value, f"[{colours[status]}]{status}[/]", fix)
    console.print(table)
    if failed:
        raise typer.Exit(1)


@config_app.command("show")
def config_show(
    stage: Annotated[str | None, typer.Argument(help="stage name, e.g. quickstart, train (omit to list them)")] = None,
    yaml_out: Annotated[bool, typer.Option("--yaml", help="print the defaults as a YAML file to copy")] = False,
) -> None:
    """Print a stage's settings with defaults and descriptions.

    Examples:

        homeforge config show
        homeforge config show quickstart
        homeforge config show train --yaml > train.yaml
    """
    from homeforge.config import STAGES, describe, to_yaml

    if stage is None:
        table = Table(title="stages (`homeforge config show STAGE` for their settings)")
        table.add_column("stage")
        table.add_column("what it configures")
        for name, schema in sorted(STAGES.items()):
            table.add_row(name, (schema.__doc__ or "").strip().splitlines()[0])
        console.print(table)
        return
    if stage not in STAGES:
        raise HomeforgeError(f"unknown stage {stage!r}", fix=f"choose one of: {', '.join(sorted(STAGES))}")
    schema = STAGES[stage]
    if yaml_out:
        sys.stdout.write(to_yaml(schema()))
        return
    table = Table(title=f"{stage}: {(schema.__doc__ or '').strip().splitlines()[0]}")
    table.add_column("key")
    table.add_column("default")
    table.add_column("description")
    for key, default, desc in describe(schema):
        table.add_row(key, default, desc)
    console.print(table)
