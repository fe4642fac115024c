"""`homeforge learn`, `homeforge monitor` and `homeforge ab report`: keep a served model learning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, Overrides, app, console, load


@app.command()
def learn(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="the champion: a model directory or a registry reference "
                                                "NAME[@ALIAS]", show_default=False)] = None,
    overrides: Overrides = None,
    config: ConfigFile = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="new data: a dataset from `homeforge prepare` "
                                              "(made with the champion's tokenizer)", show_default=False)] = None,
    docs: Annotated[list[Path] | None, typer.Option("--docs", help="new data: a folder of documents (prepared "
                                                    "here with the champion's tokenizer)", show_default=False)] = None,
    feedback: Annotated[Path | None, typer.Option("--feedback", help="new data: the feedback log of `homeforge "
                                                  "serve` (feedback.enabled=true)", show_default=False)] = None,
    old_data: Annotated[Path | None, typer.Option("--old-data", help="the champion's training dataset (default: "
                                                  "the one its manifest names)", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory (the candidate is "
                                                "OUTPUT/model)", show_default=False)] = None,
    lora: Annotated[bool, typer.Option("--lora", help="train LoRA adapters instead of every weight")] = False,
    force: Force = False,
) -> None:
    """Fine-tune the champion on new data without forgetting the old: experience replay + EWC.

    A share `replay.ratio` of every batch is replayed from the champion's own training data;
    with `ewc.lam > 0` moving a weight costs in proportion to its Fisher information on the
    old data (estimated here, or the one stored with the champion). The candidate
    (OUTPUT/model) records forgetting (old held-out perplexity after - before) and gain (new
    held-out perplexity before - after) and its own Fisher; it is registered with alias
    `candidate` when the champion came from the registry (or with `name=NAME`).

    Examples:

        homeforge learn docs@champion --docs new-notes/ --output runs/learn1 ewc.lam=200
        homeforge learn runs/train/model --data runs/data-b replay.ratio=0.5 ewc.lam=200 train.max_steps=300
        homeforge learn docs --feedback ~/.homeforge/feedback/feedback.log min_rating=4 --lora
    """
    from homeforge.continual.learn import learn as run_learn

    cfg = load(ctx, _schema(), config, overrides, model=model, data=str(data) if data else None,
               docs=[str(d) for d in docs] if docs else None, feedback=str(feedback) if feedback else None,
               old_data=str(old_data) if old_data else None, output_dir=str(output) if output else None,
               mode="lora" if lora else None)
    res = run_learn(cfg, force=force, console=console)
    console.print(f"candidate [bold]{res['model']}[/]: old held-out ppl {res['old_ppl_before']:.2f} -> "
                  f"{res['old_ppl_after']:.2f} (forgetting {res['forgetting']:+.2f}), new held-out ppl "
                  f"{res['new_ppl_before']:.2f} -> {res['new_ppl_after']:.2f} (gain {res['gain']:+.2f})"
                  + (f"; registered {res['registered']} version {res['version']} @{res['alias']}"
                     if res.get("registered") else ""), highlight=False)


def _schema():
    from homeforge.config import LearnConfig

    return LearnConfig


def _print_json(obj) -> None:
    console.print_json(json.dumps(obj))
