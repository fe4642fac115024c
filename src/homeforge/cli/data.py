"""`homeforge prepare`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, app, console, load


def split_inputs(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are inputs (files, folders, globs) or KEY.SUB=VALUE overrides."""
    inputs, overrides = [], []
    for a in args:
        key = a.split("=", 1)[0]
        if "=" in a and not os.path.exists(a) and "/" not in key and "*" not in key:
            overrides.append(a)
        else:
            inputs.append(a)
    return inputs, overrides


@app.command()
def prepare(
    ctx: typer.Context,
    args: Annotated[
        list[str] | None,
        typer.Argument(help="input files, folders or globs, then optional KEY.SUB=VALUE config overrides", show_default=False),
    ] = None,
    config: ConfigFile = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="dataset artifact directory")] = None,
    kind: Annotated[str | None, typer.Option(help="dataset kind: text, chat, classification or image-classification")] = None,
    tokenizer_from: Annotated[Path | None, typer.Option("--tokenizer-from", help="use this model directory's tokenizer")] = None,
    check_only: Annotated[bool, typer.Option("--check-only", help="print the quality report; write no dataset")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad line or file (naming it)")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="worker processes (default: CPU cores)")] = None,
    force: Force = False,
) -> None:
    """Turn a folder of raw files into a clean, deduplicated, PII-scrubbed, tokenized dataset.

    Reads .txt .md .html .jsonl .json .csv .tsv .parquet .pdf .docx; cleans and filters
    the text, removes exact and near duplicates (MinHash LSH), replaces personal data
    (e-mail, phones, PRC IDs, bank cards, IPs, credentials in URLs, your own patterns
    and names), splits by content hash, trains a byte-level BPE (or uses a model's
    tokenizer) and writes token shards, the cleaned records and a quality report
    (report.md, report.json, PNG plots). Every dropped record is counted by reason.

    Examples:

        homeforge prepare docs/ -o data/docs
        homeforge prepare 'notes/**/*.md' reports.pdf --check-only
        homeforge prepare chats.jsonl --kind chat --tokenizer-from models/base -o data/sft
        homeforge prepare tickets.csv --kind classification fields.text=body fields.label=team -o data/tickets
        homeforge prepare docs/ -o data/docs pii.mode=pseudonym dedup.threshold=0.7 split.val=0.1
        homeforge prepare photos/ --kind image-classification image.size=96 -o data/photos
    """
    from homeforge.config import PrepareConfig
    from homeforge.data.prepare import run

    inputs, overrides = split_inputs(args or [])
    cfg = load(ctx, PrepareConfig, config, overrides, inputs=inputs or None, output_dir=output, kind=kind,
               tokenizer__from_dir=tokenizer_from, strict=strict or None, workers=workers)
    if cfg.kind == "image-classification":
        from homeforge.vision.prepare import run
    run(cfg, force=force, check_only=check_only, console=console)
