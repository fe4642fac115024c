"""`homeforge run`: a whole pipeline from one file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import Overrides, app, console
from homeforge.errors import HomeforgeError
from homeforge.pipeline import spec  # registers the `run` schema for `homeforge config show run`


@app.command("run")
def run_pipeline(
    pipeline: Annotated[Path | None, typer.Argument(help="pipeline file (YAML)", show_default=False)] = None,
    overrides: Overrides = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="pipeline file (same as the argument)",
                                                show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run and why; run nothing")] = False,
    start: Annotated[str | None, typer.Option("--from", help="start at this stage (earlier ones must exist)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="stop after this stage")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="write a commented pipeline for this folder of "
                                              "documents (to --output, default pipeline.yaml)", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="with --init: the file to write")] = None,
    force: Annotated[bool, typer.Option("--force", help="with --init: replace an existing file")] = False,
) -> None:
    """Run a pipeline: prepare, train, eval, compress, export, register, serve, each skipped when up to date.

    Every stage is the command of the same name with the config in its section; the
    artifacts link them. A stage whose inputs and config are unchanged is skipped (its
    manifest says so); after Ctrl-C or a crash, run it again: finished stages are skipped
    and training continues from its last checkpoint. A failed eval gate stops the pipeline
    with the reason (exit code 3).

    Examples:

        homeforge run --init docs/                    # writes pipeline.yaml for the folder docs/
        homeforge run pipeline.yaml --dry-run         # what would run and why
        homeforge run pipeline.yaml
        homeforge run pipeline.yaml --until eval train.max_steps=800
        homeforge run --config examples/pipeline.yaml --from compress
    """
    from homeforge.pipeline import runner

    if init is not None:
        out = runner.init(init, output or Path("pipeline.yaml"), force=force)
        console.print(f"wrote {out}; next: `homeforge run {out} --dry-run`", highlight=False)
        return
    if pipeline is not None and "=" in str(pipeline) and not pipeline.exists():  # `run --config F key=value`
        overrides, pipeline = [str(pipeline), *(overrides or [])], None
    path = pipeline or config
    if path is None or (pipeline is not None and config is not None):
        raise HomeforgeError("give one pipeline file (as the argument or with --config)",
                             fix="e.g. `homeforge run pipeline.yaml`, or write one with `homeforge run --init DOCS`")
    pipe = spec.load(path, overrides)
    runner.run(pipe, start=start, until=until, dry_run=dry_run, console=console)
