"""`homeforge quickstart`: the main job on a built-in default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, Overrides, app, console, load


@app.command()
def quickstart(
    ctx: typer.Context,
    overrides: Overrides = None,
    config: ConfigFile = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="upper bound on optimizer steps")] = None,
    minutes: Annotated[float | None, typer.Option(min=0.1, help="wall-clock cap on training, in minutes (default 20)")] = None,
    preset: Annotated[str | None, typer.Option(help="model preset: debug, tiny, small, 124m")] = None,
    force: Force = False,
) -> None:
    """Train a small model from text already on this machine, evaluate it and show samples.

    Builds a corpus from the docstrings of Python's standard library, trains a byte-level
    BPE tokenizer and a small Llama-architecture model on the CPU for a fixed number of
    tokens (train_tokens, 1.2M: about 5 minutes on 2 idle cores; --minutes caps the time),
    compares validation perplexity with a unigram baseline (and says so when it is worse)
    and saves a Hugging Face model directory.

    Examples:

        homeforge quickstart
        homeforge quickstart --minutes 10 --output runs/qs
        homeforge quickstart train_tokens=3000000        # a better model, about 12 minutes
        homeforge quickstart --preset debug --max-steps 50 train.seq_len=128
    """
    from homeforge import quickstart as qs
    from homeforge.config import QuickstartConfig

    cfg = load(ctx, QuickstartConfig, config, overrides, output_dir=output, train__max_steps=max_steps,
               train__max_minutes=minutes, train__model__preset=preset)
    qs.run(cfg, force=force, console=console)
