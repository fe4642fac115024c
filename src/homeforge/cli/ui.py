"""`homeforge ui`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import app, console


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="bind address (an address other than loopback needs API keys)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0 = any free port)")] = 8600,
    root: Annotated[Path, typer.Option(help="folder with the datasets, runs, evaluations and exports to show "
                                       "(searched 4 levels deep); runs started from the page go to ROOT/runs")] = Path("."),
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
    serve_url: Annotated[list[str] | None, typer.Option(help="a running `homeforge serve` (or other OpenAI-compatible "
                                                        "server) for the playground; repeat for several",
                                                        show_default=False)] = None,
    serve_key_env: Annotated[str | None, typer.Option(help="environment variable with the API key those servers "
                                                      "expect", show_default=False)] = None,
) -> None:
    """A local web dashboard: datasets, live runs, evaluations, the registry, a playground, the audit log.

    Log in with an API key (`homeforge keys add --role admin|operator|viewer`); without keys it
    only listens on loopback. Every asset is served from the package: it works air-gapped.

    Examples:

        homeforge ui --root homeforge-runs
        homeforge ui --root . --serve-url http://127.0.0.1:8000
        homeforge keys add --name me --role admin && homeforge ui --host 0.0.0.0
    """
    import os

    from homeforge.ui.server import run

    key = os.environ.get(serve_key_env) if serve_key_env else None
    run(root, host, port, keys_file, serve_url or [], key, console=console)
