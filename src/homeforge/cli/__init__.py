"""The `homeforge` command: one thin function per command; the work lives in the library.

One module per command group (``quickstart``, ``data``, ``train``, ``evaluate``, ``export``,
``serve``, ``security``, ``tools``, ``pipeline``, ``registry``, ``ui``, ``continual``); each registers its commands on the shared ``app``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from homeforge import __version__
from homeforge.cli._common import app, console, err_console
from homeforge.errors import HomeforgeError


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"homeforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="print the version and exit")] = False,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="encrypt the data files this command writes "
                                          "(needs a data key: `homeforge keys init`)")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="experts: load artifacts without checking them "
                                            "against their manifests (recorded in the audit log)")] = False,
) -> None:
    """Set the offline switches and the egress guard before any command runs."""
    from homeforge import integrity, paths
    from homeforge.security import audit_command, egress

    if encrypt:
        from homeforge.security import keys

        keys.load_key(required=True)  # no key: fail now, before anything is written (in the clear or not)
    ctx.obj = {"encrypt": encrypt}
    integrity.set_verify(not no_verify, new_command=True)
    egress.set_offline_env()
    if not paths.network_allowed():
        egress.install(on_refuse=audit_command.egress_refused)


# the command groups register themselves on `app` when imported
from homeforge.cli import quickstart, data, train, evaluate, export, serve, tools, security, pipeline, registry, ui, continual  # noqa: E402,F401,I001


def main() -> None:
    from homeforge import scratch
    from homeforge.cli._common import PROMPT_FLAGS, SECRET_FLAGS
    from homeforge.security.audit_command import audited_command

    scratch.clean_leftovers()  # temp folders of homeforge processes that were killed (plaintext included)
    try:
        with audited_command(sys.argv[1:], SECRET_FLAGS, PROMPT_FLAGS):  # one audit line per command
            app()
    except HomeforgeError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: nothing half-written was kept")
        sys.exit(130)
