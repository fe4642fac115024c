"""Progress bars with an estimate of the time left, shared by every command."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console | None, transient: bool = False) -> Progress:
    """A bar per task: ``bar.add_task(description, total=N, info="")``; ``info`` is free text
    shown after the count (loss, tokens/s...). Silent when ``console`` is None or quiet."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=transient, disable=console is None or console.quiet)
